"""The loop's per-step services for plugins: the step's activations (``Plugin.activation_sites``) and per-neuron
freezing (``ctx.freezer``), through real runs, including kill and resume."""
from __future__ import annotations

import torch

from regstory.checkpoint import load_checkpoint
from regstory.plugins import Plugin
from regstory.train import run
from tests.conftest import interrupt_then_resume, make_cfg

TINY = ["dataset=digits", "arch=mlp", "arch.width=16", "trainer.batch_size=256", "trainer.epochs=3",
        "trainer.weight_decay=0.01"]


class FreezeFirstHalf(Plugin):
    """Freezes the first half of the first hidden layer's neurons (weights and biases) before round 0 and records
    them; checks after every step that they have not moved."""

    def start_round(self, ctx):
        layer = ctx.model.layers[0]
        self.rows = torch.arange(layer.out_features) < layer.out_features // 2
        ctx.freezer.freeze(layer.weight, self.rows, bias=layer.bias)
        self.frozen = (layer.weight[self.rows].clone(), layer.bias[self.rows].clone())

    def after_step(self, ctx):
        layer = ctx.model.layers[0]
        if hasattr(self, "frozen"):  # a resumed run does not call start_round again
            assert torch.equal(layer.weight[self.rows], self.frozen[0])
            assert torch.equal(layer.bias[self.rows], self.frozen[1])


FREEZE = "+plugins.freeze._target_=tests.test_step_services.FreezeFirstHalf"


def test_frozen_neurons_keep_their_weights_while_the_rest_trains(tmp_path):
    run(make_cfg(*TINY, FREEZE), run_dir=tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    torch.manual_seed(0)  # the run's seed: its initial model
    init = run_init_weights()
    trained = ckpt["model"]["layers.0.weight"]
    assert torch.equal(trained[:8], init[:8])
    assert not torch.equal(trained[8:], init[8:])
    assert ckpt["freezer"]["layers.0.weight"]["rows"].sum() == 8
    momentum = ckpt["optimizer"]["state"][0]["momentum_buffer"]  # layers.0.weight: the first parameter
    assert not momentum[:8].any() and momentum[8:].any()  # no momentum for frozen rows (no update, no decay)


def run_init_weights():
    from hydra.utils import instantiate

    from regstory.utils import seed_everything

    cfg = make_cfg(*TINY)
    seed_everything(int(cfg.seed))
    from regstory.data.prepare import prepare_data

    bundle = prepare_data(cfg, None)
    model = instantiate(cfg.arch, input_shape=list(bundle.input_shape), num_classes=bundle.num_classes)
    return model.layers[0].weight.detach()


def test_freezing_survives_kill_and_resume(tmp_path, monkeypatch):
    overrides = [*TINY, FREEZE]
    straight = run(make_cfg(*overrides), run_dir=tmp_path / "straight")
    resumed = interrupt_then_resume(monkeypatch, FreezeFirstHalf, "after_step", (0, 2), overrides, tmp_path / "kill")
    assert resumed["final_test_loss"] == straight["final_test_loss"]
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "kill" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


class ReadsActivations(Plugin):
    """Checks what the step's recorder holds against a hand-computed forward, and the gradients after backward."""

    activation_sites = "auto"
    activation_grads = True
    steps = 0

    def extra_loss(self, ctx, batch, out):
        rec = out.activations
        assert rec.sites == ["acts.0", "acts.1"]  # depth 2: one site per hidden layer
        x = batch["x"].flatten(1)
        pre = ctx.model.layers[0](x)
        torch.testing.assert_close(rec.pre["acts.0"], pre)
        torch.testing.assert_close(rec.post["acts.0"], pre.relu())
        assert rec.post["acts.0"].requires_grad
        return {}

    def after_backward(self, ctx):
        post = ctx.activations.post["acts.0"]
        assert post.grad is not None and post.grad.shape == post.shape
        # the head's input is post: dL/dpost = dL/dlogits @ W_head, so its gradient is non-zero somewhere
        assert post.grad.abs().sum() > 0
        ReadsActivations.steps += 1


def test_a_plugin_reads_the_steps_activations_and_their_gradients(tmp_path):
    ReadsActivations.steps = 0
    run(make_cfg(*TINY, "trainer.epochs=1", "+plugins.acts._target_=tests.test_step_services.ReadsActivations"),
        run_dir=tmp_path)
    assert ReadsActivations.steps > 0


class NoStepServices(Plugin):
    """Checks that the loop records no activations and freezes nothing when no plugin asks."""

    def after_step(self, ctx):
        assert ctx.activations is None and not ctx.freezer


def test_no_recorder_and_no_freezer_cost_without_plugins_asking(tmp_path):
    run(make_cfg(*TINY, "trainer.epochs=1", "method=imp", "method.rounds=1",
                 "+plugins.check._target_=tests.test_step_services.NoStepServices"), run_dir=tmp_path)


class GradsAfterStep(Plugin):
    """Records, after each step of round 1, whether every pruned entry's gradient reads zero (as on the two-pass
    path) and whether the optimizer took the masks into its step (the masked kernel)."""

    seen: list[tuple[bool, bool]] = []

    def after_step(self, ctx):
        if ctx.round != 1:
            return
        masks = next(p.pinned_weights() for p in ctx.plugins if p.pinned_weights() is not None)
        zero = all(not p.grad[m == 0].any() for p, m in zip(masks.params, masks.masks) if p.grad is not None)
        GradsAfterStep.seen.append((zero, bool(getattr(ctx.optimizer, "takes_gradient_masks", False))))


def test_after_step_sees_masked_gradients_whichever_path_the_masks_took(tmp_path, monkeypatch):
    """A later plugin's ``after_step`` sees the same gradients with the masked CPU kernel as without it."""
    from regstory.kernels import masked_sgd_kernel

    overrides = [*TINY, "trainer.epochs=1", "method=imp", "method.rounds=1",
                 "+plugins.grads._target_=tests.test_step_services.GradsAfterStep"]
    for disabled in ("1", "0"):
        monkeypatch.setenv("REGSTORY_NO_KERNELS", disabled)
        if disabled == "0" and masked_sgd_kernel() is None:
            continue  # no compiler here: the two-pass path was checked
        GradsAfterStep.seen = []
        run(make_cfg(*overrides), run_dir=tmp_path / disabled)
        assert GradsAfterStep.seen and all(zero for zero, _ in GradsAfterStep.seen)
        assert any(fused for _, fused in GradsAfterStep.seen) == (disabled == "0")
