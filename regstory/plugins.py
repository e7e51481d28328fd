"""The hook surface that pruning, debiasing and distillation methods plug into, and the rules they compose by.

The training loop (:mod:`regstory.loop`) calls these hooks at fixed points and knows no method by name.
A method subclasses :class:`Plugin`, overrides the hooks it needs, and is registered by its YAML file in a
config group (``conf/method/imp.yaml``: ``_target_: regstory.pruning.magnitude.IMP``). ``method=none`` and
``debias=none`` are this base class itself. Any number of plugins compose: the slots ``method``, ``debias`` and
``distill``, then every entry of ``plugins`` (``+method@plugins.second=imp``), called in that order.

Order of calls::

    setup(ctx)
    for round in range(num_rounds()):
        start_round(ctx)                      # e.g. rewind weights; optimizer is rebuilt before this
        for epoch in range(epochs):
            start_epoch(ctx)
            for batch in train:
                out = forward(batch)           # logits, features (if any plugin needs_features), per-sample CE
                loss = mean(w * l) + sum(extra_loss(...))     # l: sample_loss(...) or the CE; w: product of sample_weights(...)
                backward; after_backward(ctx); optimizer.step(); after_step(ctx)
            metrics |= evaluate val and test (skipped when a plugin ``evaluates`` them itself)
            metrics |= end_epoch(ctx)         # may end the round early (ctx.end_round_early)
        round_metrics = end_round(ctx)        # e.g. measure, then prune
    summary["plugins"][slot] = finalize(ctx)

Composition rules (owned by the engine, whatever the order of the plugins):

* **Pinned weights**: every mask a plugin returns from :meth:`Plugin.pinned_weights` is re-applied after each
  hook of every other plugin that may edit weights (set-up, rounds, epochs, resume, model surgery, and per step
  after a foreign ``after_step``), so a pruned weight stays zero whoever reset the weights.
* **Losses**: the per-sample loss is the cross-entropy unless one plugin replaces it (:meth:`Plugin.sample_loss`);
  the per-sample weights of every plugin (:meth:`Plugin.sample_weights`) multiply; the loss is the batch mean of
  weight * per-sample loss, plus every plugin's named :meth:`Plugin.extra_loss` terms.
* **Exclusive resources**: what a plugin owns alone (:meth:`Plugin.claims`, e.g. the per-sample loss or the
  training sampler) may be claimed by one plugin only; two claims, or plugins that disagree on the number of
  rounds, are refused at start-up in one line naming both.
* **Bias labels**: a bias-agnostic plugin (``uses_bias_labels = False``) gets the batches of its loss hooks without
  ``batch["bias"]``; the others get them whole.
* **Names**: each plugin has a ``slot`` (``method``, ``debias``, ``distill``, ``plugins.<key>``); its checkpoint
  state and its summary entries are stored under that name.
* **Model surgery**: a plugin that replaces the model calls ``ctx.replace_model(new_model, change)``; every plugin's
  :meth:`Plugin.model_replaced` then moves its own per-parameter state along ``change``
  (:class:`regstory.surgery.ModelChange`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from regstory.loop import RunContext
    from regstory.surgery import ModelChange


class CompositionError(ValueError):
    """Two plugins that cannot work together; the message names both."""


@dataclass
class StepOutput:
    """What the forward pass produced for one batch."""

    logits: Tensor
    per_sample_loss: Tensor  # cross-entropy per sample against batch["y"], reduction none
    features: Tensor | None = None  # bottleneck features, when a plugin sets needs_features
    #: the per-sample training loss (the CE, or a plugin's ``sample_loss``), set before ``sample_weights`` is called
    sample_loss: Tensor | None = None
    #: the step's recorded activations (``.pre[site]``, ``.post[site]``) when a plugin asks for them
    activations: Any = None


class Pinned(Protocol):
    """Weights held at zero (a :class:`regstory.pruning.masks.MaskSet`)."""

    def apply_to_weights(self) -> None: ...


class Plugin:
    """Base class of every method; every hook is a no-op. Subclasses override only what they need."""

    #: set True to receive bottleneck features in ``StepOutput.features``
    needs_features: bool = False
    #: set True when ``end_epoch`` itself reports ``{split}_loss`` and ``{split}_acc`` for the val and test splits
    #: every epoch: the loop then skips its own evaluation pass (one pass over each split instead of two)
    evaluates: bool = False
    #: True when the method needs a validation split held out from the train set (TWT, LOBSTER, SeReNe): a command
    #: line that sets no ``dataset.val_fraction`` then holds out 10% (:func:`regstory.preflight.with_validation_split`)
    needs_validation: bool = False
    #: the plugin's name in the run (its config slot); set by the engine
    slot: str = "plugin"
    #: the training step's activations this plugin reads (``out.activations`` in the loss hooks, ``ctx.activations``
    #: in ``after_backward``/``after_step``): "auto" (every activation module, per call site) or module names
    #: (their outputs), see :class:`regstory.activations.ActivationRecorder`; None: none
    activation_sites: str | list[str] | None = None
    #: True keeps the recorded activations in the autograd graph with ``.grad`` after backward (SeReNe)
    activation_grads: bool = False
    #: False for a bias-agnostic method (Table 3.2): the engine removes the bias labels (``batch["bias"]``) from the
    #: batches its loss hooks receive, so it trains without them (evaluation still measures the groups with them)
    uses_bias_labels: bool = True

    def setup(self, ctx: "RunContext") -> None:
        """Called once, after model, data and optimizer exist (and before a resumed state is loaded)."""

    def num_rounds(self) -> int:
        """How many training rounds the run has (iterative pruning: one per pruning step)."""
        return 1

    def claims(self) -> set[str]:
        """Resources this plugin needs to own alone (``sample_loss``: it replaces the per-sample loss;
        ``train_sampler``: it replaces the training loader's sampling). Two plugins claiming one are refused."""
        return {"sample_loss"} if overrides(self, "sample_loss") else set()

    def start_round(self, ctx: "RunContext") -> None:
        """Before a round's first epoch, after the optimizer was rebuilt (weights must be edited in place).
        Not called again when resuming mid-round."""

    def start_epoch(self, ctx: "RunContext") -> None:
        """Before each training epoch."""

    def sample_loss(self, ctx: "RunContext", batch: dict[str, Tensor], out: StepOutput) -> Tensor | None:
        """Replace the per-sample cross-entropy by another per-sample loss (distillation). None keeps it."""
        return None

    def sample_weights(self, ctx: "RunContext", batch: dict[str, Tensor], out: StepOutput) -> Tensor | float | None:
        """Per-sample weights of the loss (GroupDRO, LfF, re-weighting), shape (batch,) or a scalar; the weights of
        all plugins multiply. ``out.sample_loss`` holds the per-sample training loss. None: weight 1."""
        return None

    def extra_loss(self, ctx: "RunContext", batch: dict[str, Tensor], out: StepOutput) -> dict[str, Tensor]:
        """Named terms added to the loss (regularisers)."""
        return {}

    def after_backward(self, ctx: "RunContext") -> None:
        """Gradients exist, optimizer has not stepped: edit gradients here."""

    def after_step(self, ctx: "RunContext") -> None:
        """The optimizer has stepped: edit weights here (decay, re-apply masks)."""

    def end_epoch(self, ctx: "RunContext") -> dict[str, Any]:
        """After the epoch's evaluation; returned metrics are added to the epoch's record (``ctx.epoch_record``
        holds it so far: train metrics, and val/test ones on evaluated epochs). Set ``ctx.end_round_early = True``
        to make this the round's last epoch (a plateau): the engine then measures val and test, saves, and goes on
        to ``end_round``; a resumed run does not train the skipped epochs."""
        return {}

    def end_round(self, ctx: "RunContext") -> dict[str, Any]:
        """After a round's last epoch: measure the trained model, then prune / reallocate. Returns round metrics.
        Set ``ctx.stop_rounds = True`` to end the sweep early."""
        return {}

    def finalize(self, ctx: "RunContext") -> dict[str, Any]:
        """After the last round; returned entries go into ``summary.json`` (under ``plugins.<slot>``)."""
        return {}

    def pinned_weights(self) -> Pinned | None:
        """Weights this plugin holds at zero; the engine re-applies them after every other plugin's hooks."""
        return None

    def model_replaced(self, ctx: "RunContext", change: "ModelChange") -> None:
        """``ctx.model`` was replaced (model surgery): move per-parameter state (masks, snapshots) along ``change``.
        The optimizer and schedule have already been carried over by the engine."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this plugin (saved in every checkpoint, under its slot)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def overrides(plugin: Plugin, hook: str) -> bool:
    """True when ``plugin``'s class implements ``hook`` instead of inheriting :class:`Plugin`'s no-op."""
    return getattr(type(plugin), hook) is not getattr(Plugin, hook)


def check_composition(plugins: list[Plugin]) -> None:
    """Refuse, in one line naming both, plugins that claim the same resource or disagree on the number of rounds."""
    owner: dict[str, Plugin] = {}
    for p in plugins:
        for resource in sorted(p.claims()):
            if resource in owner:
                raise CompositionError(f"{describe(owner[resource])} and {describe(p)} both need to own the "
                                       f"{resource.replace('_', ' ')}: they cannot run together; drop one")
            owner[resource] = p
    counted = [p for p in plugins if p.num_rounds() != 1]
    for p in counted[1:]:
        if p.num_rounds() != counted[0].num_rounds():
            first = counted[0]
            raise CompositionError(f"{describe(first)} runs {first.num_rounds()} rounds and {describe(p)} "
                                   f"{p.num_rounds()}: they cannot run together unless the numbers of rounds agree")


def activation_recorder(plugins: list[Plugin], model: Any) -> Any:
    """One recorder for every plugin's ``activation_sites`` (their union; "auto" stands for every activation
    module), keeping the graph when any plugin wants ``activation_grads``; None when no plugin asks."""
    from regstory.activations import ActivationRecorder, activation_sites

    wanted = [p.activation_sites for p in plugins if p.activation_sites is not None]
    if not wanted:
        return None
    keep_graph = any(p.activation_grads for p in plugins)
    if all(w == "auto" for w in wanted):
        return ActivationRecorder(model, "auto", keep_graph=keep_graph)
    names: list[str] = []
    for w in wanted:
        for name in (activation_sites(model) if w == "auto" else w):
            if name not in names:
                names.append(name)
    return ActivationRecorder(model, names, keep_graph=keep_graph)


def describe(plugin: Plugin) -> str:
    """``slot (Class)``, as messages name a plugin."""
    return f"{plugin.slot} ({type(plugin).__name__})"


def edits_gradients_last(plugin: Plugin, ctx: "RunContext") -> bool:
    """True when nothing reads the gradients between ``plugin.after_backward`` and the optimizer step: it is the
    last plugin with that hook, and the trainer does not clip gradients (``trainer.grad_clip``). False for a
    context without plugins or trainer config (a plugin driven by hand, as in unit tests)."""
    trainer = getattr(getattr(ctx, "cfg", None), "trainer", None)
    editors = [p for p in getattr(ctx, "plugins", []) if overrides(p, "after_backward")]
    return trainer is not None and bool(editors) and editors[-1] is plugin and not trainer.grad_clip

