"""LearnedMixin + H (Clark, Yatskar & Zettlemoyer, EMNLP 2019, "Don't Take the Easy Way Out", sec. 3), as in
the ReBias repository (clovaai/rebias @79d1d1d, ``criterions/comparison_methods.py``: ``LearnedMixin``; README: the
bias-only model is trained first and then kept fixed, ``--n_g_pretrain_epochs 5 --n_g_update 0``).

A product of experts of the main model f and a fixed bias-only model with log-probabilities log b, mixed by a learned
gate g(x) >= 0 computed from f's own bottleneck features h:

    g(x) = softplus(w . h + c)                                    (the "learned mixin")
    L = CE(f(x) + g(x) log b, y) + w_H * H(softmax(g(x) log b))   (+H: the entropy penalty)

The entropy penalty keeps the gate from switching the bias expert off (g -> 0 makes softmax(g log b) uniform, of
maximal entropy). f's logits and log b enter the softmax up to per-sample constants, so f's raw logits serve for
log p (ReBias does the same). **At test time the main model alone is used.** The gate (a Linear on the bottleneck) is
owned by this plugin, trained by the loss above with an optimizer and lr schedule of the trainer's kind (ReBias adds
it to f's optimizer), checkpointed with the run; its gradient reaches f's encoder through h (not detached, as in
ReBias and the paper's code).

The bias-only model here reads the **bias label**: log b = log p(y | b), the class frequencies of each bias value in
the training split (floored at ``min_prob``). This is the maximum-likelihood bias-only model of a categorical bias,
what Clark et al.'s VQA-CP bias-only model is (the answer prior of each question type, from training counts); it is
fixed, like theirs and ReBias's pre-trained g. Because it is built from the bias labels, this LearnedMixin is **not
bias-agnostic** (``uses_bias_labels`` True).

What was followed and where code and paper differ:

* The paper's gate is softplus(w . h) without an offset; the authors' code (chrisc36/debias,
  ``clf_debias_loss_functions.py``) and ReBias use a Linear layer with a bias term: followed (``c`` above).
* ReBias's image adaptation uses as bias expert a separate small-receptive-field network (1x1 convolutions) trained
  5 epochs on the target and then frozen, and multiplies its raw logits by the gate; here the bias expert is the
  training-set p(y | b) of the given bias label (the limit that pre-training on the label alone converges to).
* The entropy weight: ReBias's default w_H = 0.36 (``LearnedMixin(w=0.36)``); Clark et al. tune it per task.
* The mixed CE replaces f's task cross-entropy per sample (:class:`regstory.debias.rubi.TaskLossPlugin`); the entropy
  penalty is a named extra term (``learned_mixin_entropy``).

The paper's full text was not available here; the formulas follow ReBias's code and methods-debias.md sec. 8.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regstory.debias.base import Weight
from regstory.debias.rubi import OwnedModule, TaskLossPlugin, follow_bottleneck
from regstory.options import Range, option
from regstory.utils import in_fp32

if TYPE_CHECKING:
    from regstory.loop import RunContext


def bias_log_prior(y: Tensor, bias: Tensor, num_classes: int, num_bias: int, min_prob: float = 1e-9) -> Tensor:
    """(num_bias, num_classes) table of log max(p(y | b), min_prob) from the counts of a labelled split; a bias value
    without samples gets the uniform distribution."""
    counts = torch.zeros(num_bias, num_classes, dtype=torch.float64, device=y.device)
    counts.index_put_((bias, y), torch.ones_like(y, dtype=torch.float64), accumulate=True)
    total = counts.sum(1, keepdim=True)
    prob = torch.where(total > 0, counts / total.clamp(min=1), torch.full_like(counts, 1.0 / num_classes))
    return prob.clamp(min=min_prob).log().float()


@in_fp32
def learned_mixin_terms(logits: Tensor, gate_logit: Tensor, bias_log_probs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample: CE(f + g log b, y) and H(softmax(g log b)), with g = softplus(gate_logit) (shape (B,) or (B, 1))."""
    gate = F.softplus(gate_logit.reshape(-1, 1))
    scaled = gate * bias_log_probs
    ce = F.cross_entropy(logits + scaled, y, reduction="none")
    log_p = F.log_softmax(scaled, dim=1)
    entropy = -(log_p.exp() * log_p).sum(1)
    return ce, entropy


@option("debias", "learned_mixin")
class LearnedMixin(TaskLossPlugin):
    """LearnedMixin + H with a bias-label bias expert (module docstring). ``entropy_weight``: w_H (ReBias's 0.36);
    ``min_prob``: floor of p(y | b) before the log (classes never seen with a bias value)."""

    uses_bias_labels = True  # the bias expert p(y | b) is built from the bias labels

    def __init__(self, entropy_weight: Weight = 0.36, min_prob: Annotated[float, Range(gt=0, lt=1)] = 1e-9,
                 **options):
        super().__init__(**options)
        self.entropy_weight, self.min_prob = entropy_weight, min_prob
        self._entropy: Tensor | None = None

    def setup(self, ctx: "RunContext") -> None:
        super().setup(ctx)
        train = ctx.data.train
        self.log_prior = bias_log_prior(train.y, train.extras["bias"], ctx.data.num_classes, self.num_bias,
                                        self.min_prob).to(ctx.device)
        self.gate = OwnedModule(nn.Linear(ctx.model.head.in_features, 1).to(ctx.device), ctx.cfg.trainer)
        self._gate_sum = torch.zeros((), device=ctx.device)
        self._gate_count = 0

    def task_cross_entropy(self, ctx, batch, out) -> Tensor:
        gate_logit = self.gate.module(out.features.flatten(1).float())
        ce, self._entropy = learned_mixin_terms(out.logits, gate_logit, self.log_prior[batch["bias"]], batch["y"])
        self._gate_sum += F.softplus(gate_logit.detach().float()).sum()
        self._gate_count += len(gate_logit)
        return ce

    def extra_loss(self, ctx, batch, out) -> dict[str, Tensor]:
        entropy, self._entropy = self._entropy, None
        if entropy is None:  # the task CE was not asked for (no sample_loss call): compute the penalty alone
            gate_logit = self.gate.module(out.features.flatten(1).float())
            _, entropy = learned_mixin_terms(out.logits, gate_logit, self.log_prior[batch["bias"]], batch["y"])
        return {"learned_mixin_entropy": self.entropy_weight * entropy.mean()}

    def after_backward(self, ctx) -> None:
        self.gate.step(ctx.scaler)

    def end_epoch(self, ctx) -> dict[str, Any]:
        self.gate.scheduler.step()
        record = super().end_epoch(ctx)
        record["learned_mixin_gate"] = (self._gate_sum / max(self._gate_count, 1)).item()  # mean g(x) of the epoch
        self._gate_sum.zero_()
        self._gate_count = 0
        return record

    def summary_keys(self) -> list[str]:
        return ["learned_mixin_gate"]

    def model_replaced(self, ctx, change) -> None:
        self.gate = follow_bottleneck(self.gate, ctx, change)

    def state_dict(self) -> dict[str, Any]:
        return {"gate": self.gate.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gate.load_state_dict(state["gate"])
