"""Threshold by tolerated worsening, TWT (thesis sec. 2.2.2, Fig. 2.3; LOBSTER).

After a round, a global magnitude threshold T is chosen so that pruning every remaining weight with |w| <= T
worsens the validation loss by at most a relative ``twt``: with L the current validation loss, the bound is
B = L * (1 + twt). T0 = mean over tensors of the mean non-zero |w|; if the loss pruned at T0 is within B the
search interval is [T0, max |w|], else [0, T0] (0 = prune nothing more, within B by definition). Bisection keeps
``lo`` within B and ``hi`` above it, and stops when hi - lo < ``eps`` * max |w| or |L(lo) - L(hi)| < ``loss_tol`` * B.
It returns ``lo``, the bound known to satisfy B (the LOBSTER code returns the midpoint, which may not).
The pruned model is then fine-tuned from its trained weights (``retrain=finetune`` by default, Fig. 2.2).
The validation split is held out from the train set before label noise (``dataset.val_fraction``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Callable

import torch
from torch import Tensor

from regstory.config import ConfigError
from regstory.options import Range, option
from regstory.pruning.base import PruningSweep

if TYPE_CHECKING:
    from regstory.loop import RunContext


def find_threshold(loss_at: Callable[[float], float], magnitudes: list[Tensor], twt: float, eps: float = 1e-3,
                   loss_tol: float = 0.05, max_steps: int = 60) -> tuple[float, int]:
    """Fig. 2.3 bisection. ``loss_at(T)`` = validation loss with weights |w| <= T pruned; ``magnitudes`` = |w| of
    the remaining weights, one tensor per layer. Returns (T, number of loss evaluations)."""
    nonzero = [m[m > 0] for m in magnitudes]
    nonzero = [m for m in nonzero if m.numel()]
    if not nonzero:
        return 0.0, 0
    bound = loss_at(0.0) * (1 + twt)
    t_max = max(float(m.max()) for m in nonzero)
    t0 = sum(float(m.mean()) for m in nonzero) / len(nonzero)
    evals = 2
    l0 = loss_at(t0)
    if l0 <= bound:
        lo, hi, l_lo = t0, t_max, l0
        l_hi = loss_at(hi)
        evals += 1
        if l_hi <= bound:
            return hi, evals
    else:
        lo, hi, l_lo, l_hi = 0.0, t0, bound / (1 + twt), l0
    for _ in range(max_steps):
        if hi - lo < eps * t_max or abs(l_hi - l_lo) < loss_tol * bound:
            break
        mid = (lo + hi) / 2
        l_mid = loss_at(mid)
        evals += 1
        if l_mid <= bound:
            lo, l_lo = mid, l_mid
        else:
            hi, l_hi = mid, l_mid
    return lo, evals


@option("method", "twt", overrides={"rounds": 10, "retrain": "finetune"})
class TWT(PruningSweep):
    """Options: ``twt``, ``eps``, ``loss_tol`` and :data:`regstory.pruning.base.PruningOptions`, with 10 rounds
    (each one costs a bisection of validation passes) and ``retrain=finetune``: the threshold is chosen on the
    trained weights and the pruned model is then fine-tuned from them (sec. 2.2.2, Fig. 2.2: train, prune,
    fine-tune); ``retrain=rewind`` (or any other mode) stays available."""

    def __init__(self, twt: Annotated[float, Range(gt=0)] = 0.05, eps: Annotated[float, Range(gt=0)] = 1e-3,
                 loss_tol: Annotated[float, Range(gt=0)] = 0.05, **common):
        super().__init__(**common)
        self.twt, self.eps, self.loss_tol = twt, eps, loss_tol
        self.last_threshold: float | None = None

    needs_validation = True

    def setup(self, ctx: "RunContext") -> None:
        if "val" not in ctx.loaders:
            raise ConfigError(f"{self.slot}: the TWT threshold measures the loss worsening on a validation split "
                              f"held out from the train set: set dataset.val_fraction > 0 (e.g. 0.1)")
        super().setup(ctx)

    @torch.no_grad()
    def prune(self, ctx: "RunContext") -> None:
        params, masks = self.masks.params, self.masks.masks
        saved = [p.detach().clone() for p in params]

        def loss_at(threshold: float) -> float:
            for p, w, m in zip(params, saved, masks):
                p.copy_(w * m * (w.abs() > threshold))
            return ctx.evaluate("val")["loss"]

        threshold, _ = find_threshold(loss_at, [w.abs() * m for w, m in zip(saved, masks)], self.twt, self.eps,
                                      self.loss_tol)
        for p, w in zip(params, saved):
            p.copy_(w)
        self.masks.set([m * (w.abs() > threshold) for w, m in zip(saved, masks)])
        self.masks.apply_to_weights()
        self.last_threshold = threshold

    def end_round(self, ctx: "RunContext") -> dict:
        record = super().end_round(ctx)
        if self.last_threshold is not None:
            record["twt_threshold"] = self.last_threshold
            self.last_threshold = None
        return record
