"""Simplification of a pruned model to a smaller dense one computing the same function (thesis sec. 2.3: LOBSTER /
SeReNe's "simplified topology"; Table 2.1), for any net built from the layers below, traced with ``torch.fx``.

**Channel spaces.** Every tensor has its channels (features) on dim 1. A Conv or Linear output opens a channel
space; per-channel ops keep it (BatchNorm, element-wise activations, Dropout, Identity, max / average / adaptive
pools, flattening a ``[N, C, H, W]`` map, which gives feature ``c*H*W + s`` to channel ``c``); an addition puts its
operands' spaces into one *group*, which keeps residual sums aligned. The option-A
:class:`~regstory.models.resnet_cifar.ZeroPadShortcut` maps its input channels to output positions and adds zero
channels. Whatever else touches channels (concatenation, a product of two tensors, grouped convolutions, a reshape
that mixes channels, layer / group norms, any other function) raises :class:`SimplificationError`.

**Constants.** In eval mode, a channel may be the same constant for every input and position: a Conv / Linear
output whose incoming weights are all zero is its bias; a Linear or an unpadded Conv whose non-zero weights read
only constant channels is constant too; BatchNorm (running statistics), activations, pools and additions map the
constants on.

**What is removed, and why it is exact.** Channel ``c`` of a group goes when every read of it ends nowhere: each
Conv / Linear reading a tensor of the group either has all-zero weights on ``c``, or reads a constant ``v`` there
and absorbs it into its bias (``bias += sum of W[:, c-columns] * v``; a Linear or an unpadded Conv can, a Conv with
zero padding only when ``v == 0``, since its borders would see the padding instead of ``v``). A read by an output
row that goes itself does not count, so a unit that only feeds removed units goes too. A ZeroPadShortcut's read is
fine when its output position goes too, or when the channel is the constant 0 (the padding gives the same). The
model's input and output are never reduced; a group with nothing left keeps one channel. Removing ``c`` slices the
producers' rows, the BatchNorm features, the consumers' columns (all ``H*W`` of them after a flatten) and the
shortcuts' positions. Every removed value was either never read or is replaced by the bias it adds, so the smaller
model computes the same function in eval mode, up to float rounding. A consumer that absorbs a constant and had no
bias gains one: the simplified model may have a few more bias parameters, and those biases have no source in the
:class:`ModelChange` (new tensors: fresh optimizer state, no mask). Biases that absorb constants keep their source
but not their values.

:func:`fold_batchnorm` folds each BatchNorm into the Conv / Linear before it (eval semantics); the deploy model of
Table 2.1 is ``fold_batchnorm(simplify(model, shape)[0], shape)``.

**Why not Torch-Pruning.** Torch-Pruning's ``DependencyGraph`` (it traces the model, groups the channels coupled by
residual additions and concatenations, and removes the chosen indices from every layer of a group) is the
well-kept library for physical channel removal. It only removes indices, though: it does not propagate the
constant outputs of dead units into the next bias, which is what makes removing units with no incoming weights
exact; it gives no old -> new index map to carry optimizer state and masks; and it does not know the parameter-free
option-A channel pad without a custom pruner. The fx graph below covers the shipped architectures without
another dependency.

Tracing records the value of every node for a zero input of shape ``(1, *input_shape)`` as it goes (so shapes are
plain integers and shape-dependent Python, like the residual MLP's ``out.shape == x.shape``, traces; value-dependent
control flow cannot). The model is traced in eval mode and its train / eval flags are restored after.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import operator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from regstory.models.resnet_cifar import ZeroPadShortcut
from regstory.surgery import ModelChange, _replace, _sliced, _sliced_norm, _tensor_names

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: element-wise modules: the constants go through the module itself
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
               nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign, nn.LogSigmoid)
#: modules that keep each channel's constant as it is (eval mode)
KEEPERS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
           nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
           nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
#: element-wise functions and methods, and the arithmetic that sums operands or shifts / scales by a number
FUNCTIONS = {F.relu, torch.relu, F.relu6, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, torch.tanh, F.tanh,
             torch.sigmoid, F.sigmoid, F.hardtanh, F.hardsigmoid, F.hardswish, F.softplus, F.softsign, F.leaky_relu,
             F.logsigmoid, operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub,
             operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div, operator.neg}
METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "add", "add_", "sub", "sub_", "mul", "mul_",
           "div", "div_", "neg", "contiguous", "clone"}
#: functions that keep each channel's constant (eval mode)
KEEPING_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
                     F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                     F.adaptive_max_pool2d, F.adaptive_max_pool3d}
FLATTENS = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
PRODUCTS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div,
            "mul", "mul_", "div", "div_"}


class SimplificationError(ValueError):
    """The model uses an operation that the channel analysis cannot follow (the message names the node)."""


# -- tracing with values ---------------------------------------------------------------------------------------------
class _ValueProxy(fx.Proxy):
    """A proxy whose shape is the concrete shape of the traced zero input's value at that node."""

    @property
    def shape(self) -> torch.Size:
        return self.node.meta["value"].shape

    @property
    def ndim(self) -> int:
        return self.node.meta["value"].dim()

    def size(self, dim: int | None = None):
        value = self.node.meta["value"]
        return value.size() if dim is None else value.size(dim)

    def dim(self) -> int:
        return self.node.meta["value"].dim()

    def __len__(self) -> int:
        return len(self.node.meta["value"])


