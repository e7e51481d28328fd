"""Datasets (registry), label noise, and the device-resident loader."""
from regstory.data import digits, mnist1d, torchvision_sets  # noqa: F401  (register the built-in datasets)
from regstory.data.base import Augment, DataBundle, DatasetNotFoundError, TensorSplit
from regstory.data.registry import DATASETS, register_dataset

__all__ = ["Augment", "DataBundle", "DatasetNotFoundError", "TensorSplit", "DATASETS", "register_dataset"]
