"""NEPENTHE (thesis sec. 2.6): eq. 2.23-2.24 by hand, the budget allocation, the collapsed MLP against the masked
one (residual and plain), the identity replacement, Fig. 2.12's analytic model (eq. 2.19-2.22) against quadrature
and a Monte Carlo, an end-to-end CLI sweep, resume, and bad input refused in one line."""
import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from regstory.checkpoint import load_checkpoint
from regstory.models.mlp import MLP
from regstory.pruning import nepenthe_analytic as na
from regstory.pruning.masks import MaskSet
from regstory.pruning.nepenthe import (CollapsedMLP, Nepenthe, NeuronStates, allocate, collapse_mlp, irrelevance,
                                       on_fractions, rectifier_producers, relevance, state_counts)
from tests.conftest import cli_refusal, interrupt_then_resume, make_cfg, read_jsonl, run_cli


# -- eq. 2.23-2.24 ---------------------------------------------------------------------------------------------------
def test_eq_2_23_irrelevance_and_eq_2_24_relevance_by_hand():
    weight = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # 3 weights remain
    # (1/2) * (1.0 * |1|+|-2| + 0.5 * |0.5|) / 3 = (1/2) * 3.25 / 3
    i1 = irrelevance(torch.tensor([1.0, 0.5]), weight, mask)
    assert i1 == pytest.approx(3.25 / 6)
    i2 = irrelevance(torch.tensor([0.25]), torch.tensor([[2.0, -2.0]]))  # no mask: its 2 non-zeros; 0.25 * 4 / 2
    assert i2 == pytest.approx(0.5)
    i3 = irrelevance(torch.zeros(2), weight, mask)  # a zero-entropy layer
    assert i3 == 0.0
    assert irrelevance(torch.ones(2), torch.zeros(2, 3)) == 0.0  # nothing left
    total = 3.25 / 6 + 0.5
    assert relevance([i1, i2, i3]) == pytest.approx([total / i1, total / i2, 0.0])


# -- allocation ------------------------------------------------------------------------------------------------------
def test_softmax_allocation_by_hand_then_capped_and_redistributed():
    # shares of 60 by softmax(1, 2): e/(e+e^2) = 0.2689 -> 16.13, 43.87; R = 0 takes nothing
    assert allocate(60, [1.0, 2.0, 0.0], [100, 100, 100]) == [16, 44, 0]
    # cap 0.4: the second may lose 40; its excess 3.87 goes to the first
    assert allocate(60, [1.0, 2.0, 0.0], [100, 100, 100], cap=0.4) == [20, 40, 0]
    # proportional: 1/4 and 3/4 of 40
    assert allocate(40, [1.0, 3.0], [100, 100], mode="proportional") == [10, 30]
    # more budget than room: every eligible tensor at its cap
    assert allocate(500, [1.0, 2.0, 0.0], [100, 100, 100], cap=0.5) == [50, 50, 0]


def test_allocation_sums_to_the_budget_and_respects_the_caps():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 7)
        rel = [0.0 if rng.random() < 0.2 else rng.uniform(0.5, 12) for _ in range(n)]
        alive = [rng.randint(0, 500) for _ in range(n)]
        cap = rng.choice([1.0, 0.9, 0.5, 0.05])
        budget = rng.randint(0, 2000)
        mode = rng.choice(["softmax", "proportional"])
        counts = allocate(budget, rel, alive, cap, mode)
        room = [math.floor(cap * a + 1e-9) if r > 0 else 0 for r, a in zip(rel, alive)]
        assert sum(counts) == min(budget, sum(room))
        assert all(0 <= c <= r for c, r in zip(counts, room))


# -- the collapse ----------------------------------------------------------------------------------------------------
def _inputs_of(model, i, x):
    seen = {}
    handle = model.layers[i].register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    model(x)
    handle.remove()
    return seen["x"]


