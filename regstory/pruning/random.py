"""Random pruning at initialisation, a zero-shot baseline (thesis sec. 2.2.2.2).

Round r trains, from the initial weights, the network with sparsity 1 - (1 - rate)^r whose pruned weights were
drawn uniformly at random (one fixed random score per weight, seeded, so the masks of successive rounds are nested).
``scope=global`` gives every tensor the same sparsity in expectation, ``layerwise`` exactly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from regstory.config import ConfigError
from regstory.options import option
from regstory.pruning.base import PruningSweep
from regstory.pruning.magnitude import Rate, Scope
from regstory.pruning.masks import prune_to_sparsity

if TYPE_CHECKING:
    from regstory.loop import RunContext


class OneShotAtInit(PruningSweep):
    """Shared by random and SNIP: scores fixed at initialisation, each round pruned from init to its sparsity."""

    def __init__(self, rate: Rate = 0.2, scope: Scope = "global", **common):
        common.setdefault("retrain", "rewind")
        if common["retrain"] not in ("rewind", "scratch") or common.get("rewind_epoch", 0) != 0:
            raise ConfigError("one-shot pruning at init needs method.retrain=rewind (to init, rewind_epoch=0) "
                              "or scratch")
        super().__init__(**common)
        self.rate, self.scope = rate, scope
        self.scores = None

    def round_sparsity(self, round_: int) -> float:
        return self.next_sparsity(0.0, 1 - (1 - self.rate) ** round_)

    def init_scores(self, ctx: "RunContext") -> list[torch.Tensor]:
        raise NotImplementedError

    def setup(self, ctx: "RunContext") -> None:
        super().setup(ctx)
        self.scores = self.init_scores(ctx)  # deterministic given the seed, so recomputed on resume

    def prune_before_training(self, ctx: "RunContext") -> None:
        if ctx.round > 0:
            prune_to_sparsity(self.masks, self.scores, self.round_sparsity(ctx.round), self.scope)


@option("method", "random")
class RandomPruning(OneShotAtInit):
    def init_scores(self, ctx: "RunContext") -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(int(ctx.cfg.seed) + 12345)
        return [torch.rand(p.shape, generator=gen).to(p.device) for p in self.masks.params]
