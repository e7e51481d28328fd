"""IRENE's privacy head H (thesis sec. 3.5.1): trained on the detached bottleneck only, ``head_steps`` updates per
batch (1 = the authors' code)."""
import json

import pytest
import torch
import torch.nn.functional as F

from regstory.debias.irene import IRENE, BiasHead, mutual_information_proxy
from tests.conftest import run_cli


def _manual_sgd_head(head: BiasHead, z, bias, steps, lr):
    """Plain SGD (no momentum, no weight decay) on CE(b, W z + c), written out by hand."""
    w, c = head.linear.weight.detach().clone(), head.linear.bias.detach().clone()
    for _ in range(steps):
        p = F.softmax(z @ w.t() + c, dim=1)
        g = (p - F.one_hot(bias, w.shape[0]).float()) / len(bias)  # dCE/dlogits, mean reduction
        w, c = w - lr * g.t() @ z, c - lr * g.sum(0)
    return w, c


@pytest.mark.parametrize("steps", [1, 3])
def test_head_steps_are_that_many_sgd_updates_on_detached_z_sec3_5_1(steps):
    torch.manual_seed(0)
    head = BiasHead(4, 3, lr=0.5, momentum=0.0, weight_decay=0.0, device="cpu")
    z = torch.randn(6, 4, requires_grad=True)
    bias = torch.tensor([0, 1, 2, 0, 1, 2])
    want_w, want_c = _manual_sgd_head(head, z.detach(), bias, steps, lr=0.5)
    head.step(z * 2.0 / 2.0, bias, steps)  # a non-leaf z with a graph, as the encoder's output
    assert torch.allclose(head.linear.weight, want_w, atol=1e-6)
    assert torch.allclose(head.linear.bias, want_c, atol=1e-6)
    assert z.grad is None  # H's loss never reaches the encoder


def test_hand_reference_distinguishes_step_counts():
    torch.manual_seed(0)
    head = BiasHead(4, 3, lr=0.5, momentum=0.0, weight_decay=0.0, device="cpu")
    z = torch.randn(6, 4)
    bias = torch.tensor([0, 1, 2, 0, 1, 2])
    three_w, _ = _manual_sgd_head(head, z, bias, steps=3, lr=0.5)
    one_w, _ = _manual_sgd_head(head, z, bias, steps=1, lr=0.5)
    assert not torch.allclose(three_w, one_w, atol=1e-4)  # the hand reference tells 3 steps from 1


def test_head_steps_default_is_the_authors_single_update():
    assert IRENE().head_steps == 1


def test_invalid_head_steps_fail_fast():
    with pytest.raises(ValueError, match="head_steps"):
        IRENE(head_steps=0)


def test_cli_irene_preset_with_a_stronger_head(tmp_path):
    run_cli("experiment=debias_digits_irene", "debias.head_steps=3", "trainer.epochs=1", "arch.channels=[8,16,16]",
            "dataset.test_colours=1", "dataset.val_colours=1", "debias.probe_steps=10", "logger.wandb.mode=disabled",
            "logger.progress=none", "trainer.num_threads=1", "hydra.run.dir=run", cwd=tmp_path)
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["last_irene_head_bias_acc"] <= 1.0 and 0.0 <= summary["last_bias_probe_acc"] <= 1.0
    assert "head_steps: 3" in (run_dir / "config.yaml").read_text()


def test_plugin_after_backward_applies_head_steps_updates():
    torch.manual_seed(0)
    plugin = IRENE(head_lr=0.5, head_momentum=0.0, head_weight_decay=0.0, head_steps=4)
    plugin.head = BiasHead(4, 3, lr=0.5, momentum=0.0, weight_decay=0.0, device="cpu")
    z, bias = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    want_w, _ = _manual_sgd_head(plugin.head, z, bias, steps=4, lr=0.5)
    plugin._pending = (z, bias)
    plugin.after_backward(ctx=None)
    assert torch.allclose(plugin.head.linear.weight, want_w, atol=1e-6) and plugin._pending is None


def test_head_step_casts_a_bf16_bottleneck_up_and_keeps_h_in_fp32():
    """Under bf16 autocast the encoder's z is bf16; H (fp32, stepped after backward, outside autocast) trains on
    z.float(), the same update as on the fp32 values."""
    torch.manual_seed(0)
    head = BiasHead(4, 3, lr=0.5, momentum=0.0, weight_decay=0.0, device="cpu")
    z, bias = torch.randn(6, 4).bfloat16(), torch.tensor([0, 1, 2, 0, 1, 2])
    want_w, want_c = _manual_sgd_head(head, z.float(), bias, steps=2, lr=0.5)
    head.step(z, bias, steps=2)
    assert head.linear.weight.dtype == torch.float32
    assert torch.allclose(head.linear.weight, want_w, atol=1e-6)
    assert torch.allclose(head.linear.bias, want_c, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mi_proxy_is_computed_in_fp32_under_autocast(dtype):
    """Under fp16 autocast the joint's matmul ran in fp16, where the 1e-15 clamp is 0: a bias class that H never
    predicts gave 0 * log 0 = NaN (Voronoi's round 1 diverged). The proxy now runs in fp32 whatever the autocast."""
    bias = torch.tensor([0, 0, 1, 1])
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], requires_grad=True)  # H always says 0
    want = mutual_information_proxy(bias, probs, 2)
    with torch.autocast("cpu", dtype=dtype):
        got = mutual_information_proxy(bias, probs, 2)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert torch.allclose(got, want)
    got.backward()
    assert torch.isfinite(probs.grad).all()
