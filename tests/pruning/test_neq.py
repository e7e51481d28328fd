"""NEq, neurons at equilibrium (thesis sec. 2.7): the velocity of the variations of similarity on hand-computed
sequences (paper and code forms), the equilibrium threshold, the budget's order (sec. 2.7.2.1), the back-propagation
FLOP count against torch's FlopCounterMode, the frozen-row gradient skipping, frozen rows that do not move during an
epoch, an end-to-end CLI run, bad input refused in one line, and resume."""
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from regstory.pruning.neq import (NEq, LayerInfo, at_equilibrium, backprop_costs, cosine, install_skip,
                                  layer_similarity, probe_layers, remove_skip, select_under_budget, velocity)
from tests.conftest import cli_refusal, interrupt_then_resume, make_cfg, read_jsonl, run_cli

# phi_t of three neurons over four measurements (t = 1..4)
PHI = [[0.5, 0.9, 1.0], [0.9, 0.9, 1.0], [0.95, 0.9004, 1.0], [0.951, 0.9, 1.0]]


def run_velocity(form: str, mu: float = 0.5) -> list:
    phi_prev = v = None
    out = []
    for phi in PHI:
        phi = torch.tensor(phi, dtype=torch.float64)
        v = velocity(phi, phi_prev, v, mu, form)
        out.append(None if v is None else v.tolist())
        phi_prev = phi
    return out


def test_velocity_paper_form_by_hand():
    """v_t = Dphi_t - mu * v_{t-1} (sec. 2.7.1 / the paper's v_Dphi), undefined at the first measurement."""
    v = run_velocity("paper")
    assert v[0] is None  # phi_1 only: no variation yet
    assert v[1] == pytest.approx([0.4, 0.0, 0.0])  # Dphi_2 - 0.5 * 0
    assert v[2] == pytest.approx([0.05 - 0.2, 0.0004, 0.0])  # Dphi_3 - 0.5 * v_2
    assert v[3] == pytest.approx([0.001 + 0.075, -0.0004 - 0.0002, 0.0])
    assert run_velocity("paper", mu=0.0)[3] == pytest.approx([0.001, -0.0004, 0.0])  # mu = 0: Dphi itself


def test_velocity_code_form_by_hand():
    """The authors' code: v_t = mu * v_{t-1} - (rho_{t-1} - rho_t), rho = 1 - phi, from rho_0 = 0 and v_0 = 0."""
    v = run_velocity("code")
    assert v[0] == pytest.approx([0.5, 0.1, 0.0])  # -(0 - (1 - phi_1)) = 1 - phi_1
    assert v[1] == pytest.approx([0.25 - 0.4, 0.05, 0.0])
    assert v[2] == pytest.approx([-0.075 - 0.05, 0.025 - 0.0004, 0.0])


def test_equilibrium_is_the_absolute_velocity_below_eps():
    v = torch.tensor([1e-3, -5e-4, 2e-3, 0.0, -1e-3], dtype=torch.float64)
    assert at_equilibrium(v, 1e-3, 5).tolist() == [False, True, False, True, False]
    assert at_equilibrium(None, 1e-3, 3).tolist() == [False] * 3  # before any velocity: none
    assert at_equilibrium(torch.tensor(run_velocity("paper")[3]), 1e-3, 3).tolist() == [False, True, True]


def test_cosine_flat_and_per_sample_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, -1.0], [0.0, 0.0], [3.0, 4.0]])
    assert cosine(a, b, dim=1).tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0])  # scale-free; 0/0 = 1; one zero: 0
    # a conv neuron (C = 1) on 2 samples x 2 positions: flat = one cosine over all 4 values
    prev = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [N, C, P]
    cur = torch.tensor([[[2.0, 0.0]], [[1.0, 1.0]]])
    flat = layer_similarity([prev.transpose(0, 1).reshape(1, -1)], [cur.transpose(0, 1).reshape(1, -1)], False)
    assert flat.tolist() == pytest.approx([3 / math.sqrt(2 * 6)])  # [1, 0, 0, 1] . [2, 0, 1, 1]
    per_sample = layer_similarity([prev], [cur], True)  # (cos 0 deg + cos 45 deg) / 2
    assert per_sample.tolist() == pytest.approx([(1 + 1 / math.sqrt(2)) / 2])


