"""Run identity: which experiment a run folder holds, and where that run stands.

A run's id is a short hash (the first 12 hex digits of a sha256) of the canonical JSON of its resolved config without
the keys that only say where and how the run is shown, stored and computed (:data:`NOT_IDENTITY`): the keys a resume
may change (:data:`regstory.resume.SAFE_ON_RESUME`: ``logger.*``, ``data.root``, ``data.download``,
``trainer.num_threads``, ``trainer.num_workers``, ``trainer.device``, ``trainer.checkpoint_*``,
``trainer.eval_batch_size``, ``trainer.compile*``, ``resume``), plus ``hydra.*`` and ``dry_run``. So two configs have
the same id exactly when one run may be continued with the other's config. ``trainer.device`` is left out for that
reason: a sweep started on one machine may be finished on another (it changes the last bits of the results, as the
thread count does, not the experiment).

The id is stored in the run's ``provenance.json`` (``run_id``) when the run starts. A folder without it (a run made
before run ids) is identified by its ``config.yaml``. A relaunched sweep (:mod:`regstory.preflight`) and each of its
jobs (:func:`regstory.resume.continue_sweep_job`) use :func:`inspect_folder` to see what a job's folder holds.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from regstory.checkpoint import LAST
from regstory.options import ConfigError
from regstory.resume import CONFIG_FILE, SAFE_ON_RESUME, _covered, _show, flatten
from regstory.tracking import METRICS_FILE

#: keys (and key prefixes) that are not part of a run's identity
NOT_IDENTITY = (*SAFE_ON_RESUME, "hydra", "dry_run")
PROVENANCE_FILE = "provenance.json"
SUMMARY_FILE = "summary.json"

#: what a folder holds for a job (:func:`inspect_folder`)
NEW = "new"  # nothing of a run: the job starts it
FINISHED = "finished"  # the job's run, finished (summary.json): a relaunch skips it
RESUMABLE = "resumable"  # the job's run, with a checkpoint: a relaunch resumes it
RESTART = "restart"  # the job's run, killed before its first checkpoint: a relaunch starts it over


class RunIdMismatch(ConfigError):
    """A folder holds another experiment than the job that would run there; ``diff`` names the differing keys."""

    def __init__(self, message: str, diff: str = ""):
        super().__init__(message)
        self.diff = diff


def _container(cfg: DictConfig | dict) -> dict:
    if isinstance(cfg, dict):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def identity(cfg: DictConfig | dict, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config's dotted keys and values that make the experiment (every key but :data:`NOT_IDENTITY` and
    ``leave_out``)."""
    skip = (*NOT_IDENTITY, *leave_out)
    return {k: v for k, v in flatten(_container(cfg)).items() if not _covered(k, skip)}


def hash_identity(ident: dict[str, Any]) -> str:
    text = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_id(cfg: DictConfig | dict) -> str:
    """The run's id: a short sha256 of the canonical JSON of :func:`identity`."""
    return hash_identity(identity(cfg))


def config_id(cfg: DictConfig | dict) -> str:
    """The id of the config without its seed: the repeats of one setup share it (wall-time estimates)."""
    return hash_identity(identity(cfg, leave_out=("seed",)))


def saved_config(run_dir: Path) -> dict | None:
    """The resolved config a run started with (``config.yaml``), or None."""
    path = Path(run_dir) / CONFIG_FILE
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.exists() else None


def stored_run_id(run_dir: Path) -> str | None:
    """The id a run folder holds: ``provenance.json``'s ``run_id``, else that of its ``config.yaml``; None when it
    holds neither (no run was started there)."""
    run_dir = Path(run_dir)
    try:
        stored = json.loads((run_dir / PROVENANCE_FILE).read_text()).get("run_id")
    except (OSError, ValueError):
        stored = None
    if stored:
        return str(stored)
    saved = saved_config(run_dir)
    return run_id(saved) if saved is not None else None


def differences(job: dict[str, Any], run: dict[str, Any]) -> str:
    """``key=<job's value> (the run has <run's value>)`` for every identity key that differs, comma-separated."""
    keys = sorted(k for k in set(job) | set(run) if job.get(k) != run.get(k))
    return ", ".join(f"{k}={_show(job.get(k))} (the run has {_show(run.get(k))})" for k in keys)


@dataclass
class Folder:
    """What a run folder holds for a job."""

    path: Path
    state: str  # NEW, FINISHED, RESUMABLE or RESTART
    run_id: str | None = None  # the stored id (None: no run there)
    epochs_done: int = 0  # epoch records in metrics.jsonl

    @property
    def holds_run(self) -> bool:
        return self.run_id is not None or self.state != NEW


def check_same_run(run_dir: Path, cfg: DictConfig | dict, stored: str | None = None) -> None:
    """Refuse (:class:`RunIdMismatch`, one line naming every differing key) when ``run_dir`` holds a run of another
    experiment than ``cfg``. The stored id decides; when it differs but the configs' identities are equal (an id
    stored by another version of this rule) the run is the same."""
    stored = stored if stored is not None else stored_run_id(run_dir)
    if stored is None:
        return
    job = identity(cfg)
    if stored == hash_identity(job):
        return
    saved = saved_config(run_dir)
    diff = differences(job, identity(saved)) if saved is not None else ""
    if saved is not None and not diff:
        return
    raise RunIdMismatch(f"{run_dir} holds another experiment (run id {stored}, this job's is {hash_identity(job)})"
                        + (f": {diff}" if diff else "")
                        + ". Relaunch with the overrides it was started with, or use another hydra.sweep.dir",
                        diff or f"run id {stored}, this job's is {hash_identity(job)}")


def inspect_folder(run_dir: Path, cfg: DictConfig | dict | None = None) -> Folder:
    """What ``run_dir`` holds: :data:`NEW` (no run, or no more than its config), :data:`FINISHED` (``summary.json``),
    :data:`RESUMABLE` (``checkpoints/last.pt``) or :data:`RESTART` (epochs written but no checkpoint). With ``cfg``,
    a run of another experiment is refused (:func:`check_same_run`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return Folder(run_dir, NEW)
    stored = stored_run_id(run_dir)
    if cfg is not None:
        check_same_run(run_dir, cfg, stored)
    epochs = len(epoch_records(run_dir))
    if (run_dir / SUMMARY_FILE).exists():
        state = FINISHED
    elif (run_dir / "checkpoints" / LAST).exists():
        state = RESUMABLE
    elif epochs:
        state = RESTART
    else:
        state = NEW
    return Folder(run_dir, state, stored, epochs)


def epoch_records(run_dir: Path) -> list[dict[str, Any]]:
    """The readable records of ``metrics.jsonl`` (a line cut by a kill is left out)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
