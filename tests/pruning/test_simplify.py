"""Simplification of a pruned model to a smaller dense one: the same function (eval mode), fewer channels / units,
for every shipped architecture; BatchNorm folding; the option-A shortcut; the refusals."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regstory.models import count_parameters, create
from regstory.models.mlp import MLP
from regstory.models.resnet_cifar import ZeroPadShortcut
from regstory.pruning.simplify import SimplificationError, check_simplifiable, fold_batchnorm, simplify
from regstory.surgery import rebuild, structure_of

LAYERS = (nn.Linear, nn.Conv2d)
NORMS = nn.modules.batchnorm._BatchNorm

#: name -> (builder, input shape): small variants of every shipped architecture that can be pruned
ARCHS = {
    "mlp": (lambda: create("mlp", (40,), 10, width=32, depth=3), (40,)),
    "mlp_residual": (lambda: create("mlp", (40,), 10, width=32, depth=3, residual=True), (40,)),
    "lenet300": (lambda: create("lenet300", (1, 8, 8), 10), (1, 8, 8)),
    "lenet5": (lambda: create("lenet5", (1, 8, 8), 10), (1, 8, 8)),
    "vgg16": (lambda: create("vgg16", (3, 32, 32), 10), (3, 32, 32)),
    "vgg_small": (lambda: create("vgg_small", (3, 16, 16), 10, width=8), (3, 16, 16)),
    "alexnet": (lambda: create("alexnet", (3, 32, 32), 10), (3, 32, 32)),
    "resnet20": (lambda: create("resnet20", (3, 8, 8), 10), (3, 8, 8)),
    "resnet32": (lambda: create("resnet32", (3, 8, 8), 10), (3, 8, 8)),
    "resnet18": (lambda: create("resnet18", (3, 8, 8), 10, width=8), (3, 8, 8)),
    "resnet50": (lambda: create("resnet50", (3, 32, 32), 5), (3, 32, 32)),
    "resnet101": (lambda: create("resnet101", (3, 32, 32), 5), (3, 32, 32)),
    "simple_convnet": (lambda: create("simple_convnet", (3, 8, 8), 10, channels=[8, 16, 16], kernel_size=3,
                                      pool_after=[0]), (3, 8, 8)),
    "resnet18_debias": (lambda: create("resnet18_debias", (3, 32, 32), 2, last_activation="tanh"), (3, 32, 32)),
}


@torch.no_grad()
def pruned(model: nn.Module, seed: int = 0, rows: float = 0.3, columns: float = 0.3, scattered: float = 0.3):
    """``model`` in eval mode with random BatchNorm statistics and affine parameters, random non-zero biases, and
    zeros: whole rows (units / channels with no incoming weight: constants), whole input columns, scattered."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, NORMS):
            m.running_mean.normal_(0, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.normal_(1, 0.5, generator=g)
            m.bias.normal_(0, 0.5, generator=g)
    layers = [m for m in model.modules() if isinstance(m, LAYERS)]
    for m in layers:
        if m.bias is not None:
            m.bias.normal_(0, 0.5, generator=g)
        m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= scattered)
        if m is not model.head:
            m.weight[torch.rand(m.weight.shape[0], generator=g) < rows] = 0
        m.weight[:, torch.rand(m.weight.shape[1], generator=g) < columns] = 0
    return model.eval()


def max_diff(a: nn.Module, b: nn.Module, shape, n: int = 4) -> float:
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (a.eval()(x) - b.eval()(x)).abs().max().item()


def check_change(model: nn.Module, small: nn.Module, change) -> None:
    """Every tensor of ``small`` comes from ``model`` by slicing (biases may hold absorbed constants), except biases
    created to absorb constants, which have no source."""
    old, new = model.state_dict(), small.state_dict()
    layer_biases = {f"{n}.bias" for n, m in small.named_modules() if isinstance(m, LAYERS)}
    for name, tensor in new.items():
        if name not in change.sources:
            assert name in layer_biases and name not in old, name
            continue
        carried = change.carry(name, old[change.sources[name][0]])
        assert carried.shape == tensor.shape, name
        if name not in layer_biases:
            assert torch.equal(carried, tensor), name


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_simplifies_to_fewer_parameters_and_the_same_function(arch):
    build, shape = ARCHS[arch]
    torch.manual_seed(0)
    model = pruned(build())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, change, kept = simplify(model, shape)
    assert count_parameters(small) < count_parameters(model)
    assert max_diff(small, model, shape) <= 1e-5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the pruned model is untouched
    check_change(model, small, change)
    assert set(kept) == {n for n, m in model.named_modules() if isinstance(m, LAYERS)}
    assert kept["head"] == model.head.out_features  # the output is never reduced
    deploy = fold_batchnorm(small, shape)
    assert not any(isinstance(m, NORMS) for m in deploy.modules())
    assert max_diff(deploy, model, shape) <= 1e-5


