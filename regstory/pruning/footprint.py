"""The footprint measures of the thesis' Table 2.1 (pruning benchmark): parameter counts, pruning ratio, model size,
compressed size and CPU latency, as plain functions of ``nn.Module`` objects.

Units, once for all:

- sizes are in **MB = 10**6 bytes** (not MiB). The check is the thesis' own table: AlexNet-CIFAR-100 has 23,640,996
  fp32 parameters, 94.56 MB, printed as 94.6 (in MiB it would be 90.2); VGG-16-BN-CIFAR here has 14.72 M parameters,
  58.9 MB against the printed 60.0 (56.2 MiB), its head being slightly smaller than the thesis' VGG;
- :func:`size_mb` counts every parameter and every *floating* buffer (batch-norm running mean/var: what a deployed
  model stores and needs) at 4 bytes (fp32) each, whatever their dtype; integer buffers (``num_batches_tracked``)
  are left out, inference never reads them;
- pruning ratio and sparsity are fractions (0-1) in the functions and a percentage in :func:`model_measures`
  (``pruning_ratio_pct``, the column of the table);
- MACs (multiply-accumulates) of one sample through the conv and linear layers (:func:`macs`); FLOPs = 2 x MACs;
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
               threads: int | None = 1, seed: int = 0, batch: int = 1) -> dict[str, Any]:
    """CPU inference latency of ``model`` on one input of shape ``(batch, *input_shape)`` (default batch 1, eval mode,
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
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(seed)).to(dtype)
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


# ---------------------------------------------------------------------------------------------------------- MACs

@torch.no_grad()
def macs(model: nn.Module, input_shape: Sequence[int], nonzero: bool = False) -> int:
    """Multiply-accumulates of one sample of shape ``input_shape`` through the conv and linear layers of ``model``
    (what dominates; BN, activations, pools and additions are not counted). A conv computes, per output position,
    one MAC per weight entry: ``H_out * W_out * weight.numel()``; a linear ``weight.numel()`` per row of its input.
    ``nonzero``: only the non-zero weights count (a sparse kernel's work)."""
    total = 0

    def count(module: nn.Module, args: tuple, output: Tensor) -> None:
        nonlocal total
        per_output = int(torch.count_nonzero(module.weight)) if nonzero else module.weight.numel()
        if isinstance(module, nn.Linear):
            positions = output.numel() // output.shape[-1]
        else:  # ConvNd: output (1, C_out, *spatial); each output position uses the whole filter bank
            positions = output[0, 0].numel()
        total += positions * per_output  # a grouped conv's weight already holds C_in / groups inputs per filter

    layers = [m for m in model.modules() if isinstance(m, PRUNABLE_LAYERS)]
    handles = [m.register_forward_hook(count) for m in layers]
    was_training = model.training
    try:
        model.eval()
        first = next(model.parameters(), None)
        device = first.device if first is not None else "cpu"
        model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def saved_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save`` of the model's state dict (what a checkpoint of it takes on disk)."""
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


# ----------------------------------------------------------------------------------------------- one model's row

def model_measures(model: nn.Module, simplified: nn.Module, input_shape: Sequence[int], codec: str = "auto",
                   repeats: int = 20, threads: int = 1) -> tuple[dict[str, Any], Compressed]:
    """Table 2.1's measures of a pruned ``model`` and its ``simplified`` form (BN folded), as flat JSON-friendly keys,
    and the compression (its ``decoded`` tensors give the decoded model's accuracy):

    - ``pruning_ratio_pct`` (% zeros among conv / linear weights), ``nonzero_params``, ``compression_ratio``
      (parameters / non-zero parameters);
    - ``macs_pruned`` (non-zero weights only), ``macs_simplified``;
    - ``simplified_params``, ``simplified_mb`` (:func:`size_mb`), ``simplified_bytes_on_disk`` (:func:`saved_bytes`);
    - ``compressed_codec``, ``compressed_mb``, ``compressed_max_abs_error`` (:func:`compress` of ``model``);
    - ``latency_ms_pruned``, ``latency_ms_simplified`` (batch 1), ``latency_ms_simplified_b64`` (batch 64), medians of
      ``repeats`` on ``threads`` CPU threads (``latency_threads``)."""
    packed = compress(model, codec=codec)
    nonzero = nonzero_parameters(model)
    row = {"pruning_ratio_pct": 100 * pruning_ratio(model), "nonzero_params": nonzero,
           "compression_ratio": parameter_count(model) / max(nonzero, 1),
           "macs_pruned": macs(model, input_shape, nonzero=True), "macs_simplified": macs(simplified, input_shape),
           "simplified_params": parameter_count(simplified), "simplified_mb": size_mb(simplified),
           "simplified_bytes_on_disk": saved_bytes(simplified),
           "compressed_codec": packed.codec, "compressed_mb": packed.mb,
           "compressed_max_abs_error": packed.max_abs_error}
    for name, m, batch in (("pruned", model, 1), ("simplified", simplified, 1), ("simplified_b64", simplified, 64)):
        row[f"latency_ms_{name}"] = latency_ms(m, input_shape, repeats, threads=threads, batch=batch)["median_ms"]
    row["latency_threads"] = threads
    return row, packed


def dense_measures(model: nn.Module, input_shape: Sequence[int], repeats: int = 20, threads: int = 1) -> dict[str, Any]:
    """The dense reference: ``dense_params``, ``dense_mb``, ``dense_macs``, ``latency_ms_dense`` (batch 1)."""
    return {"dense_params": parameter_count(model), "dense_mb": size_mb(model),
            "dense_macs": macs(model, input_shape),
            "latency_ms_dense": latency_ms(model, input_shape, repeats, threads=threads)["median_ms"]}
