"""The fast loop is the plain loop: same losses, same hook order, same metrics (issue 8: speed without new math)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from regstory.data.device_loader import epoch_generator
from regstory.data.prepare import prepare_data
from regstory.loop import HookCaller, optimizer_impl, read_once
from regstory.plugins import Plugin
from regstory.train import run
from regstory.utils import seed_everything
from tests.conftest import make_cfg, read_jsonl

TINY_MLP = ("dataset=digits", "arch=mlp", "arch.width=16", "trainer.batch_size=64")


def reference_training(cfg, epochs: int) -> tuple[list[float], list[float]]:
    """The loop written the straightforward way: same seed, init and shuffle, torch's for-loop SGD, ``.item()`` per
    step. Returns the per-epoch mean training loss and the final test loss."""
    seed_everything(int(cfg.seed))
    bundle = prepare_data(cfg, None)
    model = instantiate(cfg.arch, input_shape=list(bundle.input_shape), num_classes=bundle.num_classes)
    t = cfg.trainer
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, foreach=False)
    x, y = bundle.train.x, bundle.train.y
    train_losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=epoch_generator(int(cfg.seed), 0, epoch))
        total = 0.0
        for start in range(0, len(y), int(t.batch_size)):
            idx = order[start:start + int(t.batch_size)]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        train_losses.append(total / len(y))
    with torch.no_grad():
        test_loss = F.cross_entropy(model(bundle.test.x), bundle.test.y).item()
    return train_losses, [test_loss]


def test_fast_loop_reproduces_the_straightforward_loss_curve(tmp_path):
    """Tensor batches + fused SGD + device-side metric sums give the loss curve of the textbook loop."""
    cfg = make_cfg(*TINY_MLP, "trainer.epochs=3")
    run(cfg, run_dir=tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    ref_train, ref_test = reference_training(cfg, 3)
    assert [r["train_loss"] for r in records] == pytest.approx(ref_train, rel=1e-5)
    assert records[-1]["test_loss"] == pytest.approx(ref_test[0], rel=1e-5)


class Recorder(Plugin):
    """Logs every per-step hook and checks what each hook is entitled to see."""

    def __init__(self):
        self.calls: list[str] = []
        self.weights_before_step = None

    def sample_loss(self, ctx, batch, out):
        self.calls.append("sample_loss")
        return None

    def sample_weights(self, ctx, batch, out):
        self.calls.append("sample_weights")
        assert out.sample_loss is out.per_sample_loss  # no plugin replaced the CE
        return None

    def extra_loss(self, ctx, batch, out):
        self.calls.append("extra_loss")
        return {"half": 0.5 * torch.ones((), device=out.logits.device), "sq": out.logits.pow(2).mean() * 0}

    def after_backward(self, ctx):
        self.calls.append("after_backward")
        assert all(p.grad is not None for p in ctx.model.parameters())
        self.weights_before_step = ctx.model.head.weight.detach().clone()

    def after_step(self, ctx):
        self.calls.append("after_step")
        assert not torch.equal(self.weights_before_step, ctx.model.head.weight)  # the optimizer has stepped


def test_hooks_run_in_contract_order_and_terms_are_logged(tmp_path, monkeypatch):
    """Per step: sample_loss, sample_weights, extra_loss, after_backward, after_step (regstory.plugins order); extra terms averaged
    into ``loss/<name>`` and included in train_loss."""
    cfg = make_cfg(*TINY_MLP, "trainer.epochs=1")
    recorder = Recorder()
    monkeypatch.setattr("regstory.train.build_plugins", lambda cfg: [recorder])
    run(cfg, run_dir=tmp_path)
    steps = math.ceil(1257 / 64)  # digits: 1797 images, 30% held out for test
    assert recorder.calls == ["sample_loss", "sample_weights", "extra_loss", "after_backward", "after_step"] * steps
    record = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert record["loss/half"] == pytest.approx(0.5)
    assert record["loss/sq"] == 0.0
    assert record["train_loss"] > 0.5  # CE + 0.5


def test_hook_caller_lists_only_overriding_plugins():
    class OnlyAfterStep(Plugin):
        def after_step(self, ctx):
            pass

    a, b = Plugin(), OnlyAfterStep()
    hooks = HookCaller([a, b])
    assert hooks.after_step == [b] and hooks["after_step"] == [b]
    assert hooks.sample_loss == hooks.sample_weights == hooks.extra_loss == hooks.after_backward == []


def test_read_once_divides_every_sum_by_the_count():
    sums = [torch.tensor(6.0), torch.tensor(3, dtype=torch.long), torch.tensor(1.5, dtype=torch.float64)]
    assert read_once(sums, 3) == pytest.approx([2.0, 1.0, 0.5])


def test_optimizer_uses_fused_kernels_for_float_params_on_cpu():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert optimizer_impl(params) == {"fused": True}
    assert optimizer_impl([]) == {"foreach": True}


def test_fused_sgd_matches_for_loop_sgd_on_a_hand_checked_step():
    """Momentum SGD (PyTorch form, thesis eq. for SGD with momentum): v = m v + g; w -= lr v. Two steps from w=1,
    g=2, lr=0.1, m=0.9: w1 = 1 - 0.2 = 0.8; v2 = 0.9*2 + 2 = 3.8, w2 = 0.8 - 0.38 = 0.42."""
    for impl in ({"fused": True}, {"foreach": False}):
        w = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, **impl)
        for _ in range(2):
            w.grad = torch.full((2,), 2.0)
            opt.step()
        assert torch.allclose(w.detach(), torch.full((2,), 0.42)), impl


def test_optimizer_falls_back_to_foreach_when_fused_is_refused(monkeypatch):
    """A torch without fused kernels for the params' device raises at construction: build the foreach variant."""
    from omegaconf import OmegaConf

    from regstory.loop import build_optimizer

    monkeypatch.setattr("regstory.loop.optimizer_impl", lambda *args: {"fused": True, "foreach": True})
    trainer = OmegaConf.create({"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False,
                                "weight_decay": 0.0, "precision": "fp32"})
    opt = build_optimizer(torch.nn.Linear(2, 2), trainer)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