class _ValueTracer(fx.Tracer):
    """``torch.fx`` tracer that also runs each recorded op on the values of a zero input (``node.meta["value"]``):
    the shape information ShapeProp would add afterwards, available while tracing. ZeroPadShortcut is a leaf."""

    def __init__(self, example: Tensor):
        super().__init__()
        self.example = example

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ZeroPadShortcut) or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.computing = True  # while a value is computed, module attributes are the real tensors, not proxies
        try:
            proxy.node.meta["value"] = self._value(proxy.node)
        finally:
            self.computing = False
        return proxy

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if getattr(self, "computing", False):
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _value(self, node: fx.Node):
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["value"])
        if node.op == "placeholder":  # the first input is the example, others keep their concrete value
            first = not any(n.op == "placeholder" for n in node.graph.nodes if n is not node)
            return self.example if first else (args[0] if args else None)
        if node.op == "get_attr":
            return functools.reduce(getattr, node.target.split("."), self.root)
        if node.op == "call_module":  # forward, not __call__: the tracer patches module calls while it runs
            return self.root.get_submodule(node.target).forward(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the duration; every module's train / eval flag restored after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _trace(model: nn.Module, input_shape: Sequence[int]) -> fx.Graph:
    """The fx graph of ``model`` (in eval mode) with each node's value for a zero input of ``(1, *input_shape)``.
    Keyword parameters of ``forward`` after the input are fixed at their defaults (``return_features=False``)."""
    parameter = next(iter(model.parameters()), None)
    example = torch.zeros(1, *input_shape, device=parameter.device if parameter is not None else "cpu",
                          dtype=parameter.dtype if parameter is not None else torch.float32)
    extra = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in extra if p.default is not inspect.Parameter.empty}
    try:
        return _ValueTracer(example).trace(model, concrete_args=concrete or None)
    except fx.proxy.TraceError as error:
        raise SimplificationError(f"simplification cannot trace {type(model).__name__}: {error}") from None


# -- the channel analysis --------------------------------------------------------------------------------------------
@dataclass
class _Space:
    """What the analysis knows of one tensor: its channel group, its channels and features per channel along dim 1,
    and which channels are the same constant for every input and position (``value``, 0 elsewhere)."""

    group: int
    channels: int
    expand: int
    const: Tensor
    value: Tensor