# -- FLOPs ------------------------------------------------------------------------------------------------------------
def nets():
    torch.manual_seed(0)
    return {
        "linear": (nn.Sequential(nn.Linear(20, 30)), torch.randn(8, 20)),
        "mlp": (nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 12), nn.ReLU(), nn.Linear(12, 5)),
                torch.randn(8, 20)),
        "tokens": (nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 4)), torch.randn(3, 5, 6)),
        "conv": (nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.Flatten(),
                               nn.Linear(8 * 3 * 3, 4)), torch.randn(4, 3, 8, 8)),
        "conv_bn": (nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3),
                                  nn.Flatten(), nn.Linear(5 * 6 * 6, 4)),
                    torch.randn(4, 3, 8, 8)),
    }


def counted_backward(net, x) -> int:
    out = net(x)
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["linear", "mlp", "tokens", "conv", "conv_bn"])
def test_backprop_flops_match_flop_counter_mode(name):
    """Full backward, and the backward with frozen rows skipped (skip_frozen_grads), the first layer fully frozen:
    the count of the module docstring equals what FlopCounterMode sees autograd compute."""
    net, x = nets()[name]
    layers, others = probe_layers(net, x[:2], head=True)
    full = {layer.name: torch.ones(layer.neurons, dtype=torch.bool) for layer in layers}
    costs = backprop_costs(layers, full, others)
    assert costs.flops == costs.flops_full
    assert costs.flops * x.shape[0] == counted_backward(net, x)
    gen = torch.Generator().manual_seed(1)
    part = {layer.name: torch.rand(layer.neurons, generator=gen) < 0.5 for layer in layers}
    part[layers[0].name][0] = True
    if len(layers) > 1:
        part[layers[0].name][:] = False  # nothing before layer 2 trains: its input gradient is skipped too
    for layer in layers:
        install_skip(layer.module, part[layer.name])
    try:
        costs = backprop_costs(layers, part, others)
        assert costs.flops * x.shape[0] == counted_backward(net, x)
        assert costs.flops < costs.flops_full
    finally:
        for layer in layers:
            remove_skip(layer.module)


def test_one_linear_and_one_conv_layer_by_hand():
    lin = nn.Linear(20, 30)
    layers, _ = probe_layers(lin, torch.randn(2, 20), head=True)
    assert layers[0].fwd_flops == 2 * 20 * 30 and layers[0].params_per_neuron == 21 and layers[0].in_numel == 20
    conv = nn.Conv2d(3, 6, 3, stride=2, bias=False)  # 9x9 -> 4x4
    layers, _ = probe_layers(conv, torch.randn(2, 3, 9, 9), head=True)
    assert layers[0].fwd_flops == 2 * 6 * 3 * 9 * 16 and layers[0].params_per_neuron == 27
    half = torch.tensor([True, False] * 3)
    costs = backprop_costs(layers, {layers[0].name: half}, [])
    assert costs.flops == 6 * 3 * 9 * 16 and costs.flops_full == 2 * 6 * 3 * 9 * 16  # no input gradient: data


# -- skipping the frozen rows ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(7, 6), (5, 7)),
    (lambda: nn.Linear(7, 6, bias=False), (2, 3, 7)),
    (lambda: nn.Conv2d(3, 6, 3, padding=1, stride=2), (4, 3, 7, 7)),
    (lambda: nn.Conv2d(3, 6, 3).to(memory_format=torch.channels_last), (4, 3, 7, 7)),
    (lambda: nn.Conv1d(3, 6, 3, dilation=2, bias=False), (4, 3, 11)),
])
def test_skipped_gradients_equal_on_active_rows_and_zero_on_frozen(make, shape):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(shape, requires_grad=True)
    if x.dim() == 4 and layer.weight.is_contiguous(memory_format=torch.channels_last):
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    target = torch.randn_like(layer(x))
    (layer(x) * target).sum().backward()
    ref_x, ref_w = x.grad.clone(), layer.weight.grad.clone()
    ref_b = layer.bias.grad.clone() if layer.bias is not None else None
    x.grad = None
    layer.zero_grad(set_to_none=True)
    trainable = torch.tensor([True, False, False, True, True, False])
    assert install_skip(layer, trainable)
    out = layer(x)
    torch.testing.assert_close(out, type(layer).forward(layer, x))  # the same forward
    (out * target).sum().backward()
    remove_skip(layer)
    assert "forward" not in vars(layer)
    torch.testing.assert_close(x.grad, ref_x)  # frozen neurons still pass the error back
    torch.testing.assert_close(layer.weight.grad[trainable], ref_w[trainable])
    assert not layer.weight.grad[~trainable].any()
    if ref_b is not None:
        torch.testing.assert_close(layer.bias.grad[trainable], ref_b[trainable])
        assert not layer.bias.grad[~trainable].any()


