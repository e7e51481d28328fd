"""Per-call-site access to a model's pre-activations and activations during a forward pass.

What it is for:

- SeReNe (thesis eq. 2.3-2.8): a neuron's sensitivity needs its output and the gradient of the network output with
  respect to it: ``keep_graph=True`` keeps the recorded tensors in the graph and calls ``retain_grad()`` on them,
  so after ``logits.sum().backward()`` each ``recorder.pre[site].grad`` / ``post[site].grad`` is d(sum of logits)/d
  that tensor (the lower bound of eq. 2.5 is the mean of its absolute value over batch and spatial positions).
  SeReNe takes it at the module output before BN/ReLU: pass the Linear/Conv names as ``sites`` (``pre`` is then
  that output); "auto" gives the rectifier's input, which is the BatchNorm output in conv nets.
- NEq (sec. 2.7): per-neuron outputs on a fixed validation subset, epoch after epoch, for the velocities:
  ``capture(reduce=Concat)`` keeps them for every batch of the subset.
- NEPENTHE / activation entropy (eq. 2.16): the sign of each rectifier's input, counted per neuron over samples and
  positions: ``capture(reduce=lambda: NeuronMean(transform=lambda z: z > 0), record=("pre",))`` gives p_on.

Sites. ``sites="auto"`` records every activation *module* (:data:`ACTIVATION_TYPES`): ``pre`` is its input,
``post`` its output. ``sites=[names]`` records the named modules instead, of any type: an activation module as
above, any other module (Linear, Conv, BatchNorm...) with ``pre`` = its output and ``post`` the same tensor (no
non-linearity follows inside that module). A module called k times in one forward gives k sites, ``name``,
``name#1``, ..., ``name#{k-1}`` in call order; the counters restart at each call of ``model`` itself (and at
``capture()``), so every forward of ``model`` yields the same site names. torchvision's ResNets call one ``relu``
module twice per BasicBlock (``layer1.0.relu`` after bn1, ``layer1.0.relu#1`` after the residual add) and three
times per Bottleneck: each call is its own layer, never a merged tensor.

Functional calls (``F.relu(x)``, ``torch.relu(x)``, ``x.relu()``) inside a ``forward`` are invisible to module
hooks, so "auto" misses them; record the Linear/Conv (or BatchNorm) modules that feed them by name instead. No
model under ``regstory/models`` calls one at the time of writing (every rectifier there is a module; the option-A
shortcut uses only ``F.pad``); the torchvision ResNets (``resnet50``, ``resnet101``, ``resnet18_debias``) reuse one
module per block, which the ``#k`` sites cover.

In-place modules: while capturing, every submodule with ``inplace=True`` (torchvision's ``ReLU(inplace=True)``,
in-place Dropout...) runs out of place, so a recorded input is not overwritten by its own activation; the flag is
restored on exit. The numbers are the same, memory is a little higher during the capture. A recorded tensor that
the forward still modifies in place afterwards (``out += identity`` on a BatchNorm output in torchvision's blocks,
if that BatchNorm is a site) is detected by its version counter and raises on exit rather than returning a changed
tensor: record a module whose output is not modified in place.

Cost: no hook exists outside ``capture()``. Inside, the default stores detached views of the tensors the forward
computes anyway: no copy, no transfer to the host, no ``.item()``, so a GPU keeps queuing work. Hooks are removed and
``inplace`` flags restored on exit, also when the forward raises. Works under ``torch.no_grad()`` (``keep_graph``
then has nothing to keep), in train and eval mode, and with channels-last inputs (tensors keep their layout).
Capture the eager model, not a ``torch.compile``'d wrapper (hooks there force recompiles or are not seen).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

#: the module types "auto" records: element-wise non-linearities (Softmax, which mixes neurons, is not one)
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.LogSigmoid,
    nn.Tanhshrink, nn.Threshold,
)

KINDS = ("pre", "post")


class Accumulator(Protocol):
    """What a ``reduce`` factory returns: one per (site, kind); ``update`` sees each forward's tensor (detached)."""

    def update(self, t: Tensor) -> None: ...

    def result(self) -> Tensor: ...


class NeuronMean:
    """Per-neuron mean over every dimension but ``dim`` (batch and spatial positions), over all forwards of a capture.

    ``dim=1`` is the neuron axis of Linear ([N, C]) and Conv ([N, C, ...]) outputs; pass ``dim=-1`` for
    token-major [N, T, C] outputs. ``transform`` is applied first, e.g. ``lambda z: z > 0`` gives the fraction of
    ON states of eq. 2.16. Sums are accumulated in float64 on the tensor's device (no sync); ``result()`` is
    float32 of shape [C]."""

    def __init__(self, dim: int = 1, transform: Callable[[Tensor], Tensor] | None = None):
        self.dim = dim
        self.transform = transform
        self.total: Tensor | None = None
        self.count = 0

    def update(self, t: Tensor) -> None:
        if self.transform is not None:
            t = self.transform(t)
        dim = self.dim % t.dim()
        other = [d for d in range(t.dim()) if d != dim]
        t = t if t.dtype == torch.float64 else t.float()  # half/bf16/bool: summed in float32, accumulated in float64
        part = t.sum(other).double() if other else t.double()
        self.total = part if self.total is None else self.total + part
        self.count += t.numel() // t.shape[dim]

    def result(self) -> Tensor:
        if self.total is None:
            raise RuntimeError("NeuronMean: nothing was recorded")
        return (self.total / self.count).float()


class Concat:
    """Every forward's tensor, concatenated along the batch dimension (NEq's outputs on a fixed validation subset)."""

    def __init__(self, dim: int = 0):
        self.dim = dim
        self.parts: list[Tensor] = []

    def update(self, t: Tensor) -> None:
        self.parts.append(t)

    def result(self) -> Tensor:
        return torch.cat(self.parts, self.dim)