@torch.no_grad()
def states_mlp(residual: bool, x: torch.Tensor) -> MLP:
    """A masked MLP 12-16x4-3 whose layer 1 is always ON, layer 2 always ON or OFF per neuron (zero entropy, mixed),
    layer 3 non-linear with 4 always-OFF neurons, layer 0 non-linear."""
    torch.manual_seed(0)
    model = MLP((12,), 3, [16, 16, 16, 16], residual=residual).eval()
    for layer in model.layers:
        layer.weight.mul_(torch.rand_like(layer.weight) > 0.5)  # the masked model: half its weights pruned
    model.layers[1].bias.fill_(30.0)
    model.layers[2].bias[:5], model.layers[2].bias[5:] = -50.0, 50.0
    z = _inputs_of(model, 3, x)
    model.layers[3].bias.copy_(-(z.mean(0) @ model.layers[3].weight.T))  # centred: ON and OFF
    model.layers[3].bias[:4] = -1e4
    return model


@pytest.mark.parametrize("residual", [True, False])
def test_the_collapsed_mlp_computes_the_masked_one_with_two_layers_fewer(residual):
    x = torch.randn(512, 12)
    model = states_mlp(residual, x)
    p_on = on_fractions(model, [x])
    assert [state_counts(p_on[f"acts.{i}"]) for i in range(4)] == [(16, 0, 0), (0, 0, 16), (0, 5, 11), (12, 4, 0)]
    collapsed, change = collapse_mlp(model, p_on, (12,))
    assert isinstance(collapsed, CollapsedMLP) and collapsed.depth == 3  # 6 Linear maps on the path -> 3
    with torch.no_grad():
        ref, out = model(x), collapsed(x)
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert sum(p.numel() for p in collapsed.parameters()) < sum(p.numel() for p in model.parameters())
    stage = collapsed.stages[1]  # layer 3, with layers 1-2 folded in
    if residual:  # the merged affine blocks become the skip of the next block; its OFF units stay, zero
        assert stage.skip is not None and stage.linear.out_features == 16
        assert not stage.linear.weight[:4].any() and not stage.linear.bias[:4].any()
    else:  # layers 1-3 merged into one Linear; the 4 always-OFF units are removed
        assert stage.skip is None and not stage.identity_skip and stage.linear.out_features == 12
    assert change.sources["stages.0.linear.weight"] == ("layers.0.weight", ())  # untouched stage keeps its source
    assert "stages.1.linear.weight" not in change.sources  # merged: a new tensor


def test_an_identity_replaced_rectifier_is_folded_like_a_zero_entropy_one():
    x = torch.randn(256, 12)
    model = states_mlp(True, x)
    p_on = on_fractions(model, [x])
    model.acts[1] = nn.Identity()  # always ON: the identity computes the same
    del p_on["acts.1"]
    collapsed, _ = collapse_mlp(model, p_on, (12,))
    assert collapsed.depth == 3
    with torch.no_grad():
        assert torch.allclose(collapsed(x), model(x), rtol=1e-5, atol=1e-4)


class FakeCtx:
    """The part of a RunContext that ``Nepenthe.linearize`` uses: the model, its data shape, model surgery."""

    def __init__(self, model, plugin):
        self.model, self.plugin, self.round, self.optimizer = model, plugin, 0, None
        self.data = type("Data", (), {"input_shape": (12,)})()

    def replace_model(self, new, change):
        self.model = new
        self.plugin.model_replaced(self, change)


