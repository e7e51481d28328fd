"""Activation entropy of rectifier-activated layers (thesis sec. 2.4.2 and eq. 2.16-2.17).

A neuron's state on one input is the sign of its pre-activation, i.e. of the input of its ``nn.ReLU`` (eq. 2.16);
a convolutional neuron is a channel, its states counted over all samples and all spatial positions. With
p_on = fraction of ON states, the neuron's entropy is the binary entropy in bits (eq. 2.17):
H = -p_on log2 p_on - (1 - p_on) log2 (1 - p_on), with 0 log 0 = 0.

Layer entropy = mean over the layer's neurons (the thesis' definition: dead and always-ON neurons count as 0 bit).
The "non-constant" layer mean averages only neurons with 0 < p_on < 1 (how the authors' EGP code averages; a layer
with no such neuron counts 0). Network means = mean over layers of the layer means. A pre-activation of exactly 0
is OFF by default (the DSD^2 entropy script); ``zero_is_on=True`` counts it ON (the EASIER code's ``>= 0``).
Pre-activations are read by forward *pre*-hooks, so in-place ReLUs do not matter.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


def binary_entropy_bits(p: Tensor) -> Tensor:
    """Eq. 2.17: binary entropy in bits of an ON-probability, elementwise, 0 where p is 0 or 1."""
    p = p.double()
    q = 1 - p
    h = -(torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))
          + torch.where(q > 0, q * torch.log2(q.clamp_min(1e-300)), torch.zeros_like(q)))
    return h.float()


class OnCounter:
    """Forward pre-hooks on every ``nn.ReLU`` that count, per neuron (dim 1), ON states and observations."""

    def __init__(self, model: nn.Module, zero_is_on: bool = False):
        self.zero_is_on = zero_is_on
        self.on: dict[str, Tensor] = {}
        self.total: dict[str, int] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name))
                        for name, m in model.named_modules() if isinstance(m, nn.ReLU)]

    def _hook(self, name: str):
        def hook(module, inputs):
            z = inputs[0].detach()
            state = z >= 0 if self.zero_is_on else z > 0
            reduce = [d for d in range(z.ndim) if d != 1]  # samples and spatial positions
            on = state.sum(dim=reduce) if reduce else state.long()
            self.on[name] = self.on.get(name, 0) + on.to(torch.long)
            self.total[name] = self.total.get(name, 0) + z.numel() // z.shape[1]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def p_on(self) -> dict[str, Tensor]:
        return {name: self.on[name].double().cpu() / self.total[name] for name in self.on}


@torch.no_grad()
def neuron_entropies(model: nn.Module, batches: Iterable[dict[str, Tensor]] | Iterable[Tensor],
                     zero_is_on: bool = False) -> dict[str, Tensor]:
    """Per-neuron entropy (bits) of every ReLU-activated layer over ``batches`` (model in eval mode)."""
    was_training = model.training
    model.eval()
    counter = OnCounter(model, zero_is_on)
    try:
        for batch in batches:
            model(batch["x"] if isinstance(batch, dict) else batch)
    finally:
        counter.remove()
        model.train(was_training)
    return {name: binary_entropy_bits(p) for name, p in counter.p_on().items()}


def entropy_summary(per_neuron: dict[str, Tensor]) -> dict[str, float]:
    """Layer means (``entropy/<layer>``), network mean over layers (``entropy_mean``), and the same over
    non-constant neurons only (``entropy_nc/<layer>``, ``entropy_mean_nonconstant``), plus the fraction of
    constant (zero-entropy) neurons."""
    out: dict[str, float] = {}
    layer_all, layer_nc, constant, count = [], [], 0, 0
    for name, h in per_neuron.items():
        live = h[h > 0]
        all_mean = h.mean().item()
        nc_mean = live.mean().item() if len(live) else 0.0
        out[f"entropy/{name}"] = all_mean
        out[f"entropy_nc/{name}"] = nc_mean
        layer_all.append(all_mean)
        layer_nc.append(nc_mean)
        constant += int((h == 0).sum())
        count += h.numel()
    out["entropy_mean"] = sum(layer_all) / len(layer_all) if layer_all else 0.0
    out["entropy_mean_nonconstant"] = sum(layer_nc) / len(layer_nc) if layer_nc else 0.0
    out["constant_neuron_fraction"] = constant / count if count else 0.0
    return out
