"""Fully connected nets: a configurable MLP (MNIST-1D, digits) and LeNet-300-100."""
from __future__ import annotations

from typing import Annotated

from torch import Tensor, nn

from regstory.models.base import Classifier, flat_dim, model_option
from regstory.options import OneOf, Range


class MLP(Classifier):
    """Flatten, then ``depth`` blocks of Linear + activation of ``width`` units, then a linear head."""

    def __init__(self, input_shape, num_classes: int, widths: list[int], activation: str = "relu", residual: bool = False):
        super().__init__()
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[activation]
        dims = [flat_dim(input_shape), *widths]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(act() for _ in widths)
        self.residual = residual
        self.head = nn.Linear(dims[-1], num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for i, (layer, act) in enumerate(zip(self.layers, self.acts)):
            out = act(layer(x))
            x = x + out if self.residual and i > 0 and out.shape == x.shape else out
        return x


@model_option("mlp", data="mnist1d")
def mlp(input_shape, num_classes: int, width: Annotated[int, Range(ge=1)] = 512, depth: Annotated[int, Range(ge=0)] = 2,
        activation: Annotated[str, OneOf("relu", "tanh", "gelu")] = "relu", residual: bool = False) -> MLP:
    """MLP with ``depth`` hidden layers of ``width`` units (MNIST-1D default: 40-512-512-10).

    ``residual=true`` adds x + act(Wx + b) skips between equal-width hidden layers (a residual MLP).
    """
    return MLP(input_shape, num_classes, [width] * depth, activation, residual)


@model_option("lenet300", data="mnist")
def lenet300(input_shape, num_classes: int) -> MLP:
    """LeNet-300-100 (LeCun et al. 1998): flatten -> 300 -> 100 -> classes, ReLU."""
    return MLP(input_shape, num_classes, [300, 100])
