"""Label noise on the training labels (thesis sec. 2.4; He et al. 2022 protocol), one ``noise=`` option per kind.

Every kind changes only the train split (validation is held out before, test is never touched), is seeded
(``noise.seed``, else the run's seed: the same seed gives the same flipped set and the same new labels), changes a
label only to a *different* class (every flipped label is wrong), and reports the flipped indices, which
``regstory.data.prepare`` writes to ``label_noise.csv`` with the true and noisy labels.

* ``symmetric``: exactly floor(rate * N) uniformly drawn samples get a uniformly drawn other class.
* ``pairflip``: exactly floor(rate * N) uniformly drawn samples move from class c to (c + 1) mod C (the "pair
  flipping" of Han et al., NeurIPS 2018 (Co-teaching), whose transition matrix moves a fraction rate of each class to
  the next one; here the flipped set is drawn over all samples, as for ``symmetric``, so the total is exact).
* ``asymmetric``: class-dependent noise (Patrini et al., CVPR 2017): a sample of a class c that has an entry in
  ``map`` moves to ``map[c]``; exactly floor(rate * n_c) samples of each such class c (n_c its train count) move,
  i.e. T[c, c] = 1 - rate and T[c, map[c]] = rate as in the literature's transition matrix; classes without an
  entry keep their labels, so the total is sum_c floor(rate * n_c) <= floor(rate * N). ``map: null`` is the
  CIFAR-10 map of that literature: truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog
  (9 -> 1, 2 -> 0, 4 -> 7, 3 -> 5, 5 -> 3), for a 10-class set; give ``noise.map`` for any other set (e.g.
  ``noise.map='{2: 7, 3: 8, 5: 6, 6: 5, 7: 1}'``, Patrini et al.'s MNIST map).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from regstory.data.base import DatasetSplit, TensorSplit
from regstory.options import ConfigError, Range, option

#: the CIFAR-10 class-dependent map of the label-noise literature (class indices of torchvision's CIFAR10)
CIFAR10_MAP = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise.rate must be in [0, 1), got {rate}")


def _draw(n: int, n_flip: int, seed: int) -> tuple[Tensor, torch.Generator]:
    """``n_flip`` of ``range(n)``, drawn without replacement and sorted, and the generator for any further draws."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:n_flip].sort().values, gen


def symmetric_noise(labels: Tensor, num_classes: int, rate: float, seed: int) -> tuple[Tensor, Tensor]:
    """Replace exactly floor(rate * N) seeded labels by a uniformly drawn *different* class.

    The true class is never redrawn, so every flipped label is wrong. Returns (noisy labels, flipped indices,
    sorted). The same (labels, rate, seed) always gives the same flipped set and the same new labels.
    """
    _check_rate(rate)
    if num_classes < 2 and rate > 0:
        raise ValueError("label noise needs at least 2 classes")
    flipped, gen = _draw(len(labels), math.floor(rate * len(labels)), seed)
    offset = torch.randint(1, max(num_classes, 2), (len(flipped),), generator=gen)
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + offset) % num_classes
    return noisy, flipped


def pairflip_noise(labels: Tensor, num_classes: int, rate: float, seed: int) -> tuple[Tensor, Tensor]:
    """Move exactly floor(rate * N) seeded samples from their class c to (c + 1) mod C. Returns (noisy labels,
    flipped indices, sorted); the flipped set is the one :func:`symmetric_noise` draws for the same seed."""
    _check_rate(rate)
    if num_classes < 2 and rate > 0:
        raise ValueError("label noise needs at least 2 classes")
    flipped, _ = _draw(len(labels), math.floor(rate * len(labels)), seed)
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + 1) % num_classes
    return noisy, flipped


