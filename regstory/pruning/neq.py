"""NEq: neurons at equilibrium, pruning the back-propagation graph (thesis sec. 2.7, Fig. 2.14-2.15; Bragagnolo,
Tartaglione, Grangetto, "To update or not to update? Neurons at equilibrium in deep models", NeurIPS 2022), and its
budget variant (sec. 2.7.2.1: neurons to update under a FLOPs / memory budget).

Neurons. A neuron is an output unit of an ``nn.Linear`` or an output channel of an ``nn.Conv1d/2d/3d`` (grouped
convolutions included), every one the forward pass calls. The classifier head (the last such layer the forward
calls) is not tracked by default (``head: false``): the authors' code hooks only conv/BN layers and never freezes the
final linear layer; the thesis does not say. ``head: true`` tracks it too. BatchNorm parameters are not tracked
and always train (the authors' code also hooks BatchNorm layers and freezes their channels on their own outputs; the
thesis does not mention them).

The measure (thesis sec. 2.7.1, Fig. 2.14). At set-up the outputs of every tracked layer (the module's output, the
pre-activation, as the authors' hooks read it) on a fixed validation subset are recorded (the "epoch -1" pass of the
authors' code); after every epoch they are recorded again and, per neuron,

    phi_t   = cos(y_t, y_{t-1})         the neuron's outputs on the whole subset, squeezed and concatenated over
                                         samples and spatial positions, then normalised (Fig. 2.14)
    Dphi_t  = phi_t - phi_{t-1}         the "variation of similarities" (thesis: Delta v_i^t = v_i^t - v_i^{t-1})
    v_t     = Dphi_t - mu * v_{t-1}     the velocity with memory factor mu (the paper's v_Dphi^t; default form)
    equilibrium:  |v_t| < eps

A neuron at equilibrium is frozen for the whole next epoch through ``ctx.freezer``
(:class:`regstory.freezing.NeuronFreezer`): its weight row / filter and its bias entry get no update, no weight
decay and no momentum. All other neurons train. The velocity is defined once two similarities exist: after the
first epoch phi_1 exists but no Dphi, so every neuron trains the first two epochs (v_1 = 0, the first freeze can
follow epoch 2). The thesis' notation calls the similarity v_i; this module follows the paper's (phi, v).

Where the authors' code differs (options; the defaults follow the paper):

- ``velocity: code``: v_t = mu * v_{t-1} - (rho_{t-1} - rho_t) with rho = 1 - phi, i.e. v_t = mu * v_{t-1} - Dphi_t
  (the opposite sign on the memory term: the paper's form alternates the sign of past variations, the code's sums
  them as a momentum), starting from rho_0 = 0 (phi_0 = 1) and v_0 = 0, so freezing can follow the first epoch.
- ``similarity: per_sample``: a conv neuron's similarity is the mean over the subset's samples of the cosine over
  its spatial positions (the authors' hook); a linear neuron's is the cosine over its outputs on the subset in both
  modes. Cosine conventions (both): two all-zero vectors have similarity 1, one all-zero vector 0 (the code's).

The subset. ``subset_fraction`` (default 0.01: the authors held out 1% of the training set for the check) times
the size of the training split, or ``subset_size`` samples, drawn once (seeded) from the validation split when the
run has one (``dataset.val_fraction > 0``), else from the training split (then not held out; the summary says which).
Recorded in eval mode, without autocast (fp32), similarities in float64.

Budget variant (sec. 2.7.2.1; ``budget.flops`` and/or ``budget.memory`` in (0, 1]): the purpose is no longer to
exclude the neurons at equilibrium but to update the neurons furthest from it first: neurons are ranked by |v_t|
(largest first) and added one by one while the back-propagation FLOPs (or memory) needed stay within the given
fraction of a full backward's; the first neuron that does not fit ends the selection (strict priority: no neuron is
updated while one further from equilibrium stays frozen). Before velocities exist every neuron ranks first-equal and
ties go to the layers nearest the output (the cheapest to reach), then by index. eps is not used for the selection.

Counting (the logged ``neq_bp_flops*`` / ``neq_bp_memory_frac``, and the budget). Back-propagation FLOPs, per
training sample, of the Linear/Conv layers only (what ``torch.utils.flop_counter.FlopCounterMode`` counts: the
matmuls and convolutions; activations, pooling, normalisation, losses and bias sums are not counted):

- weight gradient of a layer: 2 * weight.numel() * P * (trainable neurons / neurons), P = output positions per
  sample (1 for a Linear on [N, C], T for [N, T, C], H_out * W_out for a Conv2d): the same FLOPs as its forward,
  restricted to the trainable rows;
- input gradient of a layer: 2 * weight.numel() * P, counted when some trainable parameter lies before the layer
  in the forward's call order (the gradient must reach it); a frozen neuron still passes the error back, so a layer's
  input gradient does not depend on its own frozen rows. The first layer never needs one (its input is the data).
  "Before" is the call order, exact for chains (MLPs, LeNets, VGGs) and conservative for branching nets.
- full backward: every neuron trainable. Memory: per layer with a trainable neuron, its input activation for one
  training batch (``trainer.batch_size`` x input elements per sample, kept for the weight gradient), plus the
  parameters of the trainable neurons (their gradient buffers), in elements; full = every layer and parameter.

Skipping the work (``skip_frozen_grads: true``). The freezer alone keeps frozen neurons still, but autograd still
computes their gradients. With the option on, each tracked layer with frozen rows runs, for the epoch, through a
custom autograd function that computes the weight (and bias) gradient of the trainable rows only
(grad_output[:, active]^T @ input for a Linear; ``aten.convolution_backward`` on the active output channels for a
Conv) and the full input gradient; frozen rows get zero gradients. A fully frozen layer uses detached parameters, so
autograd also skips the input gradients that no trainable parameter upstream needs (not under DDP, which needs
every parameter in the graph: zeros there). Grouped convolutions, string paddings and non-zero padding modes keep
the plain forward (their gradients are computed, the freezer discards them). Only the trainable rows' gradients are
then in ``.grad``, so a ``trainer.grad_clip`` norm ignores frozen neurons (without the option it includes them).
The patch is installed at the start of each epoch and removed at its end (checkpoints, evaluations between epochs
and other plugins' epoch hooks see the plain modules); not tried with ``trainer.compile`` (each epoch's new forward
would recompile). ``scripts/bench_neq.py`` measures the backward time against plain training (``docs/neq.md``).

Cost. One forward pass over the subset per epoch (and one at set-up), and the previous epoch's outputs of every
tracked neuron kept on the device and in every checkpoint (subset size x the tracked layers' output elements per
sample, float32: ~600 MB for ResNet-32 on 500 CIFAR images; a few kB for LeNet-5 on 12 digits).

Per-epoch metrics (``end_epoch``): ``neq_updated`` (fraction of tracked neurons updated during the epoch),
``neq_bp_flops`` / ``neq_bp_flops_full`` / ``neq_bp_flops_frac`` (per training sample, that epoch),
``neq_bp_memory_frac``, ``neq_at_equilibrium`` (fraction with |v| < eps after the epoch), ``neq_updated_next``
(fraction that trains in the next epoch), ``neq_phi_mean``, ``neq_velocity_abs_mean``. The summary has their means.
A model surgery or a new round (with a multi-round plugin) starts the measure over: outputs re-recorded, every
neuron trainable (or the budget's first selection).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regstory.activations import ActivationRecorder, Concat
from regstory.options import ConfigError, OneOf, Range, option
from regstory.plugins import Plugin

if TYPE_CHECKING:
    from regstory.loop import RunContext
    from regstory.surgery import ModelChange

#: the layers whose output units are NEq's neurons
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NEURON_TYPES = (nn.Linear, *CONV_TYPES)

Eps = Annotated[float, Range(gt=0)]
Mu = Annotated[float, Range(ge=0, lt=1)]
BudgetFraction = Annotated[Optional[float], Range(gt=0, le=1)]


@dataclass(unsafe_hash=True)  # hashable: a default value of the schema (never mutated)
class Budget:
    """Sec. 2.7.2.1: update the neurons furthest from equilibrium first, within these fractions of a full
    backward's FLOPs / memory (null: no limit; both null: plain NEq with eps)."""

    flops: BudgetFraction = None
    memory: BudgetFraction = None


