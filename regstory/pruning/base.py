"""The iterative pruning sweep shared by every pruning method (IMP, TWT, random, SNIP).

Round 0 trains the dense model; each later round trains the model at the next sparsity. ``rounds`` counts the
pruning steps, so a sweep has ``rounds + 1`` training rounds (round r of IMP has sparsity 1 - (1 - rate)^r).

Per round: ``start_round`` applies the retraining mode (``retrain``, He et al. CVPR 2022 / DSD^2):

- ``rewind``: weights (and buffers) rewound in place to their value at initialisation (``rewind_epoch=0``) or after
  epoch ``rewind_epoch`` of round 0 (lottery-ticket style; He et al. rewind to iteration 1000, here an epoch),
  then the full schedule;
- ``lr_rewind``: keep the trained weights, replay the full lr schedule (DSD^2);
- ``finetune``: keep the weights, train with a small constant lr ``finetune_lr``;
- ``scratch``: re-initialise (seeded by seed and round), then the full schedule.

``end_round`` measures the trained model (sparsity, activation entropy, memorisation of noisy labels), updates the
stop criterion and the best-validation model (``checkpoints/best.pt``), then prunes for the next round.
``finalize`` identifies the four SDD phases (:mod:`regstory.pruning.phases`) and writes them to ``summary.json``.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from regstory.checkpoint import save_checkpoint
from regstory.config import ConfigError
from regstory.data.device_loader import TensorLoader
from regstory.optim import masked_step_possible
from regstory.plugins import Plugin, edits_gradients_last, with_options_of
from regstory.pruning.entropy import entropy_summary, neuron_entropies
from regstory.pruning.masks import MaskSet, prunable_parameters
from regstory.pruning.phases import describe_phases
from regstory.pruning.stop import StopCriterion
from regstory.tracking import ROUNDS_FILE, read_jsonl

if TYPE_CHECKING:
    from regstory.loop import RunContext

RETRAIN_MODES = ("rewind", "lr_rewind", "finetune", "scratch")
BEST = "best.pt"


class PruningSweep(Plugin):
    """Masks, pinning, retraining modes, measurements, stop criterion and phases; subclasses choose what to prune
    by overriding :meth:`prune` (after a round) or :meth:`prune_before_training` (one-shot at init)."""

    def __init__(self, rounds: int = 30, retrain: str = "rewind", rewind_epoch: int = 0, finetune_lr: float = 0.001,
                 target_sparsity: float | None = None, first_layer: bool = True, last_layer: bool = True,
                 bias: bool = False, batchnorm: bool = False, entropy_samples: int | None = 1000,
                 entropy_zero_is_on: bool = False, measure_memorization: bool = True, stop: str = "none",
                 stop_average: str = "nonconstant", stop_patience: int = 2, stop_tolerance: float = 0.0,
                 stop_acc_drop: float = 0.01, stop_reference: str = "onset", phase_metric: str = "test_acc",
                 phase_tol: float = 0.01, remask_after_step: bool = False):
        if retrain not in RETRAIN_MODES:
            raise ConfigError(f"method.retrain='{retrain}' is unknown: use one of {', '.join(RETRAIN_MODES)}")
        if stop_average not in ("all", "nonconstant"):
            raise ConfigError(f"method.stop_average='{stop_average}' is unknown: use all or nonconstant")
        if rounds < 0:
            raise ConfigError(f"method.rounds={rounds} is invalid: must be an integer >= 0")
        if target_sparsity is not None and not 0 < target_sparsity < 1:
            raise ConfigError(f"method.target_sparsity={target_sparsity} is invalid: must be in (0, 1) or null")
        try:
            self.stop = StopCriterion(stop, stop_patience, stop_tolerance, stop_acc_drop, stop_reference)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.rounds, self.retrain, self.rewind_epoch, self.finetune_lr = rounds, retrain, rewind_epoch, finetune_lr
        self.target_sparsity = target_sparsity
        self.mask_options = dict(first_layer=first_layer, last_layer=last_layer, bias=bias, batchnorm=batchnorm)
        self.entropy_samples, self.entropy_zero_is_on = entropy_samples, entropy_zero_is_on
        self.measure_memorization = measure_memorization
        self.stop_average, self.phase_metric, self.phase_tol = stop_average, phase_metric, phase_tol
        self.remask_after_step = remask_after_step
        self.masks: MaskSet | None = None
        self.fuse_grad_masks = False  # hand the gradient masks to the optimizer's step (set in setup)
        self.measure_loaders: dict[str, TensorLoader | None] = {}  # fixed subsets, built at the first measurement
        self.rewind_state: dict[str, Tensor] | None = None
        self.best: dict[str, Any] = {}

    # -- set-up and state -----------------------------------------------------------------------------------------
    def setup(self, ctx: "RunContext") -> None:
        self.masks = MaskSet(prunable_parameters(ctx.model, **self.mask_options))
        if not self.masks.names:
            raise ConfigError("pruning: the model has no prunable conv/linear tensors with these method options")
        if self.retrain == "rewind" and self.rewind_epoch == 0:
            self.rewind_state = snapshot(ctx.model)
        if self.rewind_epoch >= ctx.epochs and self.retrain == "rewind":
            raise ConfigError(f"method.rewind_epoch={self.rewind_epoch} must be < trainer.epochs={ctx.epochs}")
        if self.stop.mode != "none" and "val" not in ctx.loaders:
            raise ConfigError(f"method.stop={self.stop.mode} judges accuracy on a clean validation split: "
                              f"set dataset.val_fraction > 0 (e.g. dataset.val_fraction=0.1)")
        self.fuse_grad_masks = edits_gradients_last(self, ctx)
        if self.fuse_grad_masks and ctx.cfg.trainer.optimizer == "sgd":
            masked_step_possible(self.masks.params)  # builds the kernel now (once per machine), not in an epoch

    def num_rounds(self) -> int:
        return self.rounds + 1

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks.state_dict(), "rewind_state": self.rewind_state,
                "stop": self.stop.state_dict(), "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state["masks"])
        self.rewind_state = state["rewind_state"]
        self.stop.load_state_dict(state["stop"])
        self.best = state["best"]
        self.masks.apply_to_weights()

    # -- pinning (every step) -------------------------------------------------------------------------------------
    def after_backward(self, ctx: "RunContext") -> None:
        """Zero the pruned weights' gradients; where nothing reads them before the step, as part of the step."""
        self.masks.zero_grads(ctx.optimizer if self.fuse_grad_masks else None)

    def after_step(self, ctx: "RunContext") -> None:
        """Re-mask the weights. With zeroed gradients and optimizer state SGD, Adam and AdamW leave pruned weights at
        exactly 0 anyway; this is the safety net for optimizers that do not (``remask_after_step=false`` skips it)."""
        if self.remask_after_step:
            self.masks.apply_to_weights()

    # -- rounds ---------------------------------------------------------------------------------------------------
    def start_round(self, ctx: "RunContext") -> None:
        if ctx.round > 0:
            self.apply_retrain_mode(ctx)
        self.prune_before_training(ctx)
        self.masks.apply_to_weights()
        self.masks.zero_optimizer_state(ctx.optimizer)

    def apply_retrain_mode(self, ctx: "RunContext") -> None:
        if self.retrain == "rewind":
            load_in_place(ctx.model, self.rewind_state)
        elif self.retrain == "finetune":
            ctx.rebuild_optimizer(lr=self.finetune_lr, schedule="constant")
        elif self.retrain == "scratch":
            reinitialise(ctx.model, seed=int(ctx.cfg.seed) * 1009 + ctx.round)
        # lr_rewind: keep the weights; fit() has already rebuilt the optimizer with the full schedule

    def end_epoch(self, ctx: "RunContext") -> dict[str, Any]:
        if ctx.round == 0 and self.retrain == "rewind" and self.rewind_epoch > 0 and ctx.epoch + 1 == self.rewind_epoch:
            self.rewind_state = snapshot(ctx.model)
        return {}

    def end_round(self, ctx: "RunContext") -> dict[str, Any]:
        alive, total = self.masks.counts()
        record: dict[str, Any] = {"sparsity": 1 - alive / total, "remaining_weights": alive}
        record.update(self.measure_entropy(ctx))
        if self.measure_memorization:
            if "noisy" not in self.measure_loaders:
                self.measure_loaders["noisy"] = noisy_samples_loader(ctx)
            record.update(memorization(ctx.model, self.measure_loaders["noisy"]))
        val_acc = ctx.history[-1].get("val_acc") if ctx.history else None
        self.keep_best(ctx, val_acc, record["sparsity"])
        entropy = record["entropy_mean" if self.stop_average == "all" else "entropy_mean_nonconstant"]
        if self.stop.update(entropy, val_acc):
            ctx.stop_rounds = True
            record["stopped"] = True
        if self.stop.onset is not None and self.stop.onset == len(self.stop.accs) - 1:
            record["entropy_onset"] = True
        if self.target_sparsity is not None and record["sparsity"] >= self.target_sparsity - 1.0 / total:
            ctx.stop_rounds = True
        if not ctx.stop_rounds and ctx.round + 1 < self.num_rounds():
            self.prune(ctx)
            self.masks.zero_optimizer_state(ctx.optimizer)
        return record

    def finalize(self, ctx: "RunContext") -> dict[str, Any]:
        rounds = read_jsonl(ctx.run_dir / ROUNDS_FILE)
        out: dict[str, Any] = {"final_sparsity": self.masks.sparsity()}
        curve = [(r["sparsity"], r[self.phase_metric]) for r in rounds if r.get(self.phase_metric) is not None]
        if curve:
            sparsity, acc = zip(*curve)
            out["sdd"] = {"metric": self.phase_metric, "tol": self.phase_tol, **describe_phases(sparsity, acc,
                                                                                                 self.phase_tol)}
        if self.best:
            out["best_val_model"] = self.best
        if self.stop.onset is not None:
            out["entropy_onset_round"] = self.stop.onset
        return out

    # -- what subclasses choose -----------------------------------------------------------------------------------
    def prune(self, ctx: "RunContext") -> None:
        """Prune the trained model for the next round (iterative methods)."""

    def prune_before_training(self, ctx: "RunContext") -> None:
        """Prune at the start of a round, after the retraining mode (one-shot-at-init methods)."""

    def next_sparsity(self, current: float, rate: float) -> float:
        """Remove ``rate`` of the remaining weights, capped at ``target_sparsity``."""
        nxt = 1 - (1 - current) * (1 - rate)
        return min(nxt, self.target_sparsity) if self.target_sparsity is not None else nxt

    # -- measurements ---------------------------------------------------------------------------------------------
    def measure_entropy(self, ctx: "RunContext") -> dict[str, float]:
        """Eq. 2.16-2.17 on a fixed, un-augmented subset of the train split (``entropy_samples``; null = all)."""
        if "entropy" not in self.measure_loaders:
            train = ctx.loaders["train"]
            n = len(train.split)
            chosen = torch.arange(n)
            if self.entropy_samples and self.entropy_samples < n:
                gen = torch.Generator().manual_seed(int(ctx.cfg.seed))
                chosen = torch.randperm(n, generator=gen)[: self.entropy_samples].sort().values
            self.measure_loaders["entropy"] = train.subset(chosen, int(ctx.cfg.trainer.eval_batch_size))
        return entropy_summary(neuron_entropies(ctx.model, self.measure_loaders["entropy"], self.entropy_zero_is_on))

    def keep_best(self, ctx: "RunContext", val_acc: float | None, sparsity: float) -> None:
        """Save the model with the best clean validation accuracy so far to ``checkpoints/best.pt``."""
        if val_acc is None or (self.best and val_acc <= self.best["val_acc"]):
            return
        self.best = {"round": ctx.round, "val_acc": val_acc, "sparsity": sparsity,
                     "test_acc": ctx.history[-1].get("test_acc")}
        if ctx.is_main_process:
            save_checkpoint(ctx.run_dir / "checkpoints" / BEST,
                            {"model": ctx.model.state_dict(), "masks": self.masks.state_dict(), **self.best})


