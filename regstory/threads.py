"""How many CPU threads a run uses when ``trainer.num_threads=0`` (auto): the cores other processes leave idle.

On an idle machine torch's default (one thread per core) is fastest: the MNIST-1D MLP's epoch takes 0.044 s on 2
threads against 0.076 s on one. Beside another busy process the same 2 threads wait for each other at every
parallel region while one of them is descheduled: 0.10-0.23 s, 2.3-5x its time alone, more than its fair share,
where one thread takes 0.078-0.11 s (``scripts/bench_contention.py``). So :class:`ThreadGovernor` measures how
many cores the *other* processes keep busy (``/proc/stat`` minus this process's own CPU time) and uses the rest,
at least one: at start-up and again before every epoch, so a job that starts or ends beside the run is followed.

``trainer.num_threads=N`` and ``OMP_NUM_THREADS`` (a launcher's ``env_set``, a SLURM job's ``--cpus-per-task``)
always win; GPU runs and systems without ``/proc/stat`` keep torch's default.
"""
from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger("regstory")

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: the shortest span a measurement covers (``/proc/stat`` counts in 10 ms ticks: a short span is noise)
MIN_WINDOW_S = 1.0
#: cores counted as taken by others only from this much use on (a margin against the ticks' noise)
BUSY_FROM = 0.7


def _machine_busy_s() -> float | None:
    """CPU seconds spent busy by all processes since boot (``/proc/stat``), or None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICKS


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class ThreadGovernor:
    """Sets torch's intra-op threads to the cores left idle by other processes, between ``1`` and ``max_threads``
    (torch's default: the cores this process may use). :meth:`update` measures since its last call."""

    def __init__(self, max_threads: int | None = None, cores: int | None = None):
        self.max_threads = max_threads or torch.get_num_threads()
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.cores = cores or usable
        self.threads = torch.get_num_threads()
        self._last = self._sample()

    @staticmethod
    def _sample() -> tuple[float | None, float, float]:
        return _machine_busy_s(), _own_cpu_s(), time.monotonic()

    def others_busy(self, min_window_s: float = MIN_WINDOW_S) -> float | None:
        """Cores kept busy by other processes since the last measurement, once it spans ``min_window_s`` (None
        before, or when it cannot be told)."""
        now = self._sample()
        (busy0, own0, t0), (busy1, own1, t1) = self._last, now
        if busy0 is None or busy1 is None or t1 - t0 < min_window_s:
            return None
        self._last = now
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))

    def update(self, min_window_s: float = MIN_WINDOW_S) -> int:
        """Measure (over at least ``min_window_s`` since the last measurement) and set the thread count."""
        others = self.others_busy(min_window_s)
        if others is None:
            return self.threads
        taken = int(others + 1 - BUSY_FROM)  # a core counts as taken from BUSY_FROM of it on
        threads = max(1, min(self.max_threads, self.cores - taken))
        if threads != self.threads:
            torch.set_num_threads(threads)
            log.info("%d CPU thread%s: other processes keep %.1f of %d cores busy (trainer.num_threads=N to fix it)",
                     threads, "" if threads == 1 else "s", others, self.cores)
            self.threads = threads
        return threads


def configure_threads(requested: int, device: torch.device) -> ThreadGovernor | None:
    """``trainer.num_threads`` when > 0, else ``OMP_NUM_THREADS`` when set, else a :class:`ThreadGovernor` for a CPU
    run (measured once now, after a short look at the machine; the loop updates it every epoch)."""
    from_env = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if requested or from_env:
        torch.set_num_threads(requested or from_env)
        return None
    if device.type != "cpu" or _machine_busy_s() is None:
        return None
    governor = ThreadGovernor()
    time.sleep(0.3)  # a first look at what else runs
    governor.update(min_window_s=0.25)
    return governor