@dataclass
class _Graph:
    """The traced model: a :class:`_Space` per tensor node, the union-find of channel groups, the groups that may not
    shrink (input, output) and the nodes that change when channels go."""

    model: nn.Module
    spaces: dict[fx.Node, _Space] = field(default_factory=dict)
    parent: list[int] = field(default_factory=list)
    frozen: set[int] = field(default_factory=set)
    layers: list[fx.Node] = field(default_factory=list)
    norms: list[fx.Node] = field(default_factory=list)
    shortcuts: dict[fx.Node, Tensor] = field(default_factory=dict)  # node -> output position per input channel

    def new_group(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def root(self, group: int) -> int:
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def unite(self, a: int, b: int) -> None:
        self.parent[self.root(a)] = self.root(b)

    def group_of(self, node: fx.Node) -> int:
        return self.root(self.spaces[node].group)

    def module(self, node: fx.Node) -> nn.Module:
        return self.model.get_submodule(node.target)


def _describe(node: fx.Node, model: nn.Module) -> str:
    if node.op == "call_module":
        return f"{type(model.get_submodule(node.target)).__name__} '{node.target}'"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "get_attr":
        return f"tensor attribute '{node.target}'"
    target = node.target
    return f"{getattr(target, '__module__', None) or ''}.{getattr(target, '__name__', target)}".lstrip(".")


def _cannot(node: fx.Node, model: nn.Module, why: str = "") -> SimplificationError:
    return SimplificationError(f"simplification cannot express {_describe(node, model)} at {node.name}"
                               + (f" ({why})" if why else ""))


def _analyse(model: nn.Module, input_shape: Sequence[int]) -> _Graph:
    """Trace ``model`` and follow every channel from producer to reader, or raise :class:`SimplificationError`."""
    with _evaluating(model):
        graph = _trace(model, input_shape)
        out = _Graph(model)
        output = next(n for n in graph.nodes if n.op == "output")
        needed = _ancestors(output)
        _refuse_shared_modules(graph, model)
        for node in graph.nodes:
            if node.op == "output":
                fx.node.map_arg(node.args, lambda n: out.frozen.add(out.group_of(n)) if n in out.spaces else None)
            elif node.op == "placeholder":
                if not out.spaces and isinstance(node.meta["value"], Tensor):
                    _open(out, node, frozen=True)
            elif node in needed or (node.op == "call_module" and _has_state(out.module(node))):
                _visit(out, node)
        out.frozen = {out.root(g) for g in out.frozen}
    return out


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """The nodes ``node`` depends on (the rest, e.g. asserts on fixed keyword arguments, is skipped)."""
    seen, stack = set(), [node]
    while stack:
        for n in stack.pop().all_input_nodes:
            if n not in seen:
                seen.add(n)
                stack.append(n)
    return seen


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _refuse_shared_modules(graph: fx.Graph, model: nn.Module) -> None:
    """A module with weights (or a shortcut) called at two places would need two slicings."""
    seen: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = model.get_submodule(node.target)
        if node.target in seen and (_has_state(module) or isinstance(module, ZeroPadShortcut)):
            raise _cannot(node, model, f"called again after {seen[node.target].name}")
        seen.setdefault(node.target, node)


def _open(graph: _Graph, node: fx.Node, frozen: bool = False, const: Tensor | None = None,
          value: Tensor | None = None) -> _Space:
    """A new channel space for ``node`` (a producer, the input, a shortcut's output)."""
    tensor = node.meta["value"]
    channels = tensor.shape[1]
    group = graph.new_group()
    if frozen:
        graph.frozen.add(group)
    none = torch.zeros(channels, dtype=torch.bool, device=tensor.device)
    space = _Space(group, channels, 1, none if const is None else const,
                   torch.zeros(channels, device=tensor.device, dtype=tensor.dtype) if value is None else value)
    graph.spaces[node] = space
    return space


def _visit(graph: _Graph, node: fx.Node) -> None:
    """Record what ``node`` does to channels, or raise."""
    model = graph.model
    if node.op == "call_module":
        module = graph.module(node)
        if isinstance(module, LAYERS):
            return _layer(graph, node, module)
        if isinstance(module, NORMS):
            return _norm(graph, node, module)
        if isinstance(module, ZeroPadShortcut):
            return _shortcut(graph, node, module)
        if isinstance(module, nn.Flatten):
            return _flatten(graph, node)
        if isinstance(module, ACTIVATIONS):
            return _channelwise(graph, node, lambda x: module(x))
        if isinstance(module, KEEPERS):
            return _channelwise(graph, node, None)
        if isinstance(module, AVG_POOLS):  # zero padding counted in the average shades the borders
            keeps = module.count_include_pad is False or not any(_tuple(module.padding))
            return _channelwise(graph, node, None, zero_only=not keeps)
        raise _cannot(node, model)
    if node.op in ("call_function", "call_method"):
        target = node.target
        if target in FLATTENS:
            return _flatten(graph, node)
        if target in KEEPING_FUNCTIONS:
            return _channelwise(graph, node, None)
        if target in FUNCTIONS or target in METHODS:
            if target in PRODUCTS and sum(isinstance(a, fx.Node) for a in node.args) > 1:
                raise _cannot(node, model, "a product of two tensors")
            return _channelwise(graph, node, lambda *a, **k: _call(node, *a, **k), generic=True)
    raise _cannot(node, model)


def _call(node: fx.Node, *args, **kwargs):
    return getattr(args[0], node.target)(*args[1:], **kwargs) if node.op == "call_method" else \
        node.target(*args, **kwargs)


def _tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _input(graph: _Graph, node: fx.Node) -> _Space:
    source = node.args[0] if node.args else None
    if source not in graph.spaces:
        raise _cannot(node, graph.model, "its input is not a traced tensor")
    return graph.spaces[source]


def _columns(layer: nn.Module, space: _Space) -> Tensor:
    """``layer``'s weight as ``[out, channels, columns per channel]`` over the channels of its input space."""
    return layer.weight.reshape(layer.weight.shape[0], space.channels, -1)


def _pads_with_zeros(layer: nn.Module) -> bool:
    """Whether a border output of ``layer`` reads zero padding instead of input values."""
    if isinstance(layer, nn.Linear) or layer.padding_mode != "zeros":
        return False
    if isinstance(layer.padding, str):
        return layer.padding == "same" and any(k > 1 for k in layer.kernel_size)
    return any(p > 0 for p in layer.padding)


def _absorbs(layer: nn.Module, space: _Space) -> Tensor:
    """Per input channel: a constant there can go into ``layer``'s bias (everywhere unless zero padding, else 0)."""
    return space.const & (space.value.eq(0) | (not _pads_with_zeros(layer)))


def _layer(graph: _Graph, node: fx.Node, layer: nn.Module) -> None:
    """A Conv / Linear reads its input's channels and opens a space; output ``j`` is constant when every channel it
    reads with a non-zero weight is a constant it can absorb."""
    source = _input(graph, node)
    value = node.args[0].meta["value"]
    if isinstance(layer, nn.Linear) and value.dim() != 2:
        raise _cannot(node, graph.model, "a Linear on more than [batch, features]")
    if not isinstance(layer, nn.Linear) and (layer.groups != 1 or source.expand != 1):
        raise _cannot(node, graph.model, "grouped convolution" if layer.groups != 1 else "a flattened input")
    columns = _columns(layer, source)
    live = columns.ne(0).any(-1)
    const = ~(live & ~_absorbs(layer, source)).any(1)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(const, dtype=columns.dtype)
    value = bias + columns.sum(-1) @ torch.where(source.const, source.value, 0)
    _open(graph, node, const=const, value=torch.where(const, value, 0))
    graph.layers.append(node)


def _norm(graph: _Graph, node: fx.Node, norm: nn.Module) -> None:
    """BatchNorm: per channel; constants go through the running statistics (none without them)."""
    source = _input(graph, node)
    if source.expand != 1:
        raise _cannot(node, graph.model, "a BatchNorm of flattened features")
    apply = (lambda x: norm(x)) if norm.track_running_stats and norm.running_mean is not None else None
    _channelwise(graph, node, apply, drop=apply is None)
    graph.norms.append(node)


def _channelwise(graph: _Graph, node: fx.Node, apply, zero_only: bool = False, drop: bool = False,
                 generic: bool = False) -> None:
    """An op that keeps the channel space of its tensor operands (all in one group after it) and maps constants with
    ``apply`` (None: unchanged). ``generic``: ``apply`` takes the node's arguments, tensors replaced by constants."""
    operands = [a for a in node.all_input_nodes]
    if any(a not in graph.spaces for a in operands) or not operands:
        raise _cannot(node, graph.model, "an operand is not a traced tensor")
    spaces = [graph.spaces[a] for a in operands]
    first, out = spaces[0], node.meta["value"]
    for a, space in zip(operands, spaces):
        if (space.channels, space.expand) != (first.channels, first.expand) or \
                a.meta["value"].shape[1] != out.shape[1] or a.meta["value"].dim() != out.dim():
            raise _cannot(node, graph.model, "it changes or broadcasts the channels")
        graph.unite(space.group, first.group)
    const = functools.reduce(operator.and_, [s.const for s in spaces])
    value = first.value
    if apply is not None:
        shape = (1, first.channels * first.expand) + (1,) * (out.dim() - 2)

        def constants(space: _Space) -> Tensor:
            return torch.where(const, space.value, 0).repeat_interleave(space.expand).reshape(shape).clone()

        if generic:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: constants(graph.spaces[n]))
            mapped = apply(*args, **kwargs)
        else:
            mapped = apply(constants(first))
        value = mapped.reshape(first.channels, first.expand)[:, 0]
        const = const & value.isfinite()
    if zero_only:
        const = const & value.eq(0)
    if drop:
        const = torch.zeros_like(const)
    graph.spaces[node] = _Space(first.group, first.channels, first.expand, const, torch.where(const, value, 0))


