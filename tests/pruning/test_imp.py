"""IMP sweep: retraining modes (rewinding restores exactly), one-shot baselines, resume, and the CLI end to end."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from regstory.checkpoint import load_checkpoint
from regstory.config import ConfigError
from regstory.plugins import Plugin
from regstory.pruning.magnitude import IMP
from regstory.pruning.random import RandomPruning
from regstory.pruning.snip import connection_sensitivity
from regstory.train import run
from tests.conftest import interrupt_then_resume, make_cfg, read_jsonl, run_cli


def fake_ctx(epochs=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    ctx = SimpleNamespace(model=model, loaders={}, epochs=epochs, round=0, epoch=0, cfg=SimpleNamespace(seed=0),
                          data=SimpleNamespace(input_shape=(4,)),
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rebuilt=[])
    ctx.rebuild_optimizer = lambda lr=None, schedule=None: ctx.rebuilt.append((lr, schedule))
    return ctx


def train_a_bit(ctx):
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(torch.randn_like(p))


def test_rewind_to_init_restores_exactly_in_place():
    ctx = fake_ctx()
    imp = IMP(rate=0.5, rounds=2)
    imp.setup(ctx)
    init = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    params = list(ctx.model.parameters())
    train_a_bit(ctx)
    imp.prune(ctx)
    ctx.round = 1
    imp.start_round(ctx)
    assert list(ctx.model.parameters()) == params  # same Parameter objects: the optimizer stays valid
    for name, m in zip(imp.masks.names, imp.masks.masks):
        assert torch.equal(ctx.model.state_dict()[name], init[name] * m)
    assert torch.equal(ctx.model.state_dict()["0.bias"], init["0.bias"])


def test_rewind_to_epoch_k_uses_the_weights_after_that_epoch():
    ctx = fake_ctx()
    imp = IMP(rate=0.5, rounds=2, rewind_epoch=2)
    imp.setup(ctx)
    train_a_bit(ctx)
    ctx.epoch = 1  # end of epoch 2 (1-based) of round 0
    imp.end_epoch(ctx)
    at_k = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    train_a_bit(ctx)
    imp.prune(ctx)
    ctx.round = 1
    imp.start_round(ctx)
    assert torch.equal(ctx.model.state_dict()["0.bias"], at_k["0.bias"])
    assert torch.equal(ctx.model[0].weight, at_k["0.weight"] * imp.masks.masks[0])


def test_lr_rewind_keeps_weights_and_finetune_rebuilds_with_small_constant_lr():
    for retrain, rebuilt in (("lr_rewind", []), ("finetune", [(0.001, "constant")])):
        ctx = fake_ctx()
        imp = IMP(rate=0.5, rounds=2, retrain=retrain)
        imp.setup(ctx)
        train_a_bit(ctx)
        imp.prune(ctx)
        trained = {k: v.clone() for k, v in ctx.model.state_dict().items()}
        ctx.round = 1
        imp.start_round(ctx)
        assert all(torch.equal(v, trained[k]) for k, v in ctx.model.state_dict().items())
        assert ctx.rebuilt == rebuilt


def scratch_ctx():
    """A context with the run's arch config and data shape (what ``retrain=scratch`` rebuilds from): resnet20."""
    from hydra.utils import instantiate

    cfg = make_cfg("arch=resnet20")
    data = SimpleNamespace(input_shape=(3, 32, 32), num_classes=10)
    torch.manual_seed(0)
    model = instantiate(cfg.arch, input_shape=[3, 32, 32], num_classes=10)
    ctx = SimpleNamespace(model=model, loaders={}, epochs=3, round=0, epoch=0, cfg=cfg, data=data,
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.1), rebuilt=[])
    ctx.rebuild_optimizer = lambda lr=None, schedule=None: ctx.rebuilt.append((lr, schedule))
    return ctx


def test_scratch_reinitialises_with_masks_applied():
    ctx = scratch_ctx()
    imp = IMP(rate=0.5, rounds=2, retrain="scratch")
    imp.setup(ctx)
    name = imp.masks.names[1]
    before = ctx.model.get_parameter(name).detach().clone()
    train_a_bit(ctx)
    imp.prune(ctx)
    ctx.round = 1
    imp.start_round(ctx)
    w = ctx.model.get_parameter(name).detach()
    mask = imp.masks.masks[1]
    assert not torch.equal(w, before * mask)
    assert torch.all(w[mask == 0] == 0)