def test_trainer_compile_mode_reaches_torch_compile_and_the_loop_calls_the_compiled_model(tmp_path, monkeypatch):
    import regstory.train as train_module
    from regstory.tracking import RunLogger

    calls = []

    class Compiled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    def fake_compile(module, mode):
        calls.append(mode)
        return Compiled(module)

    monkeypatch.setattr(train_module.torch, "compile", fake_compile)
    cfg = make_cfg(*TINY_MLP, "trainer.compile=true", "trainer.compile_mode=reduce-overhead", "trainer.device=cpu")
    bundle = prepare_data(cfg, None)
    model = instantiate(cfg.arch, input_shape=list(bundle.input_shape), num_classes=bundle.num_classes)
    ctx = train_module.build_context(cfg, bundle, model, torch.device("cpu"), tmp_path,
                                     RunLogger(tmp_path, cfg.logger, {}, None, None))
    assert calls == ["reduce-overhead"]
    assert isinstance(ctx.net, Compiled) and ctx.net.inner is ctx.model  # training steps go through the compiled model


def test_bf16_autocasts_the_training_steps_on_cpu_and_keeps_the_loss_in_fp32(tmp_path, monkeypatch):
    import regstory.loop as loop_module

    seen = []
    real_forward = loop_module.forward

    def spy(net, batch, with_features):
        out = real_forward(net, batch, with_features)
        seen.append((out.logits.dtype, out.per_sample_loss.dtype))
        return out

    monkeypatch.setattr(loop_module, "forward", spy)
    summary = run(make_cfg(*TINY_MLP, "trainer.epochs=1", "trainer.device=cpu", "trainer.precision=bf16"),
                  run_dir=tmp_path)
    assert seen and set(seen) == {(torch.bfloat16, torch.float32)}
    assert math.isfinite(summary["final_train_loss"])


def test_fp16_is_refused_off_cuda_and_bf16_is_accepted_on_cpu():
    from regstory.config import ConfigError
    from regstory.train import check_precision

    with pytest.raises(ConfigError, match="trainer.precision=fp16 needs a CUDA device"):
        check_precision("fp16", torch.device("cpu"))
    check_precision("bf16", torch.device("cpu"))
    check_precision("fp32", torch.device("cpu"))


class OverflowOnSteps(Plugin):
    """Makes the loss infinite at the given global steps, as an fp16 overflow would."""

    def __init__(self, steps: set[int]):
        self.steps = steps

    def extra_loss(self, ctx, batch, out):
        return {"overflow": out.logits.sum() * float("inf")} if ctx.global_step in self.steps else {}


def test_grad_scaler_branch_skips_an_overflowing_step_and_then_matches_plain_sgd(tmp_path):
    """The fp16 branch of the loop (GradScaler, no .item()), run on CPU: an inf first step leaves the weights untouched
    and halves the scale; the next step equals torch's for-loop SGD on the unscaled gradient. With torch's fused SGD
    the second step read uninitialised momentum buffers (see ``optimizer_impl``)."""
    import copy

    from regstory.loop import train_one_epoch
    from regstory.tracking import RunLogger
    from regstory.train import build_context

    from regstory.loop import build_optimizer

    cfg = make_cfg(*TINY_MLP, "trainer.device=cpu", "trainer.momentum=0.9")
    fp16_trainer = make_cfg(*TINY_MLP, "trainer.momentum=0.9", "trainer.precision=fp16").trainer
    bundle = prepare_data(cfg, None)
    model = instantiate(cfg.arch, input_shape=list(bundle.input_shape), num_classes=bundle.num_classes)
    ctx = build_context(cfg, bundle, model, torch.device("cpu"), tmp_path, RunLogger(tmp_path, cfg.logger, {}, None, None))
    ctx.optimizer = build_optimizer(ctx.model, fp16_trainer)  # what an fp16 run builds (its scaler needs CUDA)
    ctx.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    batch = {"x": bundle.train.x[:64], "y": bundle.train.y[:64]}
    reference = copy.deepcopy(ctx.model)
    before = [p.detach().clone() for p in ctx.model.parameters()]

    train_one_epoch(ctx, HookCaller([OverflowOnSteps({0})]), [batch])
    assert all(torch.equal(a, p) for a, p in zip(before, ctx.model.parameters()))
    assert ctx.scaler.get_scale() == 512.0

    train_one_epoch(ctx, HookCaller([]), [batch])
    opt = torch.optim.SGD(reference.parameters(), lr=float(cfg.trainer.lr), momentum=0.9, foreach=False)
    F.cross_entropy(reference(batch["x"]), batch["y"]).backward()
    opt.step()
    for got, want in zip(ctx.model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer,fused", [("sgd", False), ("adam", True), ("adamw", True)])
def test_fp16_keeps_fused_kernels_except_for_sgd(optimizer, fused):
    from regstory.loop import build_optimizer

    trainer = make_cfg(*TINY_MLP, f"trainer.optimizer={optimizer}", "trainer.precision=fp16").trainer
    opt = build_optimizer(torch.nn.Linear(3, 2), trainer)
    assert bool(opt.defaults.get("fused")) is fused
    assert bool(opt.defaults.get("foreach")) is not fused
