"""LNL (Kim et al. 2019; the authors' ``trainer.py`` and Hong & Yang's re-implementation): f minimises
CE + lambda * sum_k p_k log p_k of the bias predictor h's softmax (h's parameters constant there), h its bias CE
through a gradient-reversal layer that sends -grl_scale times the gradient into f; f alone at test time."""
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from regstory.debias.lnl import LNL, grad_reverse, negative_entropy
from regstory.plugins import StepOutput
from regstory.train import run
from tests.conftest import interrupt_then_resume, make_cfg, owned_linear, read_jsonl
from tests.debias.test_end_to_end import TINY, run_preset_cli
from tests.debias.test_rubi import plain_model_test_accuracy

SITE = "encoder.3"  # simple_convnet_small's second conv (16 channels under TINY), before the max-pool


@pytest.mark.parametrize("scale", [0.1, 2.0])
def test_grad_reverse_is_the_identity_forward_and_negates_and_scales_the_gradient(scale):
    x = torch.tensor([[1.0, -2.0, 3.0]], requires_grad=True)
    y = grad_reverse(x, scale)
    assert torch.equal(y, x)
    upstream = torch.tensor([[0.5, 4.0, -1.0]])
    y.backward(upstream)
    assert torch.equal(x.grad, -scale * upstream)  # the sign is flipped: +scale * upstream would fail


def test_negative_entropy_by_hand():
    logits = [1.0, 0.0, -1.0]
    z = sum(math.exp(v) for v in logits)
    p = [math.exp(v) / z for v in logits]
    want = sum(q * math.log(q) for q in p)  # = -H(p), about -0.832
    assert negative_entropy(torch.tensor([logits])).item() == pytest.approx(want, rel=1e-6)
    assert negative_entropy(torch.zeros(2, 4)).item() == pytest.approx(-math.log(4), rel=1e-6)  # uniform: -ln K


def plugin_with_predictor(weight, bias, entropy_weight=0.5, grl_scale=0.1):
    """An LNL plugin on the bottleneck whose predictor h is set by hand (no run)."""
    plugin = LNL(entropy_weight=entropy_weight, grl_scale=grl_scale)
    plugin.num_bias = weight.shape[0]
    plugin.predictor = owned_linear(weight, bias)
    return plugin


W = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]])
C = torch.tensor([0.1, 0.0, -0.2])
Z = [[0.5, 1.0], [2.0, -1.0]]
BATCH = {"y": torch.tensor([0, 1]), "bias": torch.tensor([2, 0])}


def step_output(z):
    return StepOutput(logits=torch.zeros(2, 3), per_sample_loss=torch.zeros(2), features=z)


def test_entropy_term_is_lambda_times_the_negative_entropy_and_trains_the_features_only():
    plugin = plugin_with_predictor(W, C, entropy_weight=0.5)
    z = torch.tensor(Z, requires_grad=True)
    term = plugin.extra_loss(None, BATCH, step_output(z))["lnl_entropy"]
    assert term.item() == pytest.approx(0.5 * negative_entropy(torch.tensor(Z) @ W.t() + C).item(), rel=1e-6)
    linear = plugin.predictor.module
    grads = torch.autograd.grad(term, [z, linear.weight, linear.bias], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0  # f is pushed to make h uncertain
    assert grads[1] is None and grads[2] is None  # h's parameters are constants in this term


def test_bias_term_is_h_ce_trains_h_and_sends_the_reversed_scaled_gradient_into_the_features():
    plugin = plugin_with_predictor(W, C, grl_scale=0.1)
    z = torch.tensor(Z, requires_grad=True)
    term = plugin.extra_loss(None, BATCH, step_output(z))["lnl_bias"]
    # the same CE without the reversal layer, on an independent copy of h and z
    ref_linear = nn.Linear(2, 3)
    with torch.no_grad():
        ref_linear.weight.copy_(W)
        ref_linear.bias.copy_(C)
    ref_z = torch.tensor(Z, requires_grad=True)
    ref = F.cross_entropy(ref_linear(ref_z), BATCH["bias"])
    assert term.item() == pytest.approx(ref.item(), rel=1e-6)
    term.backward()
    ref.backward()
    assert torch.allclose(z.grad, -0.1 * ref_z.grad, atol=1e-7)  # reversed and scaled into f
    linear = plugin.predictor.module
    assert torch.allclose(linear.weight.grad, ref_linear.weight.grad)  # h itself is trained normally
    assert torch.allclose(linear.bias.grad, ref_linear.bias.grad)


def test_predictor_on_the_bottleneck_follows_a_surgery_that_narrows_it():
    """After a surgery that keeps bottleneck features 0 and 2 of 3, h keeps those columns of its weight."""
    from types import SimpleNamespace

    from regstory.surgery import ModelChange

    plugin = plugin_with_predictor(torch.arange(9.0).view(3, 3), C)
    narrower = SimpleNamespace(head=nn.Linear(2, 2))
    change = ModelChange({"head.weight": ("head.weight", (None, torch.tensor([0, 2]))), "head.bias": ("head.bias", ())})
    plugin.model_replaced(SimpleNamespace(model=narrower, cfg=make_cfg()), change)
    assert plugin.predictor.module.weight.tolist() == [[0.0, 2.0], [3.0, 5.0], [6.0, 8.0]] and plugin.width == 2


def test_run_logs_its_terms_and_predictor_accuracy_tests_f_alone_and_resumes(tmp_path, monkeypatch):
    overrides = [*TINY, "debias=lnl"]
    straight = run(make_cfg(*overrides), run_dir=tmp_path / "straight")
    records = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    for r in records:
        assert r["loss/lnl_entropy"] <= 0 and r["loss/lnl_bias"] > 0
        assert 0 <= r["lnl_predictor_bias_acc"] <= 1
    assert straight["bias_agnostic"] is False and 0 <= straight["last_lnl_predictor_bias_acc"] <= 1
    ckpt = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=False)
    assert set(ckpt["plugins"]["debias"]["predictor"]) == {"module", "optimizer", "scheduler"}
    assert plain_model_test_accuracy(overrides, tmp_path / "straight") == pytest.approx(straight["last_test_acc"],
                                                                                      abs=1e-6)
    resumed = interrupt_then_resume(monkeypatch, LNL, "start_epoch", (0, 1), overrides, tmp_path / "resumed")
    for key in ("last_test_unbiased_acc", "last_test_conflicting_acc", "last_bias_probe_acc",
                "last_lnl_predictor_bias_acc", "selected_epoch"):
        assert resumed[key] == straight[key], key
    last = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")[-1]
    for key in ("loss/lnl_entropy", "loss/lnl_bias"):
        assert last[key] == pytest.approx(records[-1][key]), key


