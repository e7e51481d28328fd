"""What every debiasing run measures, and the plugin base class that measures it.

Group metrics (thesis sec. 3.6, Table 3.2; methods-debias.md sec. 7) over (target t, bias b) groups, where bias
class k is the *aligned* bias of target k (a sample is bias-aligned when ``b == y``):

* ``acc``: plain accuracy;
* ``unbiased_acc``: mean of the accuracies of the (t, b) groups present (= accuracy on a group-balanced set);
* ``conflicting_acc``: mean accuracy over the groups with t != b (bias-conflicting);
* ``aligned_acc``: mean accuracy over the groups with t == b;
* ``worst_group_acc``: the lowest group accuracy (GroupDRO's selection metric).

Bias probe (Table 3.1's "gender prediction accuracy", as a post-hoc attacker): a fresh linear classifier trained to
predict the bias from the *frozen* bottleneck features of the validation split (whose bias is independent of the
target, so the probe cannot read the bias through the class), then tested on the test split. High = the bottleneck
still carries the bias; chance = 1 / num_bias_classes.

Bias labels in training: ``uses_bias_labels`` (a class attribute, or set per instance where an option decides it)
says whether the method reads them; a bias-agnostic method (False) gets its batches without ``batch["bias"]``
(:mod:`regstory.plugins`), and ``summary.json`` reports ``bias_agnostic`` (Table 3.2's column).

Evaluation: the plugin evaluates val and test itself every epoch (whatever ``trainer.eval_every`` says; the loop's
own pass is skipped), since model selection needs every epoch's val metrics. Model selection: every epoch's record
holds the test and val metrics; ``finalize`` reports the last epoch and the
epoch chosen by ``selection`` (a val metric, never a test metric) in ``summary.json``.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Annotated, Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regstory.config import ConfigError
from regstory.options import OneOf, Range, option, schema_of
from regstory.plugins import Plugin

if TYPE_CHECKING:
    from regstory.loop import RunContext

#: weights and learning rates of the debiasing methods
Weight = Annotated[float, Range(ge=0)]
Rate = Annotated[float, Range(gt=0)]

GROUP_METRICS = ("acc", "unbiased_acc", "conflicting_acc", "aligned_acc", "worst_group_acc")


def minimised(metric: str) -> bool:
    """Whether a lower value of ``metric`` is better: losses are minimised, everything else (accuracies) maximised."""
    return metric.endswith("loss")


#: what ``selection`` may name: the last epoch, or a metric of the validation split (never of the test split)
SELECTIONS = ("last", "val_loss", *(f"val_{k}" for k in GROUP_METRICS))


def check_selection(selection: str) -> None:
    """Refuse a selection metric that is not ``last`` or a validation metric (one line, :class:`ConfigError`)."""
    if selection in SELECTIONS:
        return
    where = " selects on the test split" if selection.startswith("test_") or selection.endswith("probe_acc") else ""
    raise ConfigError(f"debias.selection={selection}{where}: must be one of {', '.join(SELECTIONS)}")


def group_accuracies(pred: Tensor, y: Tensor, bias: Tensor, num_classes: int, num_bias: int) -> Tensor:
    """(num_classes, num_bias) matrix of accuracies per (target, bias) group; NaN where a group is empty."""
    group = y * num_bias + bias
    total = torch.bincount(group, minlength=num_classes * num_bias).float()
    hits = torch.bincount(group, weights=(pred == y).float(), minlength=num_classes * num_bias)
    acc = torch.where(total > 0, hits / total.clamp(min=1), torch.full_like(total, float("nan")))
    return acc.view(num_classes, num_bias)


def group_metrics(pred: Tensor, y: Tensor, bias: Tensor, num_classes: int, num_bias: int) -> dict[str, float]:
    """Overall, unbiased, bias-conflicting, bias-aligned and worst-group accuracy (see module docstring)."""
    acc = group_accuracies(pred, y, bias, num_classes, num_bias)
    present = ~torch.isnan(acc)
    t = torch.arange(num_classes)[:, None]
    b = torch.arange(num_bias)[None, :]
    aligned = (t == b) & present
    conflicting = (t != b) & present
    nan = float("nan")
    return {
        "acc": (pred == y).float().mean().item(),
        "unbiased_acc": acc[present].mean().item() if present.any() else nan,
        "conflicting_acc": acc[conflicting].mean().item() if conflicting.any() else nan,
        "aligned_acc": acc[aligned].mean().item() if aligned.any() else nan,
        "worst_group_acc": acc[present].min().item() if present.any() else nan,
    }


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable[dict[str, Tensor]], autocast=contextlib.nullcontext,
            device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Logits and bottleneck features (fp32) with the batches' targets and bias labels (where present), concatenated
    on ``device``. Model in eval mode (restored after), forward under ``autocast()`` (e.g. ``ctx.autocast``)."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {"logits": [], "features": [], "y": [], "bias": []}
    for batch in batches:
        with autocast():
            logits, feats = model(batch["x"], return_features=True)
        parts["logits"].append(logits.float())
        parts["features"].append(feats.float())
        for key in ("y", "bias"):
            if key in batch:
                parts[key].append(batch[key])
    model.train(was_training)
    return {k: torch.cat(v).to(device) for k, v in parts.items() if v}


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int,
                          steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Accuracy on (test_x, test_y) of a linear softmax classifier fitted full-batch (Adam) on standardised
    (train_x, train_y). Deterministic for a given seed."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    probe = nn.Linear(xs.shape[1], num_classes)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=gen) * 0.01)
        probe.bias.zero_()
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(probe(xs), train_y).backward()
            opt.step()
    with torch.no_grad():
        return (probe(xt).argmax(1) == test_y).float().mean().item()


class DebiasPlugin(Plugin):
    """Base of every debiasing method; on its own it is ``debias=vanilla`` (plain CE plus the debiasing metrics).

    Args:
        selection: the val metric (a key of the epoch record, e.g. ``val_unbiased_acc``) whose best epoch of the
            last round is reported as ``selected_*`` in summary.json (lowest for a ``*loss`` key, highest otherwise);
            ``last`` reports the last epoch only. Anything else than ``last`` or ``val_*`` is refused (ConfigError).
        probe_every: fit the bias probe every this many epochs (and always at a round's last epoch); 0 = never.
        probe_steps: full-batch optimisation steps of the bias probe.
    """

    needs_features = True
    evaluates = True

    def __init__(self, selection: Annotated[str, OneOf(*SELECTIONS)] = "val_unbiased_acc", probe_every: Annotated[int, Range(ge=0)] = 1,
                 probe_steps: Annotated[int, Range(ge=1)] = 300):
        check_selection(selection)
        self.selection = selection
        self.probe_every = probe_every
        self.probe_steps = probe_steps

    # ---- metrics -------------------------------------------------------------------------------------------
    def setup(self, ctx: "RunContext") -> None:
        if ctx.data.num_bias_classes is None or "bias" not in ctx.data.train.extras:
            raise ConfigError(f"debias plugins need a dataset with bias labels (batch['bias']); "
                             f"dataset '{ctx.data.name}' has none: use e.g. dataset=biased_digits")
        self.num_bias = int(ctx.data.num_bias_classes)
        if self.selection != "last" and ctx.data.val is None:
            raise ConfigError(f"debias.selection={self.selection} needs a validation split, and dataset "
                              f"'{ctx.data.name}' has none: set dataset.val_fraction > 0 or debias.selection=last")

    def end_epoch(self, ctx: "RunContext") -> dict[str, Any]:
        record: dict[str, Any] = {}
        outputs = {split: collect(ctx.model, ctx.loaders[split], ctx.autocast)
                   for split in ("test", "val") if split in ctx.loaders}
        for split, out in outputs.items():
            record[f"{split}_loss"] = F.cross_entropy(out["logits"], out["y"]).item()
            metrics = group_metrics(out["logits"].argmax(1), out["y"], out["bias"], ctx.data.num_classes, self.num_bias)
            record.update({f"{split}_{k}": v for k, v in metrics.items()})
        if self._probe_due(ctx) and "val" in outputs:
            record["bias_probe_acc"] = linear_probe_accuracy(
                outputs["val"]["features"], outputs["val"]["bias"], outputs["test"]["features"],
                outputs["test"]["bias"], self.num_bias, steps=self.probe_steps, seed=int(ctx.cfg.seed))
        record.update(self.method_metrics(ctx, outputs))
        return record

    def _probe_due(self, ctx: "RunContext") -> bool:
        if self.probe_every <= 0:
            return False
        return (ctx.epoch + 1) % self.probe_every == 0 or ctx.epoch + 1 == ctx.epochs

    def method_metrics(self, ctx: "RunContext", outputs: dict[str, dict[str, Tensor]]) -> dict[str, Any]:
        """Extra per-epoch metrics of a method (e.g. IRENE's own head accuracy), from the collected outputs."""
        return {}

    # ---- model selection -----------------------------------------------------------------------------------
    def finalize(self, ctx: "RunContext") -> dict[str, Any]:
        """Report the last epoch's and the selected epoch's test metrics (``last_*`` / ``selected_*``)."""
        history = [r for r in ctx.history if "test_unbiased_acc" in r]
        if not history:
            return {}
        keys = [f"test_{k}" for k in GROUP_METRICS] + ["bias_probe_acc"] + self.summary_keys()
        summary: dict[str, Any] = {f"last_{k}": history[-1].get(k) for k in keys}
        summary["selection"] = self.selection
        summary["bias_agnostic"] = not self.uses_bias_labels  # Table 3.2's column: trained without bias labels
        if self.selection != "last":
            last_round = history[-1]["round"]  # Voronoi's round 0 is its vanilla bias-inference model
            scored = [r for r in history if r["round"] == last_round and r.get(self.selection) is not None
                      and r[self.selection] == r[self.selection]]  # NaN (an empty group) never wins
            if not scored:
                raise ValueError(f"debias.selection={self.selection}: no epoch of round {last_round} logged it")
            sign = -1.0 if minimised(self.selection) else 1.0
            best = max(scored, key=lambda r: sign * r[self.selection])  # max keeps the first of equal scores
            summary.update({f"selected_{k}": best.get(k) for k in keys})
            summary.update(selected_epoch=best["epoch"], selected_round=best["round"],
                           selected_score=best[self.selection])
        return summary

    def summary_keys(self) -> list[str]:
        """Method-specific epoch metrics to copy into the summary (last and selected)."""
        return []


@option("debias", "vanilla")
class Vanilla(DebiasPlugin):
    """Plain cross-entropy training with the debiasing metrics: the baseline of Tables 3.1 and 3.2."""

    uses_bias_labels = False


#: the keys every debiasing method inherits (its ``**options``): selection, probe_every, probe_steps
DebiasOptions = schema_of(DebiasPlugin)
