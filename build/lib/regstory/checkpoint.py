"""Checkpoints: one file holding everything needed to resume, written atomically (write-then-rename)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from regstory.utils import atomic_write_bytes

LAST = "last.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read; the message names the file."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise to memory first, then write-then-rename: a kill mid-write leaves the previous file intact."""
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as err:  # disk full, quota, read-only file system: the previous checkpoint is untouched
        raise CheckpointError(f"cannot write checkpoint '{path}' ({err.strerror or err}); "
                              f"the previous checkpoint in that folder is kept; free space and resume with "
                              f"resume=true hydra.run.dir={Path(path).parent.parent}") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at '{path}'")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated or corrupt file
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({type(err).__name__}: {err}); "
                              f"delete it to start over, or restore a copy") from None
