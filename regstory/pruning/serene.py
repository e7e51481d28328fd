"""SeReNe: sensitivity-based regularisation of neurons (thesis sec. 2.3.1, eq. 2.2-2.8).

The sensitivity of the network output y_N (the C logits) to the post-synaptic potential p_{n,i} of neuron i of layer
n (the output of its conv / linear module, before normalisation and rectifier) is (eq. 2.3)

    S_{n,i} = 1/C * sum_k |d y_{N,k} / d p_{n,i}|,

taken per sample (and per spatial position of a conv neuron) and averaged over the batch (and positions). Eq. 2.3
needs one backward per output; ``bound`` picks one of the two one-backward approximations:

- ``lower`` (eq. 2.5, the triangle inequality): |1/C * sum_k d y_{N,k} / d p_{n,i}|, the absolute value of the
  gradient of the sum of the logits (not of the softmax, which sums to 1), i.e. one backward of
  ``logits.sum()`` to the recorded potentials. S_low <= S.
- ``upper`` (eq. 2.6): the same backward through the network with every local Jacobian replaced by its absolute
  value: weights |W|, each rectifier a fixed gate |f'(p)| taken from the step's real forward (sum over paths of
  |products|). S <= S_up. Computed by a second forward of the step's input through the model with |W|, zero biases
  and the gates fixed (:func:`upper_bound`); it supports conv/linear layers, element-wise activation modules and
  pooling / flattening / reshaping (a max-pool picks its maximum on the copy's values, which may differ from the
  real forward's: the inequality is then no longer guaranteed). Models with normalisation layers are refused with
  ``bound=upper``: their train-mode Jacobian mixes samples.

The potentials come from the loop's activation recording (``activation_sites`` = the conv/linear module names,
``activation_grads=True``, so they are in the step's graph); the sensitivity is computed in ``extra_loss`` (which
adds no term) while the graph exists, and the update of eq. 2.8 is applied in ``after_step``:

    theta_{n,i,j} <- theta_{n,i,j} - eta * dL/dtheta_{n,i,j} - lambda * theta_{n,i,j} * max(0, 1 - S_{n,i})

(eq. 2.7-2.8) on the neuron's incoming weights (row / filter) and its bias; the optimizer does the eta term, the
lambda term uses the updated weights (``decay_of=stepped``, default) or those before the step (``pre_step``, eq. 2.8
literally). BatchNorm gamma/beta of a neuron are not decayed here (no model in :mod:`regstory.models` puts one
after a layer that SeReNe regularises in a way this module can pair; left for the conv nets). The output layer
(whose potentials are the logits, S = 1/C each) is not regularised unless ``regularize_output=true``.
The train / threshold / repeat protocol, ``pinned`` and ``recover_tolerance`` are those of
:class:`regstory.pruning.lobster.RegularisedPruning`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Sequence

import torch
from torch import Tensor, nn

from regstory.activations import ACTIVATION_TYPES, ActivationRecorder
from regstory.config import ConfigError
from regstory.options import OneOf, option
from regstory.plugins import activation_recorder
from regstory.pruning.lobster import RegularisedPruning
from regstory.pruning.masks import NORM_LAYERS, PRUNABLE_LAYERS, forward_order

if TYPE_CHECKING:
    from regstory.loop import RunContext

BOUNDS = ("lower", "upper")


def neuron_dim(module: nn.Module) -> int:
    """The neuron axis of a module's output: channels (1) of a conv, the last axis of a linear layer."""
    return -1 if isinstance(module, nn.Linear) else 1


def per_neuron_mean(t: Tensor, dim: int) -> Tensor:
    """Mean over every axis but ``dim`` (batch and positions): shape [neurons]."""
    dim = dim % t.dim()
    return t.float().mean([d for d in range(t.dim()) if d != dim]) if t.dim() > 1 else t.float()


def lower_bound(logits: Tensor, potentials: Sequence[Tensor], dims: Sequence[int]) -> list[Tensor]:
    """Eq. 2.5 per neuron: mean over batch/positions of |d(sum_k y_k)/dp| / C; one backward, graph retained."""
    num_classes = logits.shape[-1]
    grads = torch.autograd.grad(logits.float().sum(), list(potentials), retain_graph=True, allow_unused=True)
    return [torch.zeros(p.shape[d], device=p.device) if g is None else per_neuron_mean(g.abs(), d) / num_classes
            for p, g, d in zip(potentials, grads, dims)]


