"""NEPENTHE: unstructured pruning steered by neuron entropy, to make whole layers linear and remove them (thesis
sec. 2.6, eq. 2.16-2.17 and 2.23-2.24, Table 2.2, Fig. 2.13; Liao et al. 2024). The analytic model of Fig. 2.12 is
:mod:`regstory.pruning.nepenthe_analytic`; ``scripts/plot_nepenthe.py`` draws both figures.

Each round trains, then (``end_round``, before the next round's pruning):

1. **States** (eq. 2.16): on the sweep's fixed train subset (``entropy_samples``; the pass that gives every sweep
   its ``entropy/*`` keys), each neuron's fraction of ON states p_on and its entropy H (eq. 2.17, the functions of
   :mod:`regstory.pruning.entropy`); one layer per ReLU call site. A neuron with p_on = 0 is always OFF, with
   p_on = 1 always ON; a layer whose neurons all are has zero entropy and is *removable*.
2. **Removal** (``remove``). A zero-entropy layer computes a linear function of its input on the data: its ReLU is
   replaced by ``nn.Identity`` through ``ctx.replace_model`` (the checkpoint records the new structure, so a resumed
   run rebuilds it). Its always-OFF neurons output 0 and must keep doing so without the ReLU: the rows of their
   incoming weights are pruned (masked) and their biases set to 0 (with a BatchNorm between, its scale and shift),
   which is exact on the measured data (ReLU(z) = 0 there, and now the neuron outputs 0). A ReLU module called at
   several sites is replaced only when all its sites are removable; a site with always-OFF neurons and no
   Linear/Conv (+ BatchNorm) feeding the ReLU directly is not replaced. The replaced layers are the *removed
   layers* (methods.md: the replaced rectifiers, as the authors' EASIER follow-up counts them); they are trained as
   linear layers in the following rounds and are not pruned further (their entropy is 0, so I = R = 0).
   ``remove=rounds`` (default) replaces them at the end of the round where they reach zero entropy;
   ``remove=end`` only after the last round (intermediate rounds only measure, so retraining may bring a layer's
   entropy back up; the thesis does not say which).
3. **Allocation** of the round's budget: ``rate`` of the remaining prunable weights (the same count as IMP's
   global step, so the two sweeps have the same sparsity as long as the budget finds room), shared among the
   prunable tensors by their relevance. Per tensor l (the weights of the neurons of one rectifier layer: the
   Linear/Conv, or BatchNorm, whose output reaches the ReLU through BatchNorms and additions only, so a ResNet
   block's second conv and its shortcut conv both take the entropies of the ReLU after the sum),

       I_l = (1 / N_l) * sum_i H_{l,i} * ||theta_{l,i}||_1 / ||theta_l||_0          (eq. 2.23)

   with theta_{l,i} the incoming weights of neuron i (a row; pruned ones are 0) and ||theta_l||_0 the count of
   remaining weights of the tensor; ``R_l = sum_j I_j / I_l``, or 0 when I_l = 0 (eq. 2.24: zero-entropy layers
   are not pruned further). ``allocation=softmax`` (default; the authors' EGP code) gives tensor l the share
   softmax(R)_l of the budget over the tensors with R_l > 0; ``proportional`` gives R_l / sum R (the thesis is
   silent on how R becomes a share). A tensor loses at most ``cap`` of its remaining weights in a round (the EGP
   code: 1, all of them); a share above it is capped and the excess redistributed over the others by the same
   rule, until the budget is placed or no tensor has room (then the round prunes less: ``pruned`` < ``budget``).
   Within a tensor the smallest |w| go. A prunable tensor whose neurons feed no rectifier (the classifier head)
   has no entropy and is not in eq. 2.24's set L of rectifier layers: by default (``head_entropy=null``) it is
   not pruned; a number (e.g. 1, the maximum bit: such a layer never becomes removable) stands in for its
   neurons' H and puts it in L. Including the head this way scales every other R up (its I is large), from
   ~4 to ~55 in the CPU preset, and the softmax gets even sharper. Measured at CPU scale (methods.md): the softmax
   of relevances of ~2-10 is close to winner-takes-all, so one tensor takes most of a round's budget.

**Collapse** (:func:`collapse_mlp`, for :class:`regstory.models.mlp.MLP`): the depth-reduced network that computes
the same function as the masked one on the measured data. Zero-entropy stages (replaced or not yet) are the affine
maps x -> S x + D (W x + b), with S the skip (identity in a residual block, 0 in a plain one) and D the diagonal of
0/1 that keeps the always-ON neurons; consecutive affine maps compose, and the composition is folded into the
next non-linear stage: its Linear becomes W' = W M, b' = W m + b, and its skip, identity before, becomes the Linear
(M, m) (the skip and the branch read the same input, so the stage still costs one layer of the critical path). In
a plain MLP this is the usual merge of two Linears around an identity (the skip is 0); in a residual MLP a block
cannot be merged into the next one without this explicit skip, since the next block adds its own input. The last
affine map is folded into the head. Always-OFF neurons of the remaining non-linear stages get zero rows and zero
bias (ReLU(0) = 0, exact), then :func:`regstory.pruning.simplify.simplify` removes the units it can (those not
aligned with a residual addition) and folds their constants. Depth after collapse = non-linear stages + 1 (the
head). Merged tensors are computed in float64 and stored in the model's dtype.

Where merging is done: ``merge=true`` (default) installs the collapsed model with ``ctx.replace_model`` after the
last round when it is shallower (its merged tensors are new: their exact zeros are masked, the rest dense), so
``checkpoints/last.pt``, ``num_params`` and the footprint measures describe the depth-reduced network (the summary's
``final_sparsity`` stays the sweep's, comparable with IMP's; ``merged_sparsity`` is the collapsed model's); every round
also builds it to report ``depth_after_collapse``, ``collapse_max_abs_diff`` (against the masked model on the
measured subset) and ``collapse_test_acc``. It is not installed between rounds: the merged tensors are products of
sparse maps, dense and outside the pruning budget, and training them would change what the later rounds prune.
Other architectures (conv nets, torchvision ResNets) get the identity replacement only, never a merge.

Per-round keys (``rounds.jsonl``): ``lowest_entropy/1..6`` (Table 2.2: the six lowest layer entropies, removed
layers counting 0), ``layer_entropy/<site>``, ``states_nonzero|states_off|states_on/<site>`` (Fig. 2.13),
``removable_layers``, ``removed_layers``, ``depth_after_collapse``, ``collapse_max_abs_diff``,
``collapse_test_acc``, ``layer_sparsity/<tensor>``, and the allocation made at the round's end for the next round:
``relevance/<tensor>``, ``allocation/<tensor>``, ``budget`` and ``pruned`` (their sum).
"""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from regstory.config import ConfigError
from regstory.models.base import Classifier
from regstory.models.mlp import MLP
from regstory.options import OneOf, Range, option
from regstory.pruning.base import PruningSweep
from regstory.pruning.entropy import RECTIFIERS, binary_entropy_bits, entropy_summary
from regstory.pruning.entropy import on_fractions as entropy_on_fractions
from regstory.pruning.masks import NORM_LAYERS, PRUNABLE_LAYERS, keep_masks_from_scores
from regstory.pruning.measures import ActivationEntropy, Measurement
from regstory.surgery import ModelChange, _replace