@pytest.mark.parametrize("make, shape", [(lambda: nn.Linear(16, 6), (4, 16)),
                                         (lambda: nn.Conv2d(3, 6, 3), (2, 3, 6, 6))])
def test_skipped_gradients_under_bf16_autocast_are_the_plain_ones(make, shape):
    torch.manual_seed(0)
    layer, x = make(), torch.randn(shape, requires_grad=True)
    trainable = torch.tensor([True, False] * 3)
    grads = []
    for skip in (False, True):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        if skip:
            install_skip(layer, trainable)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        remove_skip(layer)
        grads.append((x.grad, layer.weight.grad, layer.bias.grad))
    (gx, gw, gb), (sx, sw, sb) = grads
    assert torch.equal(gx, sx) and torch.equal(gw[trainable], sw[trainable])
    assert torch.equal(gb[trainable], sb[trainable])
    assert sw.dtype == torch.float32 and not sw[~trainable].any()


def test_fully_frozen_layer_is_detached_and_unsupported_layers_keep_their_forward():
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    assert install_skip(net[0], torch.zeros(5, dtype=torch.bool))
    net(torch.randn(2, 4)).sum().backward()
    assert net[0].weight.grad is None and net[2].weight.grad is not None  # not in the graph: no work at all
    remove_skip(net[0])
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    assert not install_skip(grouped, torch.tensor([True, False, True, True]))  # full gradients; the freezer holds
    assert not install_skip(net[2], torch.ones(3, dtype=torch.bool))  # nothing frozen: plain forward


# -- the budget (sec. 2.7.2.1) --------------------------------------------------------------------------------------
def hand_layers() -> list[LayerInfo]:
    """Three linear layers 10 -> 4 -> 4 -> 2 (the last one the head, unmanaged), costs per sample."""
    mods = [nn.Linear(10, 4), nn.Linear(4, 4), nn.Linear(4, 2)]
    return [LayerInfo(f"l{i}", m, i, m.out_features, 2.0 * m.weight.numel(), m.in_features, m.in_features + 1, i < 2)
            for i, m in enumerate(mods)]


def test_budget_picks_the_neurons_furthest_from_equilibrium_first():
    layers = hand_layers()
    scores = {"l0": torch.tensor([0.5, 1e-4, 0.2, 3.0], dtype=torch.float64),
              "l1": torch.tensor([0.1, 2.0, 1e-5, 0.3], dtype=torch.float64)}
    full = backprop_costs(layers, {"l0": torch.ones(4, dtype=torch.bool), "l1": torch.ones(4, dtype=torch.bool)}, [])
    assert full.flops_full == 80 + 32 + 16 + 32 + 16  # weight grads of all three, input grads of l1 and the head
    # |v| order: l0#3 (3.0), l1#1 (2.0), l0#0 (0.5), l1#3, l0#2, l1#0, l0#1, l1#2
    # base: the head's weight gradient (16); l0#3 costs 20 + the input gradients of l1 and the head (32 + 16)
    picked = select_under_budget(layers, scores, [], flops=(16 + 68) / 176)
    assert picked["l0"].tolist() == [False, False, False, True] and not picked["l1"].any()
    picked = select_under_budget(layers, scores, [], flops=(16 + 68 + 8) / 176)  # + l1#1 (8)
    assert picked["l0"].tolist() == [False, False, False, True] and picked["l1"].tolist() == [False, True, False, False]
    picked = select_under_budget(layers, scores, [], flops=(16 + 68 + 8 + 19) / 176)  # l0#0 (20) does not fit
    assert picked["l0"].sum() == 1 and picked["l1"].sum() == 1  # strict priority: l1#3 (8) is not taken instead
    # the count of the selection is the count of its FLOPs
    picked = select_under_budget(layers, scores, [], flops=0.8)
    used = backprop_costs(layers, picked, [])
    assert used.flops <= 0.8 * used.flops_full < used.flops + 20
    everything = select_under_budget(layers, scores, [], flops=1.0)
    assert all(t.all() for t in everything.values())
    # before velocities exist every score is inf: the layers called last go first
    first = select_under_budget(layers, {k: torch.full((4,), math.inf) for k in scores}, [], flops=0.4)
    assert first["l1"].any() and not first["l0"].any()


