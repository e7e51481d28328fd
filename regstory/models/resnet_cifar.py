"""CIFAR ResNets: He et al. 2016 (resnet20/32/56, 3 stages, option-A shortcuts) and ResNet-18 for CIFAR.

Option A: when a block changes shape, the shortcut subsamples by 2 and zero-pads the new channels
(parameter-free), as in the paper's CIFAR experiments; this gives resnet32 0.46M parameters.
ResNet-18 for CIFAR: 3x3 stride-1 stem, no max-pool, 4 stages of BasicBlocks with 1x1-conv (option B)
projection shortcuts; 11.2M parameters with 10 classes.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regstory.models.base import Classifier, model_option
from regstory.options import OneOf, Range

#: A: zero-padding shortcuts (parameter-free), B: 1x1-conv projections
Shortcut = Annotated[str, OneOf("A", "B")]


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: stride-2 subsampling plus ``extra`` zero channels.

    In the paper's layout the input channels sit in the middle: ``extra // 2`` zero channels before them, the rest
    after. A simplified copy (:func:`regstory.pruning.simplify.simplify`) places them explicitly instead:
    ``positions[i]`` is the output channel of input channel ``i`` (-1: not passed on) and the output has
    ``extra`` zero channels besides those. ``positions`` is a plain attribute, set only on such copies and pickled
    with the model's structure; the class default (None) keeps the paper's layout for models saved before it
    existed. The shortcut holds no tensors, so its state dict is empty either way.
    """

    positions: list[int] | None = None

    def __init__(self, extra_channels: int, positions: list[int] | None = None):
        super().__init__()
        self.extra = extra_channels
        if positions is not None:
            self.positions = [int(p) for p in positions]

    def placement(self, in_channels: int) -> list[int]:
        """The output channel of each of ``in_channels`` input channels (-1: not passed on)."""
        if self.positions is None:
            return [self.extra // 2 + i for i in range(in_channels)]
        if len(self.positions) != in_channels:
            raise ValueError(f"ZeroPadShortcut places {len(self.positions)} channels, got {in_channels}")
        return list(self.positions)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]
        if self.positions is None:
            return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        source = [i for i, p in enumerate(self.positions) if p >= 0]
        target = [p for p in self.positions if p >= 0]
        out = x.new_zeros(x.shape[0], len(target) + self.extra, *x.shape[2:])
        source_index = torch.tensor(source, dtype=torch.long, device=x.device)
        target_index = torch.tensor(target, dtype=torch.long, device=x.device)
        return out.index_copy(1, target_index, x.index_select(1, source_index))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        if stride == 1 and c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(c_out - c_in)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(Classifier):
    def __init__(self, input_shape, num_classes: int, blocks: list[int], widths: list[int], shortcut: str):
        super().__init__()
        c = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, c_in = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(BasicBlock(c_in, w, stride, shortcut))
                c_in = w
        self.blocks = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in")

    def features(self, x: Tensor) -> Tensor:
        return self.pool(self.blocks(self.stem(x))).flatten(1)


def _he_resnet(depth: int, input_shape, num_classes: int, shortcut: str) -> CifarResNet:
    n = (depth - 2) // 6
    return CifarResNet(input_shape, num_classes, [n, n, n], [16, 32, 64], shortcut)


@model_option("resnet20", data="cifar10")
def resnet20(input_shape, num_classes: int, shortcut: Shortcut = "A") -> CifarResNet:
    return _he_resnet(20, input_shape, num_classes, shortcut)


@model_option("resnet32", data="cifar10")
def resnet32(input_shape, num_classes: int, shortcut: Shortcut = "A") -> CifarResNet:
    return _he_resnet(32, input_shape, num_classes, shortcut)


@model_option("resnet56", data="cifar10")
def resnet56(input_shape, num_classes: int, shortcut: Shortcut = "A") -> CifarResNet:
    return _he_resnet(56, input_shape, num_classes, shortcut)


@model_option("resnet18", data="cifar10")
def resnet18(input_shape, num_classes: int, width: Annotated[int, Range(ge=1)] = 64) -> CifarResNet:
    """ResNet-18 for CIFAR (3x3 stem, no max-pool), option-B shortcuts; ``width`` scales every stage."""
    return CifarResNet(input_shape, num_classes, [2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width], "B")
