"""VGG-16 with batch norm and AlexNet, both in their usual CIFAR variants (32x32 inputs)."""
from __future__ import annotations

from typing import Annotated

from torch import Tensor, nn

from regstory.models.base import Classifier, model_option
from regstory.options import Range

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(Classifier):
    """Conv3x3-BN-ReLU stacks with max-pools, global average pool, one linear head (CIFAR VGG-16-BN)."""

    def __init__(self, input_shape, num_classes: int, cfg: list):
        super().__init__()
        layers, c = [], input_shape[0]
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


@model_option("vgg16", data="cifar10")
def vgg16(input_shape, num_classes: int) -> VGG:
    return VGG(input_shape, num_classes, VGG16_CFG)


@model_option("vgg_small", data="cifar10")
def vgg_small(input_shape, num_classes: int, width: Annotated[int, Range(ge=1)] = 64) -> VGG:
    """A shallow VGG-like net (4 conv layers) used as the distillation student of thesis Fig. 2.8."""
    w = width
    return VGG(input_shape, num_classes, [w, "M", 2 * w, "M", 4 * w, "M", 8 * w, "M"])


class AlexNetCifar(Classifier):
    """AlexNet for 32x32 inputs: five 3x3 convs (64-192-384-256-256) with three max-pools, two FC-4096 (dropout)."""

    def __init__(self, input_shape, num_classes: int, dropout: float = 0.5):
        super().__init__()
        c = input_shape[0]
        self.conv = nn.Sequential(
            nn.Conv2d(c, 64, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 192, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2), nn.Flatten(),
        )
        self.fc = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(256 * 4, 4096), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(),
        )
        self.head = nn.Linear(4096, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x))


@model_option("alexnet", data="cifar10")
def alexnet(input_shape, num_classes: int, dropout: Annotated[float, Range(ge=0, lt=1)] = 0.5) -> AlexNetCifar:
    return AlexNetCifar(input_shape, num_classes, dropout)
