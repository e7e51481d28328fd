"""Every row of the Table 3.1 / 3.2 presets composes as its source describes it (methods-debias.md secs. 1-7), its
model builds and its plugin instantiates. The network is built without ImageNet weights (``arch.pretrained=false``
in the test only: no download); the preset's own request for them is checked on the composed config."""
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from regstory.config import check_targets, check_values
from regstory.debias.base import DebiasPlugin
from tests.conftest import make_cfg

T3_2 = ["vanilla", "end", "lnl", "lff", "groupdro", "voronoi", "di", "biascon"]
T3_1 = [(method, target) for method in ("irene", "vanilla", "rubi", "rebias", "learned_mixin")
        for target in ("Blond_Hair", "Heavy_Makeup")]

# what each row's source uses (methods-debias.md): ImageNet weights, the bottleneck's last activation, selection
T3_2_ROWS = {
    "vanilla": dict(pretrained=True, activation=nn.ReLU, selection="val_unbiased_acc"),
    "end": dict(pretrained=True, activation=nn.Tanh, selection="val_unbiased_acc"),  # EIDOSLAB train_celeba.py
    "lff": dict(pretrained=True, activation=nn.ReLU, selection="val_unbiased_acc"),
    "groupdro": dict(pretrained=True, activation=nn.ReLU, selection="val_worst_group_acc"),  # --save_best
    "voronoi": dict(pretrained=True, activation=nn.ReLU, selection="val_unbiased_acc"),
    "lnl": dict(pretrained=True, activation=nn.ReLU, selection="val_unbiased_acc"),
    "di": dict(pretrained=True, activation=nn.ReLU, selection="val_unbiased_acc"),
    "biascon": dict(pretrained=True, activation=nn.ReLU, selection="val_unbiased_acc"),
}


def build(cfg):
    """The row's model without ImageNet weights, and its plugin."""
    check_values(cfg)
    check_targets(cfg)
    model = instantiate(cfg.arch, pretrained=False, input_shape=[3, 224, 224], num_classes=2)
    return model, instantiate(cfg.debias, _convert_="all")


@pytest.mark.parametrize("method", T3_2)
def test_table3_2_row_composes_its_sources_network_and_plugin(method):
    cfg = make_cfg("experiment=table3_2", f"debias={method}")
    row = T3_2_ROWS[method]
    assert cfg.arch.pretrained is row["pretrained"]  # the preset asks for the ImageNet weights
    assert (cfg.dataset.target, cfg.dataset.test_split, cfg.dataset.balanced_test) == ("Blond_Hair", "valid", True)
    model, plugin = build(cfg)
    assert isinstance(model.body.layer4[1].relu, row["activation"])
    assert isinstance(plugin, DebiasPlugin) and plugin.selection == row["selection"]
    assert type(plugin).__name__.lower().startswith({"di": "domainindependent"}.get(method, method))
    if method == "lnl":  # Hong & Yang's CelebA LNL: h on layer2's 128-channel map, entropy weight 1
        assert (plugin.site, plugin.entropy_weight, plugin.grl_scale) == ("body.layer2", 1.0, 0.1)
    if method == "end":
        assert (plugin.alpha, plugin.beta) == (0.1, 0.1) and plugin.normalize_classifier_input is True
        model.eval()
        with torch.no_grad():
            _, z = model(torch.randn(2, 3, 224, 224), return_features=True)
        assert z.shape == (2, 512) and z.min() < 0  # Tanh: the bottleneck can be negative (orthogonality reachable)


@pytest.mark.parametrize("method, target", T3_1)
def test_table3_1_row_composes_irenes_from_scratch_network(method, target):
    cfg = make_cfg("experiment=table3_1", f"debias={method}", f"dataset.target={target}")
    assert cfg.arch.pretrained is False  # IRENE's CelebA ResNet-18 is trained from scratch
    assert (cfg.dataset.target, cfg.dataset.test_split, cfg.dataset.balanced_test) == (target, "test", False)
    model, plugin = build(cfg)
    assert isinstance(model.body.layer4[1].relu, nn.ReLU)  # raw GAP output, as IRENE's hook reads it
    assert type(plugin).__name__.lower() == method.replace("_", "") and plugin.selection == "val_acc"
    if method == "irene":
        assert (plugin.alpha, plugin.gamma, plugin.head_args["lr"]) == (0.5, 0.2, 0.1)
    if method == "rebias":  # a small-receptive-field g of its own (the ResNet-18 has no kernel-size option)
        g = instantiate(plugin.biased_arch_config(cfg.arch), input_shape=[3, 224, 224], num_classes=2)
        assert all(m.kernel_size == (1, 1) for m in g.modules() if isinstance(m, nn.Conv2d))
        assert plugin.sigma is None  # the median heuristic, ReBias's ImageNet setting


def test_the_end_row_fragment_touches_table3_2_only():
    """conf/debias/end.yaml merges ``<experiment>__end`` only where it exists: elsewhere EnD leaves the net as built."""
    assert make_cfg("experiment=table3_2", "debias=vanilla").arch.last_activation == "relu"
    assert make_cfg("experiment=table3_1", "debias=end").arch.last_activation == "relu"
    assert make_cfg("experiment=table3_2", "debias=end", "arch.last_activation=relu").arch.last_activation == "relu"
    digits = make_cfg("experiment=debias_digits_end")
    assert digits.arch.last_activation == "tanh" and (digits.debias.alpha, digits.debias.beta) == (5.0, 10.0)
