"""Read run folders (``metrics.jsonl``, ``rounds.jsonl``, ``summary.json``, ``config.yaml``) into DataFrames.

Every row carries the run's flattened config (dotted keys such as ``noise.rate``, ``method._target_``), ``run_dir``
and ``finished`` (the run wrote its ``summary.json``), so tables group by any config key. Each frame also says, in
``df.attrs``, which columns come from the config (``"config_columns"``) and which run folders it could not read
(``"skipped"``: ``(run folder, reason)`` pairs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from regstory.config import flat_config
from regstory.tracking import METRICS_FILE, ROUNDS_FILE, read_jsonl

SUMMARY_FILE = "summary.json"


def scan_runs(root: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Run folders under ``root`` (any depth) with a ``config.yaml`` and a ``metrics.jsonl``, and the other folders
    that look like a run's (a Hydra job folder ``.hydra/``, a ``provenance.json`` or a ``metrics.jsonl``) with the
    reason each cannot be read."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such folder: '{root}'")
    marks = [*root.rglob(METRICS_FILE), *root.rglob("provenance.json"), *root.rglob(".hydra")]
    candidates = sorted({p.parent for p in marks if p.name != ".hydra" or p.is_dir()})
    runs, skipped = [], []
    for run_dir in candidates:
        if not (run_dir / "config.yaml").exists():
            skipped.append((run_dir, "no config.yaml: stopped before training started"))
        elif not (run_dir / METRICS_FILE).exists():
            skipped.append((run_dir, f"no {METRICS_FILE}: stopped before its first epoch"))
        else:
            runs.append(run_dir)
    return runs, skipped


def find_runs(root: str | Path) -> list[Path]:
    """Run folders under ``root`` (any depth): those holding a ``config.yaml`` and a ``metrics.jsonl``."""
    return scan_runs(root)[0]


def _config_of(run_dir: Path) -> dict:
    return flat_config(OmegaConf.load(run_dir / "config.yaml"))


def flatten(entries: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``{"plugins": {"method": {"x": 1}}}`` -> ``plugins.method.x``); lists are left
    out (a table cell holds one value)."""
    out: dict[str, Any] = {}
    for key, value in entries.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif not isinstance(value, list):
            out[name] = value
    return out


def _frame(root, rows_of: Callable[[Path], list[dict]]) -> pd.DataFrame:
    runs, skipped = scan_runs(root)
    rows, config_columns = [], {}
    for run_dir in runs:
        try:
            config = _config_of(run_dir)
            records = rows_of(run_dir)
        except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as err:  # a corrupt file: skip the run
            skipped.append((run_dir, f"unreadable: {type(err).__name__}: {' '.join(str(err).split())[:200]}"))
            continue
        config_columns.update(dict.fromkeys(config))
        finished = (run_dir / SUMMARY_FILE).exists()
        for row in records:
            rows.append({**config, **row, "run_dir": str(run_dir), "finished": finished})
    df = pd.DataFrame(rows)
    df.attrs["config_columns"] = [c for c in config_columns if c in df.columns]
    df.attrs["skipped"] = [(str(d), reason) for d, reason in sorted(skipped)]
    return df


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per run: config + ``summary.json``, its plugins' entries flattened (``plugins.method.final_sparsity``).
    Runs without a summary (running, stopped or crashed) get ``finished=False``."""

    def rows(run_dir: Path):
        path = run_dir / SUMMARY_FILE
        summary = json.loads(path.read_text()) if path.exists() else {}
        return [flatten(summary)]

    return _frame(root, rows)


def load_epochs(root: str | Path) -> pd.DataFrame:
    """One row per (run, round, epoch) from ``metrics.jsonl``."""
    return _frame(root, lambda d: read_jsonl(d / METRICS_FILE))


def load_rounds(root: str | Path) -> pd.DataFrame:
    """One row per (run, round) from ``rounds.jsonl``."""
    return _frame(root, lambda d: read_jsonl(d / ROUNDS_FILE))
