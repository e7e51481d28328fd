"""RUBi: Reducing Unimodal Biases (Cadene et al., NeurIPS 2019), as adapted to images in the ReBias repository
(clovaai/rebias @79d1d1d, ``criterions/comparison_methods.py``, ``trainer.py``; methods-debias.md sec. 8).

A bias-only branch produces bias logits g; its sigmoid masks the main model's logits during training, and the main
model f is trained through the masked logits:

    L = CE(f(x) * sigmoid(g), y) + w_q * CE(g, y)          (ReBias ``RUBi.forward``)

On samples the bias branch already explains (bias-aligned) the mask keeps f's logit of their class and shrinks the
others, so f's loss on them is small once that logit is positive; on bias-conflicting samples the mask shrinks the
target's logit and keeps the bias class's, and f receives the large gradients. **At test time the main model alone
is used** (its own logits; no mask).

The bias branch here reads the **bias label**: g = W onehot(b) + c,
a learned table of bias logits per bias value (RUBi's question-only classifier, with the bias attribute as the
"question"). It is owned by this plugin, trained by the loss above with an optimizer and lr schedule of the
trainer's kind (ReBias adds the head to f's optimizer), and checkpointed with the run. Because the branch is
trained from the bias labels, this RUBi is **not bias-agnostic** (``uses_bias_labels`` True).

What was followed and where code and paper differ:

* ReBias's image adaptation has no question encoder: the bias branch is a separate small-receptive-field network
  g (SimpleConvNet with 1x1 kernels) trained with its own CE on the *target*, whose features are cut from the graph
  (``grad_mul_const(g_feat, 0)``) and fed to a linear head ``fc``; the mask and the question-only loss both use
  ``fc``'s output, so ``fc`` is trained by both terms. Here the branch's input is the bias label instead of an image
  network's features (an architecture prior for the bias is not needed, the label is given); the loss and which
  parameters each term trains are ReBias's (the table plays ``fc``).
* The RUBi code (cdancette/rubi.bootstrap.pytorch @04743c7, ``rubi/models/networks/rubi.py``) puts by default a
  second classifier ``c_2`` (the paper's c'_q, option ``end_classif``) on the bias logits for the question-only
  loss; that loss reaches the mask's classifier ``c_1`` through ``c_2``. ReBias has no ``c_2``: the question-only
  loss is on the mask's own logits (the code's ``end_classif=False``); followed. Both stop the gradient at the bias
  encoder's features (``grad_mul_const(., 0)``); here the branch's input, the one-hot bias label, has no encoder.
* RUBi/ReBias optimise the fused loss *instead of* f's own CE; so does this plugin: the fused CE replaces the task
  cross-entropy per sample (:class:`TaskLossPlugin`), and ``w_q`` * CE(g, y) is a named extra term (``rubi_bias``).

Defaults: ``question_loss_weight`` w_q = 1 (ReBias and the RUBi code). The paper's full text was not available
here (its abstract and project page: a question-only branch predicts a 0-1 mask on the model's logits); the
formulas follow the two codes above and methods-debias.md sec. 8.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regstory.config import ConfigError
from regstory.debias.base import DebiasPlugin, Weight
from regstory.options import Range, option
from regstory.plugins import describe
from regstory.utils import in_fp32

if TYPE_CHECKING:
    from regstory.loop import RunContext

@in_fp32
def rubi_fused_logits(logits: Tensor, bias_logits: Tensor) -> Tensor:
    """RUBi's masked logits f(x) * sigmoid(g) (ReBias ``logits_rubi``, RUBi code ``fusion_pred``), in fp32."""
    return logits * torch.sigmoid(bias_logits)


@in_fp32
def rubi_loss(logits: Tensor, bias_logits: Tensor, y: Tensor, question_loss_weight: float = 1.0) -> Tensor:
    """The whole RUBi objective of ReBias's ``RUBi.forward``: CE(f * sigmoid(g), y) + w_q CE(g, y) (batch means)."""
    return (F.cross_entropy(rubi_fused_logits(logits, bias_logits), y)
            + question_loss_weight * F.cross_entropy(bias_logits, y))


class OwnedModule:
    """Parameters a plugin owns beside the model (a head, a gate, a table), trained by the run's own loss: its
    backward fills their gradients, :meth:`step` (from ``after_backward``) applies them with an optimizer and lr
    schedule of the trainer's kind (``trainer.optimizer``, ``lr``, ``weight_decay``, ``schedule``), as ReBias adds
    such heads to f's optimizer; ``lr`` overrides the trainer's. Under fp16 the step goes through the run's
    GradScaler (unscaled, skipped on inf)."""

    def __init__(self, module: nn.Module, trainer, lr: float | None = None):
        from regstory.loop import build_optimizer, build_scheduler

        self.module = module
        self.optimizer = build_optimizer(module, trainer, lr)
        self.scheduler = build_scheduler(self.optimizer, trainer)

    def step(self, scaler=None) -> None:
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def follow_bottleneck(owned: OwnedModule, ctx: "RunContext", change) -> OwnedModule:
    """An owned Linear on the bottleneck after a model surgery: when the model's head now reads fewer features, keep
    the columns of the features that survive (``change.sources["head.weight"]``), with a fresh optimizer whose lr
    schedule stands where the old one stood. Unchanged otherwise."""
    linear, width = owned.module, ctx.model.head.in_features
    if linear.in_features == width:
        return owned
    index = change.sources.get("head.weight", (None, ()))[1]
    kept = index[1] if len(index) > 1 else None
    if kept is None or len(kept) != width:
        raise ValueError(f"the bottleneck changed from {linear.in_features} to {width} features and the surgery does "
                         f"not say which survive: a head on it cannot follow")
    new = nn.Linear(width, linear.out_features).to(linear.weight.device)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, kept.to(linear.weight.device)])
        new.bias.copy_(linear.bias)
    moved = OwnedModule(new, ctx.cfg.trainer)
    moved.scheduler.load_state_dict(owned.scheduler.state_dict())
    for group, old in zip(moved.optimizer.param_groups, owned.optimizer.param_groups):
        group["lr"] = old["lr"]
    return moved


