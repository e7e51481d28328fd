"""The one training loop: data -> forward -> loss -> backward -> step -> metrics, with named hook calls.

It knows no method by name: pruning, debiasing and distillation plug in through :class:`regstory.plugins.Plugin`.
"""
from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from regstory.activations import ActivationRecorder
from regstory.checkpoint import LAST, save_checkpoint
from regstory.data.base import DataBundle
from regstory.freezing import NeuronFreezer
from regstory.plugins import Plugin, StepOutput, overrides
from regstory.optim import LeanSGD
from regstory.surgery import ModelChange, structure_of
from regstory.tracking import RunLogger
from regstory.utils import rng_states


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class RunContext:
    """Everything a hook may read or change. ``round``/``epoch`` are 0-based; ``epoch`` counts within the round."""

    cfg: DictConfig
    model: nn.Module
    data: DataBundle
    loaders: dict[str, Any]  # "train", "test", optionally "val"
    device: torch.device
    plugins: list[Plugin]
    run_dir: Path
    logger: RunLogger
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    scaler: Any = None
    round: int = 0
    epoch: int = 0
    global_step: int = 0
    stop_rounds: bool = False
    #: set by a plugin's ``end_epoch`` to end the current round after this epoch (a plateau): the round's remaining
    #: epochs are skipped, also on resume; reset at every round start
    end_round_early: bool = False
    #: the record of the epoch being finished, for ``end_epoch`` hooks (its train/val/test metrics so far)
    epoch_record: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # epoch records of the current round
    forward_model: nn.Module | None = None  # the model called in training (compiled / DDP-wrapped); defaults to model
    is_main_process: bool = True
    preemption: Any = None  # regstory.preemption.PreemptionGuard (or its DDP-collective wrapper); None: never stop
    reduce_metrics: Callable[[dict], dict] | None = None  # DDP: average the per-rank train metrics over ranks
    started_at: float = field(default_factory=time.perf_counter)
    wall_before: float = 0.0  # wall time spent by earlier (killed) processes of a resumed run
    optimizer_overrides: dict[str, Any] = field(default_factory=dict)  # the round's lr/schedule, kept in checkpoints
    #: builds the training wrapper (compile / DDP) around a model; None: train the bare model
    wrap: Callable[[nn.Module], nn.Module] | None = None
    architecture_changed: bool = False  # a surgery replaced the model: checkpoints record its structure
    #: per-neuron freezing through optimizer steps (NEq): ``ctx.freezer.freeze(param, rows, bias)``
    freezer: NeuronFreezer | None = None
    #: the step's activations for plugins that ask for them (``Plugin.activation_sites``); None when none does
    activations: ActivationRecorder | None = None
    #: ``trainer.num_threads=0`` on a CPU: follows the cores other processes leave idle (:mod:`regstory.threads`)
    threads: Any = None
    #: the epoch the current round starts at (0; a plugin's ``start_round`` may set k > 0: the round then trains
    #: epochs k..epochs-1 with the lr schedule stepped k times, e.g. lottery-ticket rewinding to epoch k)
    first_epoch: int = 0

    @property
    def wall_time_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.started_at

    @property
    def net(self) -> nn.Module:
        return self.forward_model if self.forward_model is not None else self.model

    @property
    def epochs(self) -> int:
        return int(self.cfg.trainer.epochs)

    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of ``trainer.precision`` (bf16 on CUDA or CPU, fp16 on CUDA); None for fp32."""
        precision = str(self.cfg.trainer.precision)
        if precision == "fp32" or self.device.type not in ("cuda", "cpu"):
            return None
        return torch.bfloat16 if precision == "bf16" else torch.float16

    def autocast(self):
        dtype = self.autocast_dtype()
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def evaluate(self, split: str = "test", model: nn.Module | None = None) -> dict[str, float]:
        return evaluate(model or self.model, self.loaders[split], self.autocast)

    def rebuild_optimizer(self, lr: float | None = None, schedule: str | None = None) -> None:
        """Fresh optimizer and scheduler for a round (``lr``/``schedule`` override the trainer's, e.g. fine-tuning).
        The overrides are checkpointed, so a resumed round rebuilds the same schedule."""
        self.optimizer_overrides = {"lr": lr, "schedule": schedule}
        self.optimizer = build_optimizer(self.model, self.cfg.trainer, lr)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.trainer, schedule)

    # -- engine services --------------------------------------------------------------------------------------------
    def enforce_pins(self, after: Plugin | None = None) -> None:
        """Re-apply every plugin's pinned weights (pruning masks), except those of ``after`` (the plugin whose
        hook just ran owns its weights' state during its own hook)."""
        for p in self.plugins:
            if p is not after:
                pinned = p.pinned_weights()
                if pinned is not None:
                    pinned.apply_to_weights()

    def call(self, hook: str, *args: Any) -> list[Any]:
        """Call ``hook`` on every plugin in order, re-applying the other plugins' pinned weights after each one that
        implements it. Returns the plugins' results."""
        results = []
        for p in self.plugins:
            results.append(getattr(p, hook)(self, *args))
            if overrides(p, hook):
                self.enforce_pins(after=p)
        return results

    def replace_model(self, new_model: nn.Module, change: ModelChange) -> None:
        """Model surgery: train ``new_model`` from now on. It is moved to the run's device and memory layout and
        re-wrapped (compile / DDP); the optimizer state of every parameter with a source in ``change`` is carried
        over (restricted to the kept indices) and the others start fresh; the learning-rate schedule stays where
        it is; then every plugin's :meth:`~regstory.plugins.Plugin.model_replaced` moves its own state, and pinned
        weights are re-applied. Call it between steps (from any hook but the per-step ones)."""
        new_model = place_model(new_model, self.device, bool(self.cfg.trainer.channels_last))
        old_model, old_optimizer, old_scheduler = self.model, self.optimizer, self.scheduler
        self.model = new_model
        self.forward_model = self.wrap(new_model) if self.wrap is not None else None
        if old_optimizer is not None:
            lr, schedule = self.optimizer_overrides.get("lr"), self.optimizer_overrides.get("schedule")
            self.optimizer = build_optimizer(new_model, self.cfg.trainer, lr)
            carry_optimizer_state(old_optimizer, old_model, self.optimizer, new_model, change)
            self.scheduler = build_scheduler(self.optimizer, self.cfg.trainer, schedule)
            if old_scheduler is not None:
                self.scheduler.load_state_dict(old_scheduler.state_dict())
        self.architecture_changed = True
        if self.freezer is not None:
            self.freezer.model = new_model
            self.freezer.remap(keep={name: index[0] for name, (_, index) in change.sources.items()
                                     if index and index[0] is not None})
        if self.activations is not None:
            self.activations.model = new_model
        for p in self.plugins:
            p.model_replaced(self, change)
        self.enforce_pins()


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """The model on ``device``, with NHWC conv weights when ``channels_last``."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


@torch.no_grad()
def carry_optimizer_state(old: torch.optim.Optimizer, old_model: nn.Module, new: torch.optim.Optimizer,
                          new_model: nn.Module, change: ModelChange) -> None:
    """Copy per-parameter optimizer state (momentum, Adam moments, step counts) from ``old`` to ``new`` for the
    parameters that survive a surgery, restricted to the kept indices; and each param group's current lr."""
    old_params = dict(old_model.named_parameters())
    for name, param in new_model.named_parameters():
        source = change.sources.get(name)
        old_param = old_params.get(source[0]) if source is not None else None
        state = old.state.get(old_param) if old_param is not None else None
        if not state:
            continue
        new.state[param] = {k: (change.carry(name, v).clone() if torch.is_tensor(v) and v.shape == old_param.shape
                                else v.clone() if torch.is_tensor(v) else copy.copy(v)) for k, v in state.items()}
    for new_group, old_group in zip(new.param_groups, old.param_groups):
        for key in ("lr", "initial_lr"):
            if key in old_group:
                new_group[key] = old_group[key]


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, t, lr, impl: (LeanSGD if impl.get("fused") else torch.optim.SGD)(
        params, lr=lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay, **impl),
    "adam": lambda params, t, lr, impl: torch.optim.Adam(params, lr=lr, betas=tuple(t.betas),
                                                          weight_decay=t.weight_decay, **impl),
    "adamw": lambda params, t, lr, impl: torch.optim.AdamW(params, lr=lr, betas=tuple(t.betas),
                                                            weight_decay=t.weight_decay, **impl),
}

