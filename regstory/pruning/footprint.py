"""The footprint measures of the thesis' Table 2.1 (pruning benchmark): parameter counts, pruning ratio, model size,
compressed size and CPU latency, as plain functions of ``nn.Module`` objects.

Units, once for all:

- sizes are in **MB = 10**6 bytes** (not MiB). The check is the thesis' own table: AlexNet-CIFAR-100 has 23,640,996
  fp32 parameters, 94.56 MB, printed as 94.6 (in MiB it would be 90.2); VGG-16-BN-CIFAR here has 14.72 M parameters,
  58.9 MB against the printed 60.0 (56.2 MiB), its head being slightly smaller than the thesis' VGG;
- :func:`size_mb` counts every parameter and every *floating* buffer (batch-norm running mean/var: what a deployed
  model stores and needs) at 4 bytes (fp32) each, whatever their dtype; integer buffers (``num_batches_tracked``)
  are left out, inference never reads them;
- pruning ratio and sparsity are fractions (0-1) in the functions and a percentage in :func:`table_row`
  (``pruning_ratio_pct``, the column of the table);
- latencies are medians in milliseconds, CPU, batch 1.

Compressed size (thesis: MPEG-7 part 17, ISO/IEC 15938-17 "Neural Network Coding"): :func:`compress` uses the
reference implementation ``nncodec`` (optional extra: ``pip install -e ".[nnc]"``; it quantises, so the decoded
tensors differ by up to ``max_abs_error``) or the standard-library fallback ``lzma`` (lossless: per tensor a
bitmap of its non-zero entries plus those values in fp32, the whole stream through LZMA). The codec used is part of
every result: numbers from the two are not comparable.
"""
from __future__ import annotations

import json
import lzma
import math
import os
import statistics
import struct
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from regstory.pruning.masks import PRUNABLE_LAYERS

#: bytes in one MB (decimal megabyte, as the thesis' table; see the module docstring)
MB = 1e6
#: bytes per stored value in :func:`size_mb` (fp32)
FP32_BYTES = 4
#: the codecs :func:`compress` knows ("auto": nncodec when importable, else lzma)
CODECS = ("auto", "nncodec", "lzma")
NNC_MISSING = "codec='nncodec' needs the optional nncodec package: pip install -e \".[nnc]\""

_MAGIC = b"RSFP1"
#: a floating tensor is stored as bitmap + non-zero values when at most this fraction of it is non-zero, else dense
SPARSE_BELOW = 0.5


# ---------------------------------------------------------------------------------------------- counts and sizes

def parameter_count(model: nn.Module) -> int:
    """Number of parameters of ``model`` (entries, zeros included; buffers not counted)."""
    return sum(p.numel() for p in model.parameters())


def nonzero_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model`` that are not exactly zero (entries; buffers not counted)."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def sparsity(tensors: Iterable[Tensor]) -> float:
    """Fraction (0-1) of exact zeros among all the entries of ``tensors``; 0.0 when they hold no entry."""
    total = zeros = 0
    for t in tensors:
        n = t.numel()
        total += n
        zeros += n - int(torch.count_nonzero(t.detach()))
    return zeros / total if total else 0.0


def prunable_weights(model: nn.Module) -> list[Tensor]:
    """The weights of the conv and linear layers of ``model`` (the tensors a pruning ratio is counted over by
    default; biases and norm layers excluded)."""
    return [m.weight for m in model.modules() if isinstance(m, PRUNABLE_LAYERS) and m.weight is not None]


def pruning_ratio(model_or_tensors: nn.Module | Iterable[Tensor]) -> float:
    """Fraction (0-1) of zeros among the prunable weights: the given tensors, or a model's conv/linear weights."""
    tensors = prunable_weights(model_or_tensors) if isinstance(model_or_tensors, nn.Module) else model_or_tensors
    return sparsity(tensors)


