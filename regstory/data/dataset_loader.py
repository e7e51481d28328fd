"""The DataLoader path for sets too large to hold as tensors: worker processes decode and augment on the CPU,
batches are moved to the device (pinned memory, non-blocking). Same batch dicts and the same (seed, round, epoch)
shuffling contract as :class:`regstory.data.device_loader.TensorLoader`, and the same ``split`` / ``subset`` for
measurements on a fixed part of a split (the pruning sweep's activation entropy and memorisation, thesis sec. 2.4)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from regstory.data.base import DatasetSplit
from regstory.data.device_loader import epoch_generator


class _SeededRandomSampler(RandomSampler):
    def __init__(self, data, seed: int):
        super().__init__(data, generator=torch.Generator())
        self.seed = seed

    def set_epoch(self, round_: int, epoch: int) -> None:
        self.generator = epoch_generator(self.seed, round_, epoch)


class DatasetLoader:
    """Batches of a :class:`DatasetSplit` through a DataLoader. ``split`` is the split it serves (labels and extras
    such as ``is_noisy``/``true_y`` known up front); :meth:`subset` cuts a plain loader over some of its samples.

    ``fixed_draws`` (a seed): every pass draws the dataset's random transforms from the same stream (the same crops
    and flips each time) and leaves the global RNG untouched, so a measurement repeated every round sees the same
    inputs and does not shift the training run's random draws."""

    def __init__(self, split: DatasetSplit, batch_size: int, device: torch.device, shuffle: bool = False,
                 drop_last: bool = False, num_workers: int = 0, seed: int = 0, shard: tuple[int, int] = (0, 1),
                 fixed_draws: int | None = None):
        rank, world = shard
        self.split, self.batch_size, self.num_workers, self.seed = split, batch_size, num_workers, seed
        self.fixed_draws = fixed_draws
        if world > 1:
            self.sampler = DistributedSampler(split, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        elif shuffle:
            self.sampler = _SeededRandomSampler(split, seed)
        else:
            self.sampler = SequentialSampler(split)
        self.device = device
        # fixed draws: fresh workers at every pass (persistent ones would carry their RNG state over)
        self.loader = DataLoader(split, batch_size=batch_size, sampler=self.sampler, drop_last=drop_last,
                                 num_workers=num_workers, pin_memory=device.type == "cuda",
                                 persistent_workers=num_workers > 0 and fixed_draws is None,
                                 generator=torch.Generator() if fixed_draws is not None else None)

    def set_epoch(self, round_: int, epoch: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(round_ * 100_003 + epoch)
        elif isinstance(self.sampler, _SeededRandomSampler):
            self.sampler.set_epoch(round_, epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def subset(self, index: torch.Tensor, batch_size: int | None = None) -> "DatasetLoader":
        """A plain loader (in order, unsharded) over the samples ``index`` of this split, with their labels and
        extras, read by as many workers as this loader. The split's own transforms apply: a train split's random
        augmentation stays, drawn the same way at every pass (``fixed_draws``, seeded by this loader's seed)."""
        part = self.split.subset(index.cpu())
        return DatasetLoader(part, batch_size or self.batch_size, self.device, num_workers=self.num_workers,
                             seed=self.seed, fixed_draws=self.seed)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.fixed_draws is None:
            for batch in self.loader:
                yield self._to_device(batch)
            return
        # workers seed their RNGs from a base seed drawn from the loader's generator; the main process (no workers)
        # draws from the global RNG, swapped for a seeded state kept across the pass's batches
        self.loader.generator.manual_seed(self.fixed_draws)
        state = torch.Generator().manual_seed(self.fixed_draws).get_state()
        batches = iter(self.loader)
        while True:
            outer = torch.get_rng_state()
            torch.set_rng_state(state)
            try:
                batch = next(batches, None)
            finally:
                state = torch.get_rng_state()
                torch.set_rng_state(outer)
            if batch is None:
                return
            yield self._to_device(batch)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
