"""LOBSTER (thesis eq. 2.12-2.14): both branches of the Heaviside gate against hand-computed updates, the two
thesis/code options, an end-to-end CLI sweep, and bad input refused in one line before anything runs."""
import json

import pytest
import torch

from regstory.pruning.lobster import Lobster, insensitivity, lobster_decay
from tests.conftest import cli_refusal, read_jsonl, run_cli

THETA = [1.0, -2.0, 0.5, 3.0, 4.0]
GRAD = [0.5, -0.2, 1.5, -1.0, 0.0]  # |g| < 1, < 1, > 1 (gate off), = 1 (gate off), 0 (full decay)


def test_ramp_is_eq_2_12_expanded_and_step_is_eq_2_13_alone():
    g = torch.tensor(GRAD)
    assert insensitivity(g, "ramp").tolist() == pytest.approx([0.5, 0.8, 0.0, 0.0, 1.0])
    assert insensitivity(g, "step").tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("gate, expected", [
    # theta - 0.1 * theta * max(0, 1 - |g|): 1 - 0.05, -2 + 0.16, unchanged, unchanged, 4 - 0.4
    ("ramp", [0.95, -1.84, 0.5, 3.0, 3.6]),
    # theta - 0.1 * theta * Heaviside(1 - |g|)
    ("step", [0.9, -1.8, 0.5, 3.0, 3.6]),
])
def test_lobster_decay_by_hand_on_both_sides_of_the_gradient_threshold(gate, expected):
    theta = torch.tensor(THETA)
    lobster_decay([theta], [torch.tensor(GRAD)], 0.1, gate)
    assert theta.tolist() == pytest.approx(expected, abs=1e-6)


def test_eq_2_12_with_sgd_equals_the_expanded_rule_when_decaying_the_pre_step_weights():
    """theta^{t+1} = theta - lambda*Gamma - g*[eta - sign(g)*lambda*Gamma] (eq. 2.12 as printed), vs an SGD step
    followed by the pre_step decay."""
    eta, lmbda = 0.1, 0.01
    theta, g = torch.tensor(THETA), torch.tensor(GRAD)
    gamma = theta * (g.abs() < 1).float()  # eq. 2.13
    printed = theta - lmbda * gamma - g * (eta - torch.sign(g) * lmbda * gamma)
    stepped = theta - eta * g
    lobster_decay([stepped], [g], lmbda, "ramp", base=[theta])
    assert stepped.tolist() == pytest.approx(printed.tolist(), abs=1e-6)
    # the authors' code decays the updated weights instead: 1 - 0.1*0.5 = 0.95 -> 0.95 - 0.01*0.95*0.5
    code = theta - eta * g
    lobster_decay([code], [g], lmbda, "ramp")
    assert code[0].item() == pytest.approx(0.95 - 0.01 * 0.95 * 0.5)


def test_plugin_after_step_reads_the_gradients_and_keeps_pruned_weights_zero():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2, bias=False)
    ctx = type("Ctx", (), {"model": model, "data": None})()
    plugin = Lobster(lmbda=0.5, decay="prunable", gate="ramp")
    from regstory.pruning.masks import MaskSet
    plugin.masks = MaskSet({"weight": model.weight})
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
    plugin.masks.set([torch.tensor([[1.0, 1.0], [0.0, 1.0]])])
    model.weight.grad = torch.tensor([[0.2, 3.0], [0.7, -0.6]])
    plugin.after_step(ctx)
    # 1 - 0.5*1*0.8 = 0.6; |g| = 3 -> 2; pruned 0 stays 0; -1 + 0.5*0.4 = -0.8
    assert model.weight.detach().flatten().tolist() == pytest.approx([0.6, 2.0, 0.0, -0.8])