#: devices whose fused optimizer kernels update every parameter in one pass (fewer passes over memory than foreach)
FUSED_DEVICES = ("cpu", "cuda")


def optimizer_impl(params: list[Tensor], optimizer: str = "sgd", grad_scaler: bool = False) -> dict[str, bool]:
    """``fused=True`` where torch has fused kernels for all params' devices and dtypes, else ``foreach=True``.

    SGD is never fused under an fp16 ``GradScaler``: when the first step overflows, the fused kernel skips it but
    leaves the momentum buffers it allocated with ``empty_like`` uninitialised, and the next step reads that garbage
    (seen with torch 2.14 on CPU; LibreYOLO PR #771 reports the same on CUDA). Fused Adam/AdamW skip such steps
    cleanly."""
    fusable = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    if grad_scaler and optimizer == "sgd":
        fusable = False
    return {"fused": True} if fusable and params else {"foreach": True}


def uses_grad_scaler(trainer: DictConfig) -> bool:
    """fp16 training scales the loss (``torch.amp.GradScaler``); bf16 and fp32 do not."""
    return str(trainer.precision) == "fp16"


SCHEDULES: dict[str, Callable[..., Any]] = {
    "constant": lambda opt, t: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0),
    "step": lambda opt, t: torch.optim.lr_scheduler.StepLR(opt, step_size=t.step_size, gamma=t.gamma),
    "multistep": lambda opt, t: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(t.milestones), gamma=t.gamma),
    "cosine": lambda opt, t: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs),
}


