"""Iterative magnitude pruning, IMP (thesis sec. 2.2.2 and 2.4; Han et al. 2015, Frankle & Carbin 2019).

After each round, remove a fraction ``rate`` of the *remaining* prunable weights with the smallest |w|, over all
prunable tensors together (``scope=global``, the SDD protocol) or in each tensor separately (``layerwise``).
The retraining mode between rounds and everything else is :class:`regstory.pruning.base.PruningSweep`.
Options: ``rate``, ``scope`` and the inherited :data:`regstory.pruning.base.PruningOptions`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from regstory.options import OneOf, Range, option
from regstory.pruning.base import PruningSweep
from regstory.pruning.masks import prune_fraction, prune_to_sparsity

if TYPE_CHECKING:
    from regstory.loop import RunContext

#: fraction of the remaining weights pruned per round, and where weights compete
Rate = Annotated[float, Range(gt=0, lt=1)]
Scope = Annotated[str, OneOf("global", "layerwise")]


@option("method", "imp")
class IMP(PruningSweep):
    def __init__(self, rate: Rate = 0.2, scope: Scope = "global", **common):
        super().__init__(**common)
        self.rate, self.scope = rate, scope

    def prune(self, ctx: "RunContext") -> None:
        scores = [p.detach().abs() for p in self.masks.params]
        target = self.next_sparsity(self.masks.sparsity(), self.rate)
        if target < 1 - (1 - self.masks.sparsity()) * (1 - self.rate):  # capped by target_sparsity
            prune_to_sparsity(self.masks, scores, target, self.scope)
        else:
            prune_fraction(self.masks, scores, self.rate, self.scope)