def noisy_samples_loader(ctx: "RunContext") -> TensorLoader | None:
    """The train samples whose label was flipped by label noise (un-augmented); None when there are none."""
    train = ctx.loaders["train"]
    is_noisy = train.split.extras.get("is_noisy")
    if is_noisy is None or not bool(is_noisy.any()):
        return None
    return train.subset(torch.nonzero(is_noisy).flatten(), int(ctx.cfg.trainer.eval_batch_size))


@torch.no_grad()
def memorization(model: torch.nn.Module, noisy: TensorLoader | None) -> dict[str, float]:
    """On the noisy train samples: the fraction predicted as their (wrong) training label and as their true label
    (counted on the device, read once)."""
    if noisy is None:
        return {}
    was_training = model.training
    model.eval()
    hits = torch.zeros(2, dtype=torch.long, device=noisy.device)  # predicted as the noisy label, as the true one
    for batch in noisy:
        pred = model(batch["x"]).argmax(1)
        hits += torch.stack([(pred == batch["y"]).sum(), (pred == batch["true_y"]).sum()])
    model.train(was_training)
    fit_noisy, fit_true = (hits.double() / len(noisy.split)).tolist()
    return {"noisy_memorized": fit_noisy, "noisy_true_label_acc": fit_true}


def snapshot(model: torch.nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's state (weights and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def load_in_place(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` into the model's existing tensors (the optimizer holds these very Parameter objects)."""
    for name, tensor in model.state_dict().items():
        tensor.copy_(state[name])


@torch.no_grad()
def reinitialise(model: torch.nn.Module, seed: int) -> None:
    """Fresh initialisation in place (each module's ``reset_parameters``), seeded, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = copy.deepcopy(model)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    load_in_place(model, fresh.state_dict())


#: decorator of a pruning method taking ``(own options, **sweep options)``: see :func:`regstory.plugins.with_options_of`
with_sweep_options = with_options_of(PruningSweep)
