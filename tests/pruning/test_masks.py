"""Masks and parameter pinning (thesis sec. 2.2.2.1): pruned weights stay exactly zero and receive no update."""
import pytest
import torch
from torch import nn

from regstory.pruning.masks import MaskSet, keep_masks_from_scores, prunable_parameters, prune_fraction, prune_to_sparsity


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))


def test_prunable_parameters_default_is_conv_and_linear_weights():
    assert list(prunable_parameters(tiny_net())) == ["0.weight", "4.weight"]


def test_prunable_parameters_include_exclude_options():
    net = tiny_net()
    assert list(prunable_parameters(net, first_layer=False)) == ["4.weight"]
    assert list(prunable_parameters(net, last_layer=False)) == ["0.weight"]
    assert list(prunable_parameters(net, bias=True)) == ["0.weight", "0.bias", "4.weight", "4.bias"]
    assert list(prunable_parameters(net, batchnorm=True)) == ["0.weight", "1.weight", "1.bias", "4.weight"]


class HeadFirst(nn.Module):
    """Registers its classifier before its body (as regstory's torchvision wrappers do)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 8), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(x))


def test_first_and_last_layer_follow_the_forward_pass_not_the_registration_order():
    """first_layer=False dropped 'head' (registered first) and last_layer=False the body's last layer."""
    net = HeadFirst()
    assert list(prunable_parameters(net, first_layer=False, input_shape=(4,))) == ["head.weight", "body.2.weight"]
    assert list(prunable_parameters(net, last_layer=False, input_shape=(4,))) == ["body.0.weight", "body.2.weight"]
    assert net.training  # the probing forward restores the mode


def test_the_sweep_excludes_the_head_of_a_torchvision_resnet_with_last_layer_false():
    from types import SimpleNamespace

    from regstory.models.torchvision_models import TorchvisionResNet
    from regstory.pruning.magnitude import IMP

    model = TorchvisionResNet("resnet18", num_classes=3)
    ctx = SimpleNamespace(model=model, loaders={}, epochs=2, round=0, epoch=0, cfg=SimpleNamespace(seed=0),
                          optimizer=None, data=SimpleNamespace(input_shape=(3, 32, 32), num_classes=3))
    imp = IMP(first_layer=False, last_layer=False)
    imp.setup(ctx)
    assert "head.weight" not in imp.masks.names and "body.conv1.weight" not in imp.masks.names
    assert len(imp.masks.names) == len(prunable_parameters(model)) - 2


def pinned_training(optimizer_cls, remask=True, **kw):
    net = tiny_net()
    masks = MaskSet(prunable_parameters(net))
    opt = optimizer_cls(net.parameters(), **kw)
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
    for step in range(6):  # train a few steps dense so momentum / Adam moments are non-zero everywhere
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        if step >= 3:
            masks.zero_grads()
        opt.step()
        if step >= 3 and remask:
            masks.apply_to_weights()
        if step == 2:  # prune mid-training: half of each tensor, and clear the optimizer state there
            prune_fraction(masks, [p.abs() for p in masks.params], 0.5, "layerwise")
            masks.zero_optimizer_state(opt)
            pruned_before = [(m == 0).clone() for m in masks.masks]
    return masks, opt, pruned_before


@pytest.mark.parametrize("optimizer_cls,kw", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (torch.optim.Adam, dict(lr=0.01, weight_decay=1e-4)),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
])
@pytest.mark.parametrize("remask", [True, False])
def test_pruned_weights_stay_exactly_zero_and_their_optimizer_state_too(optimizer_cls, kw, remask):
    """Sec. 2.2.2.1 pinning. remask=False: zeroed gradients + zeroed optimizer state alone keep them at 0."""
    masks, opt, pruned = pinned_training(optimizer_cls, remask=remask, **kw)
    for p, dead in zip(masks.params, pruned):
        assert dead.sum() > 0
        assert torch.all(p.detach()[dead] == 0)
        for value in opt.state[p].values():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert torch.all(value[dead] == 0)


def test_without_grad_zeroing_momentum_would_move_pruned_weights():
    """The test above can fail: the optimizer really does move pruned weights if they are not pinned."""
    net = tiny_net()
    masks = MaskSet(prunable_parameters(net))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
    prune_fraction(masks, [p.abs() for p in masks.params], 0.5)
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    assert any((p.detach()[m == 0] != 0).any() for p, m in zip(masks.params, masks.masks))


def test_global_rate_prunes_smallest_magnitudes_across_tensors():
    scores = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])]
    masks = [torch.ones(4), torch.ones(4)]
    keep = keep_masks_from_scores(scores, masks, 4, "global")
    assert keep[0].tolist() == [0, 0, 0, 0] and keep[1].tolist() == [1, 1, 1, 1]


def test_layerwise_rate_prunes_the_same_fraction_of_each_tensor():
    a, b = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0])), nn.Parameter(torch.tensor([10.0, 20.0, 30.0, 40.0]))
    masks = MaskSet({"a": a, "b": b})
    prune_fraction(masks, [a.abs(), b.abs()], 0.5, "layerwise")
    assert masks.masks[0].tolist() == [0, 0, 1, 1] and masks.masks[1].tolist() == [0, 0, 1, 1]
    assert a.tolist() == [0, 0, 3, 4]


def test_rate_applies_to_remaining_weights_so_sparsity_is_one_minus_point_eight_to_the_i():
    w = nn.Parameter(torch.randn(1000))
    masks = MaskSet({"w": w})
    for i in range(1, 6):
        prune_fraction(masks, [w.detach().abs()], 0.2)
        assert masks.sparsity() == pytest.approx(1 - 0.8 ** i, abs=1e-3)
        assert int((w.detach() == 0).sum()) == 1000 - masks.counts()[0]


def test_pruned_entries_stay_pruned_even_with_low_scores_elsewhere():
    masks = [torch.tensor([0.0, 1.0, 1.0, 1.0])]
    keep = keep_masks_from_scores([torch.tensor([100.0, 1.0, 2.0, 3.0])], masks, 1, "global")
    assert keep[0].tolist() == [0, 0, 1, 1]


def test_prune_to_sparsity_and_state_round_trip():
    w = nn.Parameter(torch.arange(1.0, 11.0))
    masks = MaskSet({"w": w})
    prune_to_sparsity(masks, [w.detach().abs()], 0.3)
    assert masks.sparsity() == pytest.approx(0.3)
    other = MaskSet({"w": nn.Parameter(torch.ones(10))})
    other.load_state_dict(masks.state_dict())
    assert torch.equal(other.masks[0], masks.masks[0])


def test_channels_last_conv_weights_are_pruned_at_the_right_entries():
    """Masks follow the parameter's memory layout (channels_last by default) without scrambling the ranking."""
    import torch

    from regstory.pruning.masks import MaskSet, prune_fraction

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last))
    ref = w.detach().clone().contiguous()
    masks = MaskSet({"w": w})
    prune_fraction(masks, [w.detach().abs()], 0.5)
    threshold = ref.abs().flatten().kthvalue(ref.numel() // 2).values
    assert torch.equal(w.detach() == 0, ref.abs() <= threshold)
    assert masks.masks[0].is_contiguous(memory_format=torch.channels_last)
