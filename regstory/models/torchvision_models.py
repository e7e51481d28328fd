"""torchvision's ImageNet ResNets behind the :class:`Classifier` interface (no pretrained weights are fetched)."""
from __future__ import annotations

from torch import Tensor, nn

from regstory.models.base import Classifier, model_option


class TorchvisionResNet(Classifier):
    def __init__(self, name: str, num_classes: int):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        self.head = net.fc
        net.fc = nn.Identity()
        self.body = net

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


@model_option("resnet50", data="imagenet")
def resnet50(input_shape, num_classes: int) -> TorchvisionResNet:
    return TorchvisionResNet("resnet50", num_classes)


@model_option("resnet101", data="imagenet")
def resnet101(input_shape, num_classes: int) -> TorchvisionResNet:
    return TorchvisionResNet("resnet101", num_classes)
