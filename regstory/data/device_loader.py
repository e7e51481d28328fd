"""Batches drawn from tensors that live on the training device: no DataLoader, no per-sample Python.

Shuffling and augmentation draw from a generator seeded by (seed, round, epoch), so an epoch's batches are the
same whether the run went straight through or was resumed from a checkpoint.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from regstory.data.base import Augment, TensorSplit


def epoch_generator(seed: int, round_: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + round_ * 10_007 + epoch) % 2**63)


def random_crop(x: Tensor, padding: int, gen: torch.Generator) -> Tensor:
    """Random crop of each image after zero padding by ``padding`` pixels (batched, on x's device)."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: Tensor, gen: torch.Generator) -> Tensor:
    """Flip each image horizontally with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class TensorLoader:
    """Iterate a :class:`TensorSplit` in batches of dicts ``{"x", "y", "index", **extras}`` on its device."""

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: Augment | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
    ):
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment if augment is not None and augment.active else None
        self.seed = seed
        self.rank, self.world = shard
        dev = split.x.device
        shape = (1, -1) + (1,) * (split.x.ndim - 2)
        self.mean = torch.tensor(mean, device=dev).view(shape) if mean is not None else None
        self.std = torch.tensor(std, device=dev).view(shape) if std is not None else None
        self.round, self.epoch = 0, 0

    def set_epoch(self, round_: int, epoch: int) -> None:
        self.round, self.epoch = round_, epoch

    def _order(self, gen: torch.Generator) -> Tensor:
        n = len(self.split)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        if self.world > 1:  # equal shards, as DistributedSampler does (pad by wrapping around)
            per_rank = -(-n // self.world)
            order = torch.cat([order, order[: per_rank * self.world - n]])[self.rank :: self.world]
        return order.to(self.split.x.device)

    def __len__(self) -> int:
        n = -(-len(self.split) // self.world)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        gen = epoch_generator(self.seed, self.round, self.epoch)
        order = self._order(gen)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            if self.drop_last and len(index) < self.batch_size:
                break
            yield self.make_batch(index, gen)

    def make_batch(self, index: Tensor, gen: torch.Generator | None = None) -> dict[str, Tensor]:
        x = self.split.x[index]
        if self.augment is not None and gen is not None:
            if self.augment.crop_padding:
                x = random_crop(x, self.augment.crop_padding, gen)
            if self.augment.flip:
                x = random_flip(x, gen)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        batch = {"x": x, "y": self.split.y[index], "index": index}
        batch.update({k: v[index] for k, v in self.split.extras.items()})
        return batch
