"""Structured configs (Hydra ConfigStore): typed schemas so a typo or a wrong type fails at start-up.

Groups whose options name a class with ``_target_`` (dataset, arch, noise, method, debias, distill) are
checked against that class's signature by :func:`check_targets` before anything runs.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and what is allowed."""


class Choice(str, Enum):
    """A string enum whose str() is its value (OmegaConf validates it; code compares plain strings)."""

    def __str__(self) -> str:
        return self.value


class Optimizer(Choice):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class Schedule(Choice):
    constant = "constant"
    step = "step"
    multistep = "multistep"
    cosine = "cosine"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class WandbMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class Progress(Choice):
    auto = "auto"  # a bar on a terminal, one plain line per epoch otherwise
    bar = "bar"
    plain = "plain"
    none = "none"


@dataclass
class TrainerConfig:
    epochs: int = 20
    batch_size: int = 128
    eval_batch_size: int = 1000
    optimizer: Optimizer = Optimizer.sgd
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Schedule = Schedule.constant
    milestones: list[int] = field(default_factory=list)  # multistep: epochs where lr *= gamma
    step_size: int = 30  # step: lr *= gamma every step_size epochs
    gamma: float = 0.1
    grad_clip: Optional[float] = None
    device: Device = Device.auto
    precision: Precision = Precision.fp32
    channels_last: bool = True  # NHWC for 4-D inputs and conv weights: faster convs on CPU (oneDNN) and GPU tensor cores
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | ...
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    num_workers: int = 4  # DataLoader workers, for large sets read from disk (ImageNet, CelebA)
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on CUDA)
    eval_every: int = 1  # epochs between val/test passes (the last epoch always; debias plugins evaluate every epoch)
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always saved)
    # and at least this many seconds of wall time between two mid-round checkpoints (0: every checkpoint_every
    # epochs). A round's last epoch and a preemption always write one. A checkpoint after every epoch cost a small
    # MLP ~5% of its run; a ResNet-18 pruning checkpoint (180 MB) takes ~0.5 s, about a fast GPU epoch
    checkpoint_interval_s: float = 30.0


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "regstory"
    entity: Optional[str] = None
    group: Optional[str] = None  # default: the multirun sweep's folder name, so a sweep is one W&B group
    tags: list[str] = field(default_factory=list)
    name: Optional[str] = None


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: Progress = Progress.auto


@dataclass
class DataConfig:
    root: str = "${oc.env:REGSTORY_DATA,'~/.cache/regstory/data'}"
    download: bool = True


@dataclass
class RegstoryConfig:
    dataset: Any = MISSING
    arch: Any = MISSING
    noise: Any = MISSING
    method: Any = MISSING
    debias: Any = MISSING
    distill: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    resume: bool = False
    experiment_name: Optional[str] = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="regstory_schema", node=RegstoryConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)


# Keys of a dataset option that the runner reads itself; the rest go to the dataset builder.
DATASET_RUNNER_KEYS = ("name", "val_fraction")
TARGET_GROUPS = ("dataset", "arch", "noise", "method", "debias", "distill")
INJECTED = {"dataset": {"root", "download"}, "arch": {"input_shape", "num_classes"}}


def check_targets(cfg: DictConfig) -> None:
    """Fail fast on a group option whose keys the target does not accept (e.g. ``method.rat=0.2``)."""
    for group in TARGET_GROUPS:
        node = cfg.get(group)
        if node is None or "_target_" not in node:
            continue
        try:
            target = get_object(node._target_)
        except Exception as err:
            raise ConfigError(f"{group}._target_ '{node._target_}' cannot be imported: {err}") from None
        params = inspect.signature(target).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        given = {k for k in node if not str(k).startswith("_")} - set(DATASET_RUNNER_KEYS if group == "dataset" else ())
        allowed = set(params) - INJECTED.get(group, set())
        unknown = sorted(given - allowed)
        if unknown:
            raise ConfigError(
                f"{group}: unknown option(s) {', '.join(unknown)} for {node._target_}; "
                f"allowed: {', '.join(sorted(allowed)) or '(none)'}"
            )


#: torch.compile's modes (``torch._inductor.list_mode_options``)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_values(cfg: DictConfig) -> None:
    """Range checks that types alone cannot express."""
    t = cfg.trainer
    rules = [
        (t.epochs >= 1, "trainer.epochs", t.epochs, "an integer >= 1"),
        (t.batch_size >= 1, "trainer.batch_size", t.batch_size, "an integer >= 1"),
        (t.eval_batch_size >= 1, "trainer.eval_batch_size", t.eval_batch_size, "an integer >= 1"),
        (t.lr > 0, "trainer.lr", t.lr, "a number > 0"),
        (t.weight_decay >= 0, "trainer.weight_decay", t.weight_decay, "a number >= 0"),
        (t.num_threads >= 0, "trainer.num_threads", t.num_threads, "an integer >= 0"),
        (t.num_workers >= 0, "trainer.num_workers", t.num_workers, "an integer >= 0"),
        (t.eval_every >= 1, "trainer.eval_every", t.eval_every, "an integer >= 1"),
        (t.checkpoint_every >= 1, "trainer.checkpoint_every", t.checkpoint_every, "an integer >= 1"),
        (t.checkpoint_interval_s >= 0, "trainer.checkpoint_interval_s", t.checkpoint_interval_s, "a number >= 0"),
        (t.compile_mode in COMPILE_MODES, "trainer.compile_mode", t.compile_mode, f"one of {', '.join(COMPILE_MODES)}"),
        (0 <= cfg.dataset.get("val_fraction", 0.0) < 1, "dataset.val_fraction", cfg.dataset.get("val_fraction"), "in [0, 1)"),
    ]
    if "rate" in cfg.noise:
        rules.append((0 <= cfg.noise.rate < 1, "noise.rate", cfg.noise.rate, "in [0, 1)"))
    for ok, key, value, allowed in rules:
        if not ok:
            raise ConfigError(f"{key}={value} is invalid: must be {allowed}")


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as one flat dict with dotted keys (for W&B and report tables)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    walk("", OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return out