def test_memory_budget_counts_a_layer_input_once_and_each_neuron_parameters():
    layers = hand_layers()
    scores = {"l0": torch.tensor([4.0, 3.0, 0.0, 0.0], dtype=torch.float64),
              "l1": torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)}
    # batch 2: full = l0 (2*10 + 4*11) + l1 (2*4 + 4*5) + head (2*4 + 2*5) = 64 + 28 + 18 = 110; base: head 18
    picked = select_under_budget(layers, scores, [], memory=(18 + 20 + 11 + 11) / 110, batch_size=2)
    assert picked["l0"].tolist() == [True, True, False, False] and not picked["l1"].any()
    used = backprop_costs(layers, picked, [], batch_size=2)
    assert (used.memory, used.memory_full) == (60, 110)


# -- the plugin in the loop ---------------------------------------------------------------------------------------
TINY = ["dataset=digits", "arch=lenet300", "method=neq", "trainer.batch_size=64"]


@pytest.mark.parametrize("skip", [False, True])
def test_frozen_rows_do_not_move_during_an_epoch_while_the_others_do(tmp_path, monkeypatch, skip):
    """budget.flops=0.5 freezes part of every hidden layer from the first epoch; eps 0.05 freezes more later."""
    from regstory.train import run

    seen = []
    original_start, original_end = NEq.start_epoch, NEq.end_epoch

    def start(self, ctx):
        seen.append({"trainable": {k: v.clone() for k, v in self.trainable.items()},
                     "params": {l.name: (l.module.weight.detach().clone(), l.module.bias.detach().clone())
                                for l in self.managed}})
        original_start(self, ctx)

    def end(self, ctx):
        moved = {}
        for layer in self.managed:
            w0, b0 = seen[-1]["params"][layer.name]
            moved[layer.name] = ((layer.module.weight.detach() != w0).any(1) | (layer.module.bias.detach() != b0))
        seen[-1]["moved"] = moved
        return original_end(self, ctx)

    monkeypatch.setattr(NEq, "start_epoch", start)
    monkeypatch.setattr(NEq, "end_epoch", end)
    run(make_cfg(*TINY, "trainer.epochs=3", "method.budget.flops=0.5", f"method.skip_frozen_grads={skip}",
                 "trainer.weight_decay=5e-4"), run_dir=tmp_path)
    frozen_total = 0
    for epoch in seen:
        for name, trainable in epoch["trainable"].items():
            moved = epoch["moved"][name]
            assert not moved[~trainable].any(), name  # no step, no decay, no momentum
            if trainable.any():
                assert moved[trainable].float().mean() > 0.9, name
            frozen_total += int((~trainable).sum())
    assert frozen_total > 0
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(m["neq_bp_flops_frac"] <= 0.5 + 1e-9 for m in metrics)
    assert all(0 < m["neq_updated"] < 1 for m in metrics)


def test_head_option_tracks_the_classifier_too():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                          nn.Linear(100, 10))
    layers, _ = probe_layers(model, torch.randn(2, 64), head=False)
    assert [l.managed for l in layers] == [True, True, False]
    layers, _ = probe_layers(model, torch.randn(2, 64), head=True)
    assert all(l.managed for l in layers) and sum(l.neurons for l in layers) == 410


KEYS = ("neq_updated", "neq_bp_flops", "neq_bp_flops_full", "neq_bp_flops_frac", "neq_bp_memory_frac",
        "neq_at_equilibrium", "neq_updated_next", "neq_phi_mean", "test_acc")