if TYPE_CHECKING:
    from regstory.loop import RunContext

Rate = Annotated[float, Range(gt=0, le=1)]
Allocation = Annotated[str, OneOf("softmax", "proportional")]
Cap = Annotated[float, Range(gt=0, le=1)]
HeadEntropy = Annotated[float | None, Range(ge=0, le=1)]
Remove = Annotated[str, OneOf("rounds", "end")]

#: Table 2.2 reports the six lowest layer entropies
TABLE_LAYERS = 6


# -- eq. 2.23-2.24 and the allocation --------------------------------------------------------------------------------
def irrelevance(entropy: Tensor, weight: Tensor, mask: Tensor | None = None) -> float:
    """Eq. 2.23: ``(1/N) sum_i H_i ||theta_i||_1 / ||theta||_0`` for a tensor whose dim 0 indexes the N neurons
    (``entropy[i]`` = H_i), ``||theta||_0`` = its remaining weights (``mask``'s ones; without a mask, its non-zeros).
    0 when nothing remains."""
    rows = weight.detach().reshape(weight.shape[0], -1).double()
    alive = int(mask.sum()) if mask is not None else int(rows.ne(0).sum())
    if alive == 0 or rows.shape[0] == 0:
        return 0.0
    l1 = rows.abs().sum(1)
    return float((entropy.double().to(l1.device) * l1).sum() / (rows.shape[0] * alive))