def build_optimizer(model: nn.Module, trainer: DictConfig, lr: float | None = None) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    make, lr = OPTIMIZERS[str(trainer.optimizer)], float(lr if lr is not None else trainer.lr)
    try:
        return make(params, trainer, lr, optimizer_impl(params, str(trainer.optimizer), uses_grad_scaler(trainer)))
    except (RuntimeError, ValueError):  # an older torch without fused kernels here; a config error raises again
        return make(params, trainer, lr, {"foreach": True})


def build_scheduler(optimizer: torch.optim.Optimizer, trainer: DictConfig, schedule: str | None = None):
    """The lr schedule, stepped once per epoch."""
    return SCHEDULES[str(schedule or trainer.schedule)](optimizer, trainer)


class HookCaller:
    """Calls a hook only on the plugins that override it (keeps the per-step cost of unused hooks at zero).

    ``hooks["after_step"]`` is the list of plugins overriding ``after_step``; the per-step hooks are also plain
    attributes (``hooks.after_step``) so the loop reads them without a dict lookup.
    """

    STEP_HOOKS = ("sample_loss", "sample_weights", "extra_loss", "after_backward", "after_step")

    def __init__(self, plugins: list[Plugin]):
        self.plugins = plugins
        self.by_hook = {h: [p for p in plugins if overrides(p, h)] for h in self.STEP_HOOKS}
        self.sample_loss, self.sample_weights, self.extra_loss, self.after_backward, self.after_step = (
            self.by_hook[h] for h in self.STEP_HOOKS)
        #: for each plugin with an ``after_step``, whether other plugins' pinned weights must be re-applied after it
        self.pins_after_step = [any(q is not p and q.pinned_weights() is not None for q in plugins)
                                for p in self.after_step]
        self.needs_features = any(p.needs_features for p in plugins)
        #: the bias-agnostic plugins (``uses_bias_labels`` False): their loss hooks get batches without ``"bias"``
        self.blind = [p for p in plugins if not p.uses_bias_labels]
        self.evaluates = any(p.evaluates for p in plugins)

    def __getitem__(self, hook: str) -> list[Plugin]:
        return self.by_hook[hook]


