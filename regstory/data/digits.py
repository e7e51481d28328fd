"""scikit-learn's bundled 8x8 digits: real, offline, tiny (1797 images)."""
from __future__ import annotations

import functools
from typing import Annotated

import torch

from regstory.data.base import DataBundle, TensorSplit, stratified_split
from regstory.data.registry import dataset_option
from regstory.options import Range


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, 8, 8) floats in [0, 1] and (N,) labels (fresh tensors: the caller may change them)."""
    x, y = _parsed_digits()
    return x.clone(), y.clone()


@functools.cache
def _parsed_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits parsed once per process (its loader reads and parses a compressed CSV each call)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.as_tensor(d.target, dtype=torch.long)


@dataset_option("digits")
def build_digits(root: str = "", download: bool = True, test_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.3,
                 split_seed: int = 0) -> DataBundle:
    """Digits with a fixed stratified train/test split (70/30 by default, ``split_seed`` 0)."""
    x, y = load_digits_tensors()
    tr, te = stratified_split(y, test_fraction, split_seed)
    return DataBundle("digits", TensorSplit(x[tr], y[tr]), TensorSplit(x[te], y[te]), num_classes=10)
