"""Data containers shared by every dataset: a split held as tensors, and the bundle a builder returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk and may not be downloaded; the message says which folder and flag to set."""


def missing_dataset_message(name: str, root: str, reason: str) -> str:
    return (
        f"dataset '{name}' not found under '{root}' ({reason}). Put it there, point data.root=<folder> at a copy, "
        f"or allow a download with data.download=true (needs network)."
    )


@dataclass
class TensorSplit:
    """A split held as tensors: inputs ``x`` (N, ...), labels ``y`` (N,), optional per-sample extras (N, ...).

    Extras carry what methods need besides the label: ``true_y``/``is_noisy`` after label noise, ``bias`` for
    debiasing sets. Every batch also gets ``index``, the sample's row in this split.
    """

    x: Tensor
    y: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.y)
        if len(self.x) != n or any(len(v) != n for v in self.extras.values()):
            raise ValueError("x, y and every extra of a TensorSplit must have the same length")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: Tensor) -> "TensorSplit":
        return TensorSplit(self.x[index], self.y[index], {k: v[index] for k, v in self.extras.items()})

    def to(self, device: torch.device | str) -> "TensorSplit":
        return TensorSplit(self.x.to(device), self.y.to(device), {k: v.to(device) for k, v in self.extras.items()})


@dataclass
class Augment:
    """Batched image augmentation done on the training device: random crop with zero padding, horizontal flip."""

    crop_padding: int = 0
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip


@dataclass
class DataBundle:
    """What a dataset builder returns. ``mean``/``std`` normalise per channel on the fly (inputs stay in [0, 1])."""

    name: str
    train: TensorSplit
    test: TensorSplit
    num_classes: int
    val: TensorSplit | None = None
    augment: Augment = field(default_factory=Augment)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_bias_classes: int | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def stratified_split(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class seeded split; returns (keep index, held-out index), each sorted."""
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = int(round(test_fraction * len(idx)))
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values