def _flatten(graph: _Graph, node: fx.Node) -> None:
    """``[N, C, *spatial] -> [N, C * prod(spatial)]``: the same channels, ``prod(spatial)`` features each."""
    source = _input(graph, node)
    before, after = node.args[0].meta["value"].shape, node.meta["value"].shape
    if len(after) != 2 or after[0] != before[0] or after[1] != math.prod(before[1:]):
        raise _cannot(node, graph.model, f"a reshape from {tuple(before)} to {tuple(after)}")
    expand = source.expand * math.prod(before[2:])
    graph.spaces[node] = _Space(source.group, source.channels, expand, source.const, source.value)


def _shortcut(graph: _Graph, node: fx.Node, shortcut: ZeroPadShortcut) -> None:
    """Option-A shortcut: a new space whose padded channels are the constant 0 and the others copy the input's."""
    source = _input(graph, node)
    positions = torch.tensor(shortcut.placement(source.channels), dtype=torch.long, device=source.const.device)
    channels = node.meta["value"].shape[1]
    placed = positions >= 0
    const = torch.ones(channels, dtype=torch.bool, device=positions.device)
    value = torch.zeros(channels, dtype=source.value.dtype, device=positions.device)
    const[positions[placed]] = source.const[placed]
    value[positions[placed]] = source.value[placed]
    _open(graph, node, const=const, value=value)
    graph.shortcuts[node] = positions


