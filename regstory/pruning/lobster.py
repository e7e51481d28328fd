"""LOBSTER: loss-based sensitivity regularisation (thesis sec. 2.3.2, eq. 2.9-2.14), and the train / threshold /
repeat protocol it shares with SeReNe (:mod:`regstory.pruning.serene`).

The update (eq. 2.12, with Gamma(L, theta) = theta * P(dL/dtheta), P(x) = Heaviside(1 - |x|), eq. 2.13) expands to

    theta <- theta - eta * g - lambda * theta * max(0, 1 - |g|),     g = dL/dtheta (the raw mini-batch gradient),

because -lambda*Gamma + g*sign(g)*lambda*Gamma = -lambda*Gamma*(1 - |g|): the learning-rate correction of eq. 2.14
turns the Heaviside step of eq. 2.13 into the ramp max(0, 1 - |g|). The optimizer does the -eta*g part (with its
momentum / weight decay); :meth:`Lobster.after_step` applies the lambda term. Options where the thesis and the
authors' code differ (the defaults are marked):

- ``gate``: ``ramp`` (default; eq. 2.12 expanded, as above) or ``step``: lambda * theta * Heaviside(1 - |g|), the
  Gamma of eq. 2.13 alone, without the correction of eq. 2.14 (Heaviside(0) = 0: a gradient of exactly 1 gates off
  in both forms).
- ``decay_of``: ``stepped`` (default; the authors' code applies the term after the optimizer step, to the updated
  weights) or ``pre_step`` (eq. 2.12 literally: lambda * theta^t, the weights before the step; costs one copy of
  the decayed tensors per step).
- ``decay``: ``all`` (default; the authors' code: every weight and bias of conv/linear/normalisation layers) or
  ``prunable`` (only the tensors the masks cover, :data:`regstory.pruning.base.PruningOptions`).

The gradients read in ``after_step`` are the step's masked gradients (pruned entries are zero, and so are their
weights, so the decay leaves them at exactly zero).

Protocol (sec. 2.2.2, Fig. 2.2; :class:`SensitivityPruning`): each round trains ``trainer.epochs`` epochs with the
regulariser; at its end the epoch with the lowest validation loss is restored (``restore_best``; the authors'
loop restores its best snapshot once the loss has plateaued: the loop here gives each round a fixed epoch budget,
so the round's best epoch stands in for the plateau), then the performance check: the validation accuracy of the
dense round 0 is the reference, and a later round whose accuracy falls more than ``recover_tolerance`` below it
could not recover it: the sweep stops (``recovered_round`` in the summary names the last round that did; with
``revert_on_stop=true`` the model and masks go back to it, by default the last model is kept, and
``checkpoints/best.pt`` holds the best-validation one). Otherwise the TWT bisection of :mod:`regstory.pruning.twt` (Fig. 2.3) picks a
global threshold on |w| and the next round continues from the trained weights (``retrain=lr_rewind``).
``pinned`` says what then stays at zero: ``weights`` (default; every pruned weight, parameter pinning of sec.
2.2.2.1) or ``neurons`` (the authors' code: the thresholded weights are zeroed once and may grow back; only a neuron
whose incoming weights are all zero is pinned).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Optional, Sequence

import torch
from torch import Tensor, nn

from regstory.options import OneOf, Range, option
from regstory.pruning.base import load_in_place, snapshot
from regstory.pruning.masks import NORM_LAYERS, PRUNABLE_LAYERS
from regstory.pruning.twt import TWT

if TYPE_CHECKING:
    from regstory.loop import RunContext

Lambda = Annotated[float, Range(gt=0)]
TwtFraction = Annotated[float, Range(gt=0, lt=1)]
Tolerance = Annotated[float, Range(ge=0, le=1)]
Pinned = Annotated[str, OneOf("weights", "neurons")]
Patience = Annotated[Optional[int], Range(ge=1)]
PlateauTol = Annotated[float, Range(gt=-1)]
DecayOf = Annotated[str, OneOf("stepped", "pre_step")]


def insensitivity(grad: Tensor, gate: str = "ramp") -> Tensor:
    """The factor lambda is multiplied by in LOBSTER's decay: ``ramp`` max(0, 1 - |g|) (eq. 2.12 expanded with
    eq. 2.14), ``step`` Heaviside(1 - |g|) (eq. 2.13's P; Heaviside(0) = 0)."""
    if gate == "ramp":
        return (1 - grad.abs()).clamp_(min=0)
    if gate == "step":
        return (grad.abs() < 1).to(grad.dtype)
    raise ValueError(f"gate={gate!r}: use ramp or step")


@torch.no_grad()
def lobster_decay(params: Sequence[Tensor], grads: Sequence[Tensor | None], lmbda: float, gate: str = "ramp",
                  base: Sequence[Tensor] | None = None) -> None:
    """In place: theta -= lmbda * b * insensitivity(g) for each tensor (eq. 2.12-2.14), b = ``base`` (the weights
    before the step, ``decay_of=pre_step``) or theta itself (``stepped``). A tensor without a gradient (unused in the
    step) has g = 0 and is fully decayed, as the authors' code does with its zero-filled gradients."""
    for i, (p, g) in enumerate(zip(params, grads)):
        b = p if base is None else base[i]
        factor = torch.ones_like(p) if g is None else insensitivity(g.to(p.dtype), gate)
        p.sub_(lmbda * b * factor)


def regularised_parameters(model: nn.Module) -> list[nn.Parameter]:
    """``decay=all``: every weight and bias of the conv / linear / normalisation layers (the authors' code)."""
    out: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, PRUNABLE_LAYERS + NORM_LAYERS):
            out += [p for p in (getattr(module, "weight", None), getattr(module, "bias", None))
                    if isinstance(p, nn.Parameter) and p.requires_grad]
    return out


