"""Activation entropy, eq. 2.16-2.17, against hand-computed values on crafted layers."""
import math

import pytest
import torch
from torch import nn

from regstory.pruning.entropy import binary_entropy_bits, entropy_summary, neuron_entropies


def h(p):
    return 0.0 if p in (0, 1) else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def test_eq_2_17_binary_entropy_in_bits():
    got = binary_entropy_bits(torch.tensor([0.0, 0.25, 0.5, 1.0]))
    assert got.tolist() == pytest.approx([0.0, h(0.25), 1.0, 0.0], abs=1e-6)


class Crafted(nn.Module):
    """Pre-activations are the input itself, so the ReLU sees exactly the values we craft."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(x)


def test_eq_2_16_linear_neurons_sign_states_over_samples():
    # 4 samples x 4 neurons: neuron 0 ON 2/4, neuron 1 ON 1/4, neuron 2 always ON, neuron 3 always OFF
    z = torch.tensor([[1.0, 2.0, 1.0, -1.0],
                      [2.0, -1.0, 3.0, -2.0],
                      [-1.0, -1.0, 1.0, -1.0],
                      [-3.0, -2.0, 5.0, -4.0]])
    per_neuron = neuron_entropies(Crafted(), [z[:2], z[2:]])["act"]  # two batches accumulate
    assert per_neuron.tolist() == pytest.approx([1.0, h(0.25), 0.0, 0.0], abs=1e-6)
    s = entropy_summary({"act": per_neuron})
    assert s["entropy/act"] == pytest.approx((1 + h(0.25)) / 4, abs=1e-6)
    assert s["entropy_nc/act"] == pytest.approx((1 + h(0.25)) / 2, abs=1e-6)
    assert s["constant_neuron_fraction"] == 0.5


def test_conv_neuron_is_a_channel_counted_over_samples_and_positions():
    z = torch.full((2, 2, 2, 2), -1.0)
    z[0, 0, 0, 0] = 1.0  # channel 0: ON at 1 of 8 (sample, position) pairs
    z[:, 1, 0, :] = 1.0  # channel 1: ON at 4 of 8
    per_neuron = neuron_entropies(Crafted(), [z])["act"]
    assert per_neuron.tolist() == pytest.approx([h(1 / 8), 1.0], abs=1e-6)


def test_exact_zero_is_off_by_default_and_on_when_configured():
    z = torch.tensor([[0.0], [1.0], [0.0], [-1.0]])
    assert neuron_entropies(Crafted(), [z.clone()])["act"].item() == pytest.approx(h(0.25), abs=1e-6)
    assert neuron_entropies(Crafted(), [z.clone()], zero_is_on=True)["act"].item() == pytest.approx(h(0.75), abs=1e-6)


def test_network_mean_is_the_mean_of_layer_means():
    s = entropy_summary({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 0.0, 0.0, 0.0])})
    assert s["entropy_mean"] == pytest.approx(0.25)
    assert s["entropy_mean_nonconstant"] == pytest.approx(0.5)  # layer b has no non-constant neuron: counts 0


def test_hooks_are_removed_and_mode_restored():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    net.train()
    out = neuron_entropies(net, [torch.randn(5, 3)])
    assert list(out) == ["1"] and net.training
    assert not net[1]._forward_pre_hooks


class Reused(nn.Module):
    """One ReLU module called twice per forward, like torchvision's BasicBlock (after bn1 and after the add)."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(x)  # site "act": pre-activation x
        return self.act(h - 1)  # site "act#1": pre-activation relu(x) - 1


def test_a_reused_relu_is_one_layer_per_call_site():
    """Eq. 2.16-2.17 per call site: the two calls are two layers with their own neurons (they were merged into one
    'act' set counted over 8 observations: p_on 5/8 and 6/8)."""
    x = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-2.0, 4.0], [1.5, 1.25]])
    # site act:   neuron 0 ON for 2, .5, 1.5 (3/4); neuron 1 ON for 3, 4, 1.25 (3/4)
    # site act#1: relu(x) - 1 = [[1, -1], [-.5, 2], [-1, 3], [.5, .25]]: neuron 0 ON 2/4, neuron 1 ON 3/4
    per_neuron = neuron_entropies(Reused(), [x[:3], x[3:]])
    assert list(per_neuron) == ["act", "act#1"]
    assert per_neuron["act"].tolist() == pytest.approx([h(0.75), h(0.75)], abs=1e-6)
    assert per_neuron["act#1"].tolist() == pytest.approx([1.0, h(0.75)], abs=1e-6)
    s = entropy_summary(per_neuron)
    assert s["entropy/act"] == pytest.approx(h(0.75), abs=1e-6)
    assert s["entropy/act#1"] == pytest.approx((1 + h(0.75)) / 2, abs=1e-6)
    assert s["entropy_mean"] == pytest.approx((h(0.75) + (1 + h(0.75)) / 2) / 2, abs=1e-6)


def test_entropy_of_a_torchvision_bottleneck_resnet_has_three_sites_per_block():
    """resnet50 reuses one relu three times per Bottleneck with 64, 64 and 256 channels (it crashed: 64 vs 256)."""
    from regstory.models.torchvision_models import TorchvisionResNet

    torch.manual_seed(0)
    model = TorchvisionResNet("resnet50", num_classes=4)
    per_neuron = neuron_entropies(model, [torch.randn(2, 3, 32, 32)])
    assert len(per_neuron) == 1 + 16 * 3  # the stem, then three call sites in each of the 16 blocks
    assert [per_neuron[f"body.layer1.0.relu{k}"].numel() for k in ("", "#1", "#2")] == [64, 64, 256]
    s = entropy_summary(per_neuron)
    assert 0 <= s["entropy_mean"] <= 1 and 0 <= s["entropy_mean_nonconstant"] <= 1
    assert model.training  # mode restored