# -- the decision ----------------------------------------------------------------------------------------------------
def _removable(graph: _Graph) -> dict[int, Tensor]:
    """Per group root, the channels that can go (see the module docstring). A greatest fixed point, starting from
    "everything goes": a read by a row that goes itself does not count, a shortcut's read depends on whether its
    output position goes, and a group with nothing left keeps channel 0; each pass only takes removals back."""
    removable: dict[int, Tensor] = {}
    for space in graph.spaces.values():
        root = graph.root(space.group)
        if root not in removable:
            removable[root] = torch.full_like(space.const, root not in graph.frozen)
    reads = []  # (input group, output group, [out, in] non-zero weights, constants absorbed per input channel)
    for node in graph.layers:
        layer, source = graph.module(node), graph.spaces[node.args[0]]
        reads.append((graph.root(source.group), graph.group_of(node), _columns(layer, source).ne(0).any(-1),
                      _absorbs(layer, source)))
    while True:
        before = [mask.clone() for mask in removable.values()]
        for group, rows, live, absorbed in reads:
            read = (live & ~removable[rows][:, None]).any(0)
            removable[group] &= ~read | absorbed
        for node, positions in graph.shortcuts.items():
            source = graph.spaces[node.args[0]]
            gone_after = removable[graph.group_of(node)][positions.clamp(min=0)] | (positions < 0)
            removable[graph.root(source.group)] &= gone_after | (source.const & source.value.eq(0))
        for mask in removable.values():
            if mask.all():
                mask[0] = False
        if all(torch.equal(a, b) for a, b in zip(before, removable.values())):
            return removable