def activation_sites(model: nn.Module, types: tuple[type[nn.Module], ...] = ACTIVATION_TYPES) -> list[str]:
    """Qualified names of the activation modules of ``model`` (what "auto" hooks; sites are these plus ``#k``)."""
    return [name for name, m in model.named_modules() if isinstance(m, types)]


class ActivationRecorder:
    """Records pre-activations and activations of ``model`` per call site, inside :meth:`capture` only.

    ``recorder.pre[site]``: input of the non-linearity (or output of a non-activation module named in ``sites``);
    ``recorder.post[site]``: its output. ``recorder.sites`` lists the sites of the last capture in call order. The
    dictionaries are emptied when a capture starts; without ``reduce`` they hold the last forward's tensors.

    ``keep_graph=True`` (SeReNe): tensors keep their autograd history and ``retain_grad()`` is called on each that
    requires grad, so after a backward through the forward ``pre[site].grad`` and ``post[site].grad`` hold the
    gradients of the backward's root with respect to them. Default: detached views.
    """

    def __init__(self, model: nn.Module, sites: str | Sequence[str] = "auto", keep_graph: bool = False,
                 types: tuple[type[nn.Module], ...] = ACTIVATION_TYPES):
        if isinstance(sites, str) and sites != "auto":
            raise ValueError(f"sites={sites!r}: pass 'auto' or a list of module names")
        self.model = model
        self.site_spec = sites
        self.keep_graph = keep_graph
        self.types = types
        self.pre: dict[str, Tensor] = {}
        self.post: dict[str, Tensor] = {}
        self.sites: list[str] = []
        self._capturing = False

    def _modules(self) -> list[tuple[str, nn.Module]]:
        """The hooked modules, resolved now (the model may have changed since the recorder was made)."""
        if self.site_spec == "auto":
            return [(n, m) for n, m in self.model.named_modules() if isinstance(m, self.types)]
        named = dict(self.model.named_modules())
        missing = [n for n in self.site_spec if n not in named]
        if missing:
            raise KeyError(f"no module named {missing} in {type(self.model).__name__}")
        return [(n, named[n]) for n in self.site_spec]

    @contextlib.contextmanager
    def capture(self, reduce: Callable[[], Accumulator] | None = None,
                record: Sequence[str] = KINDS) -> Iterator[ActivationRecorder]:
        """Hook the sites for the duration of the block. ``reduce``: a zero-argument factory (e.g. ``NeuronMean``,
        ``Concat``) whose accumulator sees every forward's detached tensor; on exit ``pre``/``post`` hold its
        ``result()`` instead of the last tensor. ``record``: which of "pre"/"post" to keep."""
        if self._capturing:
            raise RuntimeError("ActivationRecorder.capture() is already active")
        if reduce is not None and self.keep_graph:
            raise ValueError("reduce= summarises detached tensors: it cannot be combined with keep_graph=True")
        unknown = set(record) - set(KINDS)
        if unknown:
            raise ValueError(f"record={tuple(record)}: only {KINDS}")
        keep_pre, keep_post = "pre" in record, "post" in record
        self.pre, self.post, self.sites = {}, {}, []
        calls: dict[str, int] = {}
        versions: dict[tuple[str, str], tuple[Tensor, int]] = {}
        accs: dict[tuple[str, str], Accumulator] = {}
        seen: set[str] = set()
        aliased: set[str] = set()  # sites of non-activation modules: post is pre

        def store(kind: str, site: str, t: Tensor) -> None:
            if reduce is not None:
                acc = accs.get((kind, site))
                if acc is None:
                    acc = accs[(kind, site)] = reduce()
                acc.update(t.detach())
                return
            if self.keep_graph:
                if t.requires_grad:
                    t.retain_grad()
            else:
                t = t.detach()
            (self.pre if kind == "pre" else self.post)[site] = t
            versions[(kind, site)] = (t, t._version)

        def make_hook(name: str, is_activation: bool):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                k = calls.get(name, 0)
                calls[name] = k + 1
                site = name if k == 0 else f"{name}#{k}"
                if site not in seen:
                    seen.add(site)
                    self.sites.append(site)
                if not isinstance(output, Tensor):
                    raise TypeError(f"site {site}: the output of {type(module).__name__} is not a tensor")
                if is_activation:
                    if keep_pre and args and isinstance(args[0], Tensor):
                        store("pre", site, args[0])
                    if keep_post:
                        store("post", site, output)
                else:  # a Linear/Conv/...: its output is the pre-activation; post is the same tensor (aliased below)
                    aliased.add(site)
                    store("pre", site, output)
            return hook

        handles = [self.model.register_forward_pre_hook(lambda module, args: calls.clear())]
        inplace = [m for m in self.model.modules() if getattr(m, "inplace", None) is True]
        self._capturing = True
        try:
            for m in inplace:
                m.inplace = False
            for name, m in self._modules():
                handles.append(m.register_forward_hook(make_hook(name, isinstance(m, self.types))))
            yield self
        finally:
            for h in handles:
                h.remove()
            for m in inplace:
                m.inplace = True
            self._capturing = False
        for (kind, site), (t, version) in versions.items():
            if t._version != version:
                raise RuntimeError(f"{kind}[{site!r}] was modified in place later in the forward (e.g. `out += "
                                   "identity`): it no longer holds what the site computed; record another module")
        for (kind, site), acc in accs.items():
            (self.pre if kind == "pre" else self.post)[site] = acc.result()
        for site in aliased:
            if keep_post:
                self.post[site] = self.pre[site]
            if not keep_pre:
                del self.pre[site]
