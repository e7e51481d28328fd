"""LeNet-5 in its Caffe variant (20 and 50 5x5 filters, 500 hidden units), as in the LOBSTER/SeReNe benchmarks."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from regstory.models.base import Classifier, model_option


class LeNet5(Classifier):
    def __init__(self, input_shape, num_classes: int):
        super().__init__()
        c, h, w = input_shape
        pad = 2 if min(h, w) < 28 else 0  # small inputs (8x8 digits) keep their size through the convs
        self.conv = nn.Sequential(
            nn.Conv2d(c, 20, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        )
        with torch.no_grad():
            n_flat = self.conv(torch.zeros(1, c, h, w)).numel()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(n_flat, 500), nn.ReLU())
        self.head = nn.Linear(500, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x))


@model_option("lenet5", data="mnist")
def lenet5(input_shape, num_classes: int) -> LeNet5:
    """LeNet-5 (Caffe): 431k parameters on 28x28 MNIST."""
    return LeNet5(input_shape, num_classes)