def activation_gate(module: nn.Module, pre: Tensor) -> Tensor:
    """|f'(p)| of an element-wise activation module at the real forward's input ``pre`` (detached)."""
    with torch.enable_grad():
        z = pre.detach().float().requires_grad_(True)
        y = module(z.clone())
        return torch.autograd.grad(y.sum(), z)[0].abs().to(pre.dtype)


def upper_bound(model: nn.Module, x: Tensor, layers: Sequence[str], gates: dict[str, Tensor]) -> list[Tensor]:
    """Eq. 2.6 per neuron of each named conv/linear layer: a forward of ``x`` through ``model`` with weights |W|,
    zero biases and every activation call site replaced by multiplication with its gate (``gates[site]``, sites
    named as :class:`regstory.activations.ActivationRecorder` names them), then one backward of the sum of the
    outputs; mean over batch/positions of the gradient at each layer's output, / C. Runs in eval mode (no dropout)."""
    named = dict(model.named_modules())
    params: dict[str, Tensor] = {}
    for name, module in named.items():
        if isinstance(module, PRUNABLE_LAYERS):
            prefix = f"{name}." if name else ""
            params[prefix + "weight"] = module.weight.detach().abs()
            if module.bias is not None:
                params[prefix + "bias"] = torch.zeros_like(module.bias.detach())
    captured: dict[str, Tensor] = {}
    calls: dict[str, int] = {}
    handles = []

    def gate_hook(name: str):
        def hook(module, args, output):
            k = calls.get(name, 0)
            calls[name] = k + 1
            site = name if k == 0 else f"{name}#{k}"
            return args[0] * gates[site]
        return hook

    def capture_hook(name: str):
        def hook(module, args, output):
            captured.setdefault(name, output)
        return hook

    for name, module in named.items():
        if isinstance(module, ACTIVATION_TYPES):
            handles.append(module.register_forward_hook(gate_hook(name)))
        if name in layers:
            handles.append(module.register_forward_hook(capture_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            leaf = x.detach().float().requires_grad_(True)
            out = torch.func.functional_call(model, params, (leaf,), strict=False)
            wanted = [captured[n] for n in layers]
            grads = torch.autograd.grad(out.sum(), wanted, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    num_classes = out.shape[-1]
    return [torch.zeros(t.shape[neuron_dim(named[n])], device=t.device) if g is None
            else per_neuron_mean(g, neuron_dim(named[n])) / num_classes for n, t, g in zip(layers, wanted, grads)]


def sensitivity(model: nn.Module, x: Tensor, layers: Sequence[str], bound: str = "lower") -> list[Tensor]:
    """Per-neuron sensitivity bound of each named conv/linear layer on a batch ``x`` (its own recorded forward):
    ``lower`` eq. 2.5, ``upper`` eq. 2.6. What the plugin computes per step, for use outside a run."""
    acts = [n for n, m in model.named_modules() if isinstance(m, ACTIVATION_TYPES)]
    recorder = ActivationRecorder(model, list(layers) + acts, keep_graph=True)
    with torch.enable_grad(), recorder.capture():
        logits = model(x)
    named = dict(model.named_modules())
    if bound == "lower":
        return lower_bound(logits, [recorder.pre[n] for n in layers], [neuron_dim(named[n]) for n in layers])
    gates = {s: activation_gate(named[s.split("#")[0]], recorder.pre[s]) for s in recorder.sites
             if s.split("#")[0] in acts}
    return upper_bound(model, x, layers, gates)


@torch.no_grad()
def serene_decay(weights: Sequence[Tensor], biases: Sequence[Tensor | None], sens: Sequence[Tensor], lmbda: float,
                 base_w: Sequence[Tensor] | None = None, base_b: Sequence[Tensor | None] | None = None) -> None:
    """Eq. 2.7-2.8 in place: each neuron's weights (row / filter, axis 0) and bias decay by
    lmbda * theta * max(0, 1 - S_n); theta = the ``base`` tensors (before the step) or the current ones."""
    for i, (w, b, s) in enumerate(zip(weights, biases, sens)):
        insens = (1 - s.to(w.dtype)).clamp(min=0)
        bw = w if base_w is None else base_w[i]
        w.sub_(lmbda * bw * insens.view(-1, *[1] * (w.dim() - 1)))
        if b is not None:
            bb = b if base_b is None else base_b[i]
            b.sub_(lmbda * bb * insens)


@option("method", "serene", overrides={"rounds": 30, "retrain": "lr_rewind"})
class Serene(RegularisedPruning):
    """Options: ``bound`` lower|upper (eq. 2.5 / 2.6), ``regularize_output``, ``lmbda`` (lambda > 0), ``decay_of``,
    ``pinned``, ``restore_best``, ``recover_tolerance``, ``twt`` in (0, 1), ``eps``, ``loss_tol`` and the shared
    pruning keys, with 30 rounds and ``retrain=lr_rewind``."""

    activation_grads = True

    def __init__(self, bound: Annotated[str, OneOf(*BOUNDS)] = "lower", regularize_output: bool = False, **common):
        super().__init__(**common)
        self.bound, self.regularize_output = bound, regularize_output
        self.layers: list[str] = []
        self.activations_: list[str] = []
        self.sens: list[Tensor] | None = None

    def setup(self, ctx: "RunContext") -> None:
        super().setup(ctx)
        self.find_layers(ctx)
        if self.bound == "upper" and any(isinstance(m, NORM_LAYERS) for m in ctx.model.modules()):
            raise ConfigError("method.bound=upper: the model has normalisation layers, whose train-mode Jacobian "
                              "mixes samples; use method.bound=lower")
        # the loop's recorder, rebuilt now that this plugin's sites (module names of this model) are known
        self.activation_sites = self.layers + (self.activations_ if self.bound == "upper" else [])
        ctx.activations = activation_recorder(ctx.plugins, ctx.model)

    def find_layers(self, ctx: "RunContext") -> None:
        named = [n for n, m in ctx.model.named_modules() if isinstance(m, PRUNABLE_LAYERS)]
        data = getattr(ctx, "data", None)
        order = forward_order(ctx.model, tuple(data.input_shape)) if data is not None else named
        order = order or named
        self.layers = [n for n in order if self.regularize_output or n != order[-1]]
        self.activations_ = [n for n, m in ctx.model.named_modules() if isinstance(m, ACTIVATION_TYPES)]

    def model_replaced(self, ctx: "RunContext", change) -> None:
        super().model_replaced(ctx, change)
        self.find_layers(ctx)

    def extra_loss(self, ctx: "RunContext", batch: dict[str, Tensor], out) -> dict[str, Tensor]:
        """Computes the step's sensitivities (eq. 2.5 or 2.6) while the graph exists; adds no loss term."""
        rec = out.activations
        named = dict(ctx.model.named_modules())
        pots = [rec.pre[n] for n in self.layers]
        if self.bound == "lower":
            self.sens = [s.detach() for s in lower_bound(out.logits, pots, [neuron_dim(named[n]) for n in self.layers])]
        else:
            gates = {s: activation_gate(named[s.split("#")[0]], rec.pre[s]) for s in rec.sites
                     if s.split("#")[0] in self.activations_}
            self.sens = [s.detach() for s in upper_bound(ctx.model, batch["x"], self.layers, gates)]
        return {}

    def decayed(self, ctx: "RunContext") -> list[Tensor]:
        named = dict(ctx.model.named_modules())
        out = []
        for n in self.layers:
            out.append(named[n].weight)
            if named[n].bias is not None:
                out.append(named[n].bias)
        return out

    def after_step(self, ctx: "RunContext") -> None:
        """Eq. 2.8's lambda term with the step's sensitivities S^t."""
        super().after_step(ctx)
        if self.sens is None:
            return
        named = dict(ctx.model.named_modules())
        weights = [named[n].weight for n in self.layers]
        biases = [named[n].bias for n in self.layers]
        base_w = base_b = None
        if self.pre_step is not None:
            it = iter(self.pre_step)
            base_w, base_b = [], []
            for b in biases:
                base_w.append(next(it))
                base_b.append(next(it) if b is not None else None)
        serene_decay(weights, biases, self.sens, self.lmbda, base_w, base_b)
        self.sens = self.pre_step = None

    def end_round(self, ctx: "RunContext") -> dict[str, Any]:
        record = super().end_round(ctx)
        record["bound"] = self.bound
        return record
