"""Simplification of a pruned fully connected net to a smaller dense one (thesis sec. 2.3: LOBSTER/SeReNe's
"simplified topology"), built on :func:`regstory.surgery.remove_units`.

For the chain of Linear layers of :class:`regstory.models.mlp.MLP` (hidden layers, then the head), a hidden unit goes
when it cannot change the output:

* **no incoming weight** (its row of W is zero): its output is the constant act(b_j). That constant's contribution,
  W'[:, j] * act(b_j), is added to the next layer's bias, then the unit is removed;
* **no outgoing weight** (its column in the next layer's W is zero): nothing reads it; it is removed.

The simplified model computes the same function (up to float rounding) with fewer units. Residual MLPs are refused:
removing a unit there would misalign the skip additions. Convolutional nets (channels, BN folding) are not handled
yet.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from regstory.surgery import ModelChange, remove_units


def chain(model: nn.Module) -> list[str]:
    """Names of the Linear layers of an MLP in forward order: hidden layers, then the head."""
    from regstory.models.mlp import MLP

    if not isinstance(model, MLP):
        raise ValueError(f"simplification handles regstory's MLP (and LeNet-300-100), not {type(model).__name__}")
    if model.residual:
        raise ValueError("simplification cannot remove units of a residual MLP: the skip additions would misalign")
    return [f"layers.{i}" for i in range(len(model.layers))] + ["head"]


@torch.no_grad()
def simplify(model: nn.Module) -> tuple[nn.Module, ModelChange, dict[str, int]]:
    """The smaller model, the :class:`ModelChange` from ``model`` to it, and the hidden units kept per layer."""
    names = chain(model)
    current, total = copy.deepcopy(model), ModelChange.identity(model)
    kept: dict[str, int] = {}
    for i, name in enumerate(names[:-1]):
        layer, consumer = current.get_submodule(name), current.get_submodule(names[i + 1])
        no_input = layer.weight.eq(0).all(dim=1)
        no_output = consumer.weight.eq(0).all(dim=0)
        act = current.acts[i]
        if no_input.any():  # constant act(b_j) flows into the next layer's bias
            bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
            constant = act(bias) * no_input
            if consumer.bias is None:
                raise ValueError(f"simplification: '{names[i + 1]}' has no bias to take the constant outputs of "
                                 f"'{name}'")
            consumer.bias.add_(consumer.weight @ constant)
            consumer.weight[:, no_input] = 0
        keep = torch.nonzero(~(no_input | no_output)).flatten()
        if len(keep) == 0:
            keep = torch.zeros(1, dtype=torch.long)  # one (dead) unit keeps the layer's shape valid
        current, change = remove_units(current, name, keep, consumers=[names[i + 1]])
        total = compose(total, change)
        kept[name] = len(keep)
    return current, total, kept


def compose(first: ModelChange, second: ModelChange) -> ModelChange:
    """The change ``second`` after ``first``: new name -> (name in the model before ``first``, combined index)."""
    out = {}
    for name, (mid, index) in second.sources.items():
        origin, before = first.sources[mid]
        combined = []
        for dim in range(max(len(index), len(before))):
            a = before[dim] if dim < len(before) else None
            b = index[dim] if dim < len(index) else None
            combined.append(b if a is None else a if b is None else a[b.to(a.device)])
        out[name] = (origin, tuple(combined))
    return ModelChange(out)
