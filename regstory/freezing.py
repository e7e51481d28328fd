"""Per-neuron freezing around an optimizer step: frozen rows keep their values, they are not pinned at zero.

What it is for: NEq (thesis sec. 2.7) freezes, for the next epoch, the neurons whose velocity is below eps. A frozen
neuron's incoming weights (its row of a Linear weight, its filter of a Conv weight, optionally its bias entry) get no
update at all (no gradient step, no weight decay, no momentum) while the rest of the layer trains. Zeroing their
gradients is not enough: weight decay and momentum would still move them. So :class:`NeuronFreezer` snapshots the
frozen rows of each frozen parameter and of every optimizer state tensor of the parameter's shape (SGD's
``momentum_buffer``, Adam's ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``) in ``before_step`` and writes them back in
``after_step``::

    freezer.before_step(optimizer)
    optimizer.step()          # or scaler.step(optimizer)
    freezer.after_step(optimizer)

Semantics:

- Frozen rows, of the weights and of the state, are bit-identical after the step to what they were before it, with
  any optimizer. A state tensor that the step creates (the first step, or the first after freezing a parameter the
  optimizer has not seen) gets zeros in the frozen rows: the state of a neuron that has never been updated (right
  for momentum and moments, which start at zero; wrong for an optimizer whose state starts as a copy of the weights).
  Scalar or differently shaped state (Adam's ``step``) is left alone: Adam's bias correction for a neuron unfrozen
  later uses the parameter's step count.
- Non-frozen rows get exactly the update of an unfrozen run with the same gradients for element-wise optimizers
  (SGD with momentum/Nesterov/weight decay, Adam, AdamW, RMSprop, ``regstory.optim.LeanSGD``). Optimizers that couple
  rows (LAMB/LARS trust ratios, Shampoo, factored Adafactor, a global gradient clip computed before the step) see the
  frozen rows' gradients: call :meth:`NeuronFreezer.zero_grads` before clipping to leave them out.
- Only the optimizer step is covered: whatever else edits the weights (pruning masks, LOBSTER/SeReNe decay in an
  ``after_step`` hook) acts on frozen rows too, unless it runs between ``before_step`` and ``after_step``.
- Nothing frozen: both calls return at once (no copy, no allocation). Otherwise each costs one ``index_select``
  (before) and one ``index_copy_`` (after) per frozen tensor and state tensor, on the tensors' device, with no host
  sync; the snapshot buffers are allocated once and reused. On the CPU the rows move as raw 16-byte words where
  they can (see ``_Slot``). Measured by ``scripts/bench_freezing.py`` (MLP 40-512-512-10, half of each hidden
  layer frozen, one thread, shared machine): 90-140 us a step, 2-3x LeanSGD's step alone (~45 us), 0.4-0.6x torch's
  SGD or Adam step, 3-5% of a training step at batch 128.

Rebuilding after the model changes shape (channel removal, layer replaced): frozen parameters are held by identity,
so call :meth:`NeuronFreezer.remap` with the new parameters by name (and, for a layer that lost rows, which old rows
it kept), or ``load_state_dict(state_dict(), new_params)``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class _Frozen:
    weight: Tensor
    rows: Tensor  # bool [out] on the CPU (what state_dict saves)
    idx: Tensor  # long indices of the frozen rows, on the weight's device
    count: int
    bias: Tensor | None
    key: str | None
    bias_key: str | None


#: the widest element types a row of raw bytes can be viewed as, widest first (see _Slot)
_RAW_TYPES = (torch.complex128, torch.int64, torch.int32, torch.int16, torch.uint8)


class _Slot:
    """The frozen rows of one tensor and the buffer that holds them between ``before_step`` and ``after_step``.

    On the CPU, when each row of ``src`` is one contiguous run of memory (a contiguous or channels-last tensor),
    the copies move those runs as the widest element type that divides them (complex128: 16 bytes): a bit-exact
    copy of raw bytes, ~3x faster in ``index_copy_`` than float32 elements. Elsewhere, plain ``index_select`` and
    ``index_copy_`` on the tensor."""

    def __init__(self, src: Tensor, idx: Tensor):
        self.src, self.idx, self.stride, self.dtype = src, idx, src.stride(), src.dtype
        k, row = idx.shape[0], src[0].numel() if src.shape[0] else 0
        self.buf = torch.empty_strided((k, *src.shape[1:]), (row, *src.stride()[1:]) if self._rows_dense(src)
                                       else torch.empty((k, *src.shape[1:])).stride(), dtype=src.dtype,
                                       device=src.device)
        self.view, self.raw = src, self.buf
        if src.device.type == "cpu" and self._rows_dense(src) and row:
            nbytes = row * src.element_size()
            for wide in _RAW_TYPES:
                width = torch.empty((), dtype=wide).element_size()
                if nbytes % width == 0 and src.data_ptr() % width == 0:
                    self.view = src.as_strided((src.shape[0], row), (row, 1)).view(torch.uint8).view(wide)
                    self.raw = self.buf.as_strided((k, row), (row, 1)).view(torch.uint8).view(wide)
                    break

    @staticmethod
    def _rows_dense(t: Tensor) -> bool:
        """Whether row r of ``t`` is exactly the memory [r * stride(0), (r + 1) * stride(0))."""
        if t.dim() < 2:
            return t.dim() == 1 and t.stride(0) == 1
        row = t[0].numel()
        return t.stride(0) == row and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
                                       or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)))

    def take(self) -> _Slot:
        torch.index_select(self.view, 0, self.idx, out=self.raw)
        return self

    def put(self, dst: Tensor) -> None:
        if dst is self.src and dst.stride() == self.stride:
            self.view.index_copy_(0, self.idx, self.raw)
        else:  # the optimizer replaced the tensor: copy by logical index
            dst.index_copy_(0, self.idx, self.buf)


class NeuronFreezer:
    """Freezes rows (dim 0: output neurons / filters) of parameters through optimizer steps (NEq, sec. 2.7).

    ``model``, when given, names the frozen parameters (their qualified names are the keys of ``state_dict``) and is
    where ``load_state_dict``/``remap`` look parameters up by default."""

    def __init__(self, model: nn.Module | None = None):
        self.model = model
        self._entries: dict[int, _Frozen] = {}  # by id of the weight
        self._targets: list[tuple[Tensor, Tensor]] = []  # (tensor, idx) for every frozen weight and bias
        self._slots: dict[tuple[int, Any], _Slot] = {}  # reusable snapshots by (target index, state key)
        self._pending: list[tuple[Tensor, Tensor, dict[Any, _Slot]]] | None = None

    # -- what is frozen -------------------------------------------------------------------------------------------
    def freeze(self, param: Tensor, rows: Tensor, bias: Tensor | None = None, key: str | None = None) -> None:
        """Freeze ``param``'s rows where ``rows`` (bool, shape [param.shape[0]]) is True, and the same entries of
        ``bias``. Replaces what was frozen for ``param`` before; no True row unfreezes it. ``key`` names it in
        ``state_dict`` (default: its name in ``model``). Syncs once with the device (the row indices)."""
        if rows.dtype != torch.bool or rows.dim() != 1 or rows.shape[0] != param.shape[0]:
            raise ValueError(f"rows must be a bool tensor of shape [{param.shape[0]}], got {rows.dtype} "
                             f"{tuple(rows.shape)}")
        if bias is not None and tuple(bias.shape) != (param.shape[0],):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not match {param.shape[0]} rows")
        self._entries.pop(id(param), None)
        rows = rows.detach().to("cpu").clone()
        count = int(rows.sum())
        if count:
            names = self._names()
            key = key if key is not None else names.get(id(param))
            bias_key = None
            if bias is not None:
                bias_key = names.get(id(bias))
                if bias_key is None and key is not None and key.endswith("weight"):
                    bias_key = key[: -len("weight")] + "bias"
            idx = rows.nonzero().squeeze(1).to(param.device)
            self._entries[id(param)] = _Frozen(param, rows, idx, count, bias, key, bias_key)
        self._rebuild()

    def unfreeze(self, param: Tensor) -> None:
        self._entries.pop(id(param), None)
        self._rebuild()

    def clear(self) -> None:
        """Unfreeze everything (NEq: before the next epoch's set is computed)."""
        self._entries.clear()
        self._rebuild()

    def frozen_count(self) -> int:
        """Number of frozen neurons (rows of frozen weights; a bias frozen with its weight adds none)."""
        return sum(e.count for e in self._entries.values())

    def frozen(self) -> dict[str, Tensor]:
        """Frozen rows by key (bool, CPU); entries without a key are listed under ``str(id(weight))``."""
        return {e.key if e.key is not None else str(id(e.weight)): e.rows for e in self._entries.values()}

    def __bool__(self) -> bool:
        return bool(self._targets)

    def _names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.model.named_parameters()} if self.model is not None else {}

    def _rebuild(self) -> None:
        targets, seen = [], set()
        for e in self._entries.values():
            for t in (e.weight, e.bias):
                if t is None:
                    continue
                if id(t) in seen:
                    raise ValueError("a tensor is frozen twice (as a weight and as another weight's bias?)")
                seen.add(id(t))
                targets.append((t, e.idx))
        self._targets = targets
        self._slots.clear()
        self._pending = None

    # -- around the optimizer step ---------------------------------------------------------------------------------
    def zero_grads(self) -> None:
        """Zero the frozen rows' gradients (optional: for gradient clipping or norms that should ignore them, and
        for NEq's count of skipped work; the freeze itself does not need it)."""
        for t, idx in self._targets:
            if t.grad is not None:
                t.grad.index_fill_(0, idx, 0)

    @torch.no_grad()
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Snapshot the frozen rows of each frozen parameter and of its optimizer state tensors."""
        if not self._targets:
            return
        pending = []
        for i, (t, idx) in enumerate(self._targets):
            saved: dict[Any, _Slot] = {None: self._slot(i, None, t, idx).take()}
            state = optimizer.state.get(t)
            if state:
                for k, v in state.items():
                    if isinstance(v, Tensor) and v.shape == t.shape:
                        saved[k] = self._slot(i, k, v, idx).take()
            pending.append((t, idx, saved))
        self._pending = pending

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Write the snapshots back; zero the frozen rows of state tensors the step created."""
        if not self._targets:
            return
        if self._pending is None:
            raise RuntimeError("NeuronFreezer.after_step without before_step")
        pending, self._pending = self._pending, None
        for t, idx, saved in pending:
            saved[None].put(t)
            state = optimizer.state.get(t)
            if state:
                for k, v in state.items():
                    if isinstance(v, Tensor) and v.shape == t.shape:
                        slot = saved.get(k)
                        if slot is None:
                            v.index_fill_(0, idx, 0)
                        else:
                            slot.put(v)

    def _slot(self, i: int, k: Any, src: Tensor, idx: Tensor) -> _Slot:
        slot = self._slots.get((i, k))
        if slot is None or slot.src is not src or slot.stride != src.stride() or slot.dtype != src.dtype:
            slot = self._slots[(i, k)] = _Slot(src, idx)
        return slot

    # -- persistence and rebuilding ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict[str, Any]]:
        """``{key: {"rows": bool CPU tensor, "bias": bias key or None}}``."""
        out = {}
        for e in self._entries.values():
            if e.key is None or (e.bias is not None and e.bias_key is None):
                raise ValueError("state_dict needs a key for every frozen weight and bias: pass key= (a name "
                                 "ending in 'weight' names its bias too) or give the freezer the model")
            out[e.key] = {"rows": e.rows.clone(), "bias": e.bias_key if e.bias is not None else None}
        return out

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]],
                        params: Mapping[str, Tensor] | None = None) -> None:
        """Replace what is frozen by ``state``, looking parameters up by key in ``params`` (default: the model's
        named parameters). A key that is missing raises KeyError; rows of the wrong length raise ValueError."""
        params = self._params(params)
        self._entries.clear()
        for key, item in state.items():
            bias_key = item.get("bias")
            self.freeze(params[key], item["rows"], bias=params[bias_key] if bias_key else None, key=key)
        self._rebuild()

    def remap(self, params: Mapping[str, Tensor] | None = None, keep: Mapping[str, Tensor] | None = None) -> None:
        """Re-point every frozen entry to the parameter of the same key in ``params`` (default: the model's named
        parameters, read now), after the model was rebuilt. ``keep[key]`` (long indices or a bool mask over the old
        rows) says which old rows the new parameter's rows are, for a layer that lost neurons. Entries whose key is
        no longer there are dropped (the layer is gone)."""
        params = self._params(params)
        old = self.state_dict()
        self._entries.clear()
        for key, item in old.items():
            if key not in params:
                continue
            rows = item["rows"]
            if keep is not None and key in keep:
                rows = rows[keep[key].to("cpu")]
            bias_key = item["bias"]
            bias = params.get(bias_key) if bias_key else None
            self.freeze(params[key], rows, bias=bias, key=key)
        self._rebuild()

    def _params(self, params: Mapping[str, Tensor] | None) -> Mapping[str, Tensor]:
        if params is not None:
            return params
        if self.model is None:
            raise ValueError("pass params= (name -> parameter) or give the freezer the model")
        return dict(self.model.named_parameters())