class TaskLossPlugin(DebiasPlugin):
    """Base of the methods that train the model through other logits than its own: RUBi's masked logits,
    LearnedMixin's product of experts, DI's head of the sample's bias value, BiasBal's shifted logits.

    :meth:`task_cross_entropy` gives the per-sample cross-entropy of those logits; it replaces the task
    cross-entropy of the step (``out.per_sample_loss``) through the ``sample_loss`` hook. It does not claim the
    per-sample loss: a plugin that owns it (distillation) builds on the task cross-entropy it finds in
    ``out.per_sample_loss``, so KD + RUBi trains on a T^2 KL(teacher || f) + (1 - a) CE(f * sigmoid(g), y). Such an
    owner must come after this plugin (the ``distill`` slot always does), else the run is refused at set-up. Two
    methods that each replace the task cross-entropy claim the same resource and are refused at start-up.
    Sample weights of other plugins (Group DRO) apply to the replaced loss.
    """

    def claims(self) -> set[str]:
        return (super().claims() - {"sample_loss"}) | {"task_cross_entropy"}

    def setup(self, ctx: "RunContext") -> None:
        super().setup(ctx)
        plugins = list(getattr(ctx, "plugins", []))
        before = plugins[:plugins.index(self)] if self in plugins else []
        owner = next((p for p in before if "sample_loss" in p.claims()), None)
        if owner is not None:
            raise ConfigError(f"{describe(owner)} owns the per-sample loss and comes before {describe(self)}, which "
                              f"replaces the task cross-entropy that loss is built on: put {self.slot} first")

    def task_cross_entropy(self, ctx: "RunContext", batch: dict[str, Tensor], out) -> Tensor | None:
        """The per-sample training cross-entropy of the method's logits; None keeps the model's own."""
        return None

    def sample_loss(self, ctx, batch, out) -> Tensor | None:
        ce = self.task_cross_entropy(ctx, batch, out)
        if ce is not None:
            out.per_sample_loss = ce
        return ce


def bias_onehot(bias: Tensor, num_bias: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return F.one_hot(bias, num_bias).to(dtype)


@option("debias", "rubi")
class RUBi(TaskLossPlugin):
    """RUBi with a bias-label branch (module docstring). ``question_loss_weight``: w_q, the weight of CE(g, y)
    (ReBias's ``question_loss_weight``, default 1). ``branch_lr``: the branch's learning rate (null: the trainer's,
    as ReBias, whose head shares f's optimizer); a table on a one-hot input moves one row per sample, far slower than
    a head on dense features, so a short run may need a larger one."""

    uses_bias_labels = True  # its bias-only branch reads the bias label (module docstring)

    def __init__(self, question_loss_weight: Weight = 1.0, branch_lr: Annotated[float | None, Range(gt=0)] = None,
                 **options):
        super().__init__(**options)
        self.question_loss_weight, self.branch_lr = question_loss_weight, branch_lr
        self._bias_logits: Tensor | None = None

    def setup(self, ctx: "RunContext") -> None:
        super().setup(ctx)
        self.branch = OwnedModule(nn.Linear(self.num_bias, ctx.data.num_classes).to(ctx.device), ctx.cfg.trainer,
                                  self.branch_lr)

    def bias_logits(self, bias: Tensor) -> Tensor:
        """g = W onehot(b) + c: the bias-only branch's logits (fp32)."""
        linear = self.branch.module
        return linear(bias_onehot(bias, self.num_bias, linear.weight.dtype))

    def task_cross_entropy(self, ctx, batch, out) -> Tensor:
        """CE(f(x) * sigmoid(g(b)), y) per sample; g(b) is kept for the question-only term."""
        self._bias_logits = self.bias_logits(batch["bias"]).float()
        fused = rubi_fused_logits(out.logits, self._bias_logits)
        return F.cross_entropy(fused, batch["y"], reduction="none")

    def extra_loss(self, ctx, batch, out) -> dict[str, Tensor]:
        """w_q * CE(g, y): trains the branch to predict the target from the bias alone (ReBias's question loss)."""
        g = self._bias_logits if self._bias_logits is not None else self.bias_logits(batch["bias"]).float()
        self._bias_logits = None
        return {"rubi_bias": self.question_loss_weight * F.cross_entropy(g, batch["y"])}

    def after_backward(self, ctx) -> None:
        self.branch.step(ctx.scaler)

    def end_epoch(self, ctx) -> dict[str, Any]:
        self.branch.scheduler.step()
        record = super().end_epoch(ctx)
        record["rubi_bias_train_acc"] = self.branch_accuracy(ctx)
        return record

    @torch.no_grad()
    def branch_accuracy(self, ctx) -> float:
        """How well the bias-only branch predicts the target on the training split (1 = the bias explains y)."""
        split = ctx.loaders["train"].split
        pred = self.bias_logits(split.extras["bias"].to(ctx.device)).argmax(1)
        return (pred == split.y.to(ctx.device)).float().mean().item()

    def summary_keys(self) -> list[str]:
        return ["rubi_bias_train_acc"]

    def state_dict(self) -> dict[str, Any]:
        return {"branch": self.branch.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.branch.load_state_dict(state["branch"])