def size_mb(model: nn.Module, buffers: bool = True) -> float:
    """Size in MB (10**6 bytes) of ``model`` stored densely in fp32: 4 bytes per parameter and, with ``buffers``,
    per floating buffer entry (batch-norm running statistics); integer buffers are never counted."""
    n = parameter_count(model)
    if buffers:
        n += sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return n * FP32_BYTES / MB


# ------------------------------------------------------------------------------------------------- compression

@dataclass
class Compressed:
    """One compressed state dict. ``nbytes``: its size in bytes (for nncodec: the bitstream plus the tensors it
    does not code, carried raw: integer buffers, scalars); ``mb``: the same in MB (10**6 bytes); ``max_abs_error``: the largest absolute difference
    between an original and a decoded floating entry (0.0 for the lossless lzma); ``decoded``: the decoded state
    dict (CPU tensors, original dtypes and shapes), for ``model.load_state_dict`` on a copy to measure accuracy;
    ``payload``: the lzma stream (:func:`lzma_decode` reads it back) or the nncodec bitstream."""

    codec: str
    nbytes: int
    max_abs_error: float
    decoded: dict[str, Tensor] = field(repr=False)
    payload: bytes = field(default=b"", repr=False)

    @property
    def mb(self) -> float:
        return self.nbytes / MB


def nncodec_available() -> bool:
    """Whether ``nncodec`` (the NNC reference codec) can be imported."""
    try:
        from nncodec import nnc  # noqa: F401
    except Exception:  # ImportError, or a broken install (numpy/opencv ABI mismatch): fall back the same way
        return False
    return True