def compute_loss(ctx: RunContext, hooks: HookCaller, batch: dict[str, Tensor], out: StepOutput) -> tuple[Tensor, dict]:
    """mean(w * l) plus every plugin's named extra terms: l is the per-sample CE unless a plugin replaces it
    (``sample_loss``, one plugin at most), w the product of the plugins' ``sample_weights`` (1 without any).
    A bias-agnostic plugin (``uses_bias_labels`` False) gets the batch without its bias labels."""
    hidden = {k: v for k, v in batch.items() if k != "bias"} if hooks.blind else batch
    per_sample = out.per_sample_loss
    for p in hooks.sample_loss:
        replaced = p.sample_loss(ctx, hidden if p in hooks.blind else batch, out)
        if replaced is not None:
            per_sample = replaced
    out.sample_loss = per_sample
    weight = None
    for p in hooks.sample_weights:
        w = p.sample_weights(ctx, hidden if p in hooks.blind else batch, out)
        if w is not None:
            weight = w if weight is None else weight * w
    loss = per_sample.mean() if weight is None else (weight * per_sample).mean()
    terms: dict[str, Tensor] = {}
    for p in hooks.extra_loss:
        for name, value in p.extra_loss(ctx, hidden if p in hooks.blind else batch, out).items():
            terms[name] = value
            loss = loss + value
    return loss, terms


def forward(net: nn.Module, batch: dict[str, Tensor], with_features: bool) -> StepOutput:
    """Logits (and bottleneck features when asked) plus the per-sample cross-entropy, computed in fp32."""
    if with_features:
        logits, feats = net(batch["x"], return_features=True)
    else:
        logits, feats = net(batch["x"]), None
    per_sample = F.cross_entropy(logits.float(), batch["y"], reduction="none")
    return StepOutput(logits=logits, per_sample_loss=per_sample, features=feats)


def train_one_epoch(ctx: RunContext, hooks: HookCaller, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """One pass over the training batches.

    Hooks run in the order of :mod:`regstory.plugins`. Nothing in a step reads a value back to the host: loss,
    accuracy and loss terms are summed in device tensors and read once at the end of the epoch, so on a GPU the
    host queues steps ahead of the device. Config values are read once per epoch, not per step.
    """
    scaler = ctx.scaler
    ctx.net.train()
    autocast = ctx.autocast()  # one context object, entered once per step
    grad_clip = ctx.cfg.trainer.grad_clip
    clipped: tuple[nn.Module | None, list[Tensor]] = (None, [])
    after_backward, needs_features = hooks.after_backward, hooks.needs_features
    after_step = list(zip(hooks.after_step, hooks.pins_after_step))
    recorder = ctx.activations
    loss_sum = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), device=ctx.device, dtype=torch.long)
    term_sums: dict[str, Tensor] = {}
    seen = 0
    for batch in batches:
        with autocast:
            if recorder is None:
                out = forward(ctx.net, batch, needs_features)  # read per step: a hook may replace the model
            else:
                with recorder.capture():
                    out = forward(ctx.net, batch, needs_features)
                out.activations = recorder
            loss, terms = compute_loss(ctx, hooks, batch, out)
        optimizer = ctx.optimizer  # read per step: a hook may rebuild it
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        for p in after_backward:
            p.after_backward(ctx)
        if grad_clip:
            if clipped[0] is not ctx.model:
                clipped = (ctx.model, [p for p in ctx.model.parameters() if p.requires_grad])
            nn.utils.clip_grad_norm_(clipped[1], grad_clip)
        freezer = ctx.freezer if ctx.freezer else None  # read per step: a hook may freeze neurons mid-epoch
        if freezer is not None:
            freezer.before_step(optimizer)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if freezer is not None:
            freezer.after_step(optimizer)
        for p, pins in after_step:
            p.after_step(ctx)
            if pins:
                ctx.enforce_pins(after=p)
        n = batch["y"].shape[0]
        seen += n
        ctx.global_step += 1
        loss_sum.add_(loss.detach().float(), alpha=n)  # no autograd graph: detach, argmax and eq record none
        correct.add_((out.logits.detach().argmax(1) == batch["y"]).sum())
        for name, value in terms.items():
            term = value.detach().float() * n
            term_sums[name] = term_sums[name] + term if name in term_sums else term
    names = list(term_sums)
    values = read_once([loss_sum, correct.float(), *(term_sums[k] for k in names)], max(seen, 1))
    metrics = {"train_loss": values[0], "train_acc": values[1]}
    metrics.update({f"loss/{k}": v for k, v in zip(names, values[2:])})
    return metrics


