"""Data-parallel training of one run over several processes (``torchrun --nproc_per_node=N -m regstory.train``).

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; when ``WORLD_SIZE > 1`` the run:

- joins a process group (NCCL on CUDA, gloo on CPU) and uses ``cuda:<LOCAL_RANK>`` on a GPU machine;
- uses rank 0's run dir on every rank (the others compose the config without Hydra's run dir, see ``train.main``);
- builds the same model on every rank (same seed) and wraps it in DistributedDataParallel as ``ctx.forward_model``
  (hooks and checkpoints keep using the bare ``ctx.model``, so checkpoint keys have no ``module.`` prefix);
- shards the train split with ``TensorLoader(shard=(rank, world))`` (the same padded, strided split as
  DistributedSampler) and gives each rank ``trainer.batch_size / world`` samples a step: ``trainer.batch_size`` stays
  the *global* batch, so a recipe means the same thing on 1 or N processes;
- averages the per-rank train metrics over ranks each epoch (every rank holds the same number of samples);
- evaluates on the full val/test splits on every rank (same weights, same numbers), logs and checkpoints on rank 0
  only, and agrees on preemption collectively so that all ranks stop at the same epoch boundary.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from regstory.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_worker(self) -> bool:
        """A non-zero rank of a data-parallel run."""
        return self.active and not self.is_main


def env_from_torchrun() -> DistEnv:
    """The rank layout torchrun (or SLURM via ``srun torchrun``) put into the environment; one process if unset."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistEnv(rank=int(os.environ.get("RANK", "0")), world=world,
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def is_worker_rank() -> bool:
    """A non-zero rank of a torchrun launch (it must not create Hydra output folders of its own)."""
    return env_from_torchrun().is_worker


def init(device: torch.device, env: DistEnv) -> torch.device:
    """Join the process group; return this rank's device (``cuda:<local_rank>`` on GPUs)."""
    if not env.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def wait_for_all(env: DistEnv) -> None:
    """Every rank waits here until all have arrived (the end of a successful run, before the group goes)."""
    if env.active and dist.is_initialized():
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.active and dist.is_initialized():
        dist.destroy_process_group()


def share_run_dir(run_dir: Path | None, env: DistEnv) -> Path:
    """Every rank uses rank 0's run dir (other ranks may not know it: their Hydra did not pick one)."""
    if not env.active:
        assert run_dir is not None
        return run_dir
    box = [str(run_dir) if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


@contextlib.contextmanager
def main_process_first(env: DistEnv) -> Iterator[None]:
    """Rank 0 runs the block first (downloads, writes data caches); the other ranks run it after, from the cache."""
    if env.active and not env.is_main:
        dist.barrier()
    yield
    if env.active and env.is_main:
        dist.barrier()


def per_rank_batch_size(global_batch: int, env: DistEnv) -> int:
    """``trainer.batch_size`` is the global batch: each of the ``world`` ranks takes an equal part of it."""
    if global_batch % env.world:
        raise ConfigError(f"trainer.batch_size={global_batch} is invalid for {env.world} processes: "
                          f"must be a multiple of the number of processes (it is the global batch)")
    return global_batch // env.world


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the bare model (it broadcasts rank 0's weights and all-reduces gradients)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def average_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each (per-rank mean) metric over ranks; exact for the global mean since ranks hold equal counts."""
    keys = list(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist()))


class CollectivePreemption:
    """A PreemptionGuard seen by all ranks: ``requested`` is true on every rank as soon as one rank got a signal.

    Read once per epoch by the loop, on every rank (it is an all-reduce).
    """

    def __init__(self, guard: Any, device: torch.device):
        self.guard = guard
        self.device = device

    @property
    def requested(self) -> bool:
        flag = torch.tensor([1 if self.guard.requested else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.guard.requested:
            import signal

            self.guard.signum = int(signal.SIGTERM)  # another rank was signalled
        return bool(flag.item())

    def preempted(self, run_dir: Path, round_: int, next_epoch: int):
        return self.guard.preempted(run_dir, round_, next_epoch)


def attach(ctx: Any, env: DistEnv) -> None:
    """Make a RunContext data-parallel: metric averaging, collective stop (the DDP wrapper is ``ctx.wrap``'s, see
    ``regstory.train.training_wrapper``; the per-rank batch is set by ``regstory.data.prepare.make_loaders``)."""
    if not env.active:
        return
    ctx.reduce_metrics = lambda m: average_over_ranks(m, ctx.device)
    if ctx.preemption is not None:
        ctx.preemption = CollectivePreemption(ctx.preemption, ctx.device)