def test_linearize_replaces_zero_entropy_rectifiers_silences_off_neurons_and_keeps_the_function():
    x = torch.randn(256, 12)
    model = states_mlp(True, x)
    plugin = Nepenthe(retrain="lr_rewind")
    ctx = FakeCtx(model, plugin)
    plugin.masks = MaskSet(plugin.prunable(ctx))
    plugin.producers, plugin.feeders = rectifier_producers(model, (12,))
    plugin.layers = list(plugin.producers)
    assert plugin.producers["acts.2"] == ("layers.2", None) and plugin.feeders["acts.2"] == ["layers.2"]
    plugin.entropy.p_on = on_fractions(model, [x])
    with torch.no_grad():
        before = model(x)
    plugin.linearize(ctx)
    assert isinstance(ctx.model.acts[1], nn.Identity) and isinstance(ctx.model.acts[2], nn.Identity)
    assert isinstance(ctx.model.acts[3], nn.ReLU)  # non-zero entropy: stays
    assert sorted(plugin.removed) == ["acts.1", "acts.2"] and plugin.removed["acts.2"]["off"] == 5
    mask = plugin.masks.masks[plugin.masks.names.index("layers.2.weight")]
    assert not mask[:5].any() and not ctx.model.layers[2].bias[:5].any()  # the OFF neurons: rows pruned, bias 0
    with torch.no_grad():
        assert torch.allclose(ctx.model(x), before, rtol=1e-5, atol=1e-4)


# -- Fig. 2.12 -------------------------------------------------------------------------------------------------------
def test_eq_2_22_is_the_integral_of_k0():
    from scipy.integrate import quad
    from scipy.special import k0

    for x in (1e-6, 0.01, 0.3, 1.0, 4.0, 20.0):
        assert float(na.struve_integral(x)) == pytest.approx(2 / math.pi * quad(k0, 0, x)[0], rel=1e-7, abs=1e-12)


def test_eq_2_20_integrates_to_the_kept_fraction_and_eq_2_19_is_the_pruned_one():
    from scipy.integrate import quad

    for t in (0.0, 1.0, 2.0):
        mass = 2 * quad(lambda z: float(na.preactivation_density(z, t)), 0, np.inf, limit=200)[0]
        assert mass == pytest.approx(1 - math.erf(t / math.sqrt(2)), rel=1e-6)
        assert float(na.pruned_fraction(t)) == pytest.approx(math.erf(t / math.sqrt(2)))


def test_the_normalised_curve_follows_the_monte_carlo_of_the_stated_model_and_the_printed_one_does_not():
    for t, bits in ((0.5, None), (1.0, 0.63), (2.0, 0.16)):
        p = float(na.p_normalised(t))
        assert p == pytest.approx(math.erfc(t / math.sqrt(2)) / 2, rel=1e-4)
        n = 200_000
        assert abs(na.monte_carlo_p_on(t, n, seed=1) - p) < 4 * math.sqrt(p * (1 - p) / n)
        if bits is not None:
            assert float(na.entropy_normalised(t)) == pytest.approx(bits, abs=0.005)
    # eq. 2.21 as printed stays at 1/2 (1 bit) while c >> eps, i.e. up to T ~ 4.5 for eps = 1e-7
    assert float(na.entropy_printed(4.0)) > 0.999 and float(na.p_printed(1.0)) == pytest.approx(0.5, abs=1e-5)
    assert float(na.entropy_printed(6.0)) < 0.01


# -- the sweep -------------------------------------------------------------------------------------------------------
TINY = ("experiment=nepenthe_mnist1d", "dataset=digits", "arch.width=32", "arch.depth=3", "method.rounds=1",
        "trainer.epochs=2", "method.entropy_samples=500")