def read_once(sums: list[Tensor], count: int) -> list[float]:
    """``sums / count`` as floats, with a single device-to-host copy (one synchronisation on a GPU)."""
    return (torch.stack([s.float() for s in sums]) / count).tolist()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict[str, Tensor]], autocast=contextlib.nullcontext) -> dict[str, float]:
    """Mean cross-entropy and accuracy over a loader (model in eval mode; restored to its previous mode)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = None, None, 0
    for batch in loader:
        with autocast():
            logits = model(batch["x"])
        loss = F.cross_entropy(logits.float(), batch["y"], reduction="sum")
        hits = (logits.argmax(1) == batch["y"]).sum()
        loss_sum = loss if loss_sum is None else loss_sum + loss
        correct = hits if correct is None else correct + hits
        seen += batch["y"].shape[0]
    model.train(was_training)
    if seen == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    mean_loss, acc = read_once([loss_sum, correct], seen)
    return {"loss": mean_loss, "acc": acc}


def checkpoint_state(ctx: RunContext, next_round: int, next_epoch: int, round_started: bool, finished: bool) -> dict:
    return {
        "model": ctx.model.state_dict(),
        "optimizer": ctx.optimizer.state_dict() if ctx.optimizer is not None else None,
        "scheduler": ctx.scheduler.state_dict() if ctx.scheduler is not None else None,
        "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
        "optimizer_overrides": ctx.optimizer_overrides,
        "plugins": {p.slot: p.state_dict() for p in ctx.plugins},
        "architecture": structure_of(ctx.model) if ctx.architecture_changed else None,
        "freezer": ctx.freezer.state_dict() if ctx.freezer else None,
        "rng": rng_states(),
        "position": {"round": next_round, "epoch": next_epoch, "round_started": round_started, "finished": finished,
                     "global_step": ctx.global_step},
        "history": ctx.history,
        "logs": ctx.logger.positions() if ctx.is_main_process else None,
        "wandb_id": ctx.logger.wandb_id if ctx.is_main_process else None,
        "wall_time_s": ctx.wall_time_s,
    }


def save(ctx: RunContext, next_round: int, next_epoch: int, round_started: bool, finished: bool = False) -> None:
    if ctx.is_main_process:
        save_checkpoint(ctx.run_dir / "checkpoints" / LAST,
                        checkpoint_state(ctx, next_round, next_epoch, round_started, finished))


def num_rounds(plugins: list[Plugin]) -> int:
    """The plugins' number of rounds (those with one round follow the others; ``check_composition`` refuses
    plugins that disagree)."""
    counts = {p.num_rounds() for p in plugins} - {1}
    return counts.pop() if counts else 1


def fit(ctx: RunContext, start: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run every round and epoch from ``start`` (a checkpoint's position) to the end. Returns round records."""
    hooks = HookCaller(ctx.plugins)
    start = start or {"round": 0, "epoch": 0, "round_started": False}
    rounds: list[dict[str, Any]] = []
    n_rounds = num_rounds(ctx.plugins)
    ctx.logger.start(n_rounds, ctx.epochs, start["round"], start["epoch"] if start["round_started"] else 0)
    every, interval = int(ctx.cfg.trainer.checkpoint_every), float(ctx.cfg.trainer.checkpoint_interval_s)
    last_saved = time.monotonic()
    for ctx.round in range(start["round"], n_rounds):
        resuming_mid_round = ctx.round == start["round"] and start["round_started"]
        if not resuming_mid_round:
            ctx.history = []
            ctx.first_epoch = 0
            ctx.end_round_early = False
            ctx.rebuild_optimizer()  # a plugin's start_round may rebuild it again with its own lr / schedule
            ctx.call("start_round")
            if ctx.first_epoch and ctx.scheduler is not None:  # the schedule as it stands at epoch first_epoch
                with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
                    warnings.simplefilter("ignore", UserWarning)
                    for _ in range(ctx.first_epoch):
                        ctx.scheduler.step()
        else:  # the checkpoint holds the scheduler's position; the round's records say where it started
            ctx.first_epoch = ctx.history[0]["epoch"] if ctx.history else start["epoch"]
        first_epoch = start["epoch"] if resuming_mid_round else ctx.first_epoch
        for ctx.epoch in range(first_epoch, ctx.epochs):
            record = run_epoch(ctx, hooks)
            ctx.history.append(record)
            ctx.logger.log_epoch(record)
            last = ctx.epoch + 1 == ctx.epochs or ctx.end_round_early
            preempted = ctx.preemption is not None and ctx.preemption.requested  # read once: a collective in DDP
            due = (ctx.epoch + 1) % every == 0 and time.monotonic() - last_saved >= interval
            next_epoch = ctx.epochs if ctx.end_round_early else ctx.epoch + 1  # an early end skips the rest
            if last or preempted or due:
                save(ctx, ctx.round, next_epoch, round_started=True)
                last_saved = time.monotonic()
            if preempted:
                raise ctx.preemption.preempted(ctx.run_dir, ctx.round, next_epoch)
            if ctx.end_round_early:
                break
        round_record = {"round": ctx.round, **{k: v for k, v in ctx.history[-1].items() if k not in ("round", "epoch")}}
        for metrics in ctx.call("end_round"):
            round_record.update(metrics)
        rounds.append(round_record)
        ctx.logger.log_round(round_record)
        stop = ctx.stop_rounds or ctx.round + 1 == n_rounds
        save(ctx, ctx.round + 1, 0, round_started=False, finished=stop)
        if stop:
            break
    return rounds


