"""Iterative magnitude pruning, IMP (thesis sec. 2.2.2 and 2.4; Han et al. 2015, Frankle & Carbin 2019).

After each round, remove a fraction ``rate`` of the *remaining* prunable weights with the smallest |w|, over all
prunable tensors together (``scope=global``, the SDD protocol) or in each tensor separately (``layerwise``).
The retraining mode between rounds and everything else is :class:`regstory.pruning.base.PruningSweep`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from regstory.config import ConfigError
from regstory.pruning.base import PruningSweep, with_sweep_options
from regstory.pruning.masks import prune_fraction, prune_to_sparsity

if TYPE_CHECKING:
    from regstory.loop import RunContext

SCOPES = ("global", "layerwise")


def check_rate_and_scope(rate: float, scope: str) -> None:
    if not 0 < rate < 1:
        raise ConfigError(f"method.rate={rate} is invalid: must be in (0, 1)")
    if scope not in SCOPES:
        raise ConfigError(f"method.scope='{scope}' is unknown: use global or layerwise")


@with_sweep_options
class IMP(PruningSweep):
    def __init__(self, rate: float = 0.2, scope: str = "global", **common):
        check_rate_and_scope(rate, scope)
        super().__init__(**common)
        self.rate, self.scope = rate, scope

    def prune(self, ctx: "RunContext") -> None:
        scores = [p.detach().abs() for p in self.masks.params]
        target = self.next_sparsity(self.masks.sparsity(), self.rate)
        if target < 1 - (1 - self.masks.sparsity()) * (1 - self.rate):  # capped by target_sparsity
            prune_to_sparsity(self.masks, scores, target, self.scope)
        else:
            prune_fraction(self.masks, scores, self.rate, self.scope)
