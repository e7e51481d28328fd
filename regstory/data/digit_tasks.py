"""Tasks cut from scikit-learn's 8x8 digits: a subset of the classes, and an input shift, offline and CPU-sized.

Made for transfer experiments (MiMi's CPU preset, ``conf/experiment/mimi_digits.yaml``): a backbone pre-trained on
the ten digits is adapted to a task close to it (``classes=[5,6,7,8,9]``: a new head, the same kind of images) and
to a shifted one (the same classes with ``transform=invert``: every pixel 1 - x, white background).

``classes`` keeps those digits, relabelled 0..k-1 in the order given (null: all ten, labels unchanged).
``transform`` applies to every split: ``none``, ``invert`` (1 - x), ``rotate90`` / ``rotate180`` (counter-clockwise),
``transpose`` (rows <-> columns). The train/test split is the ``digits`` option's (the same stratified split of the
1797 images by ``split_seed``, then restricted to ``classes``), so tasks with the same classes share their images.
"""
from __future__ import annotations

from typing import Annotated, Callable

import torch
from torch import Tensor

from regstory.data.base import DataBundle, TensorSplit, stratified_split
from regstory.data.registry import dataset_option
from regstory.options import OneOf, Range

TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda x: x,
    "invert": lambda x: 1.0 - x,
    "rotate90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rotate180": lambda x: torch.rot90(x, 2, dims=(-2, -1)),
    "transpose": lambda x: x.transpose(-2, -1),
}


def select_classes(x: Tensor, y: Tensor, classes: list[int] | None) -> tuple[Tensor, Tensor]:
    """The samples of ``classes``, relabelled by their position in ``classes`` (all, unchanged, for None)."""
    if classes is None:
        return x, y
    relabel = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    relabel[torch.as_tensor(classes)] = torch.arange(len(classes))
    keep = relabel[y] >= 0
    return x[keep], relabel[y[keep]]


@dataset_option("digit_tasks")
def build_digit_tasks(root: str = "", download: bool = True,
                      classes: Annotated[list[int] | None, Range(ge=0, le=9)] = None,
                      transform: Annotated[str, OneOf(*TRANSFORMS)] = "none",
                      test_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.3, split_seed: int = 0) -> DataBundle:
    """8x8 digits restricted to ``classes`` (relabelled 0..k-1) with the input ``transform``; see the module
    docstring."""
    from regstory.data.digits import load_digits_tensors

    if classes is not None and (len(set(classes)) != len(classes) or len(classes) < 2):
        raise ValueError(f"dataset.classes={list(classes)} must name at least two distinct digits")
    x, y = load_digits_tensors()
    x = TRANSFORMS[transform](x).contiguous()
    tr, te = stratified_split(y, test_fraction, split_seed)
    train, test = select_classes(x[tr], y[tr], classes), select_classes(x[te], y[te], classes)
    num_classes = len(classes) if classes is not None else 10
    return DataBundle("digit_tasks", TensorSplit(*train), TensorSplit(*test), num_classes=num_classes)
