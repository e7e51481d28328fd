"""Table 2.1 footprint measures: counts, sizes, the lossless lzma codec, latency and the flat table row."""
import json

import pytest
import torch
from torch import nn

from regstory.pruning import footprint as fp


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.BatchNorm1d(300), nn.ReLU(), nn.Linear(300, 100),
                         nn.ReLU(), nn.Linear(100, 10))


def _sparsify(model: nn.Module, keep: float, seed: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in fp.prunable_weights(model):
            w.mul_((torch.rand(w.shape, generator=gen) < keep).to(w.dtype))
    return model


def test_counts_on_hand_made_tensors():
    lin = nn.Linear(3, 2)  # 6 weights + 2 biases
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, -0.0]]))
        lin.bias.copy_(torch.tensor([0.0, 3.0]))
    assert fp.parameter_count(lin) == 8
    assert fp.nonzero_parameters(lin) == 3
    assert fp.sparsity([lin.weight]) == pytest.approx(4 / 6)
    assert fp.sparsity([lin.weight, lin.bias]) == pytest.approx(5 / 8)
    assert fp.sparsity([]) == 0.0
    assert fp.pruning_ratio(lin) == pytest.approx(4 / 6)  # conv/linear weights only, bias left out
    assert fp.pruning_ratio([lin.bias]) == pytest.approx(1 / 2)


def test_size_mb_hand_computed():
    assert fp.size_mb(nn.Linear(10, 5)) == pytest.approx((10 * 5 + 5) * 4 / 1e6)
    bn = nn.BatchNorm1d(7)  # 14 parameters, 14 floating buffers, num_batches_tracked (int) never counted
    assert fp.size_mb(bn) == pytest.approx(28 * 4 / 1e6)
    assert fp.size_mb(bn, buffers=False) == pytest.approx(14 * 4 / 1e6)


def test_lzma_round_trip_is_exact():
    model = _sparsify(_mlp(), keep=0.1)
    model.train()(torch.randn(4, 64))  # non-trivial BN running stats and num_batches_tracked
    state = model.state_dict()
    state["extra.half"] = torch.tensor([0.0, -0.0, 1.5, float("inf"), 1e-7], dtype=torch.float16)
    state["extra.bool"] = torch.tensor([True, False, True])
    state["extra.empty"] = torch.empty(0, 3)
    state["extra.dense"] = torch.randn(5, 5)
    out = fp.compress(state, codec="lzma")
    assert out.codec == "lzma" and out.max_abs_error == 0.0 and out.nbytes == len(out.payload) > 0
    assert out.mb == pytest.approx(out.nbytes / 1e6)
    assert list(out.decoded) == list(state)
    for k, t in state.items():
        d = out.decoded[k]
        assert d.dtype == t.dtype and d.shape == t.shape, k
        assert torch.equal(d, t), k  # value for value (-0.0 == 0.0)
    assert fp.lzma_decode(out.payload).keys() == state.keys()
    copy = _mlp(seed=5)
    copy.load_state_dict({k: v for k, v in out.decoded.items() if not k.startswith("extra.")})


def test_lzma_smaller_for_sparse_model():
    dense = fp.compress(_mlp(), codec="lzma")
    sparse = fp.compress(_sparsify(_mlp(), keep=0.05), codec="lzma")
    assert sparse.nbytes < 0.12 * dense.nbytes  # bitmap + 5% of the values (pruned entries are often -0.0)
    assert dense.nbytes < fp.size_mb(_mlp()) * 1e6 * 1.05  # near the fp32 size (random floats barely compress)


def test_unknown_and_missing_codec():
    with pytest.raises(ValueError, match="unknown codec"):
        fp.compress(nn.Linear(2, 2), codec="zip")
    if fp.nncodec_available():
        pytest.skip("nncodec installed")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[nnc\]"'):
        fp.compress(nn.Linear(2, 2), codec="nncodec")
    assert fp.compress(nn.Linear(2, 2)).codec == "lzma"  # auto falls back


def test_nncodec_compresses_sparse_model():
    pytest.importorskip("nncodec")
    model = _sparsify(_mlp(), keep=0.02)
    out = fp.compress(model, codec="nncodec", qp=-32)
    assert out.codec == "nncodec" and 0 < out.nbytes < fp.compress(model, codec="lzma").nbytes
    assert 0.0 <= out.max_abs_error < 0.05
    state = model.state_dict()
    assert out.decoded.keys() == state.keys()
    assert torch.equal(out.decoded["2.num_batches_tracked"], state["2.num_batches_tracked"])