class SensitivityPruning(TWT):
    """The protocol shared by LOBSTER, SeReNe and ``twt_loop``: training until the validation loss plateaus (with the
    regulariser of a :class:`RegularisedPruning` subclass), the round's best epoch restored, the recovery check
    against round 0 (``recover_tolerance``), a TWT threshold, repeat (module docstring)."""

    def __init__(self, twt: TwtFraction = 0.05, pinned: Pinned = "weights", restore_best: bool = True,
                 recover_tolerance: Tolerance = 0.01, revert_on_stop: bool = False, patience: Patience = 5,
                 plateau_tol: PlateauTol = 0.01, **common):
        super().__init__(twt=twt, **common)
        self.pinned = pinned
        self.restore_best, self.recover_tolerance = restore_best, recover_tolerance
        self.revert_on_stop = revert_on_stop
        self.patience, self.plateau_tol = patience, plateau_tol
        self.bad_epochs = 0  # consecutive epochs that are not good (``end_epoch``)
        self.reference_acc: float | None = None  # round 0's validation accuracy
        self.dense_test_acc: float | None = None  # round 0's test accuracy (the restored epoch)
        self.last_good: dict[str, Any] | None = None  # weights + masks of the last round that recovered it
        self.best: dict[str, Any] | None = None  # the round's best epoch so far: val_loss, epoch, state

    # -- per epoch: the round's best epoch, and the plateau --------------------------------------------------------
    def start_round(self, ctx: "RunContext") -> None:
        super().start_round(ctx)
        self.best, self.bad_epochs = None, 0

    def epoch_val(self, ctx: "RunContext") -> dict[str, float]:
        """This epoch's validation metrics: the loop's when it measured them, else measured here."""
        record = ctx.epoch_record
        if "val_loss" in record:
            return {"val_loss": record["val_loss"], "val_acc": record.get("val_acc")}
        return {f"val_{k}": v for k, v in ctx.evaluate("val").items()}

    def end_epoch(self, ctx: "RunContext") -> dict[str, Any]:
        """Keep the round's lowest-validation-loss epoch (its weights when ``restore_best``) and count the epochs
        that are not good: an epoch is good when its loss is below ``(1 + plateau_tol)`` times the best before it
        (the authors' loop, ``plateau_tol`` 0.01). ``patience`` consecutive epochs that are not good end the round
        (the plateau); ``patience: null`` trains every round for ``trainer.epochs`` epochs."""
        out = super().end_epoch(ctx)
        val = self.epoch_val(ctx)
        out.update({k: v for k, v in val.items() if k not in ctx.epoch_record})
        loss = float(val["val_loss"])
        before = None if self.best is None else self.best["val_loss"]
        if before is None or loss < before:
            self.best = {"val_loss": loss, "epoch": ctx.epoch,
                         "state": snapshot(ctx.model) if self.restore_best else None}
        good = before is None or loss < before * (1 + self.plateau_tol)
        self.bad_epochs = 0 if good else self.bad_epochs + 1
        out["plateau_bad_epochs"] = self.bad_epochs
        if self.patience is not None and self.bad_epochs >= self.patience:
            ctx.end_round_early = True
        return out

    # -- per round ------------------------------------------------------------------------------------------------
    def end_round(self, ctx: "RunContext") -> dict[str, Any]:
        extra: dict[str, Any] = {"round_epochs": len(ctx.history)}
        if self.restore_best and self.best is not None and self.best["state"] is not None:
            load_in_place(ctx.model, self.best["state"])
            extra["restored_epoch"] = self.best["epoch"]
        self.best = None
        val = ctx.evaluate("val")
        extra.update(val_acc_kept=val["acc"], val_loss_kept=val["loss"])
        if "test" in ctx.loaders:  # the model the threshold is applied to (the round's record has the last epoch's)
            test = ctx.evaluate("test")
            extra.update(test_acc_kept=test["acc"], test_loss_kept=test["loss"])
            if ctx.round == 0:
                self.dense_test_acc = test["acc"]
        if ctx.round == 0 or self.reference_acc is None:
            self.reference_acc = val["acc"]
        if ctx.round > 0 and val["acc"] < self.reference_acc - self.recover_tolerance:
            ctx.stop_rounds = True
            extra["recovered"] = False
            if self.revert_on_stop and self.last_good is not None:
                load_in_place(ctx.model, self.last_good["model"])
                self.masks.load_state_dict(self.last_good["masks"])
                self.masks.apply_to_weights()
                extra["reverted_to_round"] = self.last_good["round"]
        else:
            extra["recovered"] = True
            self.last_good = {"round": ctx.round, "model": snapshot(ctx.model), "masks": self.masks.state_dict()}
        extra.update(self.structure(ctx))  # the model trained this round, before the next threshold
        record = super().end_round(ctx)
        record.update(extra)
        return record

    @torch.no_grad()
    def structure(self, ctx: "RunContext") -> dict[str, Any]:
        """Exact zeros among the prunable weights (``pinned=neurons`` pins fewer than are zero) and hidden neurons
        left (rows of conv/linear weights, the output layer excepted, with a non-zero incoming weight)."""
        zeros = sum(int((p == 0).sum()) for p in self.masks.params)
        total = sum(p.numel() for p in self.masks.params)
        layers = [m for m in ctx.model.modules() if isinstance(m, PRUNABLE_LAYERS)]
        hidden = layers[:-1] if len(layers) > 1 else layers
        alive = sum(int(m.weight.detach().flatten(1).ne(0).any(1).sum()) for m in hidden)
        return {"zero_fraction": zeros / max(total, 1), "neurons_left": alive,
                "neurons_total": sum(m.weight.shape[0] for m in hidden)}

    @torch.no_grad()
    def prune(self, ctx: "RunContext") -> None:
        """TWT threshold (Fig. 2.3); with ``pinned=neurons`` the thresholded weights are zeroed but only neurons
        whose incoming weights are all zero stay masked."""
        super().prune(ctx)
        if self.pinned == "neurons":
            rows = []
            for m in self.masks.masks:
                if m.dim() >= 2:
                    rows.append(m.flatten(1).any(1).to(m.dtype).view(-1, *[1] * (m.dim() - 1)).expand_as(m).clone())
                else:
                    rows.append(m.clone())
            self.masks.set(rows)

    def finalize(self, ctx: "RunContext") -> dict[str, Any]:
        out = super().finalize(ctx)
        out["pinned"] = self.pinned
        if "test" in ctx.loaders and self.dense_test_acc is not None:  # the sweep's result against its dense start
            final = ctx.evaluate("test")["acc"]
            out.update(test_acc_dense=self.dense_test_acc, test_acc_pruned=final,
                       test_acc_drop_pts=100 * (self.dense_test_acc - final))
        if self.last_good is not None:
            out["recovered_round"] = self.last_good["round"]
        out.update(self.structure(ctx))
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["sensitivity"] = {"reference_acc": self.reference_acc, "last_good": self.last_good,
                                "best": self.best, "bad_epochs": self.bad_epochs,
                                "dense_test_acc": self.dense_test_acc}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = state.get("sensitivity", {})
        self.reference_acc = mine.get("reference_acc")
        self.last_good, self.best = mine.get("last_good"), mine.get("best")
        self.bad_epochs = int(mine.get("bad_epochs", 0))
        self.dense_test_acc = mine.get("dense_test_acc")
        super().load_state_dict(state)



