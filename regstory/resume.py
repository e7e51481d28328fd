"""A resumed run continues with its own saved config; the command line may change only what is safe to change.

``resume=true hydra.run.dir=<run>`` reads ``<run>/config.yaml`` (written when the run started) and continues with it,
so the original overrides need not be typed again and cannot be forgotten. An override that differs from the saved
config is refused in one line listing every such key, unless the key is safe to change mid-run
(:data:`SAFE_ON_RESUME`: where logs go, threads, device, checkpoint cadence, data location) or it is more epochs
(``trainer.epochs`` above the saved value, for a run that has not finished and whose schedule does not depend on the
number of epochs, i.e. not cosine). The changes that were applied are appended to ``resumes.jsonl``; the
original ``config.yaml``, ``provenance.json`` and ``.hydra/`` record are never rewritten.

A job of a relaunched ``-m`` sweep continues the run its folder already holds, when that run is the same experiment
(:mod:`regstory.runid`): it skips a finished run, resumes one with a checkpoint (through the same
:func:`config_for_resume`), starts over one killed before its first checkpoint, and refuses a run of another
experiment (:func:`continue_sweep_job`).
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, read_write

from regstory.options import ConfigError
from regstory.utils import _json_default

log = logging.getLogger("regstory")

CONFIG_FILE = "config.yaml"
RESUMES_FILE = "resumes.jsonl"

#: keys (and key prefixes) that a resume may change: where and how the run is shown, stored and computed
SAFE_ON_RESUME = ("resume", "logger", "data.root", "data.download", "trainer.num_threads", "trainer.num_workers",
                  "trainer.device", "trainer.checkpoint_every", "trainer.checkpoint_interval_s",
                  "trainer.eval_batch_size", "trainer.compile", "trainer.compile_mode")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (lists stay whole)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def explicit_override_keys() -> list[str] | None:
    """The keys the command line set (``trainer.lr=0.5`` -> ``trainer.lr``, ``dataset=digits`` -> ``dataset``), or
    None outside a Hydra app (every difference then counts as asked for)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except (ValueError, ImportError):
        return None
    return [o.lstrip("+~").split("=", 1)[0].split("@", 1)[0] for o in overrides]


def _covered(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_for_resume(cfg: DictConfig, run_dir: Path,
                      explicit: list[str] | None = None) -> tuple[DictConfig, dict[str, list[Any]]]:
    """The run's saved config with the command line's safe changes applied, and those changes ({key: [run's value,
    new value]}); refuses the others in one line."""
    saved_path = Path(run_dir) / CONFIG_FILE
    if not saved_path.exists():
        return cfg, {}  # a run killed before it wrote its config: the command line's config is all there is
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    given = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    old, new = flatten(saved), flatten(given)
    changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    if explicit is not None:
        changed = {k: v for k, v in changed.items() if any(_covered(k, [e]) or _covered(e, [k]) for e in explicit)}
    refused = {k: v for k, v in changed.items() if not _safe(k, *v, schedule=old.get("trainer.schedule"))}
    if refused:
        listed = ", ".join(f"{k}={_show(v[1])} (the run has {_show(v[0])})" for k, v in refused.items())
        raise ConfigError(f"resume=true continues the run in {run_dir} with its own config; these overrides differ "
                          f"from it: {listed}. Drop them, or start a new run in another hydra.run.dir")
    merged = OmegaConf.create(saved)
    for key, (_, value) in changed.items():
        OmegaConf.update(merged, key, value, force_add=True)
    merged.resume = True
    return merged, {k: list(v) for k, v in changed.items() if k != "resume"}


def _safe(key: str, old: Any, new: Any, schedule: str | None = None) -> bool:
    """A safe key, or more epochs under a schedule that does not depend on the number of epochs (cosine does)."""
    if _covered(key, SAFE_ON_RESUME):
        return True
    more = isinstance(old, int) and isinstance(new, int) and new > old
    return key == "trainer.epochs" and more and schedule != "cosine"


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def record_resume(run_dir: Path, changes: dict[str, list[Any]], argv: list[str]) -> None:
    """Append this resume (when, what the command line changed, the command) to ``resumes.jsonl``."""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": changes, "argv": argv},
                      default=_json_default)
    with open(Path(run_dir) / RESUMES_FILE, "a") as f:
        f.write(line + "\n")


def in_sweep_job() -> bool:
    """True in a job of a Hydra multirun (``-m``), whatever the launcher (basic, joblib, submitit)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ValueError, ImportError):
        return False


def continue_sweep_job(cfg: DictConfig, run_dir: Path) -> tuple[DictConfig, dict[str, Any] | None]:
    """What a sweep job does with a folder that a run of the sweep already used (a relaunch): a finished run of the
    same experiment is skipped (its summary is returned, nothing is written); one with a checkpoint, or killed
    before its first one, continues as ``resume=true`` would (the config comes back with ``resume`` set); a run of
    another experiment is refused in one line (:class:`regstory.runid.RunIdMismatch`). An empty folder: ``cfg``
    unchanged, None."""
    from regstory.runid import FINISHED, RESTART, RESUMABLE, SUMMARY_FILE, inspect_folder

    folder = inspect_folder(run_dir, cfg)
    if folder.state == FINISHED:
        log.info("%s holds this job's run (run id %s), finished: skipped", run_dir, folder.run_id)
        return cfg, json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    if folder.state in (RESUMABLE, RESTART):
        cfg = copy.deepcopy(cfg)
        with read_write(cfg):
            cfg.resume = True
    return cfg, None
