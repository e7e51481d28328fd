"""Batches drawn from tensors that live on the training device: no DataLoader, no per-sample Python.

Shuffling and augmentation draw from generators seeded by (seed, round, epoch), so an epoch's batches are the same
whether the run went straight through or was resumed from a checkpoint. The epoch's permutation is drawn on the host
(the same order on every device and on every rank of a sharded run; one copy per epoch); on a GPU the per-batch crop
offsets and flips are drawn by a generator on the device, so no step waits for a host-to-device copy.

Inputs are normalised once when the loader is built (``(x - mean) / std``, the same arithmetic as per batch, so the
values are bit-identical); random crops pad with the normalised value of a black pixel, exactly what "pad with zeros,
then normalise" gives.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from regstory.data.base import Augment, TensorSplit


def epoch_generator(seed: int, round_: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one epoch's shuffle and augmentation, on ``device``."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + round_ * 10_007 + epoch) % 2**63)


def random_crop(x: Tensor, padding: int, gen: torch.Generator, fill: Tensor | None = None) -> Tensor:
    """Random crop of each image after padding by ``padding`` pixels (batched, on x's device).

    ``fill`` (shape (1, C, 1, 1)) is the padding value per channel; zeros when None.
    """
    b, c, h, w = x.shape
    if fill is None:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
    else:
        padded = fill.to(x.dtype).expand(b, c, h + 2 * padding, w + 2 * padding).clone(
            memory_format=torch.contiguous_format)
        padded[:, :, padding:padding + h, padding:padding + w] = x
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=gen.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: Tensor, gen: torch.Generator) -> Tensor:
    """Flip each image horizontally with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def normalize(x: Tensor, mean: Tensor | None, std: Tensor | None) -> Tensor:
    return x if mean is None else (x - mean) / std


class TensorLoader:
    """Iterate a :class:`TensorSplit` in batches of dicts ``{"x", "y", "index", **extras}`` on its device.

    ``channels_last`` stores 4-D inputs (and hands out batches) in channels-last memory format, which is what
    oneDNN (CPU) and cuDNN with tensor cores (GPU) convolve fastest.

    ``loader.split`` holds the inputs as stored (float inputs normalised, integer inputs raw), not the split it was
    given, so a raw float copy is not kept alive beside the normalised one (on a GPU that doubled the set's memory).
    Cut further loaders from it with :meth:`subset`, which knows how its inputs are stored.
    """

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
        channels_last: bool = False,
    ):
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment if augment is not None and augment.active else None
        self.seed = seed
        self.rank, self.world = shard
        self.device = split.x.device
        shape = (1, -1) + (1,) * (split.x.ndim - 2)
        self.mean = torch.tensor(mean, device=self.device).view(shape) if mean is not None else None
        self.std = torch.tensor(std, device=self.device).view(shape) if std is not None else None
        self.memory_format = torch.channels_last if channels_last and split.x.ndim == 4 else None
        self.x = self._stored_inputs(split.x)
        self.split = TensorSplit(self.x, split.y, split.extras)
        self.normalisation = (mean, std)
        self.pad_fill = normalize(torch.zeros_like(self.mean), self.mean, self.std) if self.mean is not None else None
        self.round, self.epoch = 0, 0

    def _stored_inputs(self, x: Tensor) -> Tensor:
        """The inputs as batches are cut from them, in the requested memory format: float inputs normalised once
        here; integer inputs (CelebA's uint8 images) kept as they are and normalised per batch in ``make_batch``,
        since a float copy of them would take 4x the memory (same values either way)."""
        if x.is_floating_point():
            x = normalize(x, self.mean, self.std)
        return x.contiguous(memory_format=self.memory_format) if self.memory_format is not None else x

    def set_epoch(self, round_: int, epoch: int) -> None:
        self.round, self.epoch = round_, epoch

    def _order(self, gen: torch.Generator) -> Tensor:
        """The epoch's sample order (drawn with the host generator ``gen``), this rank's shard of it, on the device."""
        n = len(self.split)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        if self.world > 1:  # equal shards, as DistributedSampler does (pad by wrapping around)
            per_rank = -(-n // self.world)
            order = torch.cat([order, order[: per_rank * self.world - n]])[self.rank :: self.world]
        return order.to(self.device, non_blocking=True)

    def __len__(self) -> int:
        n = -(-len(self.split) // self.world)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        host_gen = epoch_generator(self.seed, self.round, self.epoch)
        order = self._order(host_gen)
        on_host = self.device.type == "cpu"  # one stream for order and augmentation, as a CPU run always drew them
        gen = host_gen if on_host else epoch_generator(self.seed, self.round, self.epoch, self.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            if self.drop_last and len(index) < self.batch_size:
                break
            yield self.make_batch(index, gen)

    def subset(self, index: Tensor, batch_size: int | None = None) -> "TensorLoader":
        """A plain loader (in order, unaugmented, unsharded) over the samples ``index`` of this split, cut from the
        stored inputs: normalised float inputs are not normalised again; integer inputs keep the per-batch
        normalisation."""
        part = self.split.subset(index.to(self.device))
        mean, std = self.normalisation if not part.x.is_floating_point() else (None, None)
        return TensorLoader(part, batch_size or self.batch_size, mean=mean, std=std,
                            channels_last=self.memory_format is not None)

    def in_order(self) -> Iterator[dict[str, Tensor]]:
        """The whole split in storage order, unaugmented and unsharded (for measurements, e.g. class centroids)."""
        n = len(self.split)
        for start in range(0, n, self.batch_size):
            yield self.make_batch(torch.arange(start, min(start + self.batch_size, n), device=self.device))

    def make_batch(self, index: Tensor, gen: torch.Generator | None = None) -> dict[str, Tensor]:
        x = self.x[index]
        if not x.is_floating_point():
            x = normalize(x, self.mean, self.std)
        if self.augment is not None and gen is not None:
            if self.augment.crop_padding:
                x = random_crop(x, self.augment.crop_padding, gen, self.pad_fill)
            if self.augment.flip:
                x = random_flip(x, gen)
            if self.memory_format is not None:
                x = x.contiguous(memory_format=self.memory_format)
        batch = {"x": x, "y": self.split.y[index], "index": index}
        for k, v in self.split.extras.items():
            batch[k] = v[index]
        return batch
