"""BiasCon (Hong & Yang 2021, authors' ``DebiasSupConLoss``): supervised contrastive loss whose positives are the
samples of the same target and a different bias; BiasBal: training logits shifted by log p(y | b); the contrastive
batch drawn with weights 1 / p(b | y) clipped at ratio x the smallest."""
import math

import pytest
import torch

from regstory.debias.biascon import (BiasCon, bias_balanced_logits, bias_contrastive_loss, conditional_table,
                                     contrast_sampling_weights)
from regstory.plugins import StepOutput
from regstory.train import run
from tests.conftest import interrupt_then_resume, make_cfg, read_jsonl
from tests.debias.test_end_to_end import TINY, run_preset_cli
from tests.debias.test_rubi import plain_model_test_accuracy

Z = [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.6, 0.8)]
Y = [0, 0, 1, 0]
B = [0, 1, 0, 0]


def hand_bias_contrastive(z, y, b, t):
    """The loss written out: mean over anchors of -(1/|P(i)|) sum_{p in P(i)} log softmax_{a != i}(z_i.z_a / t)_p."""
    n = len(z)
    dot = lambda i, j: sum(u * v for u, v in zip(z[i], z[j]))  # noqa: E731  (unit vectors)
    total = 0.0
    for i in range(n):
        positives = [p for p in range(n) if p != i and y[p] == y[i] and b[p] != b[i]]
        if not positives:
            continue  # an anchor without positives counts 0 in the mean
        log_den = math.log(sum(math.exp(dot(i, a) / t) for a in range(n) if a != i))
        total += -sum(dot(i, p) / t - log_den for p in positives) / len(positives)
    return total / n


@pytest.mark.parametrize("t", [0.5, 0.07])
def test_bias_contrastive_loss_by_hand_eq(t):
    want = hand_bias_contrastive(Z, Y, B, t)
    # the positive sets: P(0) = {1}, P(1) = {0, 3}, P(2) = {} (alone in its class), P(3) = {1}
    got = bias_contrastive_loss(torch.tensor(Z) * 3.0, torch.tensor(Y), torch.tensor(B), t)  # features normalised
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_same_target_same_bias_pairs_are_not_positives():
    """A class whose samples all share one bias has no positive at all: only bias-conflicting pairs are pulled."""
    z = torch.tensor([(1.0, 0.0), (0.0, 1.0), (0.6, 0.8)])
    loss = bias_contrastive_loss(z, torch.tensor([0, 0, 0]), torch.tensor([2, 2, 2]), 0.1)
    assert loss.item() == 0.0


def test_bias_balanced_softmax_shifts_the_logits_by_log_p_y_given_b():
    y = torch.tensor([0, 0, 0, 1, 1, 0])
    b = torch.tensor([0, 0, 0, 0, 1, 1])
    table = conditional_table(b, y, num_rows=2, num_cols=2)  # p(y | b)
    assert table.tolist() == [[0.75, 0.25], [0.5, 0.5]]
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    shifted = bias_balanced_logits(logits, torch.tensor([0, 1]), table)
    want = [[1.0 + math.log(0.75 + 1e-9), 2.0 + math.log(0.25 + 1e-9)], [math.log(0.5 + 1e-9)] * 2]
    assert shifted.tolist() == [pytest.approx(r, rel=1e-6) for r in want]


def test_contrastive_sampler_weights_are_inverse_p_b_given_y_clipped_at_ratio():
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    b = torch.tensor([0, 0, 0, 1, 1, 0])
    # p(b | y=0) = 3/4 (b 0), 1/4 (b 1); p(b | y=1) = 1/2 each: weights 4/3, 4/3, 4/3, 4, 2, 2
    assert contrast_sampling_weights(y, b, 2, 2, ratio=10).tolist() == pytest.approx([4 / 3] * 3 + [4, 2, 2])
    assert contrast_sampling_weights(y, b, 2, 2, ratio=1.5).tolist() == pytest.approx([4 / 3] * 3 + [2, 2, 2])
    assert contrast_sampling_weights(y, b, 2, 2, ratio=0).tolist() == [1.0] * 6


def test_plugin_weights_the_ce_and_contrasts_the_training_batch_when_asked():
    plugin = BiasCon(ce_weight=0.01, contrast_weight=2.0, temperature=0.5, contrast_batch_size=0)
    z = torch.tensor(Z)
    out = StepOutput(logits=torch.zeros(4, 2), per_sample_loss=torch.ones(4), features=z)
    batch = {"y": torch.tensor(Y), "bias": torch.tensor(B)}
    assert plugin.sample_weights(None, batch, out) == 0.01
    assert plugin.sample_loss(None, batch, out) is None and "task_cross_entropy" not in plugin.claims()  # BiasCon alone
    assert plugin.extra_loss(None, batch, out)["biascon"].item() == pytest.approx(
        2.0 * hand_bias_contrastive(Z, Y, B, 0.5), rel=1e-5)
    balanced = BiasCon(balanced=True)
    balanced.class_given_bias = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    task = balanced.sample_loss(None, {"y": torch.tensor([1]), "bias": torch.tensor([0])},
                                StepOutput(torch.tensor([[1.0, 2.0]]), torch.zeros(1)))
    shifted = [1.0 + math.log(0.75 + 1e-9), 2.0 + math.log(0.25 + 1e-9)]
    assert task.item() == pytest.approx(-shifted[1] + math.log(sum(math.exp(v) for v in shifted)), rel=1e-6)
    assert "task_cross_entropy" in balanced.claims()


def test_contrastive_batches_oversample_the_conflicting_samples_on_the_digits():
    from regstory.data.prepare import prepare_data

    data = prepare_data(make_cfg(*TINY, "debias=biascon"), None)
    y, bias = data.train.y, data.train.extras["bias"]
    weights = contrast_sampling_weights(y, bias, 10, 10, ratio=10)
    conflicting = (bias != y).double()
    share = (weights * conflicting).sum() / weights.sum()
    assert conflicting.mean() < 0.03 and share > 0.15  # ~2% of the set, ~17% of the contrastive draws


@pytest.mark.parametrize("balanced", [False, True])
def test_run_tests_the_model_alone_and_resumes(balanced, tmp_path, monkeypatch):
    overrides = [*TINY, "debias=biascon", f"debias.balanced={str(balanced).lower()}", "debias.contrast_batch_size=32"]
    straight = run(make_cfg(*overrides), run_dir=tmp_path / "straight")
    assert straight["bias_agnostic"] is False
    assert plain_model_test_accuracy(overrides, tmp_path / "straight") == pytest.approx(straight["last_test_acc"],
                                                                                      abs=1e-6)
    resumed = interrupt_then_resume(monkeypatch, BiasCon, "start_epoch", (0, 1), overrides, tmp_path / "resumed")
    for key in ("last_test_unbiased_acc", "last_test_conflicting_acc", "last_bias_probe_acc", "selected_epoch"):
        assert resumed[key] == straight[key], key
    assert read_jsonl(tmp_path / "resumed" / "metrics.jsonl")[-1]["loss/biascon"] == pytest.approx(
        read_jsonl(tmp_path / "straight" / "metrics.jsonl")[-1]["loss/biascon"])  # the same contrastive draws


def test_cli_biascon_preset_with_biasbal(tmp_path):
    run_dir, summary = run_preset_cli(tmp_path, "debias_digits_biascon", "debias.balanced=true", epochs=2)
    assert summary["bias_agnostic"] is False and 0 <= summary["last_test_unbiased_acc"] <= 1
    assert "balanced: true" in (run_dir / "config.yaml").read_text()
