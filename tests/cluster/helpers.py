"""Test-only plugins, selected from the command line with ``method._target_=tests.cluster.helpers.<Class>``."""
from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch

from regstory.plugins import Plugin


class SlowEpochs(Plugin):
    """Sleeps at the end of each epoch, so a signal reliably lands in the middle of a run."""

    def __init__(self, sleep_s: float = 0.1):
        self.sleep_s = sleep_s

    def end_epoch(self, ctx) -> dict[str, Any]:
        time.sleep(self.sleep_s)
        return {}


class SignalSelf(SlowEpochs):
    """Sends ``signal_name`` to its own process at the first training step of epoch ``at_epoch`` (0-based); sleeps
    ``sleep_s`` at the end of each epoch like :class:`SlowEpochs`."""

    def __init__(self, at_epoch: int = 1, signal_name: str = "SIGTERM", sleep_s: float = 0.1):
        super().__init__(sleep_s)
        self.at_epoch = at_epoch
        self.signal_name = signal_name
        self.sent = False

    armed = True  # a test disarms it for the requeued job, which resumes with the same config

    def after_step(self, ctx) -> None:
        if SignalSelf.armed and ctx.epoch == self.at_epoch and not self.sent:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class NaNLossAt(Plugin):
    """Adds a NaN term to the loss from epoch ``at_epoch`` on (0-based): a diverged run, on demand."""

    def __init__(self, at_epoch: int = 1):
        self.at_epoch = at_epoch

    def extra_loss(self, ctx, batch, out) -> dict[str, torch.Tensor]:
        if ctx.epoch >= self.at_epoch:
            return {"poison": out.per_sample_loss.mean() * float("nan")}
        return {}
