"""The model interface every architecture follows: ``features`` (the bottleneck) then a linear ``head``."""
from __future__ import annotations

import math

from torch import Tensor, nn

from regstory.options import option
from regstory.registry import Registry

MODELS: Registry = Registry("architecture")
register_model = MODELS.register


#: each architecture's natural data set by builder path (``_target_``), the thesis' pairing:
#: ``regstory-run arch=resnet32`` without ``dataset=`` trains on it (:mod:`regstory.pairing`)
NATURAL_DATA: dict[str, str] = {}


def model_option(name: str, data: str):
    """Register a builder ``(input_shape, num_classes, **options)`` as architecture ``name`` here and as the ``arch``
    schema ``<name>_schema`` (its keyword parameters after the two the runner passes); ``data``: the dataset option
    it is made for."""
    def decorate(builder):
        NATURAL_DATA[f"{builder.__module__}.{builder.__name__}"] = data
        return register_model(name)(option("arch", name, exclude=("input_shape", "num_classes"))(builder))

    return decorate


class Classifier(nn.Module):
    """``forward(x)`` gives logits; ``forward(x, return_features=True)`` gives (logits, bottleneck features).

    The bottleneck is the input of the last linear layer (after global pooling for conv nets), which is where
    debiasing methods (EnD, IRENE, Voronoi) act. Subclasses implement ``features`` and set ``self.head``.
    """

    head: nn.Linear

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, return_features: bool = False):
        z = self.features(x)
        logits = self.head(z)
        return (logits, z) if return_features else logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flat_dim(input_shape: tuple[int, ...]) -> int:
    return math.prod(int(d) for d in input_shape)
