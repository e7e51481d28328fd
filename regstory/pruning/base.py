"""The masked-method core shared by every pruning method (IMP, TWT, random, SNIP).

Round 0 trains the dense model; each later round trains the model at the next sparsity. ``rounds`` counts the
pruning steps, so a sweep has ``rounds + 1`` training rounds (round r of IMP has sparsity 1 - (1 - rate)^r).

Per round: ``start_round`` applies the retraining mode (``retrain``, He et al. CVPR 2022 / DSD^2):

- ``rewind``: weights (and buffers) rewound in place to their value at initialisation (``rewind_epoch=0``), then
  the full schedule; or (``rewind_epoch=k``) to their value after epoch k of round 0, then the rest of the schedule
  from there: epochs k..E-1 with the lr schedule positioned at epoch k (``ctx.first_epoch``), the lottery-ticket
  protocol with late rewinding (Frankle et al.; OpenLTH resumes at the rewind iteration; He et al. rewind to
  iteration 1000, here an epoch);
- ``lr_rewind``: keep the trained weights, replay the full lr schedule (DSD^2);
- ``finetune``: keep the weights, train with a small constant lr ``finetune_lr``;
- ``scratch``: re-initialise with the architecture's own initialisation (a fresh model built from the run's
  ``arch``, seeded by seed and round), then the full schedule.

``end_round`` records the sparsity, runs the optional measurements (:mod:`regstory.pruning.measures`: activation
entropy, memorisation of noisy labels, best-validation model, stop rule), then prunes for the next round;
``finalize`` adds their summaries (SDD phases...). A new method subclasses :class:`PruningSweep`, takes
``(own options, **common)`` and is registered with :func:`regstory.options.option`: it inherits every key of
:data:`PruningOptions`.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Annotated, Any, Callable

import torch
from torch import Tensor

from regstory.optim import masked_step_possible
from regstory.options import OneOf, Range, schema_of
from regstory.plugins import Plugin, edits_gradients_last
from regstory.pruning.masks import MaskSet, prunable_parameters
from regstory.pruning.measures import (ActivationEntropy, BestValModel, Footprint, Measurement, Memorization,
                                       SDDPhases, StopRule, rounds_of)
from regstory.pruning.stop import MODES as STOP_MODES, StopCriterion
from regstory.surgery import ModelChange
from regstory.config import ConfigError

if TYPE_CHECKING:
    from regstory.loop import RunContext

RETRAIN_MODES = ("rewind", "lr_rewind", "finetune", "scratch")
Count = Annotated[int, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]


class PruningSweep(Plugin):
    """Masks, pinning, rounds and retraining modes, plus the measurements its options switch on; subclasses choose
    what to prune by overriding :meth:`prune` (after a round) or :meth:`prune_before_training` (one-shot at init)."""

    def __init__(self, rounds: Count = 30, retrain: Annotated[str, OneOf(*RETRAIN_MODES)] = "rewind",
                 rewind_epoch: Count = 0, finetune_lr: Annotated[float, Range(gt=0)] = 0.001,
                 target_sparsity: Annotated[float | None, Range(gt=0, lt=1)] = None, first_layer: bool = True,
                 last_layer: bool = True, bias: bool = False, batchnorm: bool = False,
                 entropy_samples: Annotated[int | None, Range(ge=1)] = 1000, entropy_zero_is_on: bool = False,
                 measure_memorization: bool = True, stop: Annotated[str, OneOf(*STOP_MODES)] = "none",
                 stop_average: Annotated[str, OneOf("all", "nonconstant")] = "nonconstant",
                 stop_patience: Annotated[int, Range(ge=1)] = 2, stop_tolerance: Annotated[float, Range(ge=0)] = 0.0,
                 stop_acc_drop: Fraction = 0.01, stop_reference: Annotated[str, OneOf("onset", "best")] = "onset",
                 phase_metric: str = "auto", phase_tol: Fraction = 0.01, remask_after_step: bool = False,
                 footprint: Annotated[str, OneOf("none", "final", "rounds")] = "rounds",
                 footprint_codec: Annotated[str, OneOf("auto", "lzma", "nncodec")] = "auto",
                 latency_repeats: Annotated[int, Range(ge=1)] = 20, latency_threads: Annotated[int, Range(ge=1)] = 1):
        self.rounds, self.retrain, self.rewind_epoch, self.finetune_lr = rounds, retrain, rewind_epoch, finetune_lr
        self.target_sparsity = target_sparsity
        self.mask_options = dict(first_layer=first_layer, last_layer=last_layer, bias=bias, batchnorm=batchnorm)
        self.remask_after_step = remask_after_step
        self.entropy = ActivationEntropy(entropy_samples, entropy_zero_is_on)
        self.stop = StopCriterion(stop, stop_patience, stop_tolerance, stop_acc_drop, stop_reference)
        self.measures: list[Measurement] = [self.entropy, *([Memorization()] if measure_memorization else []),
                                            SDDPhases(phase_metric, phase_tol), BestValModel(),
                                            StopRule(self.stop, stop_average),
                                            *([Footprint(footprint, footprint_codec, latency_repeats, latency_threads)]
                                              if footprint != "none" else [])]
        self.masks: MaskSet | None = None
        self.fuse_grad_masks = False  # hand the gradient masks to the optimizer's step (set in setup)
        self.rewind_state: dict[str, Tensor] | None = None

    # -- set-up and state -----------------------------------------------------------------------------------------
    def prunable(self, ctx: "RunContext") -> dict[str, torch.nn.Parameter]:
        """The tensors to mask; ``first_layer``/``last_layer`` are the first and last conv/linear layer the forward
        pass calls (read on a zero input of the data's sample shape), whatever order the model registers them in."""
        data = getattr(ctx, "data", None)
        shape = tuple(data.input_shape) if data is not None else None
        return prunable_parameters(ctx.model, **self.mask_options, input_shape=shape)

    def setup(self, ctx: "RunContext") -> None:
        self.masks = MaskSet(self.prunable(ctx))
        if not self.masks.names:
            raise ConfigError("pruning: the model has no prunable conv/linear tensors with these method options")
        if self.retrain == "rewind" and self.rewind_epoch == 0:
            self.rewind_state = snapshot(ctx.model)
        if self.rewind_epoch >= ctx.epochs and self.retrain == "rewind":
            raise ConfigError(f"method.rewind_epoch={self.rewind_epoch} must be < trainer.epochs={ctx.epochs}")
        for m in self.measures:
            m.setup(self, ctx)
        self.fuse_grad_masks = edits_gradients_last(self, ctx)
        if self.fuse_grad_masks and ctx.cfg.trainer.optimizer == "sgd":
            masked_step_possible(self.masks.params)  # builds the kernel now (once per environment), not in an epoch

    def num_rounds(self) -> int:
        return self.rounds + 1

    def pinned_weights(self) -> MaskSet | None:
        """The masks: the engine keeps pruned weights at zero after every other plugin's hooks."""
        return self.masks

    def model_replaced(self, ctx: "RunContext", change: ModelChange) -> None:
        """Masks and the rewind snapshot follow a model surgery: kept entries keep their state; a new tensor is
        dense (mask 1) and rewinds to its value now."""
        masks = MaskSet(self.prunable(ctx))
        carried = change.carry_dict(self.masks.state_dict(), fill={n: m.bool() for n, m in zip(masks.names,
                                                                                              masks.masks)})
        masks.load_state_dict({n: carried[n] for n in masks.names})
        self.masks = masks
        if self.rewind_state is not None:
            self.rewind_state = change.carry_dict(self.rewind_state, fill=snapshot(ctx.model))

    def state_dict(self) -> dict[str, Any]:
        state = {"masks": self.masks.state_dict(), "rewind_state": self.rewind_state}
        for m in self.measures:
            state.update(m.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state["masks"])
        self.rewind_state = state["rewind_state"]
        for m in self.measures:
            m.load_state_dict(state)
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
            ctx.first_epoch = self.rewind_epoch  # resume the schedule where the rewound weights were taken
        elif self.retrain == "finetune":
            ctx.rebuild_optimizer(lr=self.finetune_lr, schedule="constant")
        elif self.retrain == "scratch":
            reinitialise(ctx.model, seed=int(ctx.cfg.seed) * 1009 + ctx.round, build=architecture_builder(ctx))
        # lr_rewind: keep the weights; fit() has already rebuilt the optimizer with the full schedule

    def end_epoch(self, ctx: "RunContext") -> dict[str, Any]:
        if ctx.round == 0 and self.retrain == "rewind" and self.rewind_epoch > 0 and ctx.epoch + 1 == self.rewind_epoch:
            self.rewind_state = snapshot(ctx.model)
        return {}

    def end_round(self, ctx: "RunContext") -> dict[str, Any]:
        alive, total = self.masks.counts()
        record: dict[str, Any] = {"sparsity": 1 - alive / total, "remaining_weights": alive}
        for m in self.measures:
            m.measure(self, ctx, record)
        if self.target_sparsity is not None and record["sparsity"] >= self.target_sparsity - 1.0 / total:
            ctx.stop_rounds = True
        if not ctx.stop_rounds and ctx.round + 1 < self.num_rounds():
            self.prune(ctx)
            self.masks.zero_optimizer_state(ctx.optimizer)
        return record

    def finalize(self, ctx: "RunContext") -> dict[str, Any]:
        rounds = rounds_of(ctx)
        out: dict[str, Any] = {"final_sparsity": self.masks.sparsity()}
        for m in self.measures:
            out.update(m.summary(self, ctx, rounds))
        return out

    def measure_entropy(self, ctx: "RunContext") -> dict[str, float]:
        """Activation entropy of the model now (the per-round measurement, e.g. for benchmarks)."""
        return self.entropy(ctx)

    # -- what subclasses choose -----------------------------------------------------------------------------------
    def prune(self, ctx: "RunContext") -> None:
        """Prune the trained model for the next round (iterative methods)."""

    def prune_before_training(self, ctx: "RunContext") -> None:
        """Prune at the start of a round, after the retraining mode (one-shot-at-init methods)."""

    def next_sparsity(self, current: float, rate: float) -> float:
        """Remove ``rate`` of the remaining weights, capped at ``target_sparsity``."""
        nxt = 1 - (1 - current) * (1 - rate)
        return min(nxt, self.target_sparsity) if self.target_sparsity is not None else nxt


#: the keys every pruning method inherits (its ``**common``)
PruningOptions = schema_of(PruningSweep)


def snapshot(model: torch.nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's state (weights and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def load_in_place(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` into the model's existing tensors (the optimizer holds these very Parameter objects)."""
    for name, tensor in model.state_dict().items():
        tensor.copy_(state[name])


@torch.no_grad()
def reinitialise(model: torch.nn.Module, seed: int, build: Callable[[], torch.nn.Module] | None = None) -> None:
    """Fresh initialisation in place, seeded, without touching the global RNG (``retrain=scratch``, sec. 2.2.2).

    ``build`` makes a fresh model of the same architecture (the run's ``arch`` config): its state, i.e. the
    architecture's own initialisation (Kaiming for the CIFAR ResNets...), is copied in. Tensors it lacks or shapes
    differently (a model changed by surgery), or every tensor without ``build``, take PyTorch's per-module
    ``reset_parameters()`` instead."""
    target = model.state_dict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = build().state_dict() if build is not None else {}
        fresh = {k: v for k, v in fresh.items() if k in target and v.shape == target[k].shape}
        if len(fresh) < len(target):
            reset = copy.deepcopy(model)
            for module in reset.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            fresh = {**reset.state_dict(), **fresh}
    load_in_place(model, fresh)


def architecture_builder(ctx: "RunContext") -> Callable[[], torch.nn.Module]:
    """Builds a fresh, randomly initialised model from the run's ``arch`` config, as :func:`regstory.train.run` does
    at the start; an arch with a ``pretrained`` option is built without its pretrained weights (from scratch means
    the architecture's random initialisation, and nothing is downloaded)."""
    from hydra.utils import instantiate

    extra = {"pretrained": False} if "pretrained" in ctx.cfg.arch else {}
    return lambda: instantiate(ctx.cfg.arch, input_shape=list(ctx.data.input_shape),
                               num_classes=ctx.data.num_classes, **extra)