def asymmetric_noise(labels: Tensor, num_classes: int, rate: float, seed: int,
                     mapping: dict[int, int]) -> tuple[Tensor, Tensor]:
    """Move exactly floor(rate * n_c) seeded samples of each class c in ``mapping`` to ``mapping[c]`` (n_c: the
    class's count); other classes are untouched. Returns (noisy labels, flipped indices, sorted)."""
    _check_rate(rate)
    check_map(mapping, num_classes)
    gen = torch.Generator().manual_seed(seed)
    noisy = labels.clone()
    flipped = []
    for source in sorted(mapping):  # a fixed order: the draws do not depend on how the map was written
        members = torch.nonzero(labels == source).flatten()
        chosen = members[torch.randperm(len(members), generator=gen)[:math.floor(rate * len(members))]]
        noisy[chosen] = mapping[source]
        flipped.append(chosen)
    return noisy, torch.cat(flipped).sort().values if flipped else torch.zeros(0, dtype=torch.long)


def check_map(mapping: dict[int, int], num_classes: int | None = None) -> None:
    """A class map must send classes of the set (0..num_classes-1; any index >= 0 when not known yet) to *other*
    classes of the set."""
    limit = math.inf if num_classes is None else num_classes
    for source, target in mapping.items():
        if not (0 <= source < limit and 0 <= target < limit):
            raise ConfigError(f"noise.map entry {source}: {target} is not a pair of class indices"
                              + (f" 0..{num_classes - 1}" if num_classes is not None else ""))
        if source == target:
            raise ConfigError(f"noise.map entry {source}: {target} maps a class to itself (the flip would be no noise)")


@dataclass
class LabelNoise:
    """Shared keys and the ``apply`` step of every kind: ``rate`` and ``seed`` (None: the run's seed)."""

    rate: Annotated[float, Range(ge=0, lt=1)] = 0.0
    seed: int | None = None  # None: derived from the run's seed

    def flip(self, labels: Tensor, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
        """(noisy labels, sorted flipped indices) of this kind."""
        raise NotImplementedError

    def apply(self, split: TensorSplit | DatasetSplit, num_classes: int, run_seed: int):
        """Return the split with noisy ``y`` (true labels kept as ``true_y``, ``is_noisy`` mask) and the flipped indices.
        With no label flipped (``rate=0``) the split comes back as it is: no extras for every batch to carry."""
        seed = run_seed if self.seed is None else self.seed
        noisy, flipped = self.flip(split.y, num_classes, seed)
        if len(flipped) == 0:
            return split, flipped
        is_noisy = torch.zeros(len(split), dtype=torch.bool)
        is_noisy[flipped] = True
        extras = dict(split.extras, true_y=split.y, is_noisy=is_noisy)
        return split.with_labels(noisy, extras), flipped


@option("noise", "symmetric")
@dataclass
class SymmetricNoise(LabelNoise):
    """``noise=symmetric``: symmetric label noise at ``rate`` on the train split (test and val never touched)."""

    def flip(self, labels: Tensor, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
        return symmetric_noise(labels, num_classes, self.rate, seed)


@option("noise", "pairflip")
@dataclass
class PairflipNoise(LabelNoise):
    """``noise=pairflip``: floor(rate * N) train labels move from c to (c + 1) mod C (Han et al. 2018)."""

    def flip(self, labels: Tensor, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
        return pairflip_noise(labels, num_classes, self.rate, seed)


@option("noise", "asymmetric")
@dataclass
class AsymmetricNoise(LabelNoise):
    """``noise=asymmetric``: floor(rate * n_c) train labels of each mapped class c move to ``map[c]`` (Patrini et al.
    2017); ``map: null`` is the CIFAR-10 map (10 classes only)."""

    map: dict[int, int] | None = None  # null: CIFAR10_MAP

    def __post_init__(self) -> None:
        if self.map is not None:
            try:
                self.map = {int(k): int(v) for k, v in dict(self.map).items()}
            except (TypeError, ValueError):
                raise ConfigError(f"noise.map must map class indices to class indices, got {self.map}") from None
            check_map(self.map)

    def class_map(self, num_classes: int) -> dict[int, int]:
        if self.map is not None:
            return self.map
        if num_classes != 10:
            raise ConfigError(f"noise=asymmetric without noise.map uses the CIFAR-10 map, which needs 10 classes; this "
                              f"set has {num_classes}: give noise.map (source class: noisy class, ...)")
        return dict(CIFAR10_MAP)

    def flip(self, labels: Tensor, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
        return asymmetric_noise(labels, num_classes, self.rate, seed, self.class_map(num_classes))

