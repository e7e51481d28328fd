"""Where metrics go: ``metrics.jsonl`` (one JSON object per epoch), ``rounds.jsonl`` (one per round),
Weights & Biases (offline by default), and the console (a progress bar on a terminal, a plain line otherwise).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
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


class Progressbar:
    """A tqdm bar per epoch on a terminal; otherwise nothing per batch and one plain log line per epoch."""

    def __init__(self, mode: Progress):
        mode = Progress(mode)
        if mode is Progress.auto:
            mode = Progress.bar if sys.stderr.isatty() else Progress.plain
        self.mode = mode

    def wrap(self, batches: Iterable, total: int, desc: str) -> Iterator:
        if self.mode is not Progress.bar:
            return iter(batches)
        from tqdm.auto import tqdm

        return iter(tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True))

    def epoch_line(self, record: dict[str, Any]) -> None:
        if self.mode is Progress.none:
            return
        keys = ["round", "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "time_s"]
        extra = [k for k in ("sparsity",) if k in record]
        parts = [f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}" for k in keys + extra if k in record]
        log.info(" ".join(parts))


class RunLogger:
    """Fan-out of epoch and round records to the files of the run dir, W&B, and the console."""

    def __init__(self, run_dir: Path, logger_cfg, flat_config: dict[str, Any], wandb_id: str | None, group: str | None,
                 enabled: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled  # False on non-zero DDP ranks
        self.metrics = JsonlWriter(run_dir / METRICS_FILE)
        self.rounds = JsonlWriter(run_dir / ROUNDS_FILE)
        self.progress = Progressbar(logger_cfg.progress if enabled else Progress.none)
        self.wandb = WandbRun(logger_cfg.wandb, run_dir, flat_config, wandb_id, group) if enabled else None

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
            log.info("end of round %s: %s", record.get("round"),
                     " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float) and "/" not in k))

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb else None

    def finish(self, summary: dict[str, Any] | None, exit_code: int = 0) -> None:
        if self.wandb is not None:
            if summary:
                self.wandb.summary(summary)
            self.wandb.finish(exit_code)
