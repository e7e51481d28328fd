"""torchvision's ImageNet ResNets behind the :class:`Classifier` interface, and their ImageNet weights read from
torchvision's cache (``arch.pretrained=true``) or refused in one line when they are not on disk and cannot be fetched."""
from __future__ import annotations

from torch import Tensor, nn

from regstory.models.base import Classifier, model_option
from regstory.options import ConfigError


def imagenet_weights(name: str):
    """torchvision's original ImageNet weights (``IMAGENET1K_V1``, those the papers used) of model ``name``. Loading them
    happens in :func:`build_torchvision`, which turns a failed download into one line saying where the file goes."""
    import torchvision

    return torchvision.models.get_model_weights(name).IMAGENET1K_V1


def build_torchvision(name: str, pretrained: bool, **kwargs) -> nn.Module:
    """``torchvision.models.<name>``, with its ImageNet weights when ``pretrained`` (from ``torch.hub``'s cache,
    downloaded there when the machine is online)."""
    import torch
    import torchvision

    if not pretrained:
        return getattr(torchvision.models, name)(weights=None, **kwargs)
    weights = imagenet_weights(name)
    try:
        return getattr(torchvision.models, name)(weights=weights, **kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a truncated file a RuntimeError
        where = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
        raise ConfigError(f"arch.pretrained=true needs torchvision's ImageNet weights of {name}: put {weights.url} "
                          f"at {where} (or run once online), or use arch.pretrained=false "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''})") from None


class TorchvisionResNet(Classifier):
    def __init__(self, name: str, num_classes: int, pretrained: bool = False):
        super().__init__()
        net = build_torchvision(name, pretrained)
        if net.fc.out_features == num_classes:
            self.head = net.fc
        else:  # ImageNet weights for another number of classes: a fresh head
            self.head = nn.Linear(net.fc.in_features, num_classes)
        net.fc = nn.Identity()
        self.body = net

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


@model_option("resnet50", data="imagenet")
def resnet50(input_shape, num_classes: int, pretrained: bool = False) -> TorchvisionResNet:
    """torchvision's ResNet-50; ``pretrained``: its ImageNet weights (the head is new when classes differ)."""
    return TorchvisionResNet("resnet50", num_classes, pretrained)


@model_option("resnet101", data="imagenet")
def resnet101(input_shape, num_classes: int, pretrained: bool = False) -> TorchvisionResNet:
    """torchvision's ResNet-101 (Table 2.1's ImageNet row); ``pretrained``: its ImageNet weights."""
    return TorchvisionResNet("resnet101", num_classes, pretrained)
