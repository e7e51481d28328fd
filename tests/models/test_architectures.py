import pytest
import torch

from regstory import models
from regstory.registry import UnknownNameError

SHAPES = {
    "mlp": (40,), "lenet300": (1, 28, 28), "lenet5": (1, 28, 28), "resnet20": (3, 32, 32), "resnet32": (3, 32, 32),
    "resnet56": (3, 32, 32), "resnet18": (3, 32, 32), "vgg16": (3, 32, 32), "vgg_small": (3, 32, 32),
    "alexnet": (3, 32, 32), "resnet50": (3, 64, 64), "resnet101": (3, 64, 64), "simple_convnet": (3, 28, 28),
    "resnet18_debias": (3, 64, 64), "vit_tiny": (1, 8, 8), "vit_b_16": (3, 32, 32),
}


def test_every_registered_architecture_is_covered_here():
    assert set(models.MODELS.names()) <= set(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forward_shape_and_features(name):
    torch.manual_seed(0)
    model = models.create(name, SHAPES[name], num_classes=7).eval()
    x = torch.randn(2, *SHAPES[name])
    logits, feats = model(x, return_features=True)
    assert logits.shape == (2, 7)
    assert feats.shape == (2, model.head.in_features)
    assert torch.allclose(model.head(feats), logits)


@pytest.mark.parametrize("name, expected, tol", [
    ("resnet32", 0.46e6, 0.01e6),   # He et al. 2016, Table 6: 0.46M
    ("resnet20", 0.27e6, 0.01e6),   # 0.27M
    ("resnet56", 0.85e6, 0.01e6),   # 0.85M
    ("resnet18", 11.2e6, 0.05e6),   # CIFAR ResNet-18, 10 classes
    ("lenet300", 266_610, 0),       # 784*300+300 + 300*100+100 + 100*10+10
    ("lenet5", 431_080, 0),         # Caffe LeNet-5 on 28x28
])
def test_parameter_counts(name, expected, tol):
    n = models.count_parameters(models.create(name, SHAPES[name], num_classes=10))
    assert abs(n - expected) <= tol, n


def test_mlp_width_and_depth_are_configurable():
    m = models.create("mlp", (40,), 10, width=64, depth=3)
    assert [l.out_features for l in m.layers] == [64, 64, 64]
    assert models.count_parameters(m) == 40 * 64 + 64 + 2 * (64 * 64 + 64) + 64 * 10 + 10


def test_unknown_architecture_lists_choices():
    with pytest.raises(UnknownNameError, match="unknown architecture 'resnet33'; choose one of: .*resnet32"):
        models.create("resnet33", (3, 32, 32), 10)
