"""The dataset registry: ``regstory.data.DATASETS.get(name)(root=..., download=..., **options)``, and
:func:`dataset_option`, which registers a builder both here and as the ``dataset`` config option ``name``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable

from omegaconf import MISSING

from regstory.options import Range, option
from regstory.registry import Registry

DATASETS: Registry = Registry("dataset")
register_dataset = DATASETS.register


@dataclass
class DatasetOptions:
    """Keys of every dataset option that the runner reads itself (the builder gets the others)."""

    name: str = MISSING
    #: a seeded, stratified validation split held out of the train set before label noise (clean labels)
    val_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.0


def dataset_option(name: str) -> Callable:
    """Register a builder ``(root, download, **options)`` as dataset ``name``; its schema is :class:`DatasetOptions`
    plus the builder's own keyword parameters (``root`` and ``download`` come from ``data.*``)."""
    def decorate(builder: Callable) -> Callable:
        checked = option("dataset", name, exclude=("root", "download"), base=DatasetOptions,
                         extra={"name": (str, name)})(builder)
        return register_dataset(name)(checked)

    return decorate
