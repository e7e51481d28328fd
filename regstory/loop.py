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
from regstory.plugins import Plugin, StepOutput
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
    on_checkpoint: list[Callable[["RunContext"], None]] = field(default_factory=list)
    preemption: Any = None  # regstory.preemption.PreemptionGuard (or its DDP-collective wrapper); None: never stop
    reduce_metrics: Callable[[dict], dict] | None = None  # DDP: average the per-rank train metrics over ranks
    started_at: float = field(default_factory=time.perf_counter)
    wall_before: float = 0.0  # wall time spent by earlier (killed) processes of a resumed run

    @property
    def wall_time_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.started_at

    @property
    def net(self) -> nn.Module:
        return self.forward_model if self.forward_model is not None else self.model

    @property
    def epochs(self) -> int:
        return int(self.cfg.trainer.epochs)

    def autocast(self):
        precision = str(self.cfg.trainer.precision)
        if precision == "fp32" or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)

    def evaluate(self, split: str = "test", model: nn.Module | None = None) -> dict[str, float]:
        return evaluate(model or self.model, self.loaders[split], self.autocast)

    def rebuild_optimizer(self, lr: float | None = None, schedule: str | None = None) -> None:
        """Fresh optimizer and scheduler for a round (``lr``/``schedule`` override the trainer's, e.g. fine-tuning)."""
        self.optimizer = build_optimizer(self.model, self.cfg.trainer, lr)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.trainer, schedule)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, t, lr: torch.optim.SGD(params, lr=lr, momentum=t.momentum, nesterov=t.nesterov,
                                                  weight_decay=t.weight_decay, foreach=True),
    "adam": lambda params, t, lr: torch.optim.Adam(params, lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                                    foreach=True),
    "adamw": lambda params, t, lr: torch.optim.AdamW(params, lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                                      foreach=True),
}

SCHEDULES: dict[str, Callable[..., Any]] = {
    "constant": lambda opt, t: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0),
    "step": lambda opt, t: torch.optim.lr_scheduler.StepLR(opt, step_size=t.step_size, gamma=t.gamma),
    "multistep": lambda opt, t: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(t.milestones), gamma=t.gamma),
    "cosine": lambda opt, t: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs),
}


def build_optimizer(model: nn.Module, trainer: DictConfig, lr: float | None = None) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS[str(trainer.optimizer)](params, trainer, float(lr if lr is not None else trainer.lr))


def build_scheduler(optimizer: torch.optim.Optimizer, trainer: DictConfig, schedule: str | None = None):
    """The lr schedule, stepped once per epoch."""
    return SCHEDULES[str(schedule or trainer.schedule)](optimizer, trainer)


def _overrides(plugin: Plugin, hook: str) -> bool:
    return getattr(type(plugin), hook) is not getattr(Plugin, hook)


class HookCaller:
    """Calls a hook only on the plugins that override it (keeps the per-step cost of unused hooks at zero)."""

    def __init__(self, plugins: list[Plugin]):
        self.plugins = plugins
        hooks = ["task_loss", "extra_loss", "after_backward", "after_step"]
        self.by_hook = {h: [p for p in plugins if _overrides(p, h)] for h in hooks}
        self.needs_features = any(p.needs_features for p in plugins)

    def __getitem__(self, hook: str) -> list[Plugin]:
        return self.by_hook[hook]


def compute_loss(ctx: RunContext, hooks: HookCaller, batch: dict[str, Tensor], out: StepOutput) -> tuple[Tensor, dict]:
    """Task loss (mean CE unless a plugin replaces it) plus every plugin's named extra terms."""
    loss = None
    for p in hooks["task_loss"]:
        loss = p.task_loss(ctx, batch, out)
        if loss is not None:
            break
    if loss is None:
        loss = out.per_sample_loss.mean()
    terms: dict[str, Tensor] = {}
    for p in hooks["extra_loss"]:
        for name, value in p.extra_loss(ctx, batch, out).items():
            terms[name] = value
            loss = loss + value
    return loss, terms


def forward(net: nn.Module, batch: dict[str, Tensor], with_features: bool) -> StepOutput:
    if with_features:
        logits, feats = net(batch["x"], return_features=True)
    else:
        logits, feats = net(batch["x"]), None
    per_sample = F.cross_entropy(logits.float(), batch["y"], reduction="none")
    return StepOutput(logits=logits, per_sample_loss=per_sample, features=feats)


def train_one_epoch(ctx: RunContext, hooks: HookCaller, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """One pass over the training batches. Metrics stay on the device and are read once at the end."""
    ctx.net.train()
    grad_clip = ctx.cfg.trainer.grad_clip
    loss_sum = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), device=ctx.device, dtype=torch.long)
    term_sums: dict[str, Tensor] = {}
    seen = 0
    for batch in batches:
        with ctx.autocast():
            out = forward(ctx.net, batch, hooks.needs_features)
            loss, terms = compute_loss(ctx, hooks, batch, out)
        ctx.optimizer.zero_grad(set_to_none=True)
        if ctx.scaler is not None:
            ctx.scaler.scale(loss).backward()
            ctx.scaler.unscale_(ctx.optimizer)
        else:
            loss.backward()
        for p in hooks["after_backward"]:
            p.after_backward(ctx)
        if grad_clip:
            nn.utils.clip_grad_norm_(ctx.model.parameters(), grad_clip)
        if ctx.scaler is not None:
            ctx.scaler.step(ctx.optimizer)
            ctx.scaler.update()
        else:
            ctx.optimizer.step()
        for p in hooks["after_step"]:
            p.after_step(ctx)
        n = len(batch["y"])
        seen += n
        ctx.global_step += 1
        with torch.no_grad():
            loss_sum += loss.detach().float() * n
            correct += (out.logits.argmax(1) == batch["y"]).sum()
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0) + value.detach().float() * n
    metrics = {"train_loss": (loss_sum / max(seen, 1)).item(), "train_acc": (correct.float() / max(seen, 1)).item()}
    metrics.update({f"loss/{k}": (v / max(seen, 1)).item() for k, v in term_sums.items()})
    return metrics


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
        seen += len(batch["y"])
    model.train(was_training)
    if seen == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    return {"loss": (loss_sum / seen).item(), "acc": (correct.float() / seen).item()}


def checkpoint_state(ctx: RunContext, next_round: int, next_epoch: int, round_started: bool, finished: bool) -> dict:
    return {
        "model": ctx.model.state_dict(),
        "optimizer": ctx.optimizer.state_dict() if ctx.optimizer is not None else None,
        "scheduler": ctx.scheduler.state_dict() if ctx.scheduler is not None else None,
        "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
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
    for callback in ctx.on_checkpoint:
        callback(ctx)


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
            if last or preempted or (ctx.epoch + 1) % int(ctx.cfg.trainer.checkpoint_every) == 0:
                save(ctx, ctx.round, ctx.epoch + 1, round_started=True)
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
    if last or (ctx.epoch + 1) % int(ctx.cfg.trainer.eval_every) == 0:
        for split in ("val", "test"):
            if split in ctx.loaders:
                record.update({f"{split}_{k}": v for k, v in ctx.evaluate(split).items()})
    record["lr"] = lr
    for p in ctx.plugins:
        record.update(p.end_epoch(ctx))
    record["time_s"] = time.perf_counter() - t0
    return record
