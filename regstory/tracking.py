"""Where metrics go: ``metrics.jsonl`` (one JSON object per epoch), ``rounds.jsonl`` (one per round),
Weights & Biases (offline by default), and the console (a progress bar on a terminal, a plain line otherwise).

The console numbers rounds and epochs from 1 (``round 2/31 epoch 60/60``); the files keep 0-based ``round`` and
``epoch`` fields. In a parallel sweep (joblib launcher) each console line starts with ``[job N]``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from regstory.config import Progress

log = logging.getLogger("regstory")

METRICS_FILE = "metrics.jsonl"
ROUNDS_FILE = "rounds.jsonl"


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null so pandas reads NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (``metrics.jsonl``, ``rounds.jsonl``); none if the file does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class JsonlWriter:
    """Append-only JSON-lines file. Each line is flushed, so a killed process loses at most the line in flight;
    :meth:`sync` makes the lines durable against a machine crash, and runs before a checkpoint records the counts."""

    def __init__(self, path: Path):
        self.path = path

    def count(self) -> int:
        if not self.path.exists():
            return 0
        return sum(1 for line in self.path.read_text().splitlines() if line.strip())

    def truncate(self, n_lines: int) -> None:
        """Keep the first ``n_lines`` records (drop those written after the checkpoint we resume from)."""
        if self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()][:n_lines]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in lines))
            os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def sync(self) -> None:
        if self.path.exists():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def wandb_login_missing(mode: str) -> str | None:
    """Why ``logger.wandb.mode=online`` cannot log (no API key in ``WANDB_API_KEY`` or ``~/.netrc``), or None."""
    if str(mode) != "online" or os.environ.get("WANDB_API_KEY"):
        return None
    import netrc

    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        if netrc.netrc().authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return ("logger.wandb.mode=online needs a W&B login: run `wandb login` or set WANDB_API_KEY; or keep the default "
            "logger.wandb.mode=offline (sync later with `wandb sync <run dir>/wandb`)")


class WandbRun:
    """A thin wrapper over a real ``wandb`` run; ``mode=disabled`` makes every call a no-op."""

    def __init__(self, cfg, run_dir: Path, flat_config: dict[str, Any], run_id: str | None, group: str | None):
        self.run = None
        self.id = run_id
        if cfg.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            mode=str(cfg.mode),
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group or group,
            tags=list(cfg.tags),
            name=cfg.name,
            dir=str(run_dir),
            config=flat_config,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self.id = self.run.id

    def log(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None})

    def summary(self, summary: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)):
                    self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def sweep_job() -> int | None:
    """This job's number in a Hydra multirun whose jobs run at the same time (the joblib launcher:
    ``hydra/launcher=joblib`` or ``local_parallel``); None for a single run, a sequential sweep, or outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    target = str((hc.launcher or {}).get("_target_", ""))
    if hc.mode != RunMode.MULTIRUN or "joblib" not in target.lower() or hc.job.get("num") is None:
        return None
    return int(hc.job.num)


class JobPrefix(logging.Formatter):
    """Wraps a console formatter: every line it prints starts with ``[job N]``."""

    def __init__(self, prefix: str, inner: logging.Formatter | None):
        super().__init__()
        self.prefix = prefix
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(f"{self.prefix} {line}" for line in self.inner.format(record).split("\n"))


def label_console(job: int | None) -> None:
    """In a parallel sweep, prefix each line of the console handlers (root's stream handlers, not its log files)
    with ``[job N]``; nothing for ``job=None``. Applying it twice changes nothing."""
    if job is None:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                and not isinstance(handler.formatter, JobPrefix):
            handler.setFormatter(JobPrefix(f"[job {job}]", handler.formatter))