def run_epoch(ctx: RunContext, hooks: HookCaller) -> dict[str, Any]:
    t0 = time.perf_counter()
    loader = ctx.loaders["train"]
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(ctx.round, ctx.epoch)
    if ctx.threads is not None:
        ctx.threads.update()
    ctx.call("start_epoch")
    lr = ctx.optimizer.param_groups[0]["lr"]
    batches = ctx.logger.progress.wrap(loader, len(loader), ctx.logger.progress.label(ctx.round, ctx.epoch))
    record: dict[str, Any] = {"round": ctx.round, "epoch": ctx.epoch}
    train_metrics = train_one_epoch(ctx, hooks, batches)
    record.update(ctx.reduce_metrics(train_metrics) if ctx.reduce_metrics is not None else train_metrics)
    if ctx.scheduler is not None:
        ctx.scheduler.step()
    if not torch.isfinite(torch.tensor(record["train_loss"])):
        raise NonFiniteLossError(
            f"training loss became {record['train_loss']} in round {ctx.round + 1}, epoch {ctx.epoch + 1}/{ctx.epochs}; "
            f"stopped, last good checkpoint kept in {ctx.run_dir / 'checkpoints'} (try a lower trainer.lr)")
    last = ctx.epoch + 1 == ctx.epochs
    if not hooks.evaluates and (last or (ctx.epoch + 1) % int(ctx.cfg.trainer.eval_every) == 0):
        for split in ("val", "test"):
            if split in ctx.loaders:
                record.update({f"{split}_{k}": v for k, v in ctx.evaluate(split).items()})
    record["lr"] = lr
    ctx.epoch_record = record
    for metrics in ctx.call("end_epoch"):
        record.update(metrics)
    if ctx.end_round_early and not last and not hooks.evaluates:  # the round's last epoch: every split measured
        for split in ("val", "test"):
            if split in ctx.loaders and f"{split}_acc" not in record:
                record.update({f"{split}_{k}": v for k, v in ctx.evaluate(split).items()})
    record["time_s"] = time.perf_counter() - t0
    return record
