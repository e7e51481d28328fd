"""Epoch time of the quick-start run (MLP 40-512-512-10 on MNIST-1D) alone and beside one competing busy process,
for several thread settings, measured side by side in one invocation.

Each setting runs ``regstory-run`` in a fresh process (so OpenMP reads its environment at start-up) for
``--epochs`` epochs and reports the median epoch ``time_s`` from ``metrics.jsonl``. The competitor is one Python
process spinning on a core, as another user's job would. Prints one table and the ratios busy / alone.

    python scripts/bench_contention.py --epochs 15
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    # name: (extra overrides, extra environment)
    "2 threads, OpenMP's default wait (torch's)": (["trainer.num_threads=2"], {}),
    "2 threads, active wait": (["trainer.num_threads=2"], {"OMP_WAIT_POLICY": "ACTIVE"}),
    "2 threads, passive wait": (["trainer.num_threads=2"], {"OMP_WAIT_POLICY": "PASSIVE"}),
    "1 thread": (["trainer.num_threads=1"], {}),
    "num_threads=0 (auto: regstory.threads)": ([], {}),
}


def spin(stop) -> None:
    """A single-threaded busy process (a Python loop)."""
    while not stop.is_set():
        pass


def train_like(stop) -> None:
    """Another training job: torch matrix products on torch's default threads (all cores)."""
    import torch

    a = torch.randn(512, 512)
    while not stop.is_set():
        a = torch.tanh(a @ a)


COMPETITORS = {"spin": spin, "torch": train_like}


def median_epoch(overrides: list[str], env: dict[str, str], epochs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        full_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
        full_env.update(env, REGSTORY_DATA=str(Path(tmp) / "data"), WANDB_MODE="disabled")
        exe = Path(sys.executable).parent / "regstory-run"
        subprocess.run([str(exe), "dataset=mnist1d", "arch=mlp", f"trainer.epochs={epochs}", "trainer.eval_every=1000",
                        "logger.wandb.mode=disabled", "logger.progress=none", f"hydra.run.dir={run_dir}", *overrides],
                       env=full_env, check=True, capture_output=True)
        times = [json.loads(line)["time_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(times[1:])  # the first epoch pays one-off costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--competitor", choices=sorted(COMPETITORS), default="torch",
                        help="torch: another torch job on all cores (default); spin: one busy Python loop")
    args = parser.parse_args()
    rows = []
    for name, (overrides, env) in SETTINGS.items():
        alone = median_epoch(overrides, env, args.epochs)
        stop = multiprocessing.Event()
        competitor = multiprocessing.Process(target=COMPETITORS[args.competitor], args=(stop,))
        competitor.start()
        time.sleep(0.5)
        try:
            busy = median_epoch(overrides, env, args.epochs)
        finally:
            stop.set()
            competitor.join()
        rows.append((name, alone, busy))
    print(f"{'setting':44s} {'alone (s)':>10s} {'beside a busy process (s)':>26s} {'busy/alone':>11s}")
    for name, alone, busy in rows:
        print(f"{name:44s} {alone:10.4f} {busy:26.4f} {busy / alone:10.1f}x")
    print(f"competitor: {args.competitor}; cores: {os.cpu_count()}; load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
