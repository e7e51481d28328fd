"""SimpleConvNet (ReBias's Biased-MNIST network) with the EIDOSLAB change used by EnD, IRENE and the Voronoi method:
the last activation is Tanh, so bottleneck features can be negative and orthogonality (EnD) is reachable.

Each layer is Conv(k, stride 1, same padding) + BatchNorm + activation; optional 2x2 max-pools after given layers;
then global average pooling gives the bottleneck ``features(x)`` and a Linear head gives the logits.
"""
from __future__ import annotations

from typing import Annotated

from torch import Tensor, nn

from regstory.models.base import Classifier, model_option
from regstory.models.torchvision_models import build_torchvision
from regstory.options import OneOf, Range

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
Activation = Annotated[str, OneOf(*ACTIVATIONS)]


class SimpleConvNet(Classifier):
    def __init__(self, input_shape, num_classes: int, channels=(16, 32, 64, 128), kernel_size: int = 7,
                 pool_after=(), last_activation: str = "tanh"):
        super().__init__()
        if last_activation not in ACTIVATIONS:
            raise ValueError(f"arch.last_activation={last_activation} is invalid: must be one of {sorted(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for i, c_out in enumerate(channels):
            last = i == len(channels) - 1
            layers += [nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                       nn.BatchNorm2d(c_out),
                       ACTIVATIONS[last_activation]() if last else nn.ReLU()]
            if i in tuple(pool_after):
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """ReBias: Kaiming-normal (fan_out) convolutions, BatchNorm weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        return self.encoder(x)


@model_option("simple_convnet", data="biased_mnist")
def simple_convnet(input_shape, num_classes: int, channels: Annotated[list[int], Range(ge=1)] = (16, 32, 64, 128),
                   kernel_size: Annotated[int, Range(ge=1)] = 7, pool_after: Annotated[list[int], Range(ge=0)] = (),
                   last_activation: Activation = "tanh") -> SimpleConvNet:
    """ReBias's SimpleConvNet (4 x Conv7 + BN, 3-16-32-64-128, GAP, 128-d bottleneck), last activation Tanh."""
    return SimpleConvNet(input_shape, num_classes, tuple(channels), kernel_size, tuple(pool_after), last_activation)


class DebiasResNet18(Classifier):
    """torchvision's ImageNet ResNet-18 as used on CelebA by the debiasing papers: bottleneck = the 512-d global
    average pool. ``last_activation="tanh"`` replaces ``layer4[1].relu`` by Tanh as in EIDOSLAB's EnD replication
    (in torchvision's BasicBlock that module serves both activations of the block). ``pretrained`` loads
    torchvision's ImageNet weights (EnD, LfF, GroupDRO); IRENE trains from scratch."""

    def __init__(self, num_classes: int, last_activation: str = "relu", pretrained: bool = False):
        super().__init__()
        if last_activation not in ACTIVATIONS:
            raise ValueError(f"arch.last_activation={last_activation} is invalid: must be one of {sorted(ACTIVATIONS)}")
        net = build_torchvision("resnet18", pretrained)
        net.layer4[1].relu = ACTIVATIONS[last_activation]()
        self.head = nn.Linear(net.fc.in_features, num_classes)
        net.fc = nn.Identity()
        self.body = net

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


@model_option("resnet18_debias", data="celeba")
def resnet18_debias(input_shape, num_classes: int, last_activation: Activation = "relu",
                    pretrained: bool = False) -> DebiasResNet18:
    """ImageNet ResNet-18 (224x224 inputs) with a 512-d bottleneck for the CelebA debiasing protocols."""
    return DebiasResNet18(num_classes, last_activation, pretrained)