def compress(model_or_state_dict: nn.Module | Mapping[str, Tensor], codec: str = "auto", qp: int = -32) -> Compressed:
    """Compress a model's state dict (or a state dict) with ``codec``: "nncodec" (NNC, quantisation parameter
    ``qp``; lossy), "lzma" (standard library; lossless) or "auto" (nncodec when importable, else lzma). Sizes in
    bytes and MB (10**6 bytes) on the returned :class:`Compressed`. Tensors are read on the CPU; entries that are
    not tensors are refused (ValueError)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}: expected one of {', '.join(CODECS)}")
    state = _cpu_state(model_or_state_dict)
    if codec == "auto":
        codec = "nncodec" if nncodec_available() else "lzma"
    if codec == "nncodec":
        if not nncodec_available():
            raise ImportError(NNC_MISSING)
        return _nncodec_compress(state, qp)
    payload = lzma_encode(state)
    return Compressed("lzma", len(payload), 0.0, lzma_decode(payload), payload)


def _cpu_state(obj: nn.Module | Mapping[str, Any]) -> dict[str, Tensor]:
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    out = {}
    for name, t in state.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        out[name] = t.detach().cpu()
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def lzma_encode(state: Mapping[str, Tensor]) -> bytes:
    """A lossless, compact encoding of a state dict: a JSON header (names, dtypes, shapes, layouts) and per tensor
    either the packed bitmap of its non-zero entries (``np.packbits``) plus those entries, or all of its entries;
    floating tensors in fp32 (exact for fp16/bf16 too), the others in their own dtype; the whole through LZMA
    (preset 9 | extreme). :func:`lzma_decode` inverts it exactly, value for value; the one bit not kept is the sign
    of a zero (-0.0 comes back as 0.0: masking a negative weight gives -0.0, and keeping that sign would cost a bit
    per pruned entry)."""
    header, chunks = [], []
    for name, t in state.items():
        t = t.detach().cpu()
        entry = {"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        if t.is_floating_point():
            a = t.to(torch.float32).contiguous().numpy().reshape(-1)
            nz = a != 0  # by value: a pruned weight is often -0.0 (a negative weight times a 0 mask)
            if a.size and nz.sum() <= SPARSE_BELOW * a.size:
                entry["layout"] = "sparse"
                parts = [np.packbits(nz).tobytes(), a[nz].tobytes()]
            else:
                entry["layout"] = "dense"
                parts = [a.tobytes()]
        elif t.is_complex():
            raise ValueError(f"state dict entry {name!r}: complex tensors are not supported")
        else:
            entry["layout"] = "raw"
            parts = [t.contiguous().numpy().tobytes()]
        entry["lengths"] = [len(p) for p in parts]
        header.append(entry)
        chunks += parts
    head = json.dumps(header, separators=(",", ":")).encode()
    raw = _MAGIC + struct.pack("<I", len(head)) + head + b"".join(chunks)
    return lzma.compress(raw, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)


def lzma_decode(payload: bytes) -> dict[str, Tensor]:
    """The state dict encoded by :func:`lzma_encode`: CPU tensors with their original names, dtypes and shapes."""
    raw = lzma.decompress(payload)
    if not raw.startswith(_MAGIC):
        raise ValueError("not a regstory footprint lzma stream")
    pos = len(_MAGIC)
    (head_len,) = struct.unpack_from("<I", raw, pos)
    pos += 4
    header = json.loads(raw[pos:pos + head_len])
    pos += head_len
    out: dict[str, Tensor] = {}
    for e in header:
        parts = []
        for n in e["lengths"]:
            parts.append(raw[pos:pos + n])
            pos += n
        dtype, shape = getattr(torch, e["dtype"]), tuple(e["shape"])
        numel = math.prod(shape)
        if e["layout"] == "raw":
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            t = torch.from_numpy(np.frombuffer(parts[0], dtype=np_dtype).copy())
        elif e["layout"] == "dense":
            t = torch.from_numpy(np.frombuffer(parts[0], dtype=np.float32).copy())
        else:
            nz = np.unpackbits(np.frombuffer(parts[0], dtype=np.uint8), count=numel).astype(bool)
            a = np.zeros(numel, dtype=np.float32)
            a[nz] = np.frombuffer(parts[1], dtype=np.float32)
            t = torch.from_numpy(a)
        out[e["name"]] = t.reshape(shape).to(dtype)
    return out


def _nncodec_compress(state: dict[str, Tensor], qp: int) -> Compressed:
    """NNC on the floating tensors with at least one dimension and entry (as fp32 numpy); the others (integer
    buffers such as ``num_batches_tracked``, scalars, empty tensors) carried raw, their bytes counted."""
    from nncodec import nnc

    def coded(t: Tensor) -> bool:
        return t.is_floating_point() and t.dim() > 0 and t.numel() > 0

    floats = {k: t.to(torch.float32).contiguous().numpy() for k, t in state.items() if coded(t)}
    carried = {k: t for k, t in state.items() if not coded(t)}
    carried_bytes = sum(t.numel() * t.element_size() for t in carried.values())
    bitstream = b""
    rec: Mapping[str, Any] = {}
    if floats:
        try:  # nncodec reports its failures with SystemExit: make them ordinary errors
            with tempfile.TemporaryDirectory(prefix="regstory_nnc_") as tmp:
                bitstream = bytes(nnc.compress(floats, bitstream_path=os.path.join(tmp, "bitstream.nnc"), qp=qp,
                                               return_bitstream=True))
            rec = nnc.decompress(bytearray(bitstream))  # it reads a bytearray, or else a path
        except SystemExit as e:
            raise RuntimeError(f"nncodec failed: {e}") from None
    decoded, err = {}, 0.0
    for k, t in state.items():
        if k in carried:
            decoded[k] = t.clone()
            continue
        if k not in rec:
            raise RuntimeError(f"nncodec did not return tensor {k!r}")
        d = torch.as_tensor(np.asarray(rec[k], dtype=np.float32)).reshape(t.shape)
        err = max(err, float((d - t.to(torch.float32)).abs().max()) if d.numel() else 0.0)
        decoded[k] = d.to(t.dtype)
    return Compressed("nncodec", len(bitstream) + carried_bytes, err, decoded, bitstream)


# ------------------------------------------------------------------------------------------------------ latency

def latency_ms(model: nn.Module, input_shape: Sequence[int], repeats: int = 50, warmup: int = 5,
               threads: int | None = 1, seed: int = 0) -> dict[str, Any]:
    """CPU inference latency of ``model`` on one input of shape ``(1, *input_shape)`` (batch 1, eval mode,
    ``torch.inference_mode``): ``median_ms`` (milliseconds, median of ``repeats`` timed forwards with
    ``time.perf_counter`` after ``warmup`` untimed ones), ``threads`` (torch intra-op threads used; None keeps the
    current setting) and ``repeats``. A model off the CPU is timed on a CPU copy; the train/eval mode and torch's
    thread count are restored afterwards."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    first = next((p for p in model.parameters()), None)
    if first is not None and first.device.type != "cpu":
        import copy
        model = copy.deepcopy(model).cpu()
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    x = torch.randn((1, *input_shape), generator=torch.Generator().manual_seed(seed)).to(dtype)
    previous, was_training = torch.get_num_threads(), model.training
    used = previous if threads is None else int(threads)
    times = []
    try:
        torch.set_num_threads(used)
        model.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
        model.train(was_training)
    return {"median_ms": statistics.median(times) * 1e3, "threads": used, "repeats": repeats}