def relevance(irrelevances: Sequence[float]) -> list[float]:
    """Eq. 2.24: ``R_l = sum_j I_j / I_l``, 0 where ``I_l`` is 0."""
    total = sum(irrelevances)
    return [total / i if i != 0 else 0.0 for i in irrelevances]


def allocate(budget: int, relevances: Sequence[float], alive: Sequence[int], cap: float = 1.0,
             mode: str = "softmax") -> list[int]:
    """How many weights each tensor loses: ``budget`` shared by ``softmax`` of the relevances (or in ``proportional``
    to them) over the tensors with R > 0, each capped at ``floor(cap * alive)``; a capped tensor's excess goes to the
    others by the same rule. Integer counts (largest remainders); they sum to ``min(budget, total room)``."""
    n = len(relevances)
    room = [int(math.floor(cap * a + 1e-9)) if r > 0 else 0 for r, a in zip(relevances, alive)]
    budget = min(int(budget), sum(room))
    eligible = [i for i in range(n) if room[i] > 0]
    if budget <= 0 or not eligible:
        return [0] * n
    if mode == "softmax":
        top = max(relevances[i] for i in eligible)
        weight = {i: math.exp(relevances[i] - top) for i in eligible}
    elif mode == "proportional":
        weight = {i: float(relevances[i]) for i in eligible}
    else:
        raise ValueError(f"allocation {mode!r}: use softmax or proportional")
    share = [0.0] * n
    active, left = set(eligible), float(budget)
    while active and left > 0:
        total = sum(weight[i] for i in active)
        if total <= 0:  # the rest underflowed in the softmax: fill by room
            weight.update({i: float(room[i]) for i in active})
            total = sum(weight[i] for i in active)
        over = [i for i in active if left * weight[i] / total > room[i]]
        if not over:
            for i in active:
                share[i] = left * weight[i] / total
            break
        for i in over:
            share[i] = float(room[i])
            left -= room[i]
            active.discard(i)
    counts = [min(room[i], int(math.floor(share[i] + 1e-9))) for i in range(n)]
    rest = budget - sum(counts)
    for i in sorted(range(n), key=lambda i: share[i] - counts[i], reverse=True) * 2:
        if rest <= 0:
            break
        if counts[i] < room[i]:
            counts[i] += 1
            rest -= 1
    while rest > 0:  # rounding left a few over: anywhere with room
        i = next(i for i in eligible if counts[i] < room[i])
        counts[i] += 1
        rest -= 1
    return counts


# -- neuron states ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def on_fractions(model: nn.Module, batches: Iterable[dict[str, Tensor]] | Iterable[Tensor],
                 zero_is_on: bool = False) -> dict[str, Tensor]:
    """Per ReLU call site, each neuron's fraction of ON states (eq. 2.16) over ``batches`` (eval mode), float64 on
    the CPU: 0 = always OFF, 1 = always ON. Sites as :func:`regstory.pruning.entropy.neuron_entropies` names them."""
    return {site: p_on.double() for site, p_on in entropy_on_fractions(model, batches, zero_is_on).items()}


def state_counts(p_on: Tensor) -> tuple[int, int, int]:
    """(non-zero entropy, always OFF, always ON) neurons of a layer (Fig. 2.13)."""
    off, on = int((p_on == 0).sum()), int((p_on == 1).sum())
    return p_on.numel() - off - on, off, on


def is_constant(p_on: Tensor) -> bool:
    """Every neuron always OFF or always ON: the layer's entropy is 0."""
    return bool(((p_on == 0) | (p_on == 1)).all())


class NeuronStates(ActivationEntropy):
    """The sweep's entropy measurement (same subset, same ``entropy/*`` keys) that also keeps each site's p_on."""

    def __init__(self, samples: int | None, zero_is_on: bool):
        super().__init__(samples, zero_is_on)
        self.p_on: dict[str, Tensor] = {}

    def __call__(self, ctx: "RunContext") -> dict[str, float]:
        self.p_on = on_fractions(ctx.model, self.subset(ctx), self.zero_is_on)
        return entropy_summary({site: binary_entropy_bits(p) for site, p in self.p_on.items()})


class RoundReport(Measurement):
    """The NEPENTHE keys of a round's record (runs after the sweep's other measurements, before pruning)."""

    def measure(self, sweep: "PruningSweep", ctx: "RunContext", record: dict[str, Any]) -> None:
        sweep.report(ctx, record)


