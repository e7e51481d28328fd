"""Group DRO (Sagawa et al., ICLR 2020, Algorithm 1; authors' ``loss.py``), online group weights.

Per batch: l_g = mean CE of the batch samples of group g (+ C / sqrt(n_g), the generalisation adjustment, n_g the
group's training count); for the groups present in the batch, q_g <- q_g exp(eta * l_g), then q is renormalised;
loss = sum_g q_g l_g over the groups present. Only present groups are updated (methods-debias.md: with many
near-empty groups, updating absent ones with l_g = 0 drifts q).

Groups (``groups``):
* ``bias``: g = y * K_b + b, the paper's (target, bias) groups (reads bias labels: supervised);
* ``target``: g = y, the target classes alone. It reads no bias label: this is the bias-agnostic variant (Table 3.2
  marks Group DRO as bias-agnostic; with groups = classes it is a class-level DRO).

Model selection (``selection``, default ``val_worst_group_acc``): the epoch with the best worst-group validation
accuracy, as the authors' ``--save_best`` does for robust and re-weighted runs (``train.py``: the min over the groups
of the validation split).

``balanced_sampler`` draws training batches with replacement with probability proportional to 1 / n_g (the
authors' ``--reweight_groups``, used in their CelebA command).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import torch
from torch import Tensor

from regstory.data.device_loader import TensorLoader
from regstory.debias.base import DebiasPlugin, Weight
from regstory.options import OneOf, option

if TYPE_CHECKING:
    from regstory.loop import RunContext

GROUPINGS = ("bias", "target")


def group_index(y: Tensor, bias: Tensor | None, num_bias: int, groups: str) -> Tensor:
    return y if groups == "target" else y * num_bias + bias


def group_dro_step(per_sample_loss: Tensor, group: Tensor, q: Tensor, eta: float,
                   adjustment: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One online Group DRO step: returns (robust loss, updated q). ``q`` is not modified in place."""
    weights, q_new, adjusted = group_dro_weights(per_sample_loss, group, q, eta, adjustment)
    return (weights * per_sample_loss).mean() + adjusted, q_new


def group_dro_weights(per_sample_loss: Tensor, group: Tensor, q: Tensor, eta: float,
                      adjustment: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The robust loss sum_g q_g l_g as per-sample weights: w_i = B q_g(i) / n_g(i) with n_g the batch count of the
    sample's group, so mean_i(w_i l_i) = sum_g q_g (mean loss of group g). Returns (weights, updated q, the
    adjustment's share sum_g q_g C / sqrt(n_g), a constant without gradient). ``q`` is not modified in place."""
    num_groups = len(q)
    counts = torch.bincount(group, minlength=num_groups).to(per_sample_loss.dtype)
    sums = torch.zeros(num_groups, dtype=per_sample_loss.dtype, device=per_sample_loss.device)
    sums = sums.index_add(0, group, per_sample_loss)
    present = counts > 0
    group_loss = sums / counts.clamp(min=1)
    if adjustment is not None:
        group_loss = group_loss + adjustment
    with torch.no_grad():
        q_new = torch.where(present, q * torch.exp(eta * group_loss.detach()), q)
        q_new = q_new / q_new.sum()
        weights = (len(group) * q_new / counts.clamp(min=1))[group]
        adjusted = (q_new * adjustment * present).sum() if adjustment is not None else torch.zeros((), device=q.device)
    return weights, q_new, adjusted


class GroupBalancedLoader(TensorLoader):
    """A training loader that samples indices with replacement, P(i) proportional to 1 / n_{g(i)}
    (``torch.utils.data.WeightedRandomSampler`` as in Group DRO's ``--reweight_groups``), seeded per epoch."""

    def __init__(self, base: TensorLoader, group: Tensor):
        self.__dict__.update(base.__dict__)
        counts = torch.bincount(group).float()
        self.sample_weights = (1.0 / counts[group]).cpu()

    def _order(self, gen: torch.Generator) -> Tensor:
        order = torch.multinomial(self.sample_weights, len(self.split), replacement=True, generator=gen)
        return order.to(self.split.x.device)


@option("debias", "groupdro", overrides={"selection": "val_worst_group_acc"})
class GroupDRO(DebiasPlugin):
    """Online Group DRO. Defaults: eta 0.01 and C 0 (authors' ``--robust_step_size`` / ``--generalization_adjustment``),
    selection on the worst-group validation accuracy (``--save_best``)."""

    def __init__(self, eta: Weight = 0.01, adjustment: Weight = 0.0, groups: Annotated[str, OneOf(*GROUPINGS)] = "bias",
                 balanced_sampler: bool = True, **options):
        super().__init__(**options)
        self.eta, self.adjustment, self.groups, self.balanced_sampler = eta, adjustment, groups, balanced_sampler
        self.uses_bias_labels = groups == "bias"  # groups=target is the bias-agnostic variant

    def setup(self, ctx: "RunContext") -> None:
        super().setup(ctx)
        train = ctx.data.train
        group = group_index(train.y, train.extras.get("bias"), self.num_bias, self.groups)
        num_groups = ctx.data.num_classes * (self.num_bias if self.groups == "bias" else 1)
        counts = torch.bincount(group, minlength=num_groups).float()
        self.q = torch.full((num_groups,), 1.0 / num_groups, device=ctx.device)
        self.adjust = (self.adjustment / counts.clamp(min=1).sqrt()).to(ctx.device) if self.adjustment > 0 else None
        if self.balanced_sampler:
            ctx.loaders["train"] = GroupBalancedLoader(ctx.loaders["train"], group.to(ctx.loaders["train"].split.y.device))

    def claims(self) -> set[str]:
        return super().claims() | ({"train_sampler"} if self.balanced_sampler else set())

    def sample_weights(self, ctx, batch, out) -> Tensor:
        """Group DRO's robust loss over the per-sample training loss, as per-sample weights (``group_dro_weights``)."""
        group = group_index(batch["y"], batch.get("bias"), self.num_bias, self.groups)
        weights, self.q, self._adjusted = group_dro_weights(out.sample_loss.detach(), group, self.q, self.eta,
                                                            self.adjust)
        return weights

    def extra_loss(self, ctx, batch, out) -> dict[str, Tensor]:
        """The generalisation adjustment's share of the robust loss (a constant: it moves the loss, not the
        gradient, but Group DRO reports it)."""
        return {"groupdro_adjustment": self._adjusted} if self.adjust is not None else {}

    def end_epoch(self, ctx) -> dict[str, Any]:
        record = super().end_epoch(ctx)
        record["groupdro_max_q"] = self.q.max().item()
        return record

    def summary_keys(self) -> list[str]:
        return ["groupdro_max_q"]

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q = state["q"].to(self.q.device)
