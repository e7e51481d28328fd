"""Knowledge distillation (thesis sec. 2.4.3): loss value, teacher loading, composition with IMP."""
import math

import pytest
import torch

from regstory.checkpoint import load_checkpoint
from regstory.config import ConfigError
from regstory.distill import distillation_loss
from regstory.train import run
from tests.conftest import make_cfg, read_jsonl


def test_loss_is_alpha_t2_kl_plus_one_minus_alpha_ce_by_hand():
    s, t, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([0])
    T, a = 2.0, 0.8
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [1 / (1 + math.e), math.e / (1 + math.e)]
    kl = sum(q * math.log(q / p) for q, p in zip(pt, ps))
    ce = -math.log(math.e / (math.e + 1))
    assert distillation_loss(s, t, y, a, T).item() == pytest.approx(a * T * T * kl + (1 - a) * ce, rel=1e-5)


def test_a_given_batch_ce_replaces_the_recomputed_one():
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    ce = torch.nn.functional.cross_entropy(s, y, reduction="none").mean()
    assert distillation_loss(s, t, y, 0.3, 4.0, ce=ce).item() == pytest.approx(
        distillation_loss(s, t, y, 0.3, 4.0).item(), rel=1e-6)
    assert distillation_loss(s, t, y, 0.0, 4.0, ce=torch.tensor(7.0)).item() == pytest.approx(7.0)


def test_alpha_zero_is_plain_cross_entropy():
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert distillation_loss(s, t, y, 0.0, 5.0).item() == pytest.approx(
        torch.nn.functional.cross_entropy(s, y).item(), rel=1e-6)


def test_teacher_from_checkpoint_distils_a_pruned_student(tmp_path):
    run(make_cfg("dataset=digits", "trainer.epochs=2"), run_dir=tmp_path / "teacher")
    teacher = tmp_path / "teacher" / "checkpoints" / "last.pt"
    run(make_cfg("dataset=digits", "trainer.epochs=1", "method=imp", "method.rounds=1", "distill=kd",
                 f"distill.teacher={teacher}"), run_dir=tmp_path / "student")
    rounds = read_jsonl(tmp_path / "student" / "rounds.jsonl")
    assert [r["sparsity"] for r in rounds] == pytest.approx([0.0, 0.2], abs=1e-3)
    # the task loss really is the distillation loss: with T=10 the KL term makes it differ from plain CE
    plain = read_jsonl(tmp_path / "teacher" / "metrics.jsonl")[0]["train_loss"]
    assert read_jsonl(tmp_path / "student" / "metrics.jsonl")[0]["train_loss"] != pytest.approx(plain)


def test_teacher_trained_first_in_the_run_is_saved_and_other_arch_accepted(tmp_path):
    run(make_cfg("dataset=digits", "trainer.epochs=1", "distill=kd", "distill.teacher_epochs=2",
                 "+distill.teacher_arch={_target_: regstory.models.mlp.mlp, width: 32, depth: 1}"), run_dir=tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "teacher.pt")["model"]
    assert state["layers.0.weight"].shape[0] == 32


def test_missing_teacher_file_fails_clearly(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        run(make_cfg("dataset=digits", "distill=kd", "distill.teacher=/nonexistent/last.pt"), run_dir=tmp_path)