# -- which weights feed which rectifier ------------------------------------------------------------------------------
#: autograd nodes a neuron's pre-activation may pass on its way from a Linear/Conv to its ReLU (same channels)
_PASS = ("AddBackward", "NativeBatchNormBackward", "CudnnBatchNormBackward", "MiopenBatchNormBackward")


def rectifier_producers(model: nn.Module, input_shape: Sequence[int]
                        ) -> tuple[dict[str, tuple[str | None, str | None]], dict[str, list[str]]]:
    """Which modules make each ReLU call site's neurons (sites in call order, named as the activation recorder
    names them), read from one eval-mode forward of a zero input:

    - ``producers[site] = (layer, norm)``: the Linear/Conv whose output the ReLU reads directly or through one
      BatchNorm (``norm``), else ``(None, None)`` (e.g. a ReLU after a residual addition);
    - ``feeders[site]``: every Linear/Conv and normalisation module whose output reaches the ReLU through
      BatchNorms and additions only (a ResNet block's second conv and its shortcut conv feed the ReLU after the
      sum): their output channels are the site's neurons.

    The paths are followed backwards through the autograd graph of that forward."""
    made: dict[Any, tuple[str, str]] = {}  # grad_fn of a module's output -> ("layer" | "norm", name)
    inputs: dict[str, Any] = {}  # site -> grad_fn of the ReLU's input
    calls: dict[str, int] = {}

    def output_hook(kind: str, name: str):
        def hook(module, args, out):
            if isinstance(out, Tensor) and out.grad_fn is not None:
                made[out.grad_fn] = (kind, name)
        return hook

    def relu_hook(name: str):
        def hook(module, args):
            k = calls.get(name, 0)
            calls[name] = k + 1
            site = name if k == 0 else f"{name}#{k}"
            inputs[site] = args[0].grad_fn if args and isinstance(args[0], Tensor) else None
        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_LAYERS):
            handles.append(module.register_forward_hook(output_hook("layer", name)))
        elif isinstance(module, NORM_LAYERS):
            handles.append(module.register_forward_hook(output_hook("norm", name)))
        elif isinstance(module, RECTIFIERS):
            handles.append(module.register_forward_pre_hook(relu_hook(name)))
    inplace = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    device, dtype = (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)
    was_training = model.training
    model.eval()
    try:
        for m in inplace:  # an in-place ReLU would rewrite its input's grad_fn
            m.inplace = False
        with torch.enable_grad():
            model(torch.zeros((1, *input_shape), device=device, dtype=dtype, requires_grad=True))
    finally:
        for h in handles:
            h.remove()
        for m in inplace:
            m.inplace = True
        model.train(was_training)
    producers: dict[str, tuple[str | None, str | None]] = {}
    feeders: dict[str, list[str]] = {}
    for site, node in inputs.items():
        found: list[str] = []
        chain: list[tuple[str, str]] = []  # the modules met along a path without an addition
        stack, seen, through_add = [node], set(), False
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            kind, name = made.get(fn, (None, None))
            if kind is not None and name not in found:
                found.append(name)
                if not through_add:
                    chain.append((kind, name))
            if kind == "layer":
                continue
            if kind == "norm" or type(fn).__name__.startswith(_PASS):
                through_add = through_add or type(fn).__name__.startswith("AddBackward")
                stack.extend(next_fn for next_fn, _ in fn.next_functions)
        feeders[site] = found
        layers = [n for k, n in chain if k == "layer"]
        norms = [n for k, n in chain if k == "norm"]
        direct = not through_add and len(layers) == 1 and len(norms) <= 1
        producers[site] = (layers[0], norms[0] if norms else None) if direct else (None, None)
    return producers, feeders


def module_of(site: str) -> str:
    """``layer1.0.relu#1`` -> ``layer1.0.relu``."""
    return site.split("#")[0]


# -- the collapsed MLP -----------------------------------------------------------------------------------------------
class Stage(nn.Module):
    """One non-linear stage of a collapsed MLP: ``relu(linear(x))`` plus ``skip(x)`` (a Linear: merged affine
    blocks), ``x`` (``identity_skip``: a residual block as it was) or nothing."""

    def __init__(self, linear: nn.Linear, skip: nn.Linear | None = None, identity_skip: bool = False):
        super().__init__()
        self.linear, self.act, self.skip, self.identity_skip = linear, nn.ReLU(), skip, identity_skip

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.linear(x))
        if self.skip is not None:
            return out + self.skip(x)
        return out + x if self.identity_skip else out


