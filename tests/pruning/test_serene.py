"""SeReNe (thesis eq. 2.3-2.8): the lower (eq. 2.5) and upper (eq. 2.6) bounds against the exact sensitivity of eq.
2.3 from a per-output Jacobian, hand-computed values on a 2-neuron net, the update of eq. 2.8, an end-to-end CLI
sweep, and bad input refused in one line."""
import json

import pytest
import torch
from torch import nn

from regstory.pruning.serene import sensitivity, serene_decay
from tests.conftest import cli_refusal, read_jsonl, run_cli


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))


def exact_sensitivity(net: nn.Sequential, x: torch.Tensor, site: int) -> torch.Tensor:
    """Eq. 2.3: mean over samples of 1/C sum_k |d y_k / d p_i|, p the output of ``net[site]``, from the full
    per-output Jacobian of the rest of the network (one sample at a time)."""
    head, tail = net[:site + 1], net[site + 1:]
    rows = []
    for xi in x:
        p = head(xi)
        jac = torch.autograd.functional.jacobian(tail, p)  # [C, neurons]
        rows.append(jac.abs().sum(0) / jac.shape[0])
    return torch.stack(rows).mean(0)


def test_lower_le_exact_le_upper_on_a_tiny_net_with_a_per_output_jacobian():
    net = tiny_net()
    x = torch.randn(16, 4)
    for site, name in [(0, "0"), (2, "2")]:
        exact = exact_sensitivity(net, x, site)
        lower, = sensitivity(net, x, [name], "lower")
        upper, = sensitivity(net, x, [name], "upper")
        assert (lower <= exact + 1e-6).all() and (exact <= upper + 1e-6).all(), name
        assert (upper - lower).abs().sum() > 1e-4  # the bounds differ on this net (mixed signs)
    # the last hidden layer: one rectifier and one linear map to the outputs
    exact = exact_sensitivity(net, x, 2)
    assert exact.sum() > 0


def test_bounds_by_hand_on_a_two_output_net():
    """p = x (2 neurons, identity first layer), y = W relu(p), W = [[1, -2], [3, 4]], C = 2. For p > 0:
    d y / d p_1 = (1, 3), d y / d p_2 = (-2, 4): exact (|1|+|3|)/2 = 2 and (2+4)/2 = 3; lower |1+3|/2 = 2 and
    |-2+4|/2 = 1; upper (1+3)/2 = 2 and (2+4)/2 = 3. A negative p_2 gates neuron 2 off: 0 for all three."""
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[2].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
    x = torch.tensor([[1.0, 1.0]])
    assert sensitivity(net, x, ["0"], "lower")[0].tolist() == pytest.approx([2.0, 1.0])
    assert sensitivity(net, x, ["0"], "upper")[0].tolist() == pytest.approx([2.0, 3.0])
    assert exact_sensitivity(net, x, 0).tolist() == pytest.approx([2.0, 3.0])
    x = torch.tensor([[1.0, -1.0]])
    assert sensitivity(net, x, ["0"], "lower")[0].tolist() == pytest.approx([2.0, 0.0])
    assert sensitivity(net, x, ["0"], "upper")[0].tolist() == pytest.approx([2.0, 0.0])


def test_upper_bound_through_a_conv_layer_bounds_the_exact_sensitivity():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    x = torch.randn(4, 1, 6, 6)
    lower, = sensitivity(net, x, ["0"], "lower")
    upper, = sensitivity(net, x, ["0"], "upper")
    # exact per position: mean over samples and positions of 1/C sum_k |d y_k / d p_{c, pos}|
    rows = []
    for xi in x:
        p = net[0](xi[None])[0]
        jac = torch.autograd.functional.jacobian(lambda q: net[1:](q[None])[0], p)  # [C, 3, 4, 4]
        rows.append((jac.abs().sum(0) / jac.shape[0]).mean((1, 2)))
    exact = torch.stack(rows).mean(0)
    assert (lower <= exact + 1e-6).all() and (exact <= upper + 1e-6).all()


def test_eq_2_8_decays_each_neuron_by_its_insensitivity():
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0], [5.0, 6.0]])
    b = torch.tensor([1.0, 1.0, -1.0])
    sens = torch.tensor([0.25, 1.5, 0.0])  # insensitivity 0.75, 0 (S > 1: no decay), 1
    serene_decay([w], [b], [sens], 0.1)
    assert w.flatten().tolist() == pytest.approx([0.925, -1.85, 3.0, 4.0, 4.5, 5.4])
    assert b.tolist() == pytest.approx([0.925, 1.0, -0.9])
    w2, base = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    serene_decay([w2], [None], [torch.tensor([0.5])], 0.1, base_w=[base])  # pre_step: 2 - 0.1*1*0.5
    assert w2.item() == pytest.approx(1.95)


@pytest.mark.parametrize("bound", ["lower", "upper"])
def test_serene_end_to_end_from_the_cli_prunes_and_pins(tmp_path, bound):
    run_cli("dataset=digits", "dataset.val_fraction=0.1", "arch=lenet300", "method=serene", f"method.bound={bound}",
            "method.rounds=2", "method.lmbda=3e-4", "trainer.epochs=3", "logger.wandb.mode=disabled",
            "logger.progress=none", "hydra.run.dir=run", cwd=tmp_path)
    rounds = read_jsonl(tmp_path / "run" / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[-1]["bound"] == bound
    assert rounds[-1]["sparsity"] > 0.3
    final = json.loads((tmp_path / "run" / "summary.json").read_text())["plugins"]["method"]
    assert final["final_sparsity"] > 0.3
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    for name, mask in state["plugins"]["method"]["masks"].items():
        assert (state["model"][name][mask == 0] == 0).all(), name


def test_upper_bound_refuses_normalisation_layers():
    from regstory.config import ConfigError
    from regstory.pruning.serene import Serene

    plugin = Serene(bound="upper", footprint="none")
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    ctx = type("Ctx", (), {"model": model, "data": None, "loaders": {"val": []}, "epochs": 2, "plugins": [plugin],
                           "cfg": None})()
    with pytest.raises(ConfigError, match="bound=lower"):
        plugin.setup(ctx)


@pytest.mark.parametrize("bad, key", [("method.bound=middle", "method.bound"), ("method.lmbda=0", "method.lmbda"),
                                      ("method.twt=1.5", "method.twt")])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, bad, key):
    assert key in cli_refusal(tmp_path, "dataset=digits", "method=serene", bad)
