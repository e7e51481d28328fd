"""Preemption: a signal asks the run to stop; it checkpoints at the next epoch boundary and exits for a requeue.

Ctrl-C (SIGINT) is handled the same way and exits with status 130; a second Ctrl-C stops at once, keeping the last
checkpoint written.

SLURM (and submitit, torchrun, ``kill``) warn a job before killing it: SIGTERM, SIGUSR1, or SIGUSR2 (submitit's
default preemption/timeout signal, ``SUBMITIT_PREEMPT_SIGNAL``). :class:`PreemptionGuard` turns each of them into a
flag. The loop reads the flag once per epoch (``ctx.preemption.requested``), writes ``checkpoints/last.pt`` at that
epoch boundary (even when ``trainer.checkpoint_every`` would skip it) and raises :class:`Preempted`.

Why the epoch boundary and not the step: an epoch's metrics are accumulated inside the epoch, and a mid-epoch
checkpoint would need the loader position and the partial sums as well. At the epoch boundary the checkpoint is the
same one an uninterrupted run writes, so a resumed run is bit-identical to a straight one. Give the job a warning at
least one epoch long (``signal_delay_s`` of the submitit launcher, ``sbatch --signal=USR1@<s>``); if SIGKILL comes
first, the run resumes from the previous epoch's checkpoint (written atomically after every epoch).

What happens after :class:`Preempted` (see :func:`exit_after_preemption`): inside a submitit job the signal's
previous handler (submitit's ``checkpoint_and_try_requeue``) is called, which pickles the job again through
hydra-submitit-launcher's ``checkpoint`` method and requeues it; anywhere else the process exits with
:data:`PREEMPTED_EXIT_CODE`. A requeued job finds the checkpoint in its run dir and resumes (:func:`auto_resume`).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("regstory")

#: exit status of a run stopped by a signal after writing its checkpoint (sysexits.h EX_TEMPFAIL: "try again")
PREEMPTED_EXIT_CODE = 75

#: exit status of a run stopped by Ctrl-C after writing its checkpoint (the shell's 128 + SIGINT)
INTERRUPTED_EXIT_CODE = 130

#: the signals that ask a run to checkpoint and stop (SIGUSR2 is submitit's default preemption signal; SIGINT is
#: Ctrl-C: a second one stops at once, without the checkpoint)
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


class Preempted(Exception):
    """Raised at an epoch boundary after a preemption signal; the checkpoint for that boundary is on disk."""

    def __init__(self, signum: int, run_dir: Path, round_: int, next_epoch: int, previous_handler: Any = None):
        # round_ is 0-based, next_epoch the number of epochs done in it: the message numbers both from 1 (epoch
        # ``next_epoch`` is the one the console showed as ``epoch next_epoch/N``)
        self.signum = signum
        self.run_dir = Path(run_dir)
        self.round = round_
        self.next_epoch = next_epoch
        self.previous_handler = previous_handler
        super().__init__(
            f"stopped by {signal.Signals(signum).name}: checkpoint written after epoch {next_epoch} of round "
            f"{round_ + 1} in {self.run_dir / 'checkpoints'}; continue with: regstory-run <same overrides> resume=true "
            f"hydra.run.dir={self.run_dir}")


class PreemptionGuard:
    """Context manager: while active, the preemption signals set :attr:`signum` instead of killing the process.

    Handlers can only be installed from the main thread; elsewhere (e.g. a test runner thread) the guard is inert.
    The handlers that were there before are kept (``previous``) and put back on exit.
    """

    def __init__(self, signals: tuple[str, ...] = PREEMPTION_SIGNALS):
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        if signum == signal.SIGINT and self.signum is None:
            log.warning("Ctrl-C: will checkpoint and stop at the end of this epoch (Ctrl-C again to stop at once, "
                        "losing this epoch)")
        elif self.signum is None:
            log.warning("received %s: will checkpoint and stop at the end of this epoch", signal.Signals(signum).name)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def preempted(self, run_dir: Path, round_: int, next_epoch: int) -> Preempted:
        assert self.signum is not None
        return Preempted(self.signum, run_dir, round_, next_epoch, self.previous.get(self.signum))


def in_requeued_job() -> bool:
    """True inside a submitit job (which may have been requeued) or a SLURM job that was restarted."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR")) or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def auto_resume(resume: bool, checkpoint: Path) -> bool:
    """Resume if asked to, or if this is a (re)queued cluster job whose run dir already holds a checkpoint.

    A requeued job is started again with its original overrides (``resume=false``), so it must notice by itself
    that it is a continuation; outside a cluster job an existing checkpoint is never picked up silently.
    """
    return bool(resume) or (in_requeued_job() and Path(checkpoint).exists())


def exit_after_preemption(err: Preempted, stderr: Callable[[str], Any] | None = None) -> None:
    """Requeue through submitit if it installed the handler we replaced, else exit with PREEMPTED_EXIT_CODE."""
    (stderr or (lambda m: print(m, file=sys.stderr)))(f"regstory-run: preempted: {err}")
    if err.signum == signal.SIGINT:
        raise SystemExit(INTERRUPTED_EXIT_CODE)
    handler = err.previous_handler
    if callable(handler) and getattr(handler, "__module__", "").startswith("submitit"):
        handler(err.signum, None)  # submitit: checkpoint the DelayedSubmission, requeue, sys.exit
    raise SystemExit(PREEMPTED_EXIT_CODE)