class CollapsedMLP(Classifier):
    """An MLP after NEPENTHE's collapse: flatten, the non-linear :class:`Stage` s, the head. Depth = stages + 1."""

    def __init__(self, stages: list[Stage], head: nn.Linear):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for stage in self.stages:
            x = stage(x)
        return x

    @property
    def depth(self) -> int:
        return len(self.stages) + 1


def _linear(weight: Tensor, bias: Tensor, like: nn.Linear) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.to(like.weight.dtype))
        layer.bias.copy_(bias.to(like.weight.dtype))
    return layer


@torch.no_grad()
def collapse_mlp(model: MLP, p_on: dict[str, Tensor], input_shape: Sequence[int] | None = None
                 ) -> tuple[CollapsedMLP, ModelChange]:
    """The depth-reduced :class:`CollapsedMLP` of ``model`` (module docstring, "Collapse") and the
    :class:`ModelChange` from ``model`` to it. ``p_on``: each ReLU site's ON fractions (``acts.<i>``); a ReLU with
    all neurons constant, or an ``nn.Identity`` (a replaced one), is a linear stage. With ``input_shape``, the
    always-OFF units are then removed by :func:`regstory.pruning.simplify.simplify`. Same function as ``model`` on
    the inputs ``p_on`` was measured on, up to float rounding."""
    from regstory.pruning.simplify import compose, simplify

    stages, sources = [], {}
    pending: tuple[Tensor, Tensor] | None = None  # affine map (M, m) waiting to be folded into the next stage
    head_untouched = False
    pieces = [(f"layers.{i}", layer, act, model.residual and i > 0 and layer.in_features == layer.out_features)
              for i, (layer, act) in enumerate(zip(model.layers, model.acts))] + [("head", model.head, None, False)]
    for i, (name, layer, act, skip) in enumerate(pieces):
        w = layer.weight.detach().double()
        b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(w.shape[0])
        gate = None  # None: the ReLU stays; else the 0/1 diagonal D of a linear stage
        off = None
        if act is None or isinstance(act, nn.Identity):
            gate = torch.ones_like(b)
        elif isinstance(act, nn.ReLU):
            p = p_on.get(f"acts.{i}")
            if p is not None:
                p = p.to(w.device)
                if is_constant(p):
                    gate = (p == 1).double()
                else:
                    off = p == 0
        else:
            raise ValueError(f"collapse_mlp: activation {type(act).__name__} is not a ReLU")
        untouched = pending is None
        if act is None:
            head_untouched = untouched
        if pending is not None:
            m_mat, m_vec = pending
            w, b = w @ m_mat, w @ m_vec + b
        if gate is not None:  # linear: becomes (part of) the pending affine map
            a, c = gate[:, None] * w, gate * b
            if skip:
                a, c = (a + m_mat, c + m_vec) if pending is not None else (a + torch.eye(w.shape[0], dtype=w.dtype,
                                                                                          device=w.device), c)
            pending = (a, c)
            continue
        if off is not None and off.any():  # always OFF: ReLU(z) = 0 on the data, and ReLU(0 x + 0) = 0
            w, b = w.clone(), b.clone()
            w[off], b[off] = 0, 0
        k = len(stages)
        skip_layer = _linear(m_mat, m_vec, layer) if (skip and pending is not None) else None
        stages.append(Stage(_linear(w, b, layer), skip_layer, identity_skip=skip and pending is None))
        if untouched:
            sources[f"stages.{k}.linear.weight"] = (f"{name}.weight", ())
            if layer.bias is not None:
                sources[f"stages.{k}.linear.bias"] = (f"{name}.bias", ())
        pending = None
    m_mat, m_vec = pending  # the head is linear: something is pending
    head = _linear(m_mat, m_vec, model.head)
    if head_untouched:
        sources["head.weight"] = ("head.weight", ())
        if model.head.bias is not None:
            sources["head.bias"] = ("head.bias", ())
    collapsed = CollapsedMLP(stages, head).train(model.training)
    change = ModelChange(sources)
    if input_shape is not None:
        collapsed, second, _ = simplify(collapsed, input_shape)
        change = compose(change, second)
    return collapsed, change


def nonlinear_depth(model: nn.Module) -> int:
    """Depth of an MLP (plain, collapsed, with replaced rectifiers) after collapse: its ReLU modules + 1."""
    return sum(isinstance(m, RECTIFIERS) for m in model.modules()) + 1