# ---------------------------------------------------------------------------------------------------- table row

def table_row(dense: nn.Module | None, pruned: nn.Module, simplified: nn.Module, input_shape: Sequence[int],
              codec: str = "auto", qp: int = -32, repeats: int = 50, warmup: int = 5, threads: int | None = 1,
              prunable: Iterable[Tensor] | None = None) -> dict[str, Any]:
    """One row of Table 2.1 as flat, JSON-friendly keys (for ``summary.json`` / ``rounds.jsonl``):

    - ``pruning_ratio_pct``: percent of zeros among ``prunable`` (default: the conv/linear weights of ``pruned``);
    - ``params``, ``nonzero_params`` (of ``pruned``), ``simplified_params``: counts of parameters;
    - ``dense_mb``, ``simplified_mb``: :func:`size_mb` in MB (10**6 bytes, fp32, parameters + floating buffers);
    - ``compressed_codec``, ``compressed_bytes``, ``compressed_mb``, ``compressed_max_abs_error``: :func:`compress`
      of ``pruned``'s state dict (``codec``, ``qp``);
    - ``latency_ms_dense``, ``latency_ms_pruned``, ``latency_ms_simplified``: :func:`latency_ms` medians in ms,
      with ``latency_threads`` and ``latency_repeats``.

    ``dense`` may be None (its keys are then None). ``simplified`` is the already simplified model (built by the
    caller). The decoded tensors of the compression are not kept: call :func:`compress` to measure their accuracy."""
    tensors = prunable_weights(pruned) if prunable is None else list(prunable)
    packed = compress(pruned, codec=codec, qp=qp)
    lat = {name: (latency_ms(m, input_shape, repeats=repeats, warmup=warmup, threads=threads)
                  if m is not None else None)
           for name, m in (("dense", dense), ("pruned", pruned), ("simplified", simplified))}
    some = next(v for v in lat.values() if v is not None)
    return {
        "pruning_ratio_pct": 100.0 * sparsity(tensors),
        "params": parameter_count(pruned),
        "nonzero_params": nonzero_parameters(pruned),
        "simplified_params": parameter_count(simplified),
        "dense_mb": size_mb(dense) if dense is not None else None,
        "simplified_mb": size_mb(simplified),
        "compressed_codec": packed.codec,
        "compressed_bytes": packed.nbytes,
        "compressed_mb": packed.mb,
        "compressed_max_abs_error": packed.max_abs_error,
        **{f"latency_ms_{k}": (v["median_ms"] if v is not None else None) for k, v in lat.items()},
        "latency_threads": some["threads"],
        "latency_repeats": some["repeats"],
    }