def test_cli_two_epochs_on_digits_logs_the_per_epoch_keys(tmp_path):
    run_cli("dataset=digits", "arch=lenet300", "method=neq", "trainer.epochs=2", "method.skip_frozen_grads=true",
            "logger.wandb.mode=disabled", "logger.progress=none", "trainer.num_threads=1", "hydra.run.dir=run",
            cwd=tmp_path)
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [0, 1]
    for m in metrics:
        assert all(k in m for k in KEYS), sorted(m)
        assert 0 < m["neq_bp_flops_frac"] <= 1 and m["neq_bp_flops"] <= m["neq_bp_flops_full"]
    assert metrics[0]["neq_updated"] == 1.0 and metrics[0]["neq_at_equilibrium"] == 0.0  # no velocity yet
    assert "neq_velocity_abs_mean" in metrics[1] and 0 < metrics[1]["neq_at_equilibrium"] < 1
    assert metrics[1]["neq_updated_next"] == pytest.approx(1 - metrics[1]["neq_at_equilibrium"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["plugins"]["method"]
    assert summary["neq_neurons"] == 400 and summary["neq_subset_from"] == "train"
    assert summary["neq_subset_size"] == math.ceil(0.01 * 1257)  # 1% of the training split


@pytest.mark.parametrize("bad, key", [("method.eps=0", "method.eps"), ("method.mu=1", "method.mu"),
                                      ("method.budget.flops=1.5", "method.budget.flops"),
                                      ("method.budget.memory=0", "method.budget.memory")])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, bad, key):
    line = cli_refusal(tmp_path, "dataset=digits", "method=neq", bad)
    assert key in line and "must be" in line


@pytest.mark.parametrize("bad, key", [("method.eps=-1", "method.eps"), ("method.mu=-0.1", "method.mu"),
                                      ("method.budget.flops=0", "method.budget.flops"),
                                      ("method.budget.flops=abc", "method.budget.flops"),
                                      ("method.velocity=fast", "method.velocity"),
                                      ("method.subset_fraction=0", "method.subset_fraction")])
def test_bad_input_is_refused_by_the_typed_options(bad, key):
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from regstory.config import ConfigError, compose_checked
    from regstory.train import conf_dir
    from tests.conftest import FAST

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        with pytest.raises(ConfigError, match=rf"^{key} must be"):
            compose_checked([*FAST, "method=neq", bad])
    GlobalHydra.instance().clear()


def test_direct_construction_checks_the_budget_too():
    from regstory.config import ConfigError

    assert NEq(budget={"flops": 0.3}).budgeted and not NEq().budgeted
    with pytest.raises(ConfigError, match="method.budget.memory"):
        NEq(budget={"memory": 2})


def test_state_dict_round_trip_and_resume_match_an_uninterrupted_run(tmp_path, monkeypatch):
    from regstory.train import run
    from tests.test_loop import strip_times

    args = [*TINY, "trainer.epochs=5", "method.eps=0.01", "method.skip_frozen_grads=true"]
    full = run(make_cfg(*args), run_dir=tmp_path / "full")
    resumed = interrupt_then_resume(monkeypatch, NEq, "start_epoch", (0, 3), args, tmp_path / "killed")
    a, b = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert strip_times(a) == strip_times(b)
    assert resumed["final_test_acc"] == full["final_test_acc"]
    assert any(m["neq_updated"] < 1 for m in a)  # the resumed epochs did freeze neurons
    ckpt = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)
    state = ckpt["plugins"]["method"]
    fresh = NEq()
    fresh.load_state_dict(state)
    again = {"measurements": fresh.measurements, "layers": {
        k: {"outputs": fresh.outputs[k], "phi": fresh.phi[k], "v": fresh.v[k], "trainable": fresh.trainable[k]}
        for k in state["layers"]}}
    assert again["measurements"] == state["measurements"] == 5
    for name, item in state["layers"].items():
        for key in ("phi", "v", "trainable"):
            assert torch.equal(again["layers"][name][key], item[key])
        assert all(torch.equal(x, y) for x, y in zip(again["layers"][name]["outputs"], item["outputs"]))
    frozen = {k: v["rows"] for k, v in ckpt["freezer"].items()}  # the engine's freezer holds the same set
    assert {k: torch.equal(frozen.get(f"{k}.weight", torch.zeros_like(item["trainable"])), ~item["trainable"])
            for k, item in state["layers"].items()} == {k: True for k in state["layers"]}


def test_the_digits_preset_composes_and_runs_two_epochs(tmp_path):
    from regstory.config import check_targets, check_values
    from regstory.train import run

    cfg = make_cfg("experiment=neq_digits")
    check_values(cfg)
    check_targets(cfg)
    assert cfg.method.skip_frozen_grads and cfg.arch._target_.endswith("lenet5") and cfg.dataset.val_fraction == 0.1
    summary = run(make_cfg("experiment=neq_digits", "trainer.epochs=2"), run_dir=tmp_path)
    assert summary["plugins"]["method"]["neq_subset_from"] == "val"
    assert summary["plugins"]["method"]["neq_neurons"] == 20 + 50 + 500  # conv1, conv2, fc; not the head
    assert all(k in m for m in read_jsonl(tmp_path / "metrics.jsonl") for k in KEYS)
