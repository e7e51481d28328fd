"""Which architecture takes which data set, and how much work one sample is.

Each architecture declares its natural data set (:data:`regstory.models.base.NATURAL_DATA`): ``regstory-run
arch=resnet32`` without ``dataset=`` trains on CIFAR-10 (:func:`natural_dataset`, applied before anything runs).
:func:`probe` runs the freshly built model once on a zero sample of the data set's shape, before any training: an
architecture that cannot take those inputs (``arch=resnet32 dataset=mnist1d``) is one line naming the data set it is
made for, not a convolution error deep in the first epoch; and the same pass counts the multiply-adds of its Linear
and Conv layers, which :mod:`regstory.threads` uses to pick the number of CPU threads.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from regstory.options import ConfigError


def natural_dataset(arch: DictConfig) -> str | None:
    """The dataset option an architecture is made for (``resnet32``: ``cifar10``), or None."""
    from regstory.models.base import NATURAL_DATA

    return NATURAL_DATA.get(str(arch.get("_target_")))


@torch.no_grad()
def probe(model: nn.Module, input_shape: tuple[int, ...], dataset: str, arch: DictConfig) -> float:
    """FLOPs of one sample's forward through the Linear and Conv layers (2 per multiply-add); raises
    :class:`ConfigError` (one line) when the model cannot take inputs of ``input_shape``."""
    flops = [0.0]

    def count(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        per_output = module.in_features if isinstance(module, nn.Linear) else module.weight[0].numel()
        flops[0] += 2.0 * per_output * out.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    was_training = model.training
    device = next(model.parameters(), torch.zeros(())).device
    try:
        model.eval()(torch.zeros((1, *input_shape), device=device))
    except (RuntimeError, ValueError, IndexError) as err:
        natural = natural_dataset(arch)
        hint = f"; it is made for dataset={natural}" if natural and natural != dataset else ""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        name = str(arch.get("_target_", "the model")).rsplit(".", 1)[-1]
        raise ConfigError(f"arch {name} cannot take dataset={dataset}'s inputs of shape {tuple(input_shape)} "
                          f"({first}){hint}") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return flops[0]
