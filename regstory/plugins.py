"""The hook surface that pruning, debiasing and distillation methods plug into.

The training loop (:mod:`regstory.loop`) calls these hooks at fixed points and knows no method by name.
A method subclasses :class:`Plugin`, overrides the hooks it needs, and is registered by its YAML file in a
config group (``conf/method/imp.yaml``: ``_target_: regstory.pruning.magnitude.IMP``). ``method=none`` and
``debias=none`` are this base class itself. Several plugins (a pruning method, a debiaser, distillation)
compose: the loop calls each in turn.

Order of calls::

    setup(ctx)
    for round in range(num_rounds()):
        start_round(ctx)                      # e.g. rewind weights; optimizer is rebuilt after this
        for epoch in range(epochs):
            start_epoch(ctx)
            for batch in train:
                out = forward(batch)           # logits, features (if any plugin needs_features), per-sample CE
                loss = task_loss(...) or mean CE; loss += sum(extra_loss(...))
                backward; after_backward(ctx); optimizer.step(); after_step(ctx)
            metrics |= evaluate val and test (skipped when a plugin ``evaluates`` them itself)
            metrics |= end_epoch(ctx)
        round_metrics = end_round(ctx)        # e.g. measure, then prune
    summary |= finalize(ctx)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from torch import Tensor

if TYPE_CHECKING:
    from regstory.loop import RunContext


@dataclass
class StepOutput:
    """What the forward pass produced for one batch."""

    logits: Tensor
    per_sample_loss: Tensor  # cross-entropy per sample against batch["y"], reduction none
    features: Tensor | None = None  # bottleneck features, when a plugin sets needs_features


class Plugin:
    """Base class of every method; every hook is a no-op. Subclasses override only what they need."""

    #: set True to receive bottleneck features in ``StepOutput.features``
    needs_features: bool = False
    #: set True when ``end_epoch`` itself reports ``{split}_loss`` and ``{split}_acc`` for the val and test splits
    #: every epoch: the loop then skips its own evaluation pass (one pass over each split instead of two)
    evaluates: bool = False

    def setup(self, ctx: "RunContext") -> None:
        """Called once, after model, data and optimizer exist (and before a resumed state is loaded)."""

    def num_rounds(self) -> int:
        """How many training rounds the run has (iterative pruning: one per pruning step)."""
        return 1

    def start_round(self, ctx: "RunContext") -> None:
        """Before a round's first epoch, after the optimizer was rebuilt (weights must be edited in place).
        Not called again when resuming mid-round."""

    def start_epoch(self, ctx: "RunContext") -> None:
        """Before each training epoch."""

    def task_loss(self, ctx: "RunContext", batch: dict[str, Tensor], out: StepOutput) -> Tensor | None:
        """Replace the mean cross-entropy by another reduction (GroupDRO, LfF, distillation). None keeps it."""
        return None

    def extra_loss(self, ctx: "RunContext", batch: dict[str, Tensor], out: StepOutput) -> dict[str, Tensor]:
        """Named terms added to the loss (regularisers)."""
        return {}

    def after_backward(self, ctx: "RunContext") -> None:
        """Gradients exist, optimizer has not stepped: edit gradients here."""

    def after_step(self, ctx: "RunContext") -> None:
        """The optimizer has stepped: edit weights here (decay, re-apply masks)."""

    def end_epoch(self, ctx: "RunContext") -> dict[str, Any]:
        """After the epoch's evaluation; returned metrics are added to the epoch's record."""
        return {}

    def end_round(self, ctx: "RunContext") -> dict[str, Any]:
        """After a round's last epoch: measure the trained model, then prune / reallocate. Returns round metrics.
        Set ``ctx.stop_rounds = True`` to end the sweep early."""
        return {}

    def finalize(self, ctx: "RunContext") -> dict[str, Any]:
        """After the last round; returned entries go into ``summary.json``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this plugin (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def overrides(plugin: Plugin, hook: str) -> bool:
    """True when ``plugin``'s class implements ``hook`` instead of inheriting :class:`Plugin`'s no-op."""
    return getattr(type(plugin), hook) is not getattr(Plugin, hook)


def edits_gradients_last(plugin: Plugin, ctx: "RunContext") -> bool:
    """True when nothing reads the gradients between ``plugin.after_backward`` and the optimizer step: it is the
    last plugin with that hook, and the trainer does not clip gradients (``trainer.grad_clip``). False for a
    context without plugins or trainer config (a plugin driven by hand, as in unit tests)."""
    trainer = getattr(getattr(ctx, "cfg", None), "trainer", None)
    editors = [p for p in getattr(ctx, "plugins", []) if overrides(p, "after_backward")]
    return trainer is not None and bool(editors) and editors[-1] is plugin and not trainer.grad_clip


def with_options_of(base: type) -> Callable[[type], type]:
    """Class decorator for a subclass whose ``__init__`` takes ``(own options, **options)`` and hands ``options`` to
    ``base``: gives the class the full explicit signature (its own keywords, then ``base``'s), so config keys are
    checked (``regstory.config.check_targets``) against both, without repeating ``base``'s options."""
    def decorate(cls: type) -> type:
        own = [p for p in inspect.signature(cls.__init__).parameters.values()
               if p.name != "self" and p.kind is not p.VAR_KEYWORD]
        common = [p for p in inspect.signature(base.__init__).parameters.values() if p.name != "self"]
        cls.__signature__ = inspect.Signature([p.replace(kind=p.KEYWORD_ONLY) for p in own + common])
        return cls

    return decorate
