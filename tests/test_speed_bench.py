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
                         "--repeats", "1", "--warmup", "0", "--threads", "1"])
    out = capsys.readouterr().out
    assert {"baseline_s", "regstory_s", "floor (fwd+bwd)_s", "speedup"} <= set(result)
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