def test_lobster_end_to_end_from_the_cli_prunes_and_pins(tmp_path):
    run_cli("dataset=digits", "dataset.val_fraction=0.1", "arch=lenet300", "method=lobster", "method.rounds=2",
            "method.lmbda=3e-4", "trainer.epochs=3", "logger.wandb.mode=disabled", "logger.progress=none",
            "hydra.run.dir=run", cwd=tmp_path)
    rounds = read_jsonl(tmp_path / "run" / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(r["recovered"] for r in rounds)
    assert rounds[-1]["sparsity"] > 0.3 and rounds[0]["twt_threshold"] > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    final = summary["plugins"]["method"]
    assert final["final_sparsity"] > 0.3 and final["pinned"] == "weights"
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    masks = state["plugins"]["method"]["masks"]
    for name, mask in masks.items():
        weight = state["model"][name]
        assert (weight[mask == 0] == 0).all(), name  # pruned weights are exactly zero
    assert sum(int((m == 0).sum()) for m in masks.values()) > 0


@pytest.mark.parametrize("bad, key", [("method.lmbda=0", "method.lmbda"), ("method.lmbda=-1", "method.lmbda"),
                                      ("method.twt=1.0", "method.twt"), ("method.twt=0", "method.twt"),
                                      ("method.gate=smooth", "method.gate")])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, bad, key):
    assert key in cli_refusal(tmp_path, "dataset=digits", "method=lobster", bad)


PLATEAU = ("dataset=digits", "dataset.val_fraction=0.1", "arch=lenet300", "method=lobster", "method.rounds=1",
           "trainer.epochs=6", "method.patience=1", "method.plateau_tol=-0.9")


def test_a_plateau_ends_the_round_early_and_resume_does_not_train_the_skipped_epochs(tmp_path, monkeypatch):
    """plateau_tol=-0.9 asks each epoch for a 90% lower validation loss than the best: epoch 1 is not good, and with
    patience 1 the round ends there (2 of 6 epochs); the kill in round 1 resumes without retraining round 0."""
    from regstory.pruning.lobster import SensitivityPruning
    from tests.conftest import interrupt_then_resume

    summary = interrupt_then_resume(monkeypatch, SensitivityPruning, "start_epoch", (1, 1), PLATEAU, tmp_path / "run")
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [(m["round"], m["epoch"]) for m in metrics] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [m["plateau_bad_epochs"] for m in metrics] == [0, 1, 0, 1]
    assert all("test_acc" in m and "val_loss" in m for m in metrics[1::2])  # a round's last epoch: both measured
    rounds = read_jsonl(tmp_path / "run" / "rounds.jsonl")
    assert [r["round_epochs"] for r in rounds] == [2, 2]
    assert rounds[0]["restored_epoch"] == min(metrics[:2], key=lambda m: m["val_loss"])["epoch"]
    assert summary["plugins"]["method"]["final_sparsity"] > 0


def test_plateau_patience_is_typed(tmp_path):
    assert "method.patience" in cli_refusal(tmp_path, "dataset=digits", "arch=lenet300", "method=lobster",
                                             "method.patience=0")


class ConcatNet(torch.nn.Module):
    """Two branches concatenated on the features: a topology the simplification refuses."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        n = int(torch.tensor(input_shape).prod())
        self.a, self.b, self.head = torch.nn.Linear(n, 4), torch.nn.Linear(n, 4), torch.nn.Linear(8, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


def test_an_arch_the_simplification_cannot_express_is_refused_in_one_line(tmp_path):
    line = cli_refusal(tmp_path, "dataset=digits", "dataset.val_fraction=0.1", "arch=lenet300", "method=lobster",
                       "arch._target_=tests.pruning.test_lobster.ConcatNet")
    assert "method.footprint" in line and "cat" in line and "footprint=none" in line
    # in the default run folder (outputs/runs/<date>/<time>) too: no empty folders are left behind
    proc = run_cli("dataset=digits", "dataset.val_fraction=0.1", "arch=lenet300", "method=lobster",
                   "arch._target_=tests.pruning.test_lobster.ConcatNet", "logger.wandb.mode=disabled",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2 and list(tmp_path.iterdir()) == []
