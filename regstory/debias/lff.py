"""Learning from Failure (Nam et al., NeurIPS 2020, Algorithm 1; authors' ``train.py``, ``module/loss.py``).

Two networks of the same architecture train side by side: a biased one f_B, trained with the generalised cross
entropy GCE(p, y) = (1 - p_y^q) / q (q = 0.7), which amplifies its reliance on easy (bias-aligned) samples, and the
debiased one f_D (the run's model), trained with CE re-weighted by the relative difficulty
W(x) = CE_B(x) / (CE_B(x) + CE_D(x)) (eq. 2), where each CE is a per-sample exponential moving average
(e <- 0.7 e + 0.3 l, first visit e = l) normalised by the largest EMA of the sample's class. W is a constant.
Bias-agnostic: no bias label is read.

f_B is owned by this plugin, with its own optimizer of the trainer's kind (zeroed and stepped here, right after the
run's backward). Deviation: GCE is the paper's value (1 - p^q)/q; the authors' code uses CE * q * p^q (p detached),
whose gradient is q times this one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor

from regstory.debias.base import DebiasPlugin
from regstory.options import Range, option

if TYPE_CHECKING:
    from regstory.loop import RunContext


def generalized_cross_entropy(logits: Tensor, y: Tensor, q: float) -> Tensor:
    """Per-sample GCE (Zhang & Sabuncu 2018; LfF eq. 1): (1 - p_y^q) / q."""
    p_y = F.softmax(logits.float(), dim=1).gather(1, y[:, None]).squeeze(1)
    return (1 - p_y.clamp(min=1e-12) ** q) / q


class LossEMA:
    """Per-sample exponential moving average of a loss (authors' ``util.EMA``): first visit e = l, then
    e <- alpha e + (1 - alpha) l."""

    def __init__(self, labels: Tensor, num_classes: int, alpha: float):
        self.labels, self.num_classes, self.alpha = labels, num_classes, alpha
        self.value = torch.zeros(len(labels), device=labels.device)
        self.seen = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)

    def update(self, index: Tensor, loss: Tensor) -> None:
        loss = loss.detach().float()
        old = self.value[index]
        self.value[index] = torch.where(self.seen[index], self.alpha * old + (1 - self.alpha) * loss, loss)
        self.seen[index] = True

    def class_normalised(self, index: Tensor) -> Tensor:
        """EMA of ``index`` divided by the largest EMA over all training samples of the same class."""
        class_max = torch.zeros(self.num_classes, device=self.value.device).scatter_reduce(
            0, self.labels, self.value, reduce="amax", include_self=True)
        return self.value[index] / class_max[self.labels[index]].clamp(min=1e-8)


def relative_difficulty(ema_biased: Tensor, ema_debiased: Tensor) -> Tensor:
    """LfF eq. 2: W = e_B / (e_B + e_D + 1e-8)."""
    return ema_biased / (ema_biased + ema_debiased + 1e-8)


@option("debias", "lff")
class LfF(DebiasPlugin):
    """Learning from Failure. Defaults q = 0.7 and EMA alpha = 0.7 (authors' code)."""

    uses_bias_labels = False  # bias-agnostic: trains with the bias labels removed from its batches

    def __init__(self, q: Annotated[float, Range(gt=0, le=1)] = 0.7, ema_alpha: Annotated[float, Range(ge=0, lt=1)] = 0.7,
                 **options):
        super().__init__(**options)
        self.q, self.ema_alpha = q, ema_alpha
        self._biased_loss: Tensor | None = None

    def setup(self, ctx: "RunContext") -> None:
        from regstory.loop import build_optimizer, build_scheduler

        super().setup(ctx)
        self.biased = instantiate(ctx.cfg.arch, input_shape=list(ctx.data.input_shape),
                                  num_classes=ctx.data.num_classes).to(ctx.device).train()  # ctx.evaluate restores it
        self.optimizer = build_optimizer(self.biased, ctx.cfg.trainer)
        self.scheduler = build_scheduler(self.optimizer, ctx.cfg.trainer)
        labels = ctx.loaders["train"].split.y
        self.ema_b = LossEMA(labels, ctx.data.num_classes, self.ema_alpha)
        self.ema_d = LossEMA(labels, ctx.data.num_classes, self.ema_alpha)

    def sample_weights(self, ctx, batch, out) -> Tensor:
        """LfF's relative difficulty W(x) = CE_B / (CE_B + CE_D) from the class-normalised loss EMAs (of the
        cross-entropy, whatever the training loss is), and one GCE loss of the biased model for ``after_backward``."""
        logits_b = self.biased(batch["x"])
        ce_b = F.cross_entropy(logits_b.float(), batch["y"], reduction="none")
        self.ema_b.update(batch["index"], ce_b)
        self.ema_d.update(batch["index"], out.per_sample_loss)
        weight = relative_difficulty(self.ema_b.class_normalised(batch["index"]),
                                     self.ema_d.class_normalised(batch["index"])).detach()
        self._biased_loss = generalized_cross_entropy(logits_b, batch["y"], self.q).mean()
        return weight

    def after_backward(self, ctx) -> None:
        """Update f_B on its GCE loss (its graph is separate from f_D's). Under fp16 the loss goes through the run's
        GradScaler like f_D's: scaled against underflow, and the step skipped when f_B's gradients overflow (the
        loop's ``scaler.update()`` after f_D's step then covers both optimizers)."""
        self.optimizer.zero_grad(set_to_none=True)
        scaler = ctx.scaler
        if scaler is None:
            self._biased_loss.backward()
            self.optimizer.step()
        else:
            scaler.scale(self._biased_loss).backward()
            scaler.step(self.optimizer)
        self._biased_loss = None

    def end_epoch(self, ctx) -> dict[str, Any]:
        self.scheduler.step()
        record = super().end_epoch(ctx)
        test = ctx.evaluate("test", model=self.biased)
        record["lff_biased_test_acc"] = test["acc"]
        return record

    def summary_keys(self) -> list[str]:
        return ["lff_biased_test_acc"]

    def state_dict(self) -> dict[str, Any]:
        return {"biased": self.biased.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": {k: (e.value.cpu(), e.seen.cpu()) for k, e in (("b", self.ema_b), ("d", self.ema_d))}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.biased.load_state_dict(state["biased"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for k, e in (("b", self.ema_b), ("d", self.ema_d)):
            value, seen = state["ema"][k]
            e.value, e.seen = value.to(e.value.device), seen.to(e.seen.device)
