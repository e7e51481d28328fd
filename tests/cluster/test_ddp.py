"""DDP: ``torchrun --nproc_per_node=2 -m regstory.train`` on CPU (gloo) trains the same model as one process with
the same global batch: equal shards, averaged gradients, rank-0-only files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regstory.config import ConfigError
from regstory.data.base import TensorSplit
from regstory.data.device_loader import TensorLoader
from regstory.distributed import DistEnv, per_rank_batch_size
from regstory.train import run
from tests.conftest import FAST, REPO, make_cfg, read_jsonl

# 800 train samples, global batch 64: 400 per rank, 32 per rank-step, so every global step sees the same samples
DDP_RUN = ["dataset=mnist1d", "dataset.num_samples=1000", "arch.width=64", "trainer.epochs=3",
           "trainer.batch_size=64", "trainer.device=cpu"]


def test_rank_shards_of_a_step_are_the_one_process_batch():
    """The union of the ranks' b-th batches (per-rank batch = global / world) is the 1-process b-th batch."""
    split = TensorSplit(torch.arange(24.0)[:, None], torch.zeros(24, dtype=torch.long), {})
    whole = [b["index"].tolist() for b in TensorLoader(split, 8, shuffle=True, seed=3)]
    shards = [[b["index"].tolist() for b in TensorLoader(split, 4, shuffle=True, seed=3, shard=(r, 2))]
              for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*shards)] == [sorted(b) for b in whole]


def test_global_batch_must_split_evenly_over_ranks():
    assert per_rank_batch_size(64, DistEnv(rank=1, world=2)) == 32
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        per_rank_batch_size(65, DistEnv(rank=0, world=2))


SHRINK = ["+plugins.shrink._target_=tests.test_surgery.ShrinkHidden"]  # model surgery after epoch 2: DDP re-wrapped


@pytest.mark.parametrize("extra", [[], SHRINK], ids=["plain", "model-surgery"])
def test_torchrun_two_gloo_processes_match_one_process_and_only_rank0_writes(tmp_path, extra):
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2", "-m", "regstory.train", *FAST,
                             *DDP_RUN, *extra, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        raise
    assert proc.returncode == 0, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"], "rank 1 must not create run folders of its own"
    ddp = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in ddp] == [0, 1, 2], "one line per epoch: rank 0 writes, rank 1 does not"
    assert (run_dir / "summary.json").exists() and (run_dir / "checkpoints" / "last.pt").exists()
    if extra:
        assert [r.get("hidden_units") for r in ddp] == [None, 32, None]  # both ranks shrank, DDP wrapped the new model

    single_dir = tmp_path / "single"
    run(make_cfg(*DDP_RUN, *extra), run_dir=single_dir)
    single = read_jsonl(single_dir / "metrics.jsonl")
    for a, b in zip(ddp, single):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (key, a, b)
