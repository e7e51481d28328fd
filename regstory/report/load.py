"""Read run folders (``metrics.jsonl``, ``rounds.jsonl``, ``summary.json``, ``config.yaml``) into DataFrames.

Every row carries the run's flattened config (dotted keys such as ``noise.rate``, ``method._target_``) and
``run_dir``, so tables group by any config key.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from regstory.config import flat_config
from regstory.tracking import METRICS_FILE, ROUNDS_FILE, read_jsonl


def find_runs(root: str | Path) -> list[Path]:
    """Run folders under ``root`` (any depth): those holding a ``config.yaml`` and a ``metrics.jsonl``."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such folder: '{root}'")
    return sorted(p.parent for p in root.rglob("metrics.jsonl") if (p.parent / "config.yaml").exists())


def _config_of(run_dir: Path) -> dict:
    return flat_config(OmegaConf.load(run_dir / "config.yaml"))


def _frame(root, rows_of) -> pd.DataFrame:
    rows = []
    for run_dir in find_runs(root):
        config = _config_of(run_dir)
        for row in rows_of(run_dir):
            rows.append({**config, **row, "run_dir": str(run_dir)})
    return pd.DataFrame(rows)


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per run: config + ``summary.json`` (runs without a summary, i.e. unfinished, get ``finished=False``)."""

    def rows(run_dir: Path):
        path = run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        flat = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
        return [{**flat, "finished": path.exists()}]

    return _frame(root, rows)


def load_epochs(root: str | Path) -> pd.DataFrame:
    """One row per (run, round, epoch) from ``metrics.jsonl``."""
    return _frame(root, lambda d: read_jsonl(d / METRICS_FILE))


def load_rounds(root: str | Path) -> pd.DataFrame:
    """One row per (run, round) from ``rounds.jsonl``."""
    return _frame(root, lambda d: read_jsonl(d / ROUNDS_FILE))
