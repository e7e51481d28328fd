"""The DataLoader path for sets too large to hold as tensors: worker processes decode and augment on the CPU,
batches are moved to the device (pinned memory, non-blocking). Same batch dicts and the same (seed, round, epoch)
shuffling contract as :class:`regstory.data.device_loader.TensorLoader`."""
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
    def __init__(self, split: DatasetSplit, batch_size: int, device: torch.device, shuffle: bool = False,
                 drop_last: bool = False, num_workers: int = 0, seed: int = 0, shard: tuple[int, int] = (0, 1)):
        rank, world = shard
        if world > 1:
            self.sampler = DistributedSampler(split, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        elif shuffle:
            self.sampler = _SeededRandomSampler(split, seed)
        else:
            self.sampler = SequentialSampler(split)
        self.device = device
        self.loader = DataLoader(split, batch_size=batch_size, sampler=self.sampler, drop_last=drop_last,
                                 num_workers=num_workers, pin_memory=device.type == "cuda",
                                 persistent_workers=num_workers > 0)

    def set_epoch(self, round_: int, epoch: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(round_ * 100_003 + epoch)
        elif isinstance(self.sampler, _SeededRandomSampler):
            self.sampler.set_epoch(round_, epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            yield {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
