"""The root config schema, the trainer/logger/data schemas, and the checks of a composed config.

Every option of every group has a typed schema (:mod:`regstory.options`): the dataset, arch, noise, method, debias and
distill schemas are derived from the signatures of the classes and builders they configure; the trainer and logger
ones are written out here. :func:`register_configs` stores them all in Hydra's ConfigStore; :func:`check_values`
checks types and ranges of every schema node, :func:`check_targets` the keys of every ``_target_`` node, and
:func:`compose_checked` turns any composition error into one :class:`ConfigError` line.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf

from regstory.options import OPTIONS, ConfigError, OneOf, Range, allowed, check, hints, import_all, register, schema_of

__all__ = ["ConfigError", "check_targets", "check_values", "compose_checked", "flat_config", "register_configs"]


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


#: torch.compile's modes (``torch._inductor.list_mode_options``)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
Positive = Annotated[int, Range(ge=1)]
NonNegative = Annotated[int, Range(ge=0)]


@dataclass
class TrainerConfig:
    epochs: Positive = 20
    batch_size: Positive = 128
    eval_batch_size: Positive = 1000
    optimizer: Optimizer = Optimizer.sgd
    lr: Annotated[float, Range(gt=0)] = 0.05
    momentum: Annotated[float, Range(ge=0)] = 0.9
    nesterov: bool = False
    weight_decay: Annotated[float, Range(ge=0)] = 0.0
    betas: Annotated[list[float], Range(ge=0, lt=1)] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Schedule = Schedule.constant
    milestones: Annotated[list[int], Range(ge=0)] = field(default_factory=list)  # multistep: epochs where lr *= gamma
    step_size: Positive = 30  # step: lr *= gamma every step_size epochs
    gamma: Annotated[float, Range(gt=0)] = 0.1
    grad_clip: Annotated[Optional[float], Range(gt=0)] = None
    device: Device = Device.auto
    precision: Precision = Precision.fp32
    channels_last: bool = True  # NHWC for 4-D inputs and conv weights: faster convs on CPU (oneDNN) and GPU tensor cores
    compile: bool = False
    compile_mode: Annotated[str, OneOf(*COMPILE_MODES)] = "default"  # reduce-overhead: CUDA graphs
    num_threads: NonNegative = 0  # torch intra-op threads; 0: auto (OMP_NUM_THREADS if set, else on a CPU the cores other processes leave idle, re-measured every epoch: regstory.threads)
    num_workers: NonNegative = 4  # DataLoader workers, for large sets read from disk (ImageNet, CelebA)
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on CUDA)
    eval_every: Positive = 1  # epochs between val/test passes (the last epoch always; debias plugins evaluate every epoch)
    checkpoint_every: Positive = 1  # epochs between checkpoints (the last epoch is always saved)
    # and at least this many seconds of wall time between two mid-round checkpoints (0: every checkpoint_every
    # epochs). A round's last epoch and a preemption always write one. A checkpoint after every epoch cost a small
    # MLP ~5% of its run; a ResNet-18 pruning checkpoint (180 MB) takes ~0.5 s, about a fast GPU epoch
    checkpoint_interval_s: Annotated[float, Range(ge=0)] = 30.0


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
    plugins: Dict[str, Any] = field(default_factory=dict)  # extra plugin slots: +method@plugins.<name>=imp
    seed: int = 0
    resume: bool = False
    experiment_name: Optional[str] = None


@dataclass
class NoDistillation:
    """``distill=none``: no keys, no plugin."""


# Keys of a dataset option that the runner reads itself; the rest go to the dataset builder.
DATASET_RUNNER_KEYS = ("name", "val_fraction")
TARGET_GROUPS = ("dataset", "arch", "noise", "method", "debias", "distill")
#: arguments the runner passes to a target itself (not config keys)
INJECTED = ("input_shape", "num_classes", "root", "download")
#: packages whose modules declare options (imported by register_configs, so a new module needs no registration)
OPTION_PACKAGES = ("regstory.data", "regstory.models", "regstory.pruning", "regstory.debias", "regstory.distill")
_registered = False


def register_configs() -> None:
    """Store the root schema and every option's schema (``<group>/<option>_schema``) in Hydra's ConfigStore."""
    global _registered
    if _registered:
        return
    from regstory.plugins import Plugin

    import_all(OPTION_PACKAGES)
    for group in ("method", "debias"):
        register(group, "none", schema_of(Plugin))
    register("distill", "none", NoDistillation)
    register("trainer", "trainer", TrainerConfig)
    register("logger", "logger", LoggerConfig)
    cs = ConfigStore.instance()
    cs.store(name="regstory_schema", node=RegstoryConfig)
    for (group, name), schema in OPTIONS.items():
        cs.store(group=group, name=f"{name}_schema", node=schema)
    _registered = True


def option_nodes(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """The group nodes and the extra plugin slots (``plugins.<name>``), with their dotted keys."""
    nodes = [(g, cfg[g]) for g in TARGET_GROUPS if isinstance(cfg.get(g), DictConfig)]
    plugins = cfg.get("plugins")
    if isinstance(plugins, DictConfig):
        nodes += [(f"plugins.{k}", v) for k, v in plugins.items() if isinstance(v, DictConfig)]
    return nodes


def check_targets(cfg: DictConfig) -> None:
    """Fail fast on an option whose ``_target_`` does not import, or with keys its target does not take
    (e.g. ``+method.rat=0.2``)."""
    for key, node in option_nodes(cfg):
        if "_target_" not in node:
            continue
        try:
            target = get_object(node._target_)
        except Exception as err:
            raise ConfigError(f"{key}._target_ '{node._target_}' cannot be imported: {err}") from None
        schema = OmegaConf.get_type(node)
        if not (dataclasses.is_dataclass(schema) and _own_target(schema) == node._target_):
            schema = schema_of(target, exclude=INJECTED)  # _target_ changed by an override: its own signature
        allowed_keys = {k for k in hints(schema) if not k.startswith("_")}
        unknown = sorted({str(k) for k in node if not str(k).startswith("_")} - allowed_keys)
        if unknown:
            raise ConfigError(f"{key}: unknown option(s) {', '.join(unknown)} for {node._target_}; "
                              f"allowed: {', '.join(sorted(allowed_keys)) or '(none)'}")


def _own_target(schema: type) -> Any:
    return next((f.default for f in dataclasses.fields(schema) if f.name == "_target_"), None)


def check_values(cfg: DictConfig) -> None:
    """Type and range of every key of every schema node (``trainer.epochs``, ``plugins.second.rate``...), and no key
    that its schema does not have (``+trainer.epoch=3``)."""
    def walk(node: DictConfig, data: dict, prefix: str) -> None:
        schema = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(schema):
            known = hints(schema)
            retargeted = "_target_" in data and _own_target(schema) != data["_target_"]  # check_targets checks it
            unknown = sorted(str(k) for k in data if k not in known and not str(k).startswith("_"))
            if unknown and not retargeted:  # added with '+key=' or '++key=', which open the schema node
                where = prefix.rstrip(".") or "the root config"
                raise ConfigError(f"{prefix}{unknown[0]} is not a key of {where}; allowed: "
                                  f"{', '.join(k for k in known if not k.startswith('_')) or '(none)'}")
            for key, annotation in known.items():
                if key in data and not key.startswith("_"):
                    check(prefix + key, annotation, data[key])
        for key, value in data.items():
            child = node._get_node(key)
            if isinstance(value, dict) and isinstance(child, DictConfig):
                walk(child, value, f"{prefix}{key}.")

    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception as err:  # an interpolation that does not resolve
        raise ConfigError(one_line(err)) from None
    walk(cfg, data, "")


def one_line(err: BaseException) -> str:
    """A Hydra/OmegaConf composition error as one line that names the key and what it allows."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    key = re.sub(r"\[\d+\]$", "", str(getattr(cause, "full_key", "") or ""))
    schema, name = getattr(cause, "object_type", None), key.rsplit(".", 1)[-1]
    known = hints(schema) if dataclasses.is_dataclass(schema) else {}
    if type(cause).__name__ == "ValidationError" and name in known:
        given = re.match(r"Error merging override [^=]+=(.*)", str(err))
        value = given.group(1) if given else re.search(r"Value '(.*?)'", str(cause))
        value = value if isinstance(value, str) or value is None else value.group(1)
        return f"{key} must be {allowed(known[name])}" + (f", got {value}" if value is not None else "")
    if type(cause).__name__ in ("ConfigKeyError", "ConfigAttributeError") and known:
        group = key.rsplit(".", 1)[0] if "." in key else "the root config"
        keys = ", ".join(k for k in known if not k.startswith("_")) or "(none)"
        return f"{key} is not a key of {group}; allowed: {keys} (add a new key with +{key}=...)"
    text = str(err).split("\nConfig search path")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[1].startswith("Available options"):  # unknown group option: list the choices inline
        options = [o for o in lines[2:] if not o.endswith("_schema")]
        return f"{lines[0]}; {lines[1][:-1].lower()}: {', '.join(options)}"
    if cause is not err:
        lines += [line.strip() for line in str(cause).splitlines() if line.strip() and "full_key" not in line
                  and "object_type" not in line and "reference_type" not in line]
    return "; ".join(dict.fromkeys(lines))


def compose_checked(overrides: list[str], config_name: str = "config") -> DictConfig:
    """Compose with Hydra (already initialised) and check the result; any problem is one :class:`ConfigError` line."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        cfg = compose(config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(one_line(err)) from None
    check_targets(cfg)
    check_values(cfg)
    return cfg


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