class RegularisedPruning(SensitivityPruning):
    """The protocol with a regulariser applied after each optimizer step (LOBSTER, SeReNe): ``lmbda`` > 0 and
    ``decay_of`` (``stepped``: the updated weights, the authors' code; ``pre_step``: the weights before the step)."""

    def __init__(self, lmbda: Lambda = 1e-4, decay_of: DecayOf = "stepped", **common):
        super().__init__(**common)
        self.lmbda, self.decay_of = lmbda, decay_of
        self.pre_step: list[Tensor] | None = None

    # -- per step -------------------------------------------------------------------------------------------------
    def decayed(self, ctx: "RunContext") -> list[Tensor]:
        """The tensors the regulariser updates (subclasses say)."""
        raise NotImplementedError

    def after_backward(self, ctx: "RunContext") -> None:
        super().after_backward(ctx)
        if self.decay_of == "pre_step":
            self.pre_step = [p.detach().clone() for p in self.decayed(ctx)]


@option("method", "lobster", overrides={"rounds": 30, "retrain": "lr_rewind"})
class Lobster(RegularisedPruning):
    """Options: ``lmbda`` (lambda > 0), ``gate`` ramp|step, ``decay`` all|prunable, ``decay_of``, ``pinned``,
    ``restore_best``, ``recover_tolerance``, ``twt`` in (0, 1), ``eps``, ``loss_tol`` and the shared pruning keys,
    with 30 rounds (the recovery check usually ends the sweep first) and ``retrain=lr_rewind`` (continue from the
    trained, thresholded weights)."""

    def __init__(self, gate: Annotated[str, OneOf("ramp", "step")] = "ramp",
                 decay: Annotated[str, OneOf("all", "prunable")] = "all", **common):
        super().__init__(**common)
        self.gate, self.decay = gate, decay
        self._decayed: tuple[nn.Module, list[Tensor]] | None = None

    def decayed(self, ctx: "RunContext") -> list[Tensor]:
        if self._decayed is None or self._decayed[0] is not ctx.model:  # recomputed after a model surgery
            params = self.masks.params if self.decay == "prunable" else regularised_parameters(ctx.model)
            self._decayed = (ctx.model, list(params))
        return self._decayed[1]

    def after_step(self, ctx: "RunContext") -> None:
        """Eq. 2.12-2.14: the lambda term, on the gradients of this step (masked: pruned entries stay zero)."""
        super().after_step(ctx)
        params = self.decayed(ctx)
        base = self.pre_step if self.decay_of == "pre_step" else None
        lobster_decay(params, [p.grad for p in params], self.lmbda, self.gate, base)
        self.pre_step = None


@option("method", "twt_loop", overrides={"rounds": 30, "retrain": "lr_rewind"})
class TwtLoop(SensitivityPruning):
    """LOBSTER and SeReNe's protocol with no regulariser (best epoch, plateau, recovery check, TWT threshold,
    repeat): the baseline that shows what the regulariser adds."""