# -- the method ------------------------------------------------------------------------------------------------------
@option("method", "nepenthe", overrides={"rounds": 7, "retrain": "lr_rewind"})
class Nepenthe(PruningSweep):
    """Options (module docstring): ``rate`` in (0, 1] (0.5, Table 2.2), ``allocation`` softmax|proportional,
    ``cap`` in (0, 1], ``head_entropy`` (null or [0, 1] bits), ``remove`` rounds|end, ``merge``, and the shared
    pruning keys, with 7 rounds (Table 2.2's seven iterations) and ``retrain=lr_rewind`` (weights kept, the lr
    schedule replayed: the EGP code)."""

    def __init__(self, rate: Rate = 0.5, allocation: Allocation = "softmax", cap: Cap = 1.0,
                 head_entropy: HeadEntropy = None, remove: Remove = "rounds", merge: bool = True, **common):
        super().__init__(**common)
        self.rate, self.allocation, self.cap, self.head_entropy = rate, allocation, cap, head_entropy
        self.remove, self.merge = remove, merge
        base, self.entropy = self.entropy, NeuronStates(self.entropy.samples, self.entropy.zero_is_on)
        self.measures = [self.entropy if m is base else m for m in self.measures]
        self.measures.append(RoundReport())
        self.layers: list[str] = []  # rectifier sites of the model at set-up, in call order
        self.producers: dict[str, tuple[str | None, str | None]] = {}  # site -> direct (Linear/Conv, BatchNorm)
        self.feeders: dict[str, list[str]] = {}  # site -> modules whose output channels are its neurons
        self.removed: dict[str, dict[str, int]] = {}  # site -> {"off", "on", "round"} at its replacement
        self.merged: dict[str, Any] = {}  # the installed collapse: depth, params, sparsity before it
        self.extra: dict[str, Any] = {}  # keys added to the round's record by prune / removal
        self._merging = False

    # -- set-up and state -----------------------------------------------------------------------------------------
    def setup(self, ctx: "RunContext") -> None:
        super().setup(ctx)
        self.producers, self.feeders = rectifier_producers(ctx.model, tuple(ctx.data.input_shape))
        self.layers = list(self.producers)
        if not self.layers and not isinstance(ctx.model, CollapsedMLP) and not ctx.cfg.get("resume"):
            raise ConfigError(f"method=nepenthe measures and removes ReLU layers, and the model "
                              f"({type(ctx.model).__name__}) has none: use an architecture with nn.ReLU "
                              f"activations (an MLP needs arch.activation=relu and arch.depth >= 1)")

    def unit_sites(self) -> list[str | None]:
        """The rectifier site each masked tensor's neurons (dim 0) feed, or None (the head)."""
        by_module: dict[str, str] = {}
        for site, names in self.feeders.items():
            for name in names:
                by_module.setdefault(name, site)
        return [by_module.get(name.rpartition(".")[0]) for name in self.masks.names]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["nepenthe"] = {"layers": list(self.layers), "producers": dict(self.producers),
                             "feeders": {k: list(v) for k, v in self.feeders.items()},
                             "removed": copy.deepcopy(self.removed), "merged": dict(self.merged)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = state.get("nepenthe", {})
        self.layers = list(mine.get("layers", self.layers))
        self.producers = {k: tuple(v) for k, v in mine.get("producers", self.producers).items()}
        self.feeders = {k: list(v) for k, v in mine.get("feeders", self.feeders).items()}
        self.removed = copy.deepcopy(mine.get("removed", {}))
        self.merged = dict(mine.get("merged", {}))
        super().load_state_dict(state)

    def model_replaced(self, ctx: "RunContext", change: ModelChange) -> None:
        super().model_replaced(ctx, change)
        if self._merging:  # the merged tensors' exact zeros are pruned; the rest of them is dense
            self.masks.set([m * p.detach().ne(0).to(m.dtype) for m, p in zip(self.masks.masks, self.masks.params)])

    # -- per round ------------------------------------------------------------------------------------------------
    def end_round(self, ctx: "RunContext") -> dict[str, Any]:
        self.extra = {}
        record = super().end_round(ctx)  # measurements (NeuronStates, RoundReport...), then prune() if a round follows
        if ctx.stop_rounds or ctx.round + 1 >= self.num_rounds():
            self.linearize(ctx)
            if self.merge:
                self.install_collapse(ctx)
        record.update(self.extra)
        return record

    def layer_states(self) -> dict[str, tuple[float, tuple[int, int, int]]]:
        """Per layer (set-up order): (mean entropy, (non-zero, OFF, ON) counts); removed layers as at removal."""
        out = {}
        for site in self.layers:
            if site in self.removed:
                r = self.removed[site]
                out[site] = (0.0, (0, r["off"], r["on"]))
            elif site in self.entropy.p_on:
                p = self.entropy.p_on[site]
                out[site] = (float(binary_entropy_bits(p).double().mean()), state_counts(p))
        return out

    def report(self, ctx: "RunContext", record: dict[str, Any]) -> None:
        """The round's NEPENTHE keys (module docstring), measured on the trained model before pruning."""
        states = self.layer_states()
        for site, (h, (nonzero, off, on)) in states.items():
            record[f"layer_entropy/{site}"] = h
            record[f"states_nonzero/{site}"], record[f"states_off/{site}"], record[f"states_on/{site}"] = \
                nonzero, off, on
        for k, h in enumerate(sorted(h for h, _ in states.values())[:TABLE_LAYERS]):
            record[f"lowest_entropy/{k + 1}"] = h
        record["removable_layers"] = sum(1 for _, (nz, _, _) in states.values() if nz == 0)
        record["removed_layers"] = len(self.removed)
        for name, mask in zip(self.masks.names, self.masks.masks):
            record[f"layer_sparsity/{name}"] = 1.0 - float(mask.float().mean())
        if isinstance(ctx.model, MLP):
            record.update(self.check_collapse(ctx))
        elif isinstance(ctx.model, CollapsedMLP):
            record["depth_after_collapse"] = ctx.model.depth

    @torch.no_grad()
    def check_collapse(self, ctx: "RunContext") -> dict[str, Any]:
        """Build the collapsed model now and compare it with the masked one on the measured subset."""
        collapsed, _ = collapse_mlp(ctx.model, self.entropy.p_on, tuple(ctx.data.input_shape))
        collapsed.eval()
        was_training = ctx.model.training
        ctx.model.eval()
        diff = 0.0
        try:
            for batch in self.entropy.subset(ctx):
                diff = max(diff, float((collapsed(batch["x"]) - ctx.model(batch["x"])).abs().max()))
        finally:
            ctx.model.train(was_training)
        out = {"depth_after_collapse": collapsed.depth, "collapse_max_abs_diff": diff,
               "collapse_params": sum(p.numel() for p in collapsed.parameters())}
        if "test" in ctx.loaders:
            out["collapse_test_acc"] = ctx.evaluate("test", model=collapsed)["acc"]
        return out

    def prune(self, ctx: "RunContext") -> None:
        """Between rounds: replace the zero-entropy rectifiers (``remove=rounds``), then prune ``rate`` of the
        remaining weights, allocated over the tensors by eq. 2.23-2.24."""
        if self.remove == "rounds":
            self.linearize(ctx)
        p_on = self.entropy.p_on
        irr = []
        for name, param, mask, site in zip(self.masks.names, self.masks.params, self.masks.masks, self.unit_sites()):
            rows = param.shape[0]
            if site is None:
                h = None if self.head_entropy is None else torch.full((rows,), float(self.head_entropy))
            elif site in self.removed or site not in p_on:
                h = torch.zeros(rows)
            else:
                h = binary_entropy_bits(p_on[site])
                h = h if h.numel() == rows else torch.zeros(rows)  # a tensor not sized by the site's neurons
            irr.append(0.0 if h is None else irrelevance(h, param, mask))
        rel = relevance(irr)
        alive = [int(m.sum()) for m in self.masks.masks]
        remaining, total = sum(alive), sum(m.numel() for m in self.masks.masks)
        target = self.next_sparsity(self.masks.sparsity(), self.rate)
        if self.target_sparsity is not None and target < 1 - (1 - self.masks.sparsity()) * (1 - self.rate):
            budget = max(0, remaining - int(round((1 - target) * total)))
        else:
            budget = int(round(self.rate * remaining))
        counts = allocate(budget, rel, alive, self.cap, self.allocation)
        scores = [p.detach().abs() for p in self.masks.params]
        self.masks.set(keep_masks_from_scores(scores, self.masks.masks, counts, "layerwise"))
        self.masks.apply_to_weights()
        self.extra["budget"], self.extra["pruned"] = budget, sum(counts)
        for name, r, n in zip(self.masks.names, rel, counts):
            self.extra[f"relevance/{name}"] = r
            self.extra[f"allocation/{name}"] = n

    # -- removal and collapse -------------------------------------------------------------------------------------
    def silenceable(self, model: nn.Module, site: str, p_on: Tensor) -> bool:
        """Its always-OFF neurons (if any) can be made to output 0: a Linear/Conv feeds the ReLU directly, or through
        one BatchNorm with an affine scale and shift (zeroed for those channels)."""
        if not bool((p_on == 0).any()):
            return True
        layer, norm = self.producers.get(site, (None, None))
        return layer is not None and (norm is None or getattr(model.get_submodule(norm), "weight", None) is not None)

    @torch.no_grad()
    def linearize(self, ctx: "RunContext") -> None:
        """Replace the ReLU modules whose every site has zero entropy by ``nn.Identity`` (model surgery), with their
        always-OFF neurons silenced: incoming rows pruned, bias (or BatchNorm scale and shift) zeroed."""
        p_on = self.entropy.p_on
        sites_of: dict[str, list[str]] = {}
        for site in self.layers:
            if site not in self.removed:
                sites_of.setdefault(module_of(site), []).append(site)
        chosen = [module for module, sites in sites_of.items()
                  if all(s in p_on and is_constant(p_on[s]) and self.silenceable(ctx.model, s, p_on[s])
                         for s in sites)]
        if not chosen:
            self.extra["removed_layers"] = len(self.removed)
            return
        new = copy.deepcopy(ctx.model)
        silenced: dict[str, Tensor] = {}
        for module in chosen:
            for site in sites_of[module]:
                off = (p_on[site] == 0)
                if off.any():
                    layer, norm = self.producers[site]
                    target = new.get_submodule(norm if norm is not None else layer)
                    off_dev = off.to(target.weight.device)
                    for tensor in (target.weight, getattr(target, "bias", None)):
                        if tensor is not None:
                            tensor[off_dev] = 0
                    key = f"{layer}.weight"
                    silenced[key] = off if key not in silenced else silenced[key] | off
                _, n_off, n_on = state_counts(p_on[site])
                self.removed[site] = {"off": n_off, "on": n_on, "round": ctx.round}
            _replace(new, module, nn.Identity())
        ctx.replace_model(new, ModelChange.identity(new))
        masks = []
        for name, mask in zip(self.masks.names, self.masks.masks):
            mask = mask.clone()
            if name in silenced:
                mask[silenced[name].to(mask.device)] = 0
            masks.append(mask)
        self.masks.set(masks)
        self.masks.apply_to_weights()
        self.masks.zero_optimizer_state(ctx.optimizer)
        self.extra["removed_layers"] = len(self.removed)

    @torch.no_grad()
    def install_collapse(self, ctx: "RunContext") -> None:
        """After the last round: the collapsed MLP replaces the model when it is shallower."""
        model = ctx.model
        if not isinstance(model, MLP):
            return
        collapsed, change = collapse_mlp(model, self.entropy.p_on, tuple(ctx.data.input_shape))
        if collapsed.depth >= len(model.layers) + 1:
            return
        before = self.masks.sparsity()
        self._merging = True
        try:
            ctx.replace_model(collapsed, change)
        finally:
            self._merging = False
        self.merged = {"depth": collapsed.depth, "params": sum(p.numel() for p in collapsed.parameters()),
                       "sparsity_before_merge": before, "round": ctx.round}
        self.extra["merged_depth"] = collapsed.depth

    def finalize(self, ctx: "RunContext") -> dict[str, Any]:
        out = super().finalize(ctx)
        out.update(removed_layers=len(self.removed), removed_sites=list(self.removed), layers=len(self.layers),
                   merged=bool(self.merged))
        if isinstance(ctx.model, (MLP, CollapsedMLP)):
            out["depth_dense"] = len(self.layers) + 1
            out["depth_final"] = nonlinear_depth(ctx.model)
        if self.merged:  # final_sparsity stays the sweep's (comparable with IMP's); the collapsed model's apart
            out["merged_sparsity"] = out["final_sparsity"]
            out["final_sparsity"] = self.merged["sparsity_before_merge"]
            out["merged_params"] = self.merged["params"]
            if "test" in ctx.loaders:
                out["merged_test_acc"] = ctx.evaluate("test")["acc"]
        return out