def duration(seconds: float) -> str:
    """``h:mm:ss``."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progressbar:
    """The console side of a run: a tqdm bar per epoch on a terminal, else nothing per batch; one line per epoch
    (``round r/R epoch e/N: <metrics> | ETA h:mm:ss``, 1-based, the round left out of one-round runs) except for
    ``none``. In a parallel sweep (``job`` given) ``auto`` means plain lines: bars of several processes would
    overwrite each other on one terminal."""

    def __init__(self, mode: Progress, job: int | None = None, epochs: int | None = None):
        mode = Progress(mode)
        if mode is Progress.auto:
            mode = Progress.bar if sys.stderr.isatty() and job is None else Progress.plain
        self.mode = mode
        self.job = job
        self.rounds: int | None = None  # unknown until plan()
        self.epochs = epochs
        self._start: float | None = None
        self._done_at_start = 0
        self._eta: str | None = None

    def plan(self, rounds: int, epochs: int, round_: int = 0, epoch: int = 0) -> None:
        """The run's size (rounds, epochs per round) and where it starts (0-based round and epoch: a resumed run
        starts later); the labels show ``r/R``, and the ETA counts from here."""
        self.rounds, self.epochs = int(rounds), int(epochs)
        self._start = time.monotonic()
        self._done_at_start = round_ * self.epochs + epoch
        self._eta = None

    def label(self, round_: int, epoch: int) -> str:
        """``round r/R epoch e/N`` for a 0-based (round, epoch); 1-based, as every console message numbers them."""
        parts = []
        if self.rounds is None:
            parts.append(f"round {round_ + 1}")
        elif self.rounds > 1:
            parts.append(f"round {round_ + 1}/{self.rounds}")
        parts.append(f"epoch {epoch + 1}/{self.epochs}" if self.epochs else f"epoch {epoch + 1}")
        return " ".join(parts)

    def round_label(self, round_: int) -> str:
        """``round r/R`` (1-based) for a 0-based round."""
        return f"round {round_ + 1}/{self.rounds}" if self.rounds else f"round {round_ + 1}"

    def eta(self, round_: int, epoch: int) -> str | None:
        """Time left after the 0-based (round, epoch) just finished, from the mean time per epoch since
        :meth:`plan` (round ends included); None before plan() or after the last epoch."""
        if self._start is None or not self.rounds or not self.epochs:
            return None
        done = round_ * self.epochs + epoch + 1
        left = self.rounds * self.epochs - done
        ran = done - self._done_at_start
        if left <= 0 or ran <= 0:
            return None
        return duration((time.monotonic() - self._start) / ran * left)

    def wrap(self, batches: Iterable, total: int, desc: str) -> Iterator:
        if self.mode is not Progress.bar:
            return iter(batches)
        from tqdm.auto import tqdm

        desc = f"[job {self.job}] {desc}" if self.job is not None else desc
        postfix = f"run ETA {self._eta}" if self._eta else None
        return iter(tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True, postfix=postfix))

    def epoch_line(self, record: dict[str, Any]) -> None:
        round_, epoch = int(record.get("round", 0)), int(record.get("epoch", 0))
        self._eta = self.eta(round_, epoch)
        if self.mode is Progress.none:
            return
        keys = ["train_loss", "train_acc", "test_loss", "test_acc", "lr", "time_s"]
        extra = [k for k in ("sparsity",) if k in record]
        parts = [_metric(k, record[k]) for k in keys + extra if k in record]
        eta = f" | ETA {self._eta}" if self._eta else ""
        log.info("%s: %s%s", self.label(round_, epoch), " ".join(parts), eta)


def _metric(key: str, value: Any) -> str:
    return f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"


class RunLogger:
    """Fan-out of epoch and round records to the files of the run dir, W&B, and the console."""

    def __init__(self, run_dir: Path, logger_cfg, flat_config: dict[str, Any], wandb_id: str | None, group: str | None,
                 enabled: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled  # False on non-zero DDP ranks
        self.metrics = JsonlWriter(run_dir / METRICS_FILE)
        self.rounds = JsonlWriter(run_dir / ROUNDS_FILE)
        job = sweep_job() if enabled else None
        label_console(job)
        self.progress = Progressbar(logger_cfg.progress if enabled else Progress.none, job,
                                    flat_config.get("trainer.epochs"))
        self.wandb = WandbRun(logger_cfg.wandb, run_dir, flat_config, wandb_id, group) if enabled else None
        if enabled:
            log.info("run folder: %s", Path(run_dir).resolve())

    def start(self, rounds: int, epochs: int, round_: int = 0, epoch: int = 0) -> None:
        """The run's size and where it starts (0-based), for the ``round r/R epoch e/N`` labels and the ETA
        (:meth:`Progressbar.plan`)."""
        self.progress.plan(rounds, epochs, round_, epoch)

    def positions(self) -> dict[str, int]:
        """Line counts for a checkpoint, after making those lines durable (the checkpoint must not point past them)."""
        self.metrics.sync()
        self.rounds.sync()
        return {"metrics_lines": self.metrics.count(), "rounds_lines": self.rounds.count()}

    def rewind_to(self, positions: dict[str, int]) -> None:
        if self.enabled:
            self.metrics.truncate(positions["metrics_lines"])
            self.rounds.truncate(positions["rounds_lines"])

    def log_epoch(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.metrics.write(record)
            self.wandb.log(record)
            self.progress.epoch_line(record)

    def log_round(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.rounds.write(record)
            self.wandb.log({f"round/{k}": v for k, v in record.items()})
            # per-layer entries (``entropy/<layer>``...) stay in the files: the console line keeps network-level ones
            log.info("end of %s: %s", self.progress.round_label(int(record.get("round", 0))),
                     " ".join(_metric(k, v) for k, v in record.items() if isinstance(v, float) and "/" not in k))

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb else None

    def finish(self, summary: dict[str, Any] | None, exit_code: int = 0) -> None:
        if self.wandb is not None:
            if summary:
                self.wandb.summary(summary)
            self.wandb.finish(exit_code)
