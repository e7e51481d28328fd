"""Shared pieces of the cluster tests: a tiny run's overrides and metric comparison."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import FAST, REPO, read_jsonl

#: a tiny run (digits, small MLP): ~10 ms per epoch on one core
TINY = ["dataset=digits", "arch=mlp", "arch.width=32", "trainer.batch_size=64"]


def comparable(records: list[dict]) -> list[dict]:
    """Epoch records without wall-clock fields (everything else must match exactly)."""
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def final_metrics(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k.startswith(("final_", "best_")) and k != "final_time_s"}


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    """``regstory-run ARGS`` in the background (one torch thread), for tests that signal it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    exe = str(Path(sys.executable).parent / "regstory-run")
    return subprocess.Popen([exe, *FAST, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll until ``predicate()`` holds; fail if the process ended first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended (rc={proc.returncode}) before the condition held:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


def metrics_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(read_jsonl(path)) if path.exists() else 0