def test_predictor_on_a_site_reads_the_pooled_map_and_trains_f_through_it(tmp_path, monkeypatch):
    seen = []
    original = LNL.extra_loss

    def check(self, ctx, batch, out):
        feats = self.features_of(out)
        site = out.activations.post[SITE]
        seen.append((tuple(site.shape[1:]), tuple(feats.shape), feats.requires_grad,
                     torch.allclose(feats, site.mean((2, 3)))))
        return original(self, ctx, batch, out)

    monkeypatch.setattr(LNL, "extra_loss", check)
    summary = run(make_cfg(*TINY, "debias=lnl", f"debias.site={SITE}", "trainer.epochs=1"), run_dir=tmp_path)
    (channels, h, w), (n, width), in_graph, is_gap = seen[0]
    assert (channels, width) == (16, 16) and h > 1 and w > 1 and in_graph and is_gap
    assert all(s[0] == seen[0][0] and s[2] and s[3] for s in seen)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert "loss/lnl_entropy" in records[-1] and "loss/lnl_bias" in records[-1]
    assert 0 <= summary["last_lnl_predictor_bias_acc"] <= 1


def test_an_unknown_site_is_refused_naming_it(tmp_path):
    from regstory.config import ConfigError

    with pytest.raises(ConfigError, match="debias.site=encoder.99"):
        run(make_cfg(*TINY, "debias=lnl", "debias.site=encoder.99", "trainer.epochs=1"), run_dir=tmp_path)


def test_unknown_option_fails_fast(tmp_path):
    from regstory.config import ConfigError

    with pytest.raises(ConfigError, match="entropy_wieght"):
        run(make_cfg(*TINY, "debias=lnl", "+debias.entropy_wieght=1"), run_dir=tmp_path)


def test_cli_lnl_preset(tmp_path):
    run_dir, summary = run_preset_cli(tmp_path, "debias_digits_lnl")
    assert summary["bias_agnostic"] is False and summary["selection"] == "val_unbiased_acc"
    assert 0 <= summary["last_lnl_predictor_bias_acc"] <= 1 and "selected_test_conflicting_acc" in summary
    assert "loss/lnl_entropy" in read_jsonl(run_dir / "metrics.jsonl")[-1]
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.debias._target_ == "regstory.debias.lnl.LNL" and cfg.experiment_name == "debias_digits_lnl"


def test_table3_2_lnl_row_trains_on_celeba_files_with_its_predictor_on_layer2(fake_celeba, tmp_path):
    """The Table 3.2 row end to end on CelebA in torchvision's on-disk format (tiny fake images, no ImageNet
    weights): h reads ResNet-18's 128-channel layer2 map, as Hong & Yang's CelebA LNL."""
    cfg = make_cfg("experiment=table3_2", "debias=lnl", f"data.root={fake_celeba}", "data.download=false",
                   "arch.pretrained=false", "dataset.image_size=16", "trainer.epochs=1", "trainer.batch_size=16",
                   "debias.probe_steps=5")
    summary = run(cfg, run_dir=tmp_path / "run")
    assert summary["bias_agnostic"] is False and 0 <= summary["last_lnl_predictor_bias_acc"] <= 1
    predictor = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["plugins"]["debias"]
    assert predictor["predictor"]["module"]["weight"].shape == (2, 128)
