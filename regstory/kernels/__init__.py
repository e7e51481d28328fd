"""CPU kernels torch has no single op for, compiled on first use with torch's C++ extension loader.

``masked_sgd_kernel()`` returns the masked SGD step of ``masked_sgd.cpp``: the pruning masks' gradient pass
(thesis sec. 2.2.2.1, parameter pinning) fused into the SGD-with-momentum update, so a pruned model's step reads
its gradients once instead of twice. It is built once per environment into torch's extension cache (~20 s, needs
a C++ compiler and ninja) and reused by every later run. Where it cannot be built, or with ``REGSTORY_NO_KERNELS=1``,
it is None and callers keep the two-pass path: the same update, up to the last bit of some entries.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("masked_sgd.cpp")
_CFLAGS = ("-O3", "-ffp-contract=off")
_built: dict[str, Callable | None] = {}


def kernels_disabled() -> bool:
    return os.environ.get("REGSTORY_NO_KERNELS", "").strip() not in ("", "0")


def masked_sgd_kernel() -> Callable | None:
    """``masked_sgd_(params, grads, bufs, masks, lr, momentum, dampening, weight_decay, nesterov,
    store_masked_grads) -> bool``, or None.

    With ``store_masked_grads`` each masked gradient is left equal to ``grad * mask`` (as the two-pass path leaves
    it); otherwise the gradients are only read. The kernel returns False and changes nothing when a tensor is not a
    dense fp32 CPU tensor laid out like its parameter. A failed build warns once per process and is not retried."""
    if kernels_disabled():
        return None
    if "masked_sgd" not in _built:
        _built["masked_sgd"] = _build_masked_sgd()
    return _built["masked_sgd"]


def extension_name(stem: str, sources: tuple[Path, ...] = (_SOURCE,), cflags: tuple[str, ...] = _CFLAGS) -> str:
    """The cache name of a build: ``<stem>_torch<version>_<key>``.

    torch's extension cache keeps one build directory per name (a changed source, flag or Python rebuilds it in
    place), so two environments sharing the cache (~/.cache/torch_extensions) under one name rebuild, or load, each
    other's module.

    ``key`` hashes the environment (``sys.prefix``, the Python executable), the torch version, the compiler flags
    and the sources' paths and bytes, so each environment, checkout and source revision has its own build."""
    import torch

    digest = hashlib.sha256()
    for part in (sys.prefix, sys.executable, torch.__version__, *cflags):
        digest.update(part.encode() + b"\0")
    for source in map(Path, sources):
        digest.update(str(source.resolve()).encode() + b"\0" + source.read_bytes() + b"\0")
    return f"{stem}_torch{re.sub(r'[^0-9A-Za-z]', '_', torch.__version__)}_{digest.hexdigest()[:12]}"


def _build_masked_sgd() -> Callable | None:
    try:
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its import warns "No CUDA runtime is found" on CPU machines: not our case
        try:
            from torch.utils.cpp_extension import load
        finally:
            quiet.setLevel(level)

        log.info("regstory: loading the masked SGD kernel (the first time in an environment it is built: ~20 s)")
        start = time.perf_counter()
        module = load(name=extension_name("regstory_masked_sgd"), sources=[str(_SOURCE)],
                      extra_cflags=list(_CFLAGS), verbose=False)
        if time.perf_counter() - start > 2:
            log.info("regstory: masked SGD kernel built in %.0f s (cached for later runs)", time.perf_counter() - start)
        return module.masked_sgd_
    except Exception as err:  # no compiler, no ninja, a read-only cache: the two-pass path still works
        warnings.warn(f"regstory: the masked SGD kernel could not be built ({type(err).__name__}: "
                      f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}); pruned models mask their "
                      f"gradients in a separate pass instead (the same update, ~4% slower steps on a small CPU model). "
                      f"Set REGSTORY_NO_KERNELS=1 to skip the build.", RuntimeWarning, stacklevel=3)
        return None