def test_latency_restores_threads_and_mode():
    model = _mlp().train()
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    res = fp.latency_ms(model, (64,), repeats=3, warmup=1, threads=other)
    assert res["median_ms"] > 0 and res["threads"] == other and res["repeats"] == 3
    assert torch.get_num_threads() == before and model.training
    assert fp.latency_ms(model, (64,), repeats=1, warmup=0, threads=None)["threads"] == before


def test_model_measures_keys_and_json():
    pruned = _sparsify(_mlp(), keep=0.1)
    simplified = nn.Sequential(nn.Flatten(), nn.Linear(64, 30), nn.ReLU(), nn.Linear(30, 10))
    row, packed = fp.model_measures(pruned, simplified, (64,), codec="lzma", repeats=2)
    assert json.loads(json.dumps(row)) == row and packed.codec == row["compressed_codec"] == "lzma"
    assert 85 < row["pruning_ratio_pct"] < 95
    assert row["compression_ratio"] == pytest.approx(fp.parameter_count(pruned) / row["nonzero_params"])
    assert row["simplified_mb"] == pytest.approx((64 * 30 + 30 + 30 * 10 + 10) * 4 / 1e6)
    assert row["macs_simplified"] == 64 * 30 + 30 * 10
    assert row["macs_pruned"] == sum(int((m.weight != 0).sum()) for m in pruned.modules() if isinstance(m, nn.Linear))
    assert row["simplified_bytes_on_disk"] > (64 * 30 + 30 * 10) * 4
    assert all(row[f"latency_ms_{k}"] > 0 for k in ("pruned", "simplified", "simplified_b64"))
    dense = fp.dense_measures(_mlp(), (64,), repeats=2)
    assert dense["dense_params"] == fp.parameter_count(pruned) and dense["latency_ms_dense"] > 0


def test_macs_of_lenet5_by_hand():
    """LeNet-5 (Caffe) on 28x28: conv1 20x24x24 outputs x 25 MACs, conv2 50x8x8 x (20*25), fc 800x500, head 500x10."""
    from regstory.models.lenet import lenet5

    model = lenet5((1, 28, 28), 10)
    hand = 20 * 24 * 24 * 25 + 50 * 8 * 8 * 20 * 25 + 800 * 500 + 500 * 10
    assert fp.macs(model, (1, 28, 28)) == hand
    with torch.no_grad():
        model.conv[0].weight[:10] = 0  # half of conv1's filters
    assert fp.macs(model, (1, 28, 28), nonzero=True) == hand - 10 * 24 * 24 * 25


def test_macs_of_resnet18_match_torchs_flop_counter():
    """torch.utils.flop_counter counts 2 FLOPs per MAC of the convolutions and matrix products (no BN, ReLU, adds)."""
    from torch.utils.flop_counter import FlopCounterMode

    from regstory.models.resnet_cifar import resnet18

    model = resnet18((3, 32, 32), 10, width=16).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    assert 2 * fp.macs(model, (3, 32, 32)) == counter.get_total_flops()


def test_footprint_of_runs_script_remeasures_a_finished_run(tmp_path):
    """scripts/footprint_of_runs.py rebuilds a finished LOBSTER run's final model and measures it again; its figures
    match what the run recorded (lossless codec: the decoded model has the run's test accuracy)."""
    import importlib.util
    import json
    from pathlib import Path

    import pandas as pd

    from regstory.train import run
    from tests.conftest import make_cfg

    run_dir = tmp_path / "run"
    run(make_cfg("dataset=digits", "dataset.val_fraction=0.2", "arch=lenet300", "method=lobster", "method.rounds=1",
                 "trainer.epochs=2", "method.latency_repeats=2"), run_dir=run_dir)
    script = Path(__file__).parents[2] / "scripts" / "footprint_of_runs.py"
    spec = importlib.util.spec_from_file_location("footprint_of_runs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(run_dir), "--codec", "lzma", "--repeats", "2", "--out", str(tmp_path / "t.csv")])
    row = pd.read_csv(tmp_path / "t.csv").iloc[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert row["nonzero_params"] == summary["nonzero_params"] > 0
    assert row["simplified_mb"] == pytest.approx(summary["simplified_mb"])
    assert row["decoded_test_acc"] == row["test_acc"] == pytest.approx(summary["compressed_test_acc"])
