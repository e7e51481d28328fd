"""LearnedMixin + H (Clark et al. 2019; ReBias's ``LearnedMixin``): the product of experts
softmax(f + g(x) log b) with the learned gate g(x) = softplus(w.h + c), plus w_H times the entropy of
softmax(g(x) log b); the bias expert log b = log p(y | b) of the training labels; the main model alone at test time."""
import math

import pytest
import torch

from regstory.debias.learned_mixin import LearnedMixin, bias_log_prior, learned_mixin_terms
from regstory.plugins import StepOutput
from regstory.train import run
from tests.conftest import interrupt_then_resume, make_cfg, owned_linear, read_jsonl
from tests.debias.test_end_to_end import TINY, run_preset_cli
from tests.debias.test_rubi import plain_model_test_accuracy


def softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_poe_with_the_softplus_gate_and_its_entropy_by_hand():
    logits = torch.tensor([[1.0, 0.0]])
    log_b = torch.log(torch.tensor([[0.8, 0.2]]))
    gate_logit = torch.tensor([[0.0]])  # softplus(0) = ln 2
    ce, entropy = learned_mixin_terms(logits, gate_logit, log_b, torch.tensor([1]))
    g = math.log(2)
    mixed = [1.0 + g * math.log(0.8), 0.0 + g * math.log(0.2)]
    assert ce.item() == pytest.approx(-mixed[1] + math.log(sum(math.exp(v) for v in mixed)), rel=1e-6)
    p = softmax([g * math.log(0.8), g * math.log(0.2)])  # = 0.8^g, 0.2^g normalised
    assert p[0] == pytest.approx(0.8 ** g / (0.8 ** g + 0.2 ** g))
    assert entropy.item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-6)


def test_a_closed_gate_leaves_f_alone_and_the_bias_expert_uniform():
    """g -> 0 (softplus of a very negative logit): the PoE is f's own CE and the bias expert's softmax is uniform
    (entropy ln K, the maximum): what the entropy penalty works against."""
    logits, log_b = torch.tensor([[2.0, 0.0, -1.0]]), torch.log(torch.tensor([[0.9, 0.05, 0.05]]))
    ce, entropy = learned_mixin_terms(logits, torch.tensor([[-30.0]]), log_b, torch.tensor([2]))
    assert ce.item() == pytest.approx(-(-1.0) + math.log(math.exp(2) + 1 + math.exp(-1)), rel=1e-6)
    assert entropy.item() == pytest.approx(math.log(3), rel=1e-6)


def test_bias_expert_is_the_training_split_p_y_given_b_with_a_floor():
    y = torch.tensor([0, 0, 0, 1, 1, 0])
    b = torch.tensor([0, 0, 0, 0, 1, 1])
    table = bias_log_prior(y, b, num_classes=2, num_bias=3, min_prob=1e-9).exp()
    assert table[0].tolist() == pytest.approx([0.75, 0.25])
    assert table[1].tolist() == pytest.approx([0.5, 0.5])
    assert table[2].tolist() == pytest.approx([0.5, 0.5])  # a bias value without samples: uniform
    floored = bias_log_prior(torch.tensor([0, 0]), torch.tensor([0, 0]), 2, 1, min_prob=1e-9)
    assert floored[0, 1].item() == pytest.approx(math.log(1e-9))


def test_plugin_gates_the_bias_expert_from_the_bottleneck_and_trains_gate_and_encoder():
    plugin = LearnedMixin(entropy_weight=0.5)
    plugin.log_prior = torch.log(torch.tensor([[0.8, 0.2], [0.3, 0.7]]))
    plugin.gate = owned_linear(torch.tensor([[1.0, -1.0]]), 0.5)
    plugin._gate_sum, plugin._gate_count = torch.zeros(()), 0
    z = torch.tensor([[0.5, 1.0], [2.0, 0.0]], requires_grad=True)
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    batch = {"y": torch.tensor([1, 0]), "bias": torch.tensor([0, 1])}
    out = StepOutput(logits=logits, per_sample_loss=torch.zeros(2), features=z)
    task = plugin.sample_loss(None, batch, out)
    gates = [math.log1p(math.exp(0.5 - 1.0 + 0.5)), math.log1p(math.exp(2.0 + 0.5))]
    priors = [[0.8, 0.2], [0.3, 0.7]]
    want, entropies = [], []
    for f, g, prior, yy in zip([[1.0, 0.0], [0.0, 1.0]], gates, priors, [1, 0]):
        mixed = [a + g * math.log(p) for a, p in zip(f, prior)]
        want.append(-mixed[yy] + math.log(sum(math.exp(v) for v in mixed)))
        q = softmax([g * math.log(p) for p in prior])
        entropies.append(-sum(v * math.log(v) for v in q))
    assert task.tolist() == pytest.approx(want, rel=1e-6) and out.per_sample_loss is task
    extra = plugin.extra_loss(None, batch, out)["learned_mixin_entropy"]
    assert extra.item() == pytest.approx(0.5 * sum(entropies) / 2, rel=1e-6)
    (task.mean() + extra).backward()
    assert plugin.gate.module.weight.grad.abs().sum() > 0 and z.grad.abs().sum() > 0  # the gate's gradient reaches the encoder
    assert plugin._gate_count == 2 and plugin._gate_sum.item() == pytest.approx(sum(gates), rel=1e-6)


def test_run_tests_the_main_model_alone_and_resumes(tmp_path, monkeypatch):
    overrides = [*TINY, "debias=learned_mixin"]
    straight = run(make_cfg(*overrides), run_dir=tmp_path / "straight")
    records = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert all(r["learned_mixin_gate"] > 0 for r in records) and straight["bias_agnostic"] is False
    assert plain_model_test_accuracy(overrides, tmp_path / "straight") == pytest.approx(straight["last_test_acc"],
                                                                                      abs=1e-6)
    resumed = interrupt_then_resume(monkeypatch, LearnedMixin, "start_epoch", (0, 1), overrides, tmp_path / "resumed")
    for key in ("last_test_unbiased_acc", "last_test_conflicting_acc", "last_bias_probe_acc", "selected_epoch"):
        assert resumed[key] == straight[key], key
    assert read_jsonl(tmp_path / "resumed" / "metrics.jsonl")[-1]["learned_mixin_gate"] == pytest.approx(
        records[-1]["learned_mixin_gate"])


def test_cli_learned_mixin_preset(tmp_path):
    run_dir, summary = run_preset_cli(tmp_path, "debias_digits_learned_mixin", epochs=2)
    assert summary["bias_agnostic"] is False and 0 <= summary["last_test_unbiased_acc"] <= 1
    assert "loss/learned_mixin_entropy" in read_jsonl(run_dir / "metrics.jsonl")[-1]
