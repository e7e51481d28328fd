"""How many CPU threads a run uses when ``trainer.num_threads=0`` (auto).

A small model gains little from a second intra-op thread and loses a lot when another process is busy: every
parallel region then waits for its descheduled twin, and an MLP epoch that takes 0.1 s alone took ~8 s beside one
busy process with 2 threads (``scripts/bench_contention.py``). So a step whose forward and backward need less than
:data:`SMALL_STEP_FLOPS` runs on one thread, which costs at most its fair share of a shared machine; larger steps,
where threads pay off, keep torch's default. ``OMP_NUM_THREADS`` (a launcher's ``env_set``, a SLURM job's
``--cpus-per-task``) and an explicit ``trainer.num_threads`` always win. On a GPU the choice does not matter much:
the CPU only feeds the device.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("regstory")

#: forward + backward FLOPs of one training step below which one thread is used (about 10 ms of one core)
SMALL_STEP_FLOPS = 1e9


def configure_threads(requested: int, sample_flops: float, batch_size: int, device: torch.device) -> int:
    """Set torch's intra-op threads: ``requested`` when > 0, else ``OMP_NUM_THREADS`` when set, else one thread
    for a CPU run whose step (3x the forward's ``sample_flops`` per sample) is below :data:`SMALL_STEP_FLOPS`, else
    torch's default. Returns the number in use."""
    from_env = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    small = device.type == "cpu" and 3.0 * sample_flops * batch_size < SMALL_STEP_FLOPS
    chosen = requested or from_env or (1 if small else 0)
    if chosen:
        torch.set_num_threads(chosen)
    if not requested and not from_env and small:
        log.info("one CPU thread: this model's training step is small (trainer.num_threads=N to choose)")
    return torch.get_num_threads()