def hand_pruned_mlp(activation: str = "relu") -> MLP:
    torch.manual_seed(0)
    model = MLP((10,), 3, [16, 12], activation=activation)
    with torch.no_grad():
        model.layers[0].weight[[1, 4, 7]] = 0      # units with no incoming weight: constant act(b)
        model.layers[1].weight[:, [2, 9]] = 0      # layer-0 units 2 and 9: nothing reads them
        model.layers[1].weight[[0, 5]] = 0         # layer-1 units 0 and 5: constant
        model.head.weight[:, 3] = 0                # layer-1 unit 3: nothing reads it
    return model


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_an_mlp_loses_exactly_its_dead_and_unread_units(activation):
    model = hand_pruned_mlp(activation)
    small, change, kept = simplify(model, (10,))
    assert max_diff(small, model, (10,), n=64) <= 1e-5
    assert kept == {"layers.0": 16 - 5, "layers.1": 12 - 3, "head": 3}
    assert small.layers[0].weight.shape == (11, 10) and small.layers[1].weight.shape == (9, 11)
    assert small.head.weight.shape == (3, 9)
    check_change(model, small, change)


def test_a_residual_mlp_removes_units_aligned_across_its_skip_additions():
    torch.manual_seed(0)
    model = MLP((10,), 3, [8, 8, 8], residual=True)
    with torch.no_grad():
        for layer in model.layers:
            layer.weight[2] = 0                    # unit 2 is a constant in every summand: absorbed downstream
        for layer in (model.layers[1], model.layers[2], model.head):
            layer.weight[:, 5] = 0                 # unit 5 of the sum is read by nobody
        model.layers[0].weight[6] = 0              # unit 6: constant in one summand only, so not constant: kept
    small, _, kept = simplify(model, (10,))
    assert kept == {"layers.0": 6, "layers.1": 6, "layers.2": 6, "head": 3}
    assert max_diff(small, model, (10,), n=64) <= 1e-5


