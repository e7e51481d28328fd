"""Datasets (registry), label noise, and the device-resident loader."""
from regstory.data import (biased, celeba, digit_tasks, digits, flowers, imagenet, mnist1d,  # noqa: F401
                           torchvision_sets)  # (register built-ins)
from regstory.data.base import Augment, DataBundle, DatasetNotFoundError, DatasetSplit, TensorSplit
from regstory.data.registry import DATASETS, register_dataset

__all__ = ["Augment", "DataBundle", "DatasetNotFoundError", "DatasetSplit", "TensorSplit", "DATASETS", "register_dataset"]
