"""Data containers shared by every dataset: a split held as tensors, and the bundle a builder returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk and may not be downloaded; the message says which folder and flag to set."""


def missing_dataset_message(name: str, root: str, reason: str, download_tried: bool = False) -> str:
    if download_tried:
        hint = (" torchvision downloads it from Google Drive through the 'gdown' package: pip install gdown "
                "(or pip install -e \".[celeba]\"), then run again." if "gdown" in reason else "")
        return (f"dataset '{name}' is not under '{root}' and downloading it failed ({reason}): check the network, "
                f"or put the files there / point data.root=<folder> at a copy.{hint}")
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

    def with_labels(self, y: Tensor, extras: dict[str, Tensor]) -> "TensorSplit":
        return TensorSplit(self.x, y, extras)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


class DatasetSplit:
    """A split too large to hold as tensors (ImageNet, CelebA): a torch ``Dataset`` of ``(input, label)`` pairs
    read by DataLoader workers, with the labels known up front (``y``) so that validation splits and label noise
    work as for a :class:`TensorSplit`. Items are dicts ``{"x", "y", "index", **extras}``; ``y`` and the extras
    come from this object, not from the dataset, so noisy labels are the ones served."""

    def __init__(self, dataset, y: Tensor, extras: dict[str, Tensor] | None = None,
                 sample_shape: tuple[int, ...] | None = None, rows: Tensor | None = None):
        self.dataset = dataset
        self.y = y
        self.extras = extras or {}
        self.rows = rows if rows is not None else torch.arange(len(y))  # rows of ``dataset`` this split serves
        self._sample_shape = sample_shape
        if len(self.rows) != len(y) or any(len(v) != len(y) for v in self.extras.values()):
            raise ValueError("y, rows and every extra of a DatasetSplit must have the same length")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        x, _ = self.dataset[int(self.rows[i])]
        return {"x": x, "y": self.y[i], "index": i, **{k: v[i] for k, v in self.extras.items()}}

    def subset(self, index: Tensor) -> "DatasetSplit":
        return DatasetSplit(self.dataset, self.y[index], {k: v[index] for k, v in self.extras.items()},
                            self._sample_shape, self.rows[index])

    def with_labels(self, y: Tensor, extras: dict[str, Tensor]) -> "DatasetSplit":
        return DatasetSplit(self.dataset, y, extras, self._sample_shape, self.rows)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self._sample_shape is None:
            self._sample_shape = tuple(self[0]["x"].shape)
        return self._sample_shape


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
    train: TensorSplit | DatasetSplit
    test: TensorSplit | DatasetSplit
    num_classes: int
    val: TensorSplit | DatasetSplit | None = None
    augment: Augment = field(default_factory=Augment)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_bias_classes: int | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.sample_shape


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
