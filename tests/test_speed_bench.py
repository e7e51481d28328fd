"""scripts/bench_train.py runs both loops in one process and reports what it measured (no timing is asserted)."""
from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_times_baseline_regstory_and_floor(bench, capsys):
    result = bench.main(["--arch", "mlp", "--dataset", "synthetic28", "--num-train", "192", "--batch-size", "64",
                         "--repeats", "1", "--warmup", "0", "--threads", "1", "--parallel-seeds", "2"])
    out = capsys.readouterr().out
    assert {"baseline_s", "regstory_s", "floor (fwd+bwd)_s", "vmap x2_s", "speedup", "parallel_seeds_gain"} <= set(result)
    assert result["speedup"] == pytest.approx(result["baseline_s"] / result["regstory_s"])
    for label in ("baseline:", "regstory:", "speedup:", "images/s", "GFLOP/s"):
        assert label in out
    assert "masks cost" in out or "n/a (regstory.pruning not present)" in out


def test_baseline_dataset_is_per_sample_and_uses_torchvision_transforms(bench):
    bundle = bench.synthetic_bundle("synthetic32", 8)
    transform = bench.baseline_transform(bundle)
    names = [type(t).__name__ for t in transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "Normalize"]
    x, y = bench.SampleDataset(bundle.train.x, bundle.train.y, transform)[3]
    assert x.shape == (3, 32, 32) and isinstance(y, int)


def test_mask_and_entropy_costs_are_timed_through_the_plugin_hooks(bench, capsys, monkeypatch):
    """With a pruning package present, the bench prunes once through ``end_round`` and times the masked loop; here
    ``method=none`` stands in for a pruning method so the path runs without regstory.pruning."""
    monkeypatch.setattr(bench, "pruning_available", lambda: True)
    result = bench.main(["--arch", "mlp", "--dataset", "synthetic28", "--num-train", "128", "--batch-size", "64",
                         "--repeats", "1", "--warmup", "0", "--no-baseline", "--no-floor", "--mask-method", "none",
                         "--entropy-override", "trainer.lr=0.05"])
    out = capsys.readouterr().out
    assert {"regstory+masks_s", "regstory+entropy_s", "masks_cost", "entropy_cost"} <= set(result)
    assert "masks cost" in out and "entropy cost" in out
