"""The one training loop: data -> forward -> loss -> backward -> step -> metrics, with named hook calls.

It knows no method by name: pruning, debiasing and distillation plug in through :class:`regstory.plugins.Plugin`.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from regstory.checkpoint import LAST, save_checkpoint
from regstory.data.base import DataBundle
from regstory.plugins import Plugin, StepOutput, overrides
from regstory.optim import LeanSGD
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
    history: list[dict[str, Any]] = field(default_factory=list)  # epoch records of the current round
    forward_model: nn.Module | None = None  # the model called in training (compiled / DDP-wrapped); defaults to model
    is_main_process: bool = True
    preemption: Any = None  # regstory.preemption.PreemptionGuard (or its DDP-collective wrapper); None: never stop
    reduce_metrics: Callable[[dict], dict] | None = None  # DDP: average the per-rank train metrics over ranks
    started_at: float = field(default_factory=time.perf_counter)
    wall_before: float = 0.0  # wall time spent by earlier (killed) processes of a resumed run
    optimizer_overrides: dict[str, Any] = field(default_factory=dict)  # the round's lr/schedule, kept in checkpoints

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

    STEP_HOOKS = ("task_loss", "extra_loss", "after_backward", "after_step")

    def __init__(self, plugins: list[Plugin]):
        self.plugins = plugins
        self.by_hook = {h: [p for p in plugins if overrides(p, h)] for h in self.STEP_HOOKS}
        self.task_loss, self.extra_loss, self.after_backward, self.after_step = (
            self.by_hook[h] for h in self.STEP_HOOKS)
        self.needs_features = any(p.needs_features for p in plugins)
        self.evaluates = any(p.evaluates for p in plugins)

    def __getitem__(self, hook: str) -> list[Plugin]:
        return self.by_hook[hook]


def compute_loss(ctx: RunContext, hooks: HookCaller, batch: dict[str, Tensor], out: StepOutput) -> tuple[Tensor, dict]:
    """Task loss (mean CE unless a plugin replaces it) plus every plugin's named extra terms."""
    loss = None
    for p in hooks.task_loss:
        loss = p.task_loss(ctx, batch, out)
        if loss is not None:
            break
    if loss is None:
        loss = out.per_sample_loss.mean()
    terms: dict[str, Tensor] = {}
    for p in hooks.extra_loss:
        for name, value in p.extra_loss(ctx, batch, out).items():
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
    net, scaler = ctx.net, ctx.scaler
    net.train()
    autocast = ctx.autocast()  # one context object, entered once per step
    grad_clip = ctx.cfg.trainer.grad_clip
    clip_params = [p for p in ctx.model.parameters() if p.requires_grad] if grad_clip else []
    after_backward, after_step, needs_features = hooks.after_backward, hooks.after_step, hooks.needs_features
    loss_sum = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), device=ctx.device, dtype=torch.long)
    term_sums: dict[str, Tensor] = {}
    seen = 0
    for batch in batches:
        with autocast:
            out = forward(net, batch, needs_features)
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
            nn.utils.clip_grad_norm_(clip_params, grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        for p in after_step:
            p.after_step(ctx)
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
        "plugins": [p.state_dict() for p in ctx.plugins],
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
    counts = {p.num_rounds() for p in plugins} - {1}
    if len(counts) > 1:
        raise ValueError(f"plugins disagree on the number of rounds: {sorted(counts)}")
    return counts.pop() if counts else 1


def fit(ctx: RunContext, start: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run every round and epoch from ``start`` (a checkpoint's position) to the end. Returns round records."""
    hooks = HookCaller(ctx.plugins)
    start = start or {"round": 0, "epoch": 0, "round_started": False}
    rounds: list[dict[str, Any]] = []
    n_rounds = num_rounds(ctx.plugins)
    every, interval = int(ctx.cfg.trainer.checkpoint_every), float(ctx.cfg.trainer.checkpoint_interval_s)
    last_saved = time.monotonic()
    for ctx.round in range(start["round"], n_rounds):
        resuming_mid_round = ctx.round == start["round"] and start["round_started"]
        if not resuming_mid_round:
            ctx.history = []
            ctx.rebuild_optimizer()  # a plugin's start_round may rebuild it again with its own lr / schedule
            for p in ctx.plugins:
                p.start_round(ctx)
        first_epoch = start["epoch"] if resuming_mid_round else 0
        for ctx.epoch in range(first_epoch, ctx.epochs):
            record = run_epoch(ctx, hooks)
            ctx.history.append(record)
            ctx.logger.log_epoch(record)
            last = ctx.epoch + 1 == ctx.epochs
            preempted = ctx.preemption is not None and ctx.preemption.requested  # read once: a collective in DDP
            due = (ctx.epoch + 1) % every == 0 and time.monotonic() - last_saved >= interval
            if last or preempted or due:
                save(ctx, ctx.round, ctx.epoch + 1, round_started=True)
                last_saved = time.monotonic()
            if preempted:
                raise ctx.preemption.preempted(ctx.run_dir, ctx.round, ctx.epoch + 1)
        round_record = {"round": ctx.round, **{k: v for k, v in ctx.history[-1].items() if k not in ("round", "epoch")}}
        for p in ctx.plugins:
            round_record.update(p.end_round(ctx))
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
    for p in ctx.plugins:
        p.start_epoch(ctx)
    lr = ctx.optimizer.param_groups[0]["lr"]
    batches = ctx.logger.progress.wrap(loader, len(loader), f"round {ctx.round} epoch {ctx.epoch + 1}/{ctx.epochs}")
    record: dict[str, Any] = {"round": ctx.round, "epoch": ctx.epoch}
    train_metrics = train_one_epoch(ctx, hooks, batches)
    record.update(ctx.reduce_metrics(train_metrics) if ctx.reduce_metrics is not None else train_metrics)
    if ctx.scheduler is not None:
        ctx.scheduler.step()
    if not torch.isfinite(torch.tensor(record["train_loss"])):
        raise NonFiniteLossError(
            f"training loss became {record['train_loss']} in round {ctx.round}, epoch {ctx.epoch}; "
            f"stopped, last good checkpoint kept in {ctx.run_dir / 'checkpoints'} (try a lower trainer.lr)")
    last = ctx.epoch + 1 == ctx.epochs
    if not hooks.evaluates and (last or (ctx.epoch + 1) % int(ctx.cfg.trainer.eval_every) == 0):
        for split in ("val", "test"):
            if split in ctx.loaders:
                record.update({f"{split}_{k}": v for k, v in ctx.evaluate(split).items()})
    record["lr"] = lr
    for p in ctx.plugins:
        record.update(p.end_epoch(ctx))
    record["time_s"] = time.perf_counter() - t0
    return record
