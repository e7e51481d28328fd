"""RUBi (Cadene et al. 2019, as in ReBias's ``criterions/comparison_methods.py``): the bias-only branch's sigmoid masks
the logits in training, L = CE(f * sigmoid(g), y) + w_q CE(g, y); the main model alone at test time."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from regstory.debias.rubi import RUBi, rubi_fused_logits, rubi_loss
from regstory.plugins import StepOutput
from regstory.train import run
from tests.conftest import interrupt_then_resume, make_cfg, owned_linear, read_jsonl
from tests.debias.test_end_to_end import TINY, run_preset_cli


def ce(logits, y):
    """Cross-entropy of one sample, by hand."""
    return -logits[y] + math.log(sum(math.exp(v) for v in logits))


F_LOGITS = [2.0, -1.0, 0.5]
G_LOGITS = [0.0, math.log(3), -math.log(3)]  # sigmoid: 1/2, 3/4, 1/4


def plain_model_test_accuracy(overrides, run_dir, logits_of=None) -> float:
    """Test accuracy of the run's last checkpointed model called on its own (no plugin): ``logits_of(model, x,
    checkpoint)`` replaces ``model(x)`` when given."""
    from hydra.utils import instantiate

    from regstory.data.prepare import make_loaders, prepare_data

    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    cfg = make_cfg(*overrides)
    data = prepare_data(cfg, None)
    model = instantiate(cfg.arch, input_shape=list(data.input_shape), num_classes=data.num_classes)
    model.load_state_dict(ckpt["model"])
    model.eval()
    test = make_loaders(data, cfg, torch.device("cpu"))["test"]
    with torch.no_grad():
        hits = sum(((logits_of(model, b["x"], ckpt) if logits_of else model(b["x"])).argmax(1) == b["y"]).sum().item()
                   for b in test)
    return hits / len(test.split)


def test_masking_is_the_logits_times_the_sigmoid_of_the_bias_logits():
    fused = rubi_fused_logits(torch.tensor([F_LOGITS]), torch.tensor([G_LOGITS]))
    assert torch.allclose(fused, torch.tensor([[1.0, -0.75, 0.125]]))


@pytest.mark.parametrize("w_q", [1.0, 0.5])
def test_rubi_loss_is_the_masked_ce_plus_the_bias_only_ce_by_hand(w_q):
    want = ce([1.0, -0.75, 0.125], 0) + w_q * ce(G_LOGITS, 0)
    got = rubi_loss(torch.tensor([F_LOGITS]), torch.tensor([G_LOGITS]), torch.tensor([0]), w_q)
    assert got.item() == pytest.approx(want, rel=1e-6)


def plugin_with_table(weight, bias, w_q=1.0):
    """A RUBi plugin whose bias-only branch g(b) = W onehot(b) + c is set by hand (no run)."""
    plugin = RUBi(question_loss_weight=w_q)
    plugin.num_bias = weight.shape[1]
    plugin.branch = owned_linear(weight, bias)
    return plugin


def test_plugin_masks_with_the_branch_row_of_each_samples_bias_and_adds_w_q_ce():
    # bias value 1's column of W is G_LOGITS (c = 0); sample 0 has bias 1, sample 1 bias 0 (column of zeros: mask 1/2)
    weight = torch.zeros(3, 2)
    weight[:, 1] = torch.tensor(G_LOGITS)
    plugin = plugin_with_table(weight, torch.zeros(3), w_q=0.5)
    logits = torch.tensor([F_LOGITS, [1.0, 2.0, 3.0]], requires_grad=True)
    batch = {"y": torch.tensor([0, 2]), "bias": torch.tensor([1, 0])}
    out = StepOutput(logits=logits, per_sample_loss=torch.zeros(2))
    task = plugin.sample_loss(None, batch, out)
    want = [ce([1.0, -0.75, 0.125], 0), ce([0.5, 1.0, 1.5], 2)]
    assert task.tolist() == pytest.approx(want, rel=1e-6)
    assert out.per_sample_loss is task  # the task cross-entropy a later owner of the loss builds on
    extra = plugin.extra_loss(None, batch, out)["rubi_bias"]
    assert extra.item() == pytest.approx(0.5 * (ce(G_LOGITS, 0) + ce([0.0, 0.0, 0.0], 2)) / 2, rel=1e-6)
    # the bias-only CE trains the branch, never the main model's logits
    grad_logits, = torch.autograd.grad(extra, logits, allow_unused=True)
    assert grad_logits is None
    (task.mean() + extra).backward()
    assert plugin.branch.module.weight.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0


def test_an_aligned_sample_costs_f_less_than_a_conflicting_one_under_the_mask():
    """The point of RUBi: where the branch explains the target (aligned), the mask keeps f's class and f's loss and
    gradient are small; on a conflicting sample the mask shrinks f's class and f gets the larger loss and gradient."""
    weight = 4.0 * torch.eye(3) - 2.0  # g(b) = 2 on class b, -2 elsewhere
    plugin = plugin_with_table(weight, torch.zeros(3))
    logits = torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]], requires_grad=True)  # f says class 0 for both
    batch = {"y": torch.tensor([0, 0]), "bias": torch.tensor([0, 1])}
    task = plugin.task_cross_entropy(None, batch, StepOutput(logits, torch.zeros(2)))
    s_hi, s_lo = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))
    assert task.tolist() == pytest.approx([ce([3 * s_hi, 0.0, 0.0], 0), ce([3 * s_lo, 0.0, 0.0], 0)], rel=1e-6)
    task.sum().backward()
    aligned, conflicting = logits.grad.norm(dim=1).tolist()
    assert task[0] < task[1] and aligned < conflicting


