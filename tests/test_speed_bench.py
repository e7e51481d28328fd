"""scripts/bench_train.py runs both loops in one process and reports what it measured (no timing is asserted)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from regstory.plugins import Plugin

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
    assert {"baseline_s", "regstory_s", "floor (fwd+bwd)_s", "floor+update_s", "vmap x2_s", "speedup",
            "parallel_seeds_gain"} <= set(result)
    assert result["speedup"] == pytest.approx(result["baseline_s"] / result["regstory_s"])
    assert result["bound"] == pytest.approx(result["baseline_s"] / result["floor (fwd+bwd)_s"])
    assert result["train_bound"] == pytest.approx(result["baseline_s"] / result["floor+update_s"])
    assert result["over_train_floor"] == pytest.approx(result["regstory_s"] / result["floor+update_s"])
    for label in ("baseline:", "regstory:", "speedup:", "training bound:", "images/s", "GFLOP/s"):
        assert label in out
    assert "masks cost" in out


def test_baseline_dataset_is_per_sample_and_uses_torchvision_transforms(bench):
    bundle = bench.synthetic_bundle("synthetic32", 8)
    transform = bench.baseline_transform(bundle)
    names = [type(t).__name__ for t in transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "Normalize"]
    x, y = bench.SampleDataset(bundle.train.x, bundle.train.y, transform)[3]
    assert x.shape == (3, 32, 32) and isinstance(y, int)


class FakePruner(Plugin):
    """Stands in for a regstory.pruning method: masks the head's first row after each step, measures 'entropy'."""

    def __init__(self):
        self.rounds_ended = 0
        self.entropy_calls = 0

    def end_round(self, ctx):
        self.rounds_ended += 1
        return {}

    def after_step(self, ctx):
        with torch.no_grad():
            ctx.model.head.weight[0].zero_()

    def measure_entropy(self, ctx):
        self.entropy_calls += 1
        return {"entropy_mean": 0.0}


def test_mask_and_entropy_costs_are_timed_through_the_plugin_hooks(bench, capsys):
    """The bench trains one epoch, prunes once through ``end_round``, then times the masked loop and one
    ``measure_entropy`` call; a fake method stands in for a regstory.pruning method here."""
    result = bench.main(["--arch", "mlp", "--dataset", "synthetic28", "--num-train", "128", "--batch-size", "64",
                         "--repeats", "1", "--warmup", "0", "--no-baseline", "--no-floor", "--mask-method", "none",
                         "--mask-override", "method._target_=tests.test_speed_bench.FakePruner"])
    out = capsys.readouterr().out
    assert {"regstory+masks_s", "entropy (1 call)_s", "masks_cost", "entropy_steps"} <= set(result)
    assert "masks cost" in out and "entropy cost" in out and "checkpoint cost" in out
    assert result["checkpoint_epoch_cost"] > 0  # one write of that run's checkpoint, against a masked epoch


def test_a_method_without_entropy_is_reported_as_such(bench, capsys):
    result = bench.main(["--arch", "mlp", "--dataset", "synthetic28", "--num-train", "128", "--batch-size", "64",
                         "--repeats", "1", "--warmup", "0", "--no-baseline", "--no-floor", "--mask-method", "none"])
    assert "masks_cost" in result and "entropy_steps" not in result
    assert "entropy: n/a (method=none has no measure_entropy)" in capsys.readouterr().out


def test_bench_can_time_regstory_in_bf16_against_the_usual_fp32_loop(bench, capsys):
    bench.main(["--arch", "mlp", "--dataset", "synthetic28", "--num-train", "128", "--batch-size", "64",
                "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-floor", "--no-masks",
                "--precision", "bf16", "--baseline-precision", "fp32"])
    assert "precision=bf16 baseline_precision=fp32" in capsys.readouterr().out


def test_bench_refuses_fp16_on_cpu(bench):
    from regstory.config import ConfigError

    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        bench.main(["--arch", "mlp", "--dataset", "synthetic28", "--device", "cpu", "--precision", "fp16"])


def test_parallel_seeds_bench_checks_stacked_equals_sequential_and_reports_each_k(capsys):
    spec = importlib.util.spec_from_file_location("bench_parallel_seeds", REPO / "scripts" / "bench_parallel_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ratios = module.main(["--ks", "1", "2", "--width", "16", "--num-train", "256", "--batch-size", "32",
                          "--repeats", "1"])
    out = capsys.readouterr().out
    assert set(ratios) == {1, 2} and all(r > 0 for r in ratios.values())
    diff = float(out.split("max |diff| = ")[1].split()[0])
    moved = float(out.split("weights moved by up to ")[1].rstrip(")\n").split(")")[0])
    assert diff < 1e-6 < moved


def test_floor_update_is_sgd_with_momentum_and_floor_leaves_no_gradients(bench):
    """The training floor's update is v <- m v + g, w <- w - lr v (checked against torch.optim.SGD over three
    steps); both floors drop the gradients after each backward, as a loop's zero_grad does."""
    args = bench.parse_args(["--lr", "0.1", "--momentum", "0.9", "--batch-size", "4"])
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    reference = torch.nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    update = bench.sgd_update(list(model.parameters()), args)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        x = torch.randn(4, 3)
        for net in (model, reference):
            net.zero_grad(set_to_none=True)
            net(x).square().sum().backward()
        update()
        sgd.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)

    bundle = bench.synthetic_bundle("synthetic28", 8)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    before = [p.detach().clone() for p in net.parameters()]
    bench.floor_epoch(net, bundle, args, torch.device("cpu"), None)()
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))  # the plain floor does not train
    bench.floor_epoch(net, bundle, args, torch.device("cpu"), None, update=True)()
    assert all(p.grad is None for p in net.parameters())
    assert not all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


@pytest.mark.parametrize("no_kernels", ["0", "1"])
def test_bench_says_which_path_the_masks_take(bench, capsys, monkeypatch, no_kernels):
    from regstory import kernels

    monkeypatch.setenv("REGSTORY_NO_KERNELS", no_kernels)
    if no_kernels == "0" and kernels.masked_sgd_kernel() is None:
        pytest.skip("no masked SGD kernel here (no C++ compiler)")
    bench.main(["--arch", "mlp", "--dataset", "synthetic28", "--num-train", "128", "--batch-size", "64",
                "--repeats", "1", "--warmup", "0", "--no-baseline", "--no-floor"])
    out = capsys.readouterr().out
    expected = "masks inside the SGD step" if no_kernels == "0" else "masks in a separate gradient pass"
    assert expected in out