# -- the measure ------------------------------------------------------------------------------------------------------
def cosine(a: Tensor, b: Tensor, dim: int = -1) -> Tensor:
    """Cosine similarity along ``dim`` in float64; two all-zero vectors give 1, one all-zero vector 0."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=dim), b.norm(dim=dim)
    cos = (a * b).sum(dim) / (na * nb).clamp_min(torch.finfo(torch.float64).tiny)
    za, zb = na == 0, nb == 0
    cos = torch.where(za & zb, torch.ones_like(cos), torch.where(za | zb, torch.zeros_like(cos), cos))
    return cos.clamp_(-1.0, 1.0)


def layer_similarity(previous: list[Tensor], current: list[Tensor], per_sample: bool) -> Tensor:
    """phi of every neuron of a layer ([C], float64) from its outputs at two times, one tensor per call site:
    [C, M] (flattened over samples and positions: one cosine over M) or, for a conv in ``per_sample`` mode,
    [N, C, P] (the cosine over P per sample, then the mean over all samples of all sites)."""
    if not per_sample:
        return cosine(torch.cat(previous, 1), torch.cat(current, 1), dim=1)
    return torch.cat([cosine(p, c, dim=2) for p, c in zip(previous, current)], 0).mean(0)


def velocity(phi: Tensor, phi_prev: Tensor | None, v_prev: Tensor | None, mu: float,
             form: str = "paper") -> Tensor | None:
    """The velocity of the variations of similarity (thesis sec. 2.7.1; the paper's v_Dphi).

    ``paper``: v_t = Dphi_t - mu * v_{t-1}, Dphi_t = phi_t - phi_{t-1}; None while phi_{t-1} does not exist (the first
    measurement: nothing is at equilibrium yet), v_{t-1} = 0 at the first velocity.
    ``code`` (the authors' code): v_t = mu * v_{t-1} - (rho_{t-1} - rho_t), rho = 1 - phi, from rho_0 = 0, v_0 = 0."""
    if form == "paper":
        if phi_prev is None:
            return None
        return (phi - phi_prev) - mu * (v_prev if v_prev is not None else torch.zeros_like(phi))
    if form == "code":
        rho_prev = 1 - phi_prev if phi_prev is not None else torch.zeros_like(phi)
        return mu * (v_prev if v_prev is not None else torch.zeros_like(phi)) - (rho_prev - (1 - phi))
    raise ValueError(f"velocity form {form!r}: use paper or code")


def at_equilibrium(v: Tensor | None, eps: float, size: int) -> Tensor:
    """|v| < eps (bool [size]); nothing is at equilibrium while v does not exist."""
    if v is None:
        return torch.zeros(size, dtype=torch.bool)
    return v.abs() < eps


# -- what the layers cost -------------------------------------------------------------------------------------------
@dataclass
class LayerInfo:
    """A Linear/Conv layer the forward calls, with its costs per training sample (summed over its calls)."""

    name: str
    module: nn.Module
    position: int  # call order (first call) among the modules that own parameters
    neurons: int
    fwd_flops: float  # 2 * weight.numel() * output positions: its forward, its weight gradient, its input gradient
    in_numel: int  # input elements per sample (the activation its weight gradient needs)
    params_per_neuron: int  # weight row / filter + bias entry
    managed: bool  # tracked by NEq (False: the head with head=false: always trains)

    @property
    def flops_per_neuron(self) -> float:
        return self.fwd_flops / self.neurons


@dataclass
class Costs:
    flops: float
    flops_full: float
    memory: float
    memory_full: float

    @property
    def flops_frac(self) -> float:
        return self.flops / self.flops_full if self.flops_full else 1.0

    @property
    def memory_frac(self) -> float:
        return self.memory / self.memory_full if self.memory_full else 1.0


@torch.no_grad()
def probe_layers(model: nn.Module, x: Tensor, head: bool = False) -> tuple[list[LayerInfo], list[int]]:
    """The Linear/Conv layers ``model(x)`` calls, in call order, with their per-sample costs; and the call positions
    of the other modules that own trainable parameters (BatchNorm...), which need the error signal to reach them.
    ``head=False`` leaves the last Linear/Conv called out of NEq (``managed=False``)."""
    owners = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    order: dict[str, int] = {}
    seen: dict[str, dict[str, float]] = {}
    batch = x.shape[0]

    def make_hook(name: str, module: nn.Module):
        def hook(mod, args, output):
            order.setdefault(name, len(order))
            if isinstance(mod, NEURON_TYPES) and isinstance(output, Tensor) and args and isinstance(args[0], Tensor):
                c = mod.weight.shape[0]
                positions = output.numel() // (batch * c)
                entry = seen.setdefault(name, {"flops": 0.0, "in": 0})
                entry["flops"] += 2.0 * mod.weight.numel() * positions
                entry["in"] += args[0].numel() // batch
        return hook

    handles = [m.register_forward_hook(make_hook(n, m)) for n, m in owners]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    modules = dict(owners)
    layers = []
    for name in sorted(seen, key=order.__getitem__):
        m = modules[name]
        bias = getattr(m, "bias", None)
        per_neuron = m.weight[0].numel() + (1 if isinstance(bias, Tensor) else 0)
        layers.append(LayerInfo(name, m, order[name], int(m.weight.shape[0]), seen[name]["flops"],
                                int(seen[name]["in"]), per_neuron, True))
    if layers and not head:
        layers[-1].managed = False
    others = sorted(order[n] for n, m in owners if n in order and n not in seen
                    and any(p.requires_grad for p in m.parameters(recurse=False)))
    return layers, others


def _trainable_count(layer: LayerInfo, trainable: dict[str, Tensor]) -> int:
    if layer.managed:
        return int(trainable[layer.name].sum())
    return layer.neurons if layer.module.weight.requires_grad else 0


def backprop_costs(layers: list[LayerInfo], trainable: dict[str, Tensor], others: list[int],
                   batch_size: int = 1) -> Costs:
    """Back-propagation FLOPs (per training sample) and memory (elements, one batch of ``batch_size``) that the
    trainable neurons need, and those of a full backward (module docstring: what is counted)."""
    counts = [_trainable_count(layer, trainable) for layer in layers]
    first = min([layer.position for layer, k in zip(layers, counts) if k] + others, default=math.inf)
    first_full = min([layer.position for layer in layers] + others, default=math.inf)
    flops = sum(layer.flops_per_neuron * k + (layer.fwd_flops if layer.position > first else 0.0)
                for layer, k in zip(layers, counts))
    full = sum(layer.fwd_flops * (2 if layer.position > first_full else 1) for layer in layers)
    memory = sum((batch_size * layer.in_numel if k else 0) + layer.params_per_neuron * k
                 for layer, k in zip(layers, counts))
    memory_full = sum(batch_size * layer.in_numel + layer.params_per_neuron * layer.neurons for layer in layers)
    return Costs(float(flops), float(full), float(memory), float(memory_full))


def select_under_budget(layers: list[LayerInfo], scores: dict[str, Tensor], others: list[int],
                        flops: float | None = None, memory: float | None = None,
                        batch_size: int = 1) -> dict[str, Tensor]:
    """Sec. 2.7.2.1: the trainable neurons (bool per managed layer) chosen by decreasing score (|v|; inf before
    velocities exist), each added while the FLOPs / memory needed stay within ``flops`` / ``memory`` times a full
    backward's; the first that does not fit ends the selection. Ties: the layer called last first, then by index.
    The layers NEq does not manage (the head by default) and the other trainable parameters always train: their
    cost is spent first."""
    managed = [layer for layer in layers if layer.managed]
    chosen = {layer.name: torch.zeros(layer.neurons, dtype=torch.bool) for layer in managed}
    base = backprop_costs(layers, chosen, others, batch_size)
    limit_f = None if flops is None else flops * base.flops_full * (1 + 1e-12)
    limit_m = None if memory is None else memory * base.memory_full * (1 + 1e-12)
    used_f, used_m = base.flops, base.memory
    if (limit_f is not None and used_f > limit_f) or (limit_m is not None and used_m > limit_m):
        return chosen
    # input-gradient FLOPs a layer needs once something before it trains, by call position
    unmanaged = [layer.position for layer in layers if not layer.managed and layer.module.weight.requires_grad]
    first = min(unmanaged + others, default=math.inf)
    candidates = []
    for rank, layer in enumerate(managed):
        s = scores[layer.name].detach().to("cpu", torch.float64).tolist()
        candidates += [(-v, -layer.position, i, rank) for i, v in enumerate(s)]
    candidates.sort()
    started = [False] * len(managed)
    for _, _, i, rank in candidates:
        layer = managed[rank]
        df = layer.flops_per_neuron
        if layer.position < first:  # the error signal must now reach this layer: the input gradients between
            df += sum(other.fwd_flops for other in layers if layer.position < other.position <= first)
        dm = layer.params_per_neuron + (0 if started[rank] else batch_size * layer.in_numel)
        if (limit_f is not None and used_f + df > limit_f) or (limit_m is not None and used_m + dm > limit_m):
            break
        chosen[layer.name][i] = True
        used_f, used_m = used_f + df, used_m + dm
        started[rank] = True
        first = min(first, layer.position)
    return chosen


# -- skipping the frozen rows' gradients ----------------------------------------------------------------------------
class _RowsLinear(torch.autograd.Function):
    """F.linear whose backward computes the weight/bias gradients of the ``active`` rows only (zeros elsewhere) and
    the full input gradient (frozen neurons still pass the error back)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, active: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, active)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, active = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        dt = grad.dtype  # autocast: the forward ran in grad's precision
        if need_x:
            gx = grad.matmul(weight.to(dt)).to(x.dtype)
        if need_w or need_b:
            g = grad.reshape(-1, grad.shape[-1]).index_select(1, active)  # [M, k]
            if need_w:
                gw = torch.zeros_like(weight)
                if active.numel():
                    x2 = x.reshape(-1, x.shape[-1]).to(dt)
                    gw.index_copy_(0, active, g.t().matmul(x2).to(weight.dtype))
            if need_b:
                gb = torch.zeros(weight.shape[0], dtype=ctx.bias_dtype, device=weight.device)
                if active.numel():
                    gb.index_copy_(0, active, g.sum(0).to(ctx.bias_dtype))
        return gx, gw, gb, None


class _RowsConv(torch.autograd.Function):
    """An ungrouped, zero-padded convolution whose backward computes the weight/bias gradients of the ``active``
    output channels only (``aten.convolution_backward`` on grad_output[:, active]) and the full input gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, active: Tensor, stride, padding,
                dilation) -> Tensor:
        ctx.save_for_backward(x, weight, active)
        ctx.conf = (list(stride), list(padding), list(dilation))
        ctx.bias_dtype = bias.dtype if bias is not None else None
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(stride) - 1]  # (autocast casts these, not aten.convolution)
        return conv(x, weight, bias, stride, padding, dilation, 1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, active = ctx.saved_tensors
        stride, padding, dilation = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        dt = grad.dtype
        zeros = [0] * len(stride)
        backward = torch.ops.aten.convolution_backward
        if need_x:
            gx = backward(grad, x.to(dt), weight.to(dt), None, stride, padding, dilation, False, zeros, 1,
                          [True, False, False])[0].to(x.dtype)
        if (need_w or need_b) and active.numel():
            g = grad.index_select(1, active)
        if need_w:
            gw = torch.zeros_like(weight)
            if active.numel():
                w_active = weight.index_select(0, active).to(dt)
                part = backward(g, x.to(dt), w_active, None, stride, padding, dilation, False, zeros, 1,
                                [False, True, False])[1]
                gw.index_copy_(0, active, part.to(weight.dtype))
        if need_b:
            gb = torch.zeros(weight.shape[0], dtype=ctx.bias_dtype, device=weight.device)
            if active.numel():
                gb.index_copy_(0, active, g.sum([d for d in range(g.dim()) if d != 1]).to(ctx.bias_dtype))
        return gx, gw, gb, None, None, None, None


def rows_supported(module: nn.Module) -> bool:
    """Whether :func:`install_skip` can skip the frozen rows of ``module`` (a Linear; an ungrouped conv with
    numeric zero padding)."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, CONV_TYPES) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _skip_forward(module: nn.Module, active: Tensor | None, x: Tensor) -> Tensor:
    """The forward installed by :func:`install_skip`: ``active`` None = every row frozen (detached parameters)."""
    weight, bias = module.weight, module.bias
    if not torch.is_grad_enabled():
        return type(module).forward(module, x)
    if active is None:
        w, b = weight.detach(), (bias.detach() if bias is not None else None)
        return F.linear(x, w, b) if isinstance(module, nn.Linear) else module._conv_forward(x, w, b)
    if isinstance(module, nn.Linear):
        return _RowsLinear.apply(x, weight, bias, active)
    return _RowsConv.apply(x, weight, bias, active, module.stride, module.padding, module.dilation)


def install_skip(module: nn.Module, trainable: Tensor, detach: bool = True) -> bool:
    """Make ``module``'s backward skip the weight/bias gradients of its frozen rows (``trainable`` False): an
    instance ``forward`` that :func:`remove_skip` deletes. A fully frozen layer runs on detached parameters when
    ``detach`` (autograd then also skips input gradients nothing upstream needs), else through the row-skipping
    function with no active row. No-op (returns False) when every row trains or the layer is not supported."""
    remove_skip(module)
    if "forward" in vars(module):  # someone else's instance forward: leave it alone
        return False
    trainable = trainable.to(module.weight.device)
    if bool(trainable.all()):
        return False
    if not bool(trainable.any()) and detach:
        active = None
    elif rows_supported(module):
        active = trainable.nonzero().squeeze(1)
    else:
        return False
    module.forward = functools.partial(_skip_forward, module, active)
    return True


def remove_skip(module: nn.Module) -> None:
    """Undo :func:`install_skip` (the class's forward again)."""
    forward = vars(module).get("forward")
    if isinstance(forward, functools.partial) and forward.func is _skip_forward:
        del module.forward


# -- the plugin -----------------------------------------------------------------------------------------------------
@option("method", "neq")
class NEq(Plugin):
    """Neurons at equilibrium (module docstring). Options: ``eps`` > 0, ``mu`` in [0, 1), ``velocity`` paper|code,
    ``similarity`` flat|per_sample, ``subset_fraction`` / ``subset_size``, ``head``, ``budget.flops`` /
    ``budget.memory`` in (0, 1] (null: none), ``skip_frozen_grads``."""

    def __init__(self, eps: Eps = 1e-3, mu: Mu = 0.5,
                 velocity: Annotated[str, OneOf("paper", "code")] = "paper",
                 similarity: Annotated[str, OneOf("flat", "per_sample")] = "flat",
                 subset_fraction: Annotated[float, Range(gt=0, le=1)] = 0.01,
                 subset_size: Annotated[Optional[int], Range(ge=1)] = None,
                 head: bool = False, budget: Budget = Budget(), skip_frozen_grads: bool = False):
        self.eps, self.mu, self.form, self.similarity = float(eps), float(mu), velocity, similarity
        self.subset_fraction, self.subset_size, self.head = subset_fraction, subset_size, head
        self.budget = self._budget(budget)
        self.skip = skip_frozen_grads
        self.layers: list[LayerInfo] = []
        self.others: list[int] = []
        self.loader = None
        self.device = torch.device("cpu")
        self.batch_size = 1
        self.detach_ok = True
        self.outputs: dict[str, list[Tensor]] = {}  # the last recorded outputs, per layer and call site
        self.phi: dict[str, Tensor | None] = {}
        self.v: dict[str, Tensor | None] = {}
        self.trainable: dict[str, Tensor] = {}  # bool, on the CPU: the neurons that train this epoch
        self.measurements = 0
        self.subset_info: dict[str, Any] = {}
        self.skipping: list[nn.Module] = []

    @staticmethod
    def _budget(budget: Any) -> Budget:
        if not isinstance(budget, Budget):
            items = dict(budget or {})
            unknown = sorted(set(items) - {"flops", "memory"})
            if unknown:
                raise ConfigError(f"method.budget: unknown key(s) {', '.join(unknown)}; allowed: flops, memory")
            budget = Budget(**items)
        for key in ("flops", "memory"):
            value = getattr(budget, key)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ConfigError(f"method.budget.{key} must be null or a number in (0, 1], got {value}")
        return budget

    @property
    def budgeted(self) -> bool:
        return self.budget.flops is not None or self.budget.memory is not None

    @property
    def managed(self) -> list[LayerInfo]:
        return [layer for layer in self.layers if layer.managed]

    # -- set-up ---------------------------------------------------------------------------------------------------
    def setup(self, ctx: "RunContext") -> None:
        self.device = ctx.device
        self.batch_size = int(ctx.cfg.trainer.batch_size) if getattr(ctx, "cfg", None) is not None else 1
        self.detach_ok = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self.loader = self._subset_loader(ctx)
        self._start(ctx)

    def _subset_loader(self, ctx: "RunContext"):
        """The fixed, seeded subset the outputs are recorded on (from val when the run has one, else train)."""
        source = "val" if "val" in ctx.loaders else "train"
        loader = ctx.loaders[source]
        n_train, n = len(ctx.loaders["train"].split), len(loader.split)
        want = self.subset_size if self.subset_size is not None else math.ceil(self.subset_fraction * n_train)
        size = max(1, min(int(want), n))
        seed = int(ctx.cfg.seed) if getattr(ctx, "cfg", None) is not None else 0
        gen = torch.Generator().manual_seed(seed + 7919)
        index = torch.randperm(n, generator=gen)[:size].sort().values
        eval_batch = int(ctx.cfg.trainer.eval_batch_size) if getattr(ctx, "cfg", None) is not None else size
        self.subset_info = {"subset_from": source, "subset_size": size}
        return loader.subset(index, eval_batch)

    def _start(self, ctx: "RunContext") -> None:
        """(Re)start the measure on ``ctx.model``: find the layers, record the outputs, select the first set."""
        self._remove_skips()
        first = next(iter(self.loader))
        self.layers, self.others = probe_layers(ctx.model, first["x"][:2], self.head)
        self.outputs = self._record(ctx)
        self.phi = {layer.name: None for layer in self.managed}
        self.v = {layer.name: None for layer in self.managed}
        self.measurements = 0
        self.trainable = self._select()
        self._apply_freezer(ctx)

    # -- per epoch ------------------------------------------------------------------------------------------------
    def start_round(self, ctx: "RunContext") -> None:
        if ctx.round > 0:  # a multi-round plugin rewound or pruned the weights: start over
            self._start(ctx)

    def start_epoch(self, ctx: "RunContext") -> None:
        self._remove_skips()
        if self.skip:
            for layer in self.managed:
                if install_skip(layer.module, self.trainable[layer.name], self.detach_ok):
                    self.skipping.append(layer.module)

    def end_epoch(self, ctx: "RunContext") -> dict[str, Any]:
        self._remove_skips()
        total = sum(layer.neurons for layer in self.managed)
        costs = backprop_costs(self.layers, self.trainable, self.others, self.batch_size)
        out: dict[str, Any] = {
            "neq_updated": sum(int(t.sum()) for t in self.trainable.values()) / max(total, 1),
            "neq_bp_flops": costs.flops, "neq_bp_flops_full": costs.flops_full,
            "neq_bp_flops_frac": costs.flops_frac, "neq_bp_memory_frac": costs.memory_frac,
        }
        current = self._record(ctx)
        equilibrium = 0
        phis, speeds = [], []
        for layer in self.managed:
            name = layer.name
            phi = layer_similarity(self.outputs[name], current[name], self._per_sample(layer)).cpu()
            v = velocity(phi, self.phi[name], self.v[name], self.mu, self.form)
            self.phi[name], self.v[name] = phi, v
            equilibrium += int(at_equilibrium(v, self.eps, layer.neurons).sum())
            phis.append(phi)
            if v is not None:
                speeds.append(v.abs())
        self.outputs = current
        self.measurements += 1
        self.trainable = self._select()
        self._apply_freezer(ctx)
        out["neq_at_equilibrium"] = equilibrium / max(total, 1)
        out["neq_updated_next"] = sum(int(t.sum()) for t in self.trainable.values()) / max(total, 1)
        if phis:
            out["neq_phi_mean"] = float(torch.cat(phis).mean())
        if speeds:  # from the first velocity on
            out["neq_velocity_abs_mean"] = float(torch.cat(speeds).mean())
        return out

    def _per_sample(self, layer: LayerInfo) -> bool:
        return self.similarity == "per_sample" and isinstance(layer.module, CONV_TYPES)

    @torch.no_grad()
    def _record(self, ctx: "RunContext") -> dict[str, list[Tensor]]:
        """Every tracked layer's outputs on the subset, one tensor per call site: [C, M] (flat) or [N, C, P]."""
        model = ctx.model
        managed = self.managed
        recorder = ActivationRecorder(model, [layer.name for layer in managed])
        was_training = model.training
        model.eval()
        try:
            with recorder.capture(reduce=Concat, record=("pre",)):
                for batch in self.loader:
                    model(batch["x"])
        finally:
            model.train(was_training)
        out: dict[str, list[Tensor]] = {}
        for layer in managed:
            parts = []
            for site in recorder.sites:
                if site == layer.name or site.startswith(layer.name + "#"):
                    t = recorder.pre[site].float()
                    c = layer.neurons
                    if self._per_sample(layer):
                        parts.append(t.reshape(t.shape[0], c, -1))
                    elif isinstance(layer.module, CONV_TYPES):
                        parts.append(t.transpose(0, 1).reshape(c, -1))
                    else:
                        parts.append(t.reshape(-1, c).t())
            out[layer.name] = parts
        return out

    def _scores(self) -> dict[str, Tensor]:
        """|v| per managed neuron (inf where no velocity exists yet)."""
        return {layer.name: (self.v[layer.name].abs() if self.v.get(layer.name) is not None
                             else torch.full((layer.neurons,), math.inf, dtype=torch.float64))
                for layer in self.managed}

    def _select(self) -> dict[str, Tensor]:
        if self.budgeted:
            return select_under_budget(self.layers, self._scores(), self.others, self.budget.flops,
                                       self.budget.memory, self.batch_size)
        return {layer.name: ~at_equilibrium(self.v.get(layer.name), self.eps, layer.neurons)
                for layer in self.managed}

    def _apply_freezer(self, ctx: "RunContext") -> None:
        if ctx.freezer is None:
            return
        for layer in self.managed:
            ctx.freezer.freeze(layer.module.weight, ~self.trainable[layer.name].cpu(), bias=layer.module.bias)

    def _remove_skips(self) -> None:
        for module in self.skipping:
            remove_skip(module)
        self.skipping = []

    # -- end of run, surgery, state -------------------------------------------------------------------------------
    def finalize(self, ctx: "RunContext") -> dict[str, Any]:
        self._remove_skips()
        records = [r for r in ctx.history if "neq_updated" in r]
        out: dict[str, Any] = {
            "neq_neurons": sum(layer.neurons for layer in self.managed),
            "neq_layers": [layer.name for layer in self.managed], "neq_head": self.head,
            "neq_velocity": self.form, "neq_similarity": self.similarity,
            **{f"neq_{k}": v for k, v in self.subset_info.items()},
        }
        if records:
            for key in ("neq_updated", "neq_bp_flops_frac", "neq_bp_memory_frac"):
                out[f"{key}_mean"] = sum(r[key] for r in records) / len(records)
        return out

    def model_replaced(self, ctx: "RunContext", change: "ModelChange") -> None:
        if ctx.freezer is not None:
            ctx.freezer.clear()
        self._start(ctx)

    def state_dict(self) -> dict[str, Any]:
        def cpu(t):
            return None if t is None else t.detach().cpu()

        return {"measurements": self.measurements,
                "layers": {layer.name: {"outputs": [cpu(t) for t in self.outputs[layer.name]],
                                        "phi": cpu(self.phi[layer.name]), "v": cpu(self.v[layer.name]),
                                        "trainable": cpu(self.trainable[layer.name])} for layer in self.managed}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.measurements = int(state["measurements"])
        for name, item in state["layers"].items():
            self.outputs[name] = [t.to(self.device) for t in item["outputs"]]
            self.phi[name], self.v[name] = item["phi"], item["v"]
            self.trainable[name] = item["trainable"].clone()