def conv_reading_a_constant(padding: int) -> nn.Sequential:
    """Conv -> BN -> ReLU -> Conv(padding, no bias): channel 1 is the constant relu(+) > 0, channel 2 relu(-) = 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=padding, bias=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[[1, 2]] = 0
        model[0].bias[[1, 2]] = 0
        model[1].bias.copy_(torch.tensor([0.1, 1.0, -1.0, 0.2]))
    return model.eval()


def test_a_padded_conv_keeps_a_non_zero_constant_channel_and_an_unpadded_one_absorbs_it():
    padded = conv_reading_a_constant(padding=1)
    small, change, kept = simplify(padded, (3, 6, 6))
    assert kept["0"] == 3  # channel 2 (constant 0) goes; channel 1 (constant 1.0) stays: borders would differ
    assert small[3].bias is None
    assert max_diff(small, padded, (3, 6, 6)) <= 1e-5
    unpadded = conv_reading_a_constant(padding=0)
    small, change, kept = simplify(unpadded, (3, 6, 6))
    assert kept["0"] == 2 and small[3].weight.shape == (4, 2, 3, 3)
    assert small[3].bias is not None and "3.bias" not in change.sources  # a new bias holds the constant's share
    assert max_diff(small, unpadded, (3, 6, 6)) <= 1e-5
    check_change(unpadded, small, change)


def test_resnet_option_a_removes_residual_channels_in_step_and_remaps_the_shortcut():
    torch.manual_seed(0)
    model = pruned(create("resnet20", (3, 8, 8), 10), rows=0, columns=0, scattered=0.2)
    gone3 = [0, 1, 20, 40, 63]  # stage 3; its shortcut pads 16 zero channels in front: 20 and 40 are stage-2's 4, 24
    with torch.no_grad():  # blocks 6-8 form stage 3; block 6's conv1 and shortcut read stage 2
        for layer in [model.blocks[7].conv1, model.blocks[8].conv1, model.head]:
            layer.weight[:, gone3] = 0
        for i in [3, 4, 5, 6]:
            model.blocks[i].conv1.weight[:, 4] = 0  # stage-2 channel 4 is left to the shortcut, whose output 20 goes
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, change, kept = simplify(model, (3, 8, 8))
    assert all(m.training for m in model.modules())  # flags restored, running statistics untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [kept[f"blocks.{i}.conv2"] for i in range(9)] == [16] * 3 + [31] * 3 + [59] * 3
    assert small.blocks[6].conv1.in_channels == 31 and small.head.in_features == 59
    shortcut = small.blocks[6].shortcut
    assert len(shortcut.positions) == 31  # stage-2 channel 4 is gone; 24 (now 23) stays but is not passed on
    assert shortcut.positions.count(-1) == 1 and shortcut.positions[23] == -1
    assert sum(p >= 0 for p in shortcut.positions) + shortcut.extra == 59
    assert max_diff(small, model, (3, 8, 8)) <= 1e-5
    restored = rebuild(structure_of(small), small.state_dict())  # a checkpoint keeps the shortcut's placement
    assert max_diff(restored, model, (3, 8, 8)) <= 1e-5
    again, _, _ = simplify(small, (3, 8, 8))
    assert count_parameters(again) == count_parameters(small)  # nothing more to remove


class ShortcutNet(nn.Module):
    """shortcut(relu(conv(x))) + side(x) -> 1x1 conv -> pool -> head; the shortcut adds 4 zero channels."""

    def __init__(self):
        super().__init__()
        self.conv, self.shortcut, self.side = nn.Conv2d(3, 4, 3), ZeroPadShortcut(4), nn.Conv2d(3, 8, 3, stride=2)
        self.mix, self.head = nn.Conv2d(8, 6, 1), nn.Linear(6, 2)

    def forward(self, x):
        h = self.shortcut(F.relu(self.conv(x))) + self.side(x)
        return self.head(F.adaptive_avg_pool2d(self.mix(h), 1).flatten(1))


def test_a_shortcut_drops_an_input_channel_that_is_the_constant_zero_and_keeps_its_position():
    torch.manual_seed(0)
    model = ShortcutNet().eval()
    with torch.no_grad():
        model.conv.weight[[1, 2]] = 0
        model.conv.bias[1] = -1.0  # relu(-1) = 0: input channel 1 is the constant 0, placed at output 3 (read)
        model.conv.bias[2] = 1.0   # the constant 1 at output 4: the shortcut cannot add it, so channel 2 stays
    small, _, kept = simplify(model, (3, 8, 8))
    assert kept == {"conv": 3, "side": 8, "mix": 6, "head": 2}
    assert small.shortcut.positions == [2, 4, 5] and small.shortcut.extra == 5  # input 1 gone, output 3 zero
    assert max_diff(small, model, (3, 8, 8)) <= 1e-5


def test_the_zero_pad_shortcut_keeps_the_papers_layout_and_old_pickles():
    x = torch.randn(2, 3, 4, 4)
    shortcut = ZeroPadShortcut(5)
    assert torch.equal(shortcut(x), F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 3)))
    assert shortcut.state_dict() == {} and shortcut.placement(3) == [2, 3, 4]
    old = pickle.loads(pickle.dumps(shortcut))
    old.__dict__.pop("positions", None)  # a model pickled before `positions` existed
    assert torch.equal(old(x), shortcut(x))
    placed = ZeroPadShortcut(2, positions=[1, -1, 0])
    out = placed(x)
    assert out.shape == (2, 4, 2, 2) and torch.equal(out[:, 1], x[:, 0, ::2, ::2])
    assert torch.equal(out[:, 0], x[:, 2, ::2, ::2]) and not out[:, 2:].any()


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1).amax((2, 3)))


class Product(Concat):
    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.a(x) * self.b(x), 1).flatten(1).repeat(1, 2))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(4, 4, 3, groups=2), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1))


@pytest.mark.parametrize("model, node", [(Concat(), "cat"), (Product(), "mul"), (Grouped(), "conv")])
def test_an_operation_the_analysis_cannot_follow_is_refused_in_one_line_naming_its_node(model, node):
    shape = (4, 6, 6) if isinstance(model, Grouped) else (3, 6, 6)
    with pytest.raises(SimplificationError, match=f"simplification cannot express .* at {node}\\b") as caught:
        check_simplifiable(model, shape)
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=f"at {node}\\b"):
        simplify(model, shape)


def test_units_that_feed_only_removed_units_go_too():
    torch.manual_seed(0)
    model = MLP((10,), 3, [8, 8])
    with torch.no_grad():
        model.layers[1].weight[:, 4] = 0
        model.layers[1].weight[6, 4] = 1.5  # layer-0 unit 4 is read by layer-1 unit 6 only
        model.head.weight[:, 6] = 0         # ... which nothing reads
    small, change, kept = simplify(model, (10,))
    assert kept == {"layers.0": 7, "layers.1": 7, "head": 3}
    assert max_diff(small, model, (10,), n=64) <= 1e-5
    check_change(model, small, change)