# -- building the smaller model --------------------------------------------------------------------------------------
def _kept(removable: Tensor) -> Tensor | None:
    """The indices kept, or None when all are."""
    return None if not removable.any() else torch.nonzero(~removable).flatten()


def _expanded(index: Tensor | None, expand: int) -> Tensor | None:
    """Channel indices -> feature indices of a flattened tensor (``expand`` features per channel)."""
    if index is None or expand == 1:
        return index
    return (index[:, None] * expand + torch.arange(expand, device=index.device)).flatten()


def _absorbed(layer: nn.Module, source: _Space, gone: Tensor) -> Tensor:
    """What the removed constant input channels of ``layer`` added to each output: its bias gains this."""
    taken = gone & source.const
    return _columns(layer, source).sum(-1)[:, taken] @ source.value[taken]


def _rebuild_layer(graph: _Graph, new: nn.Module, node: fx.Node, removable: dict[int, Tensor],
                   sources: dict) -> None:
    layer, name = graph.module(node), node.target
    source = graph.spaces[node.args[0]]
    gone = removable[graph.root(source.group)]
    out_keep = _kept(removable[graph.group_of(node)])
    in_keep = _expanded(_kept(gone), source.expand)
    if out_keep is None and in_keep is None:
        return
    fresh = _sliced(layer, out_keep=out_keep, in_keep=in_keep)
    fresh.weight.requires_grad_(layer.weight.requires_grad)
    shift = _absorbed(layer, source, gone)
    shift = shift if out_keep is None else shift[out_keep]
    if layer.bias is not None:
        fresh.bias.requires_grad_(layer.bias.requires_grad)
        fresh.bias.add_(shift)
    elif shift.ne(0).any():
        fresh.bias = nn.Parameter(shift.clone())
    _replace(new, name, fresh)
    sources[f"{name}.weight"] = (f"{name}.weight", (out_keep, in_keep))
    if layer.bias is not None:
        sources[f"{name}.bias"] = (f"{name}.bias", (out_keep,))


def _rebuild_norm(graph: _Graph, new: nn.Module, node: fx.Node, removable: dict[int, Tensor],
                  sources: dict) -> None:
    keep = _kept(removable[graph.group_of(node)])
    if keep is None:
        return
    norm = graph.module(node)
    _replace(new, node.target, _sliced_norm(norm, keep))
    for key, tensor in norm.state_dict().items():
        if tensor.dim() == 1:
            sources[f"{node.target}.{key}"] = (f"{node.target}.{key}", (keep,))


def _rebuild_shortcut(graph: _Graph, new: nn.Module, node: fx.Node, removable: dict[int, Tensor]) -> None:
    """The shortcut's kept input channels go to the new index of their output position (-1 if it went)."""
    positions = graph.shortcuts[node]
    kept_in = ~removable[graph.root(graph.spaces[node.args[0]].group)]
    kept_out = ~removable[graph.group_of(node)]
    if kept_in.all() and kept_out.all():
        return
    renumber = torch.full_like(kept_out, -1, dtype=torch.long)
    renumber[kept_out] = torch.arange(int(kept_out.sum()), device=renumber.device)
    placed = torch.where(positions >= 0, renumber[positions.clamp(min=0)], -1)[kept_in]
    extra = int(kept_out.sum()) - int((placed >= 0).sum())
    fresh = ZeroPadShortcut(extra, positions=placed.tolist())
    fresh.train(graph.module(node).training)
    _replace(new, node.target, fresh)