def test_scratch_uses_the_architectures_own_initialisation():
    """A resnet20 3x3 conv (16 -> 16 channels) is Kaiming-normal, fan_out: std sqrt(2 / (16 * 9)) = 0.118 at
    construction; PyTorch's default reset_parameters() (Kaiming-uniform, a=sqrt(5)) gave std 0.048."""
    ctx = scratch_ctx()
    imp = IMP(rate=0.5, rounds=2, retrain="scratch")
    imp.setup(ctx)
    convs = [n for n, p in ctx.model.named_parameters() if p.dim() == 4 and tuple(p.shape) == (16, 16, 3, 3)]
    at_init = torch.cat([ctx.model.get_parameter(n).detach().flatten() for n in convs]).std().item()
    train_a_bit(ctx)
    imp.prune(ctx)  # pruning removes entries: measure the std of the kept ones after the re-initialisation
    ctx.round = 1
    imp.start_round(ctx)
    kept = torch.cat([ctx.model.get_parameter(n).detach()[imp.masks.masks[imp.masks.names.index(n)] > 0]
                      for n in convs])
    expected = (2 / (16 * 9)) ** 0.5
    assert at_init == pytest.approx(expected, rel=0.1)
    assert kept.std().item() == pytest.approx(expected, rel=0.1)
    bn = dict(ctx.model.named_buffers())
    assert all(torch.all(v == 0) for k, v in bn.items() if k.endswith("running_mean"))


def test_scratch_builds_a_pretrained_arch_without_its_pretrained_weights(monkeypatch):
    """From scratch = the architecture's random initialisation: nothing is downloaded or loaded."""
    import torchvision

    from regstory.pruning.base import architecture_builder

    asked = []
    real = torchvision.models.resnet18
    monkeypatch.setattr(torchvision.models, "resnet18", lambda weights=None, **kw: asked.append(weights) or real(**kw))
    cfg = make_cfg("arch=simple_convnet_resnet18", "arch.pretrained=true")
    model = architecture_builder(SimpleNamespace(cfg=cfg, data=SimpleNamespace(input_shape=(3, 32, 32),
                                                                                num_classes=2)))()
    assert asked == [None] and model.head.out_features == 2


def test_bad_options_fail_fast():
    with pytest.raises(ConfigError, match="retrain"):
        IMP(retrain="sometimes")
    with pytest.raises(ConfigError, match="rate"):
        IMP(rate=1.5)
    with pytest.raises(ConfigError, match="scope"):
        IMP(scope="neuronwise")


def test_random_pruning_masks_are_nested_and_follow_the_schedule():
    ctx = fake_ctx()
    rp = RandomPruning(rate=0.5, rounds=3)
    rp.setup(ctx)
    previous = None
    for r in (1, 2, 3):
        ctx.round = r
        rp.start_round(ctx)
        assert rp.masks.sparsity() == pytest.approx(1 - 0.5 ** r, abs=0.02)
        keep = torch.cat([m.flatten() for m in rp.masks.masks])
        if previous is not None:
            assert torch.all(keep <= previous)
        previous = keep


def test_snip_scores_are_abs_gradient_times_weight():
    torch.manual_seed(0)
    lin = nn.Linear(2, 2, bias=False)
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([0])
    scores = connection_sensitivity(lin, [lin.weight], [{"x": x, "y": y}])[0]
    p = torch.softmax(lin(x), 1)[0].detach()
    grad = (p - torch.tensor([1.0, 0.0]))[:, None] * x  # dCE/dW = (softmax - onehot) x^T
    assert torch.allclose(scores, (grad * lin.weight.detach()).abs(), atol=1e-6)


