"""Activation entropy of rectifier-activated layers (thesis sec. 2.4.2 and eq. 2.16-2.17).

A neuron's state on one input is the sign of its pre-activation, i.e. of the input of its ``nn.ReLU`` (eq. 2.16);
a convolutional neuron is a channel, its states counted over all samples and all spatial positions. With
p_on = fraction of ON states, the neuron's entropy is the binary entropy in bits (eq. 2.17):
H = -p_on log2 p_on - (1 - p_on) log2 (1 - p_on), with 0 log 0 = 0.

Layer entropy = mean over the layer's neurons (the thesis' definition: dead and always-ON neurons count as 0 bit).
The "non-constant" layer mean averages only neurons with 0 < p_on < 1 (how the authors' EGP code averages; a layer
with no such neuron counts 0). Network means = mean over layers of the layer means. A pre-activation of exactly 0
is OFF by default (the DSD^2 entropy script); ``zero_is_on=True`` counts it ON (the EASIER code's ``>= 0``).
Each call site of a ReLU module is its own layer (a module reused k times per forward gives k layers, ``name``,
``name#1``, ...); pre-activations are read by :class:`regstory.activations.ActivationRecorder`, which runs in-place
ReLUs out of place while it records.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from regstory.activations import ActivationRecorder, NeuronMean


def binary_entropy_bits(p: Tensor) -> Tensor:
    """Eq. 2.17: binary entropy in bits of an ON-probability, elementwise, 0 where p is 0 or 1."""
    p = p.double()
    q = 1 - p
    h = -(torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))
          + torch.where(q > 0, q * torch.log2(q.clamp_min(1e-300)), torch.zeros_like(q)))
    return h.float()


#: the rectifiers whose input sign is a neuron's ON/OFF state (eq. 2.16)
RECTIFIERS: tuple[type[nn.Module], ...] = (nn.ReLU,)


class OnFraction(NeuronMean):
    """The reducer of one call site: per neuron (dim 1), the fraction of ON states (eq. 2.16) over samples and
    positions, returned in float64 so that one OFF state among ~10^7 observations still reads as p_on < 1."""

    def __init__(self, zero_is_on: bool = False):
        super().__init__(dim=1, transform=(lambda z: z >= 0) if zero_is_on else (lambda z: z > 0))

    def result(self) -> Tensor:
        if self.total is None:
            raise RuntimeError("OnFraction: nothing was recorded")
        return self.total / self.count


@torch.no_grad()
def neuron_entropies(model: nn.Module, batches: Iterable[dict[str, Tensor]] | Iterable[Tensor],
                     zero_is_on: bool = False) -> dict[str, Tensor]:
    """Per-neuron entropy (bits, eq. 2.17) of every rectifier-activated layer over ``batches`` (model in eval mode).

    One entry per *call site* of an ``nn.ReLU`` (:class:`regstory.activations.ActivationRecorder`): a module called
    k times per forward (torchvision's ResNet blocks reuse one ``relu`` after bn1, bn2 and the residual add) gives
    k layers ``name``, ``name#1``, ..., each with its own neurons: the i-th neuron of the l-th layer of eq. 2.16."""
    return {site: binary_entropy_bits(p_on) for site, p_on in on_fractions(model, batches, zero_is_on).items()}


@torch.no_grad()
def on_fractions(model: nn.Module, batches: Iterable[dict[str, Tensor]] | Iterable[Tensor],
                 zero_is_on: bool = False) -> dict[str, Tensor]:
    """Per ReLU call site (as :func:`neuron_entropies` names them), each neuron's fraction of ON states (eq. 2.16)
    over ``batches``, model in eval mode, on the CPU: 0 = always OFF, 1 = always ON."""
    was_training = model.training
    model.eval()
    recorder = ActivationRecorder(model, sites="auto", types=RECTIFIERS)
    try:
        with recorder.capture(reduce=lambda: OnFraction(zero_is_on), record=("pre",)):
            for batch in batches:
                model(batch["x"] if isinstance(batch, dict) else batch)
    finally:
        model.train(was_training)
    return {site: recorder.pre[site].cpu() for site in recorder.sites if site in recorder.pre}


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