@torch.no_grad()
def simplify(model: nn.Module, input_shape: Sequence[int]) -> tuple[nn.Module, ModelChange, dict[str, int]]:
    """The smaller model computing the same function as ``model`` in eval mode (``model`` is not changed), the
    :class:`ModelChange` from ``model`` to it, and the output channels / units kept per Conv / Linear layer.
    ``input_shape``: one sample's shape, e.g. ``(1, 8, 8)`` or ``(64,)``. Raises :class:`SimplificationError` for
    an operation it cannot follow. Biases gained by layers that had none have no source in the change."""
    graph = _analyse(model, input_shape)
    removable = _removable(graph)
    new = copy.deepcopy(model)
    sources = {name: (name, ()) for name in _tensor_names(model)}
    for node in graph.layers:
        _rebuild_layer(graph, new, node, removable, sources)
    for node in graph.norms:
        _rebuild_norm(graph, new, node, removable, sources)
    for node in graph.shortcuts:
        _rebuild_shortcut(graph, new, node, removable)
    names = set(_tensor_names(new))
    change = ModelChange({name: source for name, source in sources.items() if name in names})
    kept = {node.target: int((~removable[graph.group_of(node)]).sum()) for node in graph.layers}
    return new, change, kept


def check_simplifiable(model: nn.Module, input_shape: Sequence[int]) -> None:
    """Raise :class:`SimplificationError` (one line naming the node) if :func:`simplify` cannot handle ``model``;
    builds nothing (a zero-input trace at batch size 1)."""
    _analyse(model, input_shape)


# -- BatchNorm folding -----------------------------------------------------------------------------------------------
@torch.no_grad()
def fold_batchnorm(model: nn.Module, input_shape: Sequence[int]) -> nn.Module:
    """A copy of ``model`` in which every BatchNorm (with running statistics) whose input is the output of a Conv /
    Linear read by nothing else is folded into that layer (weights scaled per output channel, a bias created or
    updated) and replaced by ``nn.Identity``. Same function in eval mode; in train mode batch statistics are gone."""
    new = copy.deepcopy(model)
    with _evaluating(new):
        graph = _trace(new, input_shape)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        producer = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(producer, fx.Node) or producer.op != "call_module" or len(producer.users) != 1:
            continue
        norm, layer = new.get_submodule(node.target), new.get_submodule(producer.target)
        if not (isinstance(norm, NORMS) and norm.track_running_stats and norm.running_mean is not None):
            continue
        if not isinstance(layer, LAYERS) or calls[node.target] != 1 or calls[producer.target] != 1:
            continue
        if isinstance(layer, nn.Linear) and producer.meta["value"].dim() != 2:
            continue
        _fold(layer, norm)
        _replace(new, node.target, nn.Identity())
    return new


def _fold(layer: nn.Module, norm: nn.Module) -> None:
    """``norm(layer(x)) == layer'(x)`` in eval mode: scale the rows, shift the bias (computed in float64)."""
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    shift = (bias - norm.running_mean.double()) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.copy_((layer.weight.double() * scale.reshape(shape)).to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.to(layer.weight.dtype))
    else:
        layer.bias.copy_(shift.to(layer.bias.dtype))


# -- composition of changes ------------------------------------------------------------------------------------------
def compose(first: ModelChange, second: ModelChange) -> ModelChange:
    """The change ``second`` after ``first``: new name -> (name in the model before ``first``, combined index).
    Tensors new in ``second`` (no source there) stay new; those new in ``first`` have no source either."""
    out = {}
    for name, (mid, index) in second.sources.items():
        if mid not in first.sources:
            continue
        origin, before = first.sources[mid]
        combined = []
        for dim in range(max(len(index), len(before))):
            a = before[dim] if dim < len(before) else None
            b = index[dim] if dim < len(index) else None
            combined.append(b if a is None else a if b is None else a[b.to(a.device)])
        out[name] = (origin, tuple(combined))
    return ModelChange(out)