def test_imp_cli_two_rounds_end_to_end(tmp_path):
    run_cli("method=imp", "dataset=mnist1d", "arch=mlp", "noise.rate=0.5", "method.rounds=2", "method.rate=0.2",
            "trainer.epochs=1", "logger.wandb.mode=disabled", "logger.progress=none", "trainer.num_threads=1",
            "hydra.run.dir=run", cwd=tmp_path)
    run_dir = tmp_path / "run"
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["sparsity"] for r in rounds] == pytest.approx([0.0, 0.2, 0.36], abs=1e-4)
    for key in ("train_acc", "test_acc", "train_loss", "test_loss", "entropy_mean", "entropy_mean_nonconstant",
                "noisy_memorized"):
        assert all(key in r for r in rounds)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    masks = ckpt["plugins"]["method"]["masks"]
    for name, mask in masks.items():
        assert torch.all(ckpt["model"][name][~mask] == 0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sdd"]["phase_per_round"][0] == "light" and summary["final_sparsity"] == pytest.approx(0.36, 1e-3)


def test_resume_mid_sweep_gives_the_same_rounds(tmp_path, monkeypatch):
    args = ("dataset=digits", "method=imp", "method.rounds=2", "method.rate=0.5", "trainer.epochs=2")
    straight = run(make_cfg(*args), run_dir=tmp_path / "a")

    resumed = interrupt_then_resume(monkeypatch, IMP, "end_epoch", (1, 0), args, tmp_path / "b")
    a, b = read_jsonl(tmp_path / "a" / "rounds.jsonl"), read_jsonl(tmp_path / "b" / "rounds.jsonl")
    assert [r["sparsity"] for r in a] == [r["sparsity"] for r in b]
    assert [r["test_acc"] for r in a] == pytest.approx([r["test_acc"] for r in b], abs=1e-6)
    assert resumed["final_sparsity"] == straight["final_sparsity"]


def test_entropy_stop_needs_validation_and_keeps_best_model(tmp_path):
    with pytest.raises(ConfigError, match="val_fraction"):
        run(make_cfg("dataset=digits", "method=imp", "method.stop=entropy", "trainer.epochs=1"), run_dir=tmp_path / "x")
    summary = run(make_cfg("dataset=digits", "method=imp", "method.stop=accuracy", "method.rounds=3",
                           "method.rate=0.5", "dataset.val_fraction=0.2", "trainer.epochs=1"), run_dir=tmp_path)
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["round"] == summary["best_val_model"]["round"]
    rounds = read_jsonl(tmp_path / "rounds.jsonl")
    assert best["val_acc"] == max(r["val_acc"] for r in rounds)


@pytest.mark.parametrize("method,extra", [("random", []), ("snip", ["method.batches=2"]),
                                          ("imp", ["method.scope=layerwise", "method.retrain=finetune"])])
def test_other_methods_run_a_two_round_sweep(tmp_path, method, extra):
    run(make_cfg("dataset=digits", f"method={method}", "method.rounds=1", "method.rate=0.5", "trainer.epochs=1",
                 *extra), run_dir=tmp_path)
    rounds = read_jsonl(tmp_path / "rounds.jsonl")
    assert rounds[1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    if "method.retrain=finetune" in extra:
        assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["lr"] == pytest.approx(0.001)


def test_target_sparsity_caps_and_ends_the_sweep(tmp_path):
    summary = run(make_cfg("dataset=digits", "method=imp", "method.rounds=10", "method.rate=0.5",
                           "method.target_sparsity=0.6", "trainer.epochs=1"), run_dir=tmp_path)
    assert [r["sparsity"] for r in read_jsonl(tmp_path / "rounds.jsonl")] == pytest.approx([0, 0.5, 0.6], abs=1e-3)
    assert summary["num_rounds"] == 3


FINETUNE = ["dataset=digits", "method=imp", "method.rounds=1", "method.retrain=finetune", "trainer.epochs=3",
            "trainer.schedule=step", "trainer.step_size=1", "trainer.gamma=0.5"]
FINETUNE_LRS = [(0, 0.05), (0, 0.025), (0, 0.0125), (1, 0.001), (1, 0.001), (1, 0.001)]


def test_finetune_rounds_keep_a_constant_small_lr_whatever_the_trainer_schedule(tmp_path):
    run(make_cfg(*FINETUNE), run_dir=tmp_path)
    assert [(r["round"], r["lr"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == FINETUNE_LRS


def test_a_fine_tuning_round_resumed_mid_round_keeps_its_constant_lr(tmp_path, monkeypatch):
    """The checkpoint records the round's lr/schedule override: a resume rebuilt the trainer's step schedule,
    which decayed the fine-tuning lr (0.001 -> 0.0005)."""
    interrupt_then_resume(monkeypatch, IMP, "end_epoch", (1, 1), FINETUNE, tmp_path)
    assert [(r["round"], r["lr"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == FINETUNE_LRS


LATE_REWIND = ["dataset=digits", "method=imp", "method.rounds=1", "method.rewind_epoch=2", "trainer.epochs=4",
               "trainer.schedule=step", "trainer.step_size=1", "trainer.gamma=0.5"]
LATE_REWIND_EPOCHS = [(0, 0, 0.05), (0, 1, 0.025), (0, 2, 0.0125), (0, 3, 0.00625), (1, 2, 0.0125), (1, 3, 0.00625)]


def test_rewinding_to_epoch_k_resumes_the_schedule_at_epoch_k(tmp_path):
    """Lottery ticket with late rewinding (Frankle et al.; OpenLTH): after the rewind to the weights of epoch k=2,
    round 1 trains epochs 2..3 with the lr of epochs 2..3 (it replayed epochs 0..3 from lr 0.05)."""
    run(make_cfg(*LATE_REWIND), run_dir=tmp_path)
    got = [(r["round"], r["epoch"], r["lr"]) for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert [g[:2] for g in got] == [e[:2] for e in LATE_REWIND_EPOCHS]
    assert [g[2] for g in got] == pytest.approx([e[2] for e in LATE_REWIND_EPOCHS])
    rounds = read_jsonl(tmp_path / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["sparsity"] == pytest.approx(0.2, abs=0.01)


def test_a_late_rewind_round_resumed_mid_round_continues_where_it_was(tmp_path, monkeypatch):
    """Killed in round 1 after epoch 2 (its first): the resume trains epoch 3 with the lr of epoch 3."""
    interrupt_then_resume(monkeypatch, IMP, "end_epoch", (1, 3), LATE_REWIND, tmp_path / "killed")
    run(make_cfg(*LATE_REWIND), run_dir=tmp_path / "straight")
    resumed, straight = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("killed", "straight"))
    assert [(r["round"], r["epoch"], r["lr"]) for r in resumed] == [(r["round"], r["epoch"], r["lr"]) for r in straight]
    assert resumed[-1]["test_acc"] == straight[-1]["test_acc"]


def _count_masked_kernel_calls(monkeypatch) -> list[int]:
    import regstory.optim as optim_module

    calls: list[int] = []
    real = optim_module.masked_sgd_kernel()
    if real is None:
        pytest.skip("no masked SGD kernel here (REGSTORY_NO_KERNELS=1 or no C++ compiler)")
    monkeypatch.setattr(optim_module, "masked_sgd_kernel", lambda: lambda *a: calls.append(1) or real(*a))
    return calls


def test_pruned_steps_mask_gradients_inside_the_sgd_step_with_the_same_results(tmp_path, monkeypatch):
    """IMP on CPU hands its masks to LeanSGD's step (one pass, regstory.kernels); the rounds match a run that masks
    the gradients in a separate pass (REGSTORY_NO_KERNELS=1) up to float rounding, and pruned weights stay 0."""
    args = ("dataset=digits", "method=imp", "method.rounds=1", "method.rate=0.5", "trainer.epochs=2")
    calls = _count_masked_kernel_calls(monkeypatch)
    run(make_cfg(*args), run_dir=tmp_path / "fused")
    assert len(calls) > 0
    monkeypatch.setenv("REGSTORY_NO_KERNELS", "1")
    run(make_cfg(*args), run_dir=tmp_path / "two_pass")
    fused, two_pass = (read_jsonl(tmp_path / d / "rounds.jsonl") for d in ("fused", "two_pass"))
    assert [r["sparsity"] for r in fused] == [r["sparsity"] for r in two_pass]
    assert [r["train_loss"] for r in fused] == pytest.approx([r["train_loss"] for r in two_pass], rel=1e-4)
    ckpt = load_checkpoint(tmp_path / "fused" / "checkpoints" / "last.pt")
    for name, mask in ckpt["plugins"]["method"]["masks"].items():
        assert torch.all(ckpt["model"][name][~mask] == 0)


@pytest.mark.parametrize("reader", ["grad_clip", "later_plugin"])
def test_masks_stay_a_separate_pass_when_something_reads_the_gradients_before_the_step(tmp_path, monkeypatch, reader):
    """Gradient clipping, or a later plugin's after_backward, must see masked gradients."""
    seen = []

    class GradientReader(Plugin):
        def after_backward(self, ctx):
            seen.append(all(bool(torch.all(p.grad[m == 0] == 0)) for p, m in
                            zip(ctx.plugins[0].masks.params, ctx.plugins[0].masks.masks)))

    if reader == "later_plugin":
        monkeypatch.setattr("regstory.train.build_plugins",
                            lambda cfg, _real=__import__("regstory.train").train.build_plugins: [*_real(cfg), GradientReader()])
    calls = _count_masked_kernel_calls(monkeypatch)
    extra = ["trainer.grad_clip=1.0"] if reader == "grad_clip" else []
    run(make_cfg("dataset=digits", "method=imp", "method.rounds=1", "method.rate=0.5", "trainer.epochs=1", *extra),
        run_dir=tmp_path)
    assert calls == []
    if reader == "later_plugin":
        assert seen and all(seen)


@pytest.mark.parametrize("optimizer,builds", [("sgd", 1), ("adam", 0)])
def test_the_masked_kernel_is_built_at_setup_not_inside_an_epoch(tmp_path, monkeypatch, optimizer, builds):
    """A first build takes ~20 s: it must not land in a training epoch's time_s (and is skipped for Adam)."""
    events = []
    monkeypatch.setattr("regstory.pruning.base.masked_step_possible", lambda params: events.append("build") or False)
    monkeypatch.setattr(IMP, "start_epoch", lambda self, ctx: events.append("epoch"), raising=False)
    run(make_cfg("dataset=digits", "method=imp", "method.rounds=1", "trainer.epochs=1",
                 f"trainer.optimizer={optimizer}"), run_dir=tmp_path)
    assert events.count("build") == builds and events.count("epoch") == 2
    assert events[:builds] == ["build"] * builds