def test_nepenthe_end_to_end_from_the_cli_records_the_per_round_keys(tmp_path):
    run_cli(*TINY, "logger.wandb.mode=disabled", "logger.progress=none", "trainer.num_threads=1",
            "hydra.run.dir=run", cwd=tmp_path)
    rounds = read_jsonl(tmp_path / "run" / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    for r in rounds:
        assert {"test_acc", "removable_layers", "removed_layers", "depth_after_collapse", "lowest_entropy/1",
                "lowest_entropy/3", "collapse_max_abs_diff", "collapse_test_acc"} <= set(r)
        assert r["collapse_max_abs_diff"] < 1e-4 and 1 <= r["depth_after_collapse"] <= 4
        for site in ("acts.0", "acts.1", "acts.2"):
            assert sum(r[f"states_{k}/{site}"] for k in ("nonzero", "off", "on")) == 32
    first = rounds[0]  # the allocation made after round 0: the budget, over layers 1-2 (the head is not in L)
    assert first["allocation/layers.1.weight"] + first["allocation/layers.2.weight"] == first["pruned"] == \
        first["budget"] > 0 and first["allocation/head.weight"] == 0 == first["relevance/head.weight"]
    assert "allocation/layers.0.weight" not in first  # the preset keeps the input layer dense
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["plugins"]["method"]
    assert summary["depth_dense"] == 4 and summary["layers"] == 3
    plot = _plot_script()  # Table 2.2 rows and Fig. 2.13 from the run folder
    assert len(plot.table_rows(rounds)) == 3
    plot.main([str(tmp_path / "run"), "--out", str(tmp_path / "states.png")])
    assert (tmp_path / "states.png").stat().st_size > 0


def _plot_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "plot_nepenthe.py"
    spec = importlib.util.spec_from_file_location("plot_nepenthe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_removal_survives_kill_and_resume_and_the_sweep_ends_collapsed(tmp_path, monkeypatch):
    """States forced to 'always ON' for acts.1 after round 0: the rectifier is replaced mid-sweep; a kill in round 1
    resumes the replaced model from the checkpoint's structure; the last round installs the collapsed MLP."""
    original = NeuronStates.__call__

    def forced(self, ctx):
        out = original(self, ctx)
        self.p_on["acts.1"] = torch.ones(32, dtype=torch.float64)
        return out

    monkeypatch.setattr(NeuronStates, "__call__", forced)
    overrides = ["dataset=digits", "arch=mlp", "arch.width=32", "arch.depth=3", "arch.residual=true",
                 "method=nepenthe", "method.rounds=1", "method.rate=0.1", "trainer.epochs=2",
                 "method.entropy_samples=200"]
    summary = interrupt_then_resume(monkeypatch, Nepenthe, "start_epoch", (1, 1), overrides, tmp_path / "run")
    final = summary["plugins"]["method"]
    removed = final["removed_sites"]
    assert removed[0] == "acts.1" and final["merged"] and final["depth_final"] == 4 - len(removed)
    rounds = read_jsonl(tmp_path / "run" / "rounds.jsonl")
    assert rounds[0]["removed_layers"] == 1 and rounds[1]["removed_layers"] == len(removed)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert isinstance(ckpt["architecture"], CollapsedMLP) and len(ckpt["architecture"].stages) == 3 - len(removed)


def test_plugin_state_round_trips():
    plugin = Nepenthe()
    plugin.masks = MaskSet({"w": nn.Parameter(torch.ones(2, 2))})
    plugin.layers, plugin.producers = ["acts.0", "acts.1"], {"acts.0": ("layers.0", None), "acts.1": (None, None)}
    plugin.feeders = {"acts.0": ["layers.0"], "acts.1": ["layers.1", "skip.0"]}
    plugin.removed = {"acts.1": {"off": 1, "on": 3, "round": 2}}
    state = plugin.state_dict()
    other = Nepenthe()
    other.masks = MaskSet({"w": nn.Parameter(torch.ones(2, 2))})
    other.load_state_dict(state)
    assert other.layers == plugin.layers and other.producers == plugin.producers and other.removed == plugin.removed
    assert other.feeders == plugin.feeders


@pytest.mark.parametrize("bad, key", [("method.rate=0", "method.rate"), ("method.rate=1.5", "method.rate"),
                                      ("method.allocation=greedy", "method.allocation"),
                                      ("method.cap=0", "method.cap"), ("method.head_entropy=2", "method.head_entropy")])
def test_bad_options_are_refused_naming_the_key(bad, key):
    from regstory.config import ConfigError, check_values

    with pytest.raises(ConfigError, match=key):
        check_values(make_cfg("method=nepenthe", bad))


@pytest.mark.parametrize("bad, words", [(("method.rate=1.5",), "method.rate"),
                                        (("arch.activation=tanh",), "has none")])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, bad, words):
    assert words in cli_refusal(tmp_path, "dataset=digits", "arch=mlp", "method=nepenthe", *bad)
