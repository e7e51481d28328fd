"""Label noise on the training labels (thesis sec. 2.4; He et al. 2022 protocol)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from regstory.data.base import DatasetSplit, TensorSplit
from regstory.options import Range, option


def symmetric_noise(labels: Tensor, num_classes: int, rate: float, seed: int) -> tuple[Tensor, Tensor]:
    """Replace exactly floor(rate * N) seeded labels by a uniformly drawn *different* class.

    The true class is never redrawn, so every flipped label is wrong. Returns (noisy labels, flipped indices,
    sorted). The same (labels, rate, seed) always gives the same flipped set and the same new labels.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise.rate must be in [0, 1), got {rate}")
    if num_classes < 2 and rate > 0:
        raise ValueError("label noise needs at least 2 classes")
    gen = torch.Generator().manual_seed(seed)
    n_flip = math.floor(rate * len(labels))
    flipped = torch.randperm(len(labels), generator=gen)[:n_flip].sort().values
    offset = torch.randint(1, max(num_classes, 2), (n_flip,), generator=gen)
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + offset) % num_classes
    return noisy, flipped


@option("noise", "symmetric")
@dataclass
class SymmetricNoise:
    """``noise=symmetric``: symmetric label noise at ``rate`` on the train split (test and val never touched)."""

    rate: Annotated[float, Range(ge=0, lt=1)] = 0.0
    seed: int | None = None  # None: derived from the run's seed

    def apply(self, split: TensorSplit | DatasetSplit, num_classes: int, run_seed: int):
        """Return the split with noisy ``y`` (true labels kept as ``true_y``, ``is_noisy`` mask) and the flipped indices.
        With no label flipped (``rate=0``) the split comes back as it is: no extras for every batch to carry."""
        seed = run_seed if self.seed is None else self.seed
        noisy, flipped = symmetric_noise(split.y, num_classes, self.rate, seed)
        if len(flipped) == 0:
            return split, flipped
        is_noisy = torch.zeros(len(split), dtype=torch.bool)
        is_noisy[flipped] = True
        extras = dict(split.extras, true_y=split.y, is_noisy=is_noisy)
        return split.with_labels(noisy, extras), flipped