def test_trained_run_tests_the_main_model_alone_and_resumes(tmp_path, monkeypatch):
    """Test metrics are those of the model's own logits (no mask at test time); the branch is checkpointed."""
    overrides = [*TINY, "debias=rubi", "debias.branch_lr=0.05"]
    summary = run(make_cfg(*overrides), run_dir=tmp_path / "straight")
    ckpt = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=False)
    assert set(ckpt["plugins"]["debias"]["branch"]) == {"module", "optimizer", "scheduler"}
    assert summary["bias_agnostic"] is False and 0 <= summary["last_rubi_bias_train_acc"] <= 1
    assert plain_model_test_accuracy(overrides, tmp_path / "straight") == pytest.approx(summary["last_test_acc"],
                                                                                      abs=1e-6)  # float32 mean

    resumed = interrupt_then_resume(monkeypatch, RUBi, "start_epoch", (0, 1), overrides, tmp_path / "resumed")
    for key in ("last_test_unbiased_acc", "last_test_conflicting_acc", "last_bias_probe_acc"):
        assert resumed[key] == summary[key], key
    assert read_jsonl(tmp_path / "resumed" / "metrics.jsonl")[-1]["loss/rubi_bias"] == pytest.approx(
        read_jsonl(tmp_path / "straight" / "metrics.jsonl")[-1]["loss/rubi_bias"])


def test_cli_rubi_preset(tmp_path):
    run_dir, summary = run_preset_cli(tmp_path, "debias_digits_rubi", epochs=2)
    assert summary["bias_agnostic"] is False and summary["selection"] == "val_unbiased_acc"
    assert 0 <= summary["last_test_conflicting_acc"] <= 1
    assert "loss/rubi_bias" in read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert OmegaConf.load(run_dir / "config.yaml").debias._target_ == "regstory.debias.rubi.RUBi"


def test_composes_with_distillation_on_the_masked_cross_entropy(tmp_path, monkeypatch):
    """KD owns the per-sample loss and builds it on the task cross-entropy, which RUBi replaced: the loss is
    a T^2 KL(teacher || f) + (1 - a) CE(f * sigmoid(g), y)."""
    from regstory.distill import Distillation, distillation_loss

    seen = []
    original = Distillation.sample_loss

    def check(self, ctx, batch, out):
        loss = original(self, ctx, batch, out)
        with torch.no_grad():
            teacher = self.teacher(batch["x"])
            masked = ctx.plugins[0]._bias_logits
        fused = rubi_fused_logits(out.logits, masked)
        want = distillation_loss(out.logits, teacher, batch["y"], self.alpha, self.temperature,
                                 ce=torch.nn.functional.cross_entropy(fused, batch["y"], reduction="none"),
                                 reduction="none")
        seen.append(torch.allclose(loss, want, atol=1e-5))
        return loss

    monkeypatch.setattr(Distillation, "sample_loss", check)
    run(make_cfg(*TINY, "debias=rubi", "distill=kd", "distill.teacher_epochs=1", "trainer.epochs=1"), run_dir=tmp_path)
    assert seen and all(seen)


def test_two_methods_that_replace_the_task_cross_entropy_are_refused_naming_both():
    from regstory.plugins import CompositionError
    from regstory.train import build_plugins

    with pytest.raises(CompositionError, match=r"debias \(RUBi\) and plugins.di \(DomainIndependent\) both need to "
                                               r"own the task cross entropy"):
        build_plugins(make_cfg(*TINY, "debias=rubi", "+debias@plugins.di=di"))


def test_an_owner_of_the_per_sample_loss_before_it_is_refused_at_set_up(tmp_path):
    from regstory.config import ConfigError

    with pytest.raises(ConfigError, match=r"distill \(Distillation\) owns the per-sample loss and comes before "
                                          r"plugins.rubi \(RUBi\)"):
        run(make_cfg(*TINY, "debias=vanilla", "distill=kd", "distill.teacher_epochs=1", "+debias@plugins.rubi=rubi"),
            run_dir=tmp_path)
