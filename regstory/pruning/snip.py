"""SNIP, single-shot connection sensitivity at initialisation (Lee et al. ICLR 2019; thesis sec. 2.2.2.2).

Score of weight w: |dL/dw * w| at the initial weights, the loss summed over ``batches`` training mini-batches.
Round r trains, from init, the network keeping the highest-scored 1 - (1 - rate)^r of the weights
(scores computed once on the dense net, so masks are nested).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
import torch.nn.functional as F

from regstory.options import Range, option
from regstory.pruning.magnitude import Rate, Scope
from regstory.pruning.random import OneShotAtInit

if TYPE_CHECKING:
    from regstory.loop import RunContext


def connection_sensitivity(model: torch.nn.Module, params: list[torch.Tensor], batches) -> list[torch.Tensor]:
    """|g * w| per weight, g the gradient of the cross-entropy summed over ``batches`` (model in train mode)."""
    grads = [torch.zeros_like(p) for p in params]
    for batch in batches:
        loss = F.cross_entropy(model(batch["x"]), batch["y"])
        for acc, g in zip(grads, torch.autograd.grad(loss, params)):
            acc += g
    return [(g * p.detach()).abs() for g, p in zip(grads, params)]


@option("method", "snip")
class SNIP(OneShotAtInit):
    def __init__(self, rate: Rate = 0.2, scope: Scope = "global", batches: Annotated[int, Range(ge=1)] = 1,
                 **common):
        super().__init__(rate, scope, **common)
        self.batches = batches

    def init_scores(self, ctx: "RunContext") -> list[torch.Tensor]:
        loader = ctx.loaders["train"]
        gen = torch.Generator().manual_seed(int(ctx.cfg.seed) + 54321)
        order = torch.randperm(len(loader.split), generator=gen).to(loader.split.x.device)
        size = loader.batch_size
        batches = [loader.make_batch(order[i * size:(i + 1) * size]) for i in range(self.batches)]
        was_training = ctx.model.training
        ctx.model.train()
        scores = connection_sensitivity(ctx.model, self.masks.params, batches)
        ctx.model.train(was_training)
        return scores
