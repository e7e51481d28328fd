"""Mining bias-target alignment from Voronoi cells (Nahon, Nguyen & Tartaglione, ICCV 2023; thesis sec. 3.6,
Figs. 3.3-3.4). Bias-agnostic: no bias label is read (they are used only to *report* how well the pseudo-labels
match the true conflicting set).

Round 0, bias inference with a vanilla model (authors' ``infer_predicted_bias``):
* at the start of every epoch after ``warmup_epochs``, class centroids c_k of the bottleneck z are computed over the
  *correctly classified* training samples (eval mode, whole training set);
* during that epoch's steps, each misclassified sample (target y, prediction y') gets its distance to the Voronoi
  bisector between c_y and c_y' (the face of its target cell that faces y'):
  d = |w . z + b| / ||w||, w = c_y' - c_y, b = (||c_y||^2 - ||c_y'||^2) / 2, and the relative distance
  d_rel = d * K / sum_k ||c_k|| (d over the mean centroid norm; over the classes that have a centroid);
* e* = the epoch where the mean d_rel of the misclassified samples peaks ("the model has learned bias features").
At e*: misclassified samples are bias-misaligned with pseudo-bias b^ = y'(e*); the others are aligned (b^ = y).
Alignment rate rho^_c = 1 - #(misaligned with b^ = c) / N_c; weights: aligned 1 / rho^_y, misaligned
1 / (1 - rho^_b^) (authors' ``VCBAReweighter``; the thesis says the weights come "from the distances": in the code
the distances only choose e* and the misaligned set, and so here).

Round 1, debiased model: the model is reset in place to the run's initial weights (same seed; the optimizer was
rebuilt for the round), then trained on mean_i(w_i CE_i) + gamma * I_masked, where I_masked is IRENE's MI proxy
(sec. 3.5.1) between b^ and a bias head H on the bottleneck, over the batch's pseudo-misaligned samples only; H is
trained on b^ from detached z and gets no gradient from the MI term. (The authors' code skips the backward of a
batch without pseudo-misaligned samples; here the weighted CE is always back-propagated.)
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Annotated, Any

import torch
from torch import Tensor

from regstory.debias.base import DebiasPlugin, Rate, Weight, collect
from regstory.options import Range, option
from regstory.debias.irene import BiasHead, mutual_information_proxy, probs_without_head_gradient

if TYPE_CHECKING:
    from regstory.loop import RunContext

INFERENCE, DEBIAS = 0, 1


def class_centroids(features: Tensor, y: Tensor, pred: Tensor, num_classes: int) -> Tensor:
    """Mean feature of the correctly classified samples of each class; NaN rows for classes with none."""
    correct = pred == y
    dim = features.shape[1]
    sums = torch.zeros(num_classes, dim, dtype=features.dtype, device=features.device).index_add(
        0, y[correct], features[correct])
    counts = torch.bincount(y[correct], minlength=num_classes).to(features.dtype)
    return torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], torch.full_like(sums, float("nan")))


def bisector_distance(z: Tensor, centroids: Tensor, y: Tensor, pred: Tensor) -> Tensor:
    """Distance of each z to the Voronoi bisector between c_y and c_pred: |w.z + b| / ||w||,
    w = c_pred - c_y, b = (||c_y||^2 - ||c_pred||^2) / 2."""
    c_y, c_p = centroids[y], centroids[pred]
    w = c_p - c_y
    b = 0.5 * (c_y.pow(2).sum(1) - c_p.pow(2).sum(1))
    return ((w * z).sum(1) + b).abs() / w.norm(dim=1).clamp(min=1e-12)


def relative_distance(d: Tensor, centroids: Tensor) -> Tensor:
    """d_rel = d * K / sum_k ||c_k|| (distance over the mean centroid norm); classes without a centroid (NaN rows:
    no correctly classified sample) are left out of the mean."""
    return d / centroids.norm(dim=1).nanmean()


def select_epoch(mean_distances: dict[int, float]) -> int:
    """e* = the epoch with the largest mean relative distance of misclassified samples (first one on ties)."""
    return max(sorted(mean_distances), key=lambda e: mean_distances[e])


def pseudo_bias(y: Tensor, pred_at_e_star: Tensor) -> Tensor:
    """b^ = y' (the prediction at e*) for misclassified samples, y otherwise."""
    return torch.where(pred_at_e_star != y, pred_at_e_star, y)


def alignment_weights(y: Tensor, b_hat: Tensor, num_classes: int) -> Tensor:
    """rho^_c = 1 - #(misaligned, b^ = c) / N_c; w = 1 / rho^_y if aligned, 1 / (1 - rho^_b^) if misaligned."""
    misaligned = b_hat != y
    n_class = torch.bincount(y, minlength=num_classes).float().clamp(min=1)
    n_mis = torch.bincount(b_hat[misaligned], minlength=num_classes).float()
    rho = 1 - n_mis / n_class
    return torch.where(misaligned, 1 / (1 - rho[b_hat]).clamp(min=1e-8), 1 / rho[y].clamp(min=1e-8))


@option("debias", "voronoi")
class VoronoiMining(DebiasPlugin):
    """Two rounds: vanilla bias inference (round 0), then the re-weighted, information-removing retraining (round 1).
    Defaults: gamma 2 (authors' code), head SGD lr 0.1 / momentum 0.9 / wd 1e-4, one warm-up epoch."""

    uses_bias_labels = False  # bias-agnostic: mines pseudo-bias labels; its batches come without the true ones

    def __init__(self, gamma: Weight = 2.0, warmup_epochs: Annotated[int, Range(ge=0)] = 1, head_lr: Rate = 0.1,
                 head_momentum: Weight = 0.9, head_weight_decay: Weight = 1e-4, **options):
        super().__init__(**options)
        self.gamma, self.warmup_epochs = gamma, warmup_epochs
        self.head_args = dict(lr=head_lr, momentum=head_momentum, weight_decay=head_weight_decay)
        self.centroids: Tensor | None = None
        self.distance_sum: dict[int, float] = {}
        self.distance_count: dict[int, int] = {}
        self.best_predictions: Tensor | None = None  # the training-set predictions of the best epoch so far (e*)
        self._epoch: tuple[Tensor, Tensor, Tensor] | None = None  # this epoch's predictions, distance sum, count
        self.b_hat: Tensor | None = None
        self.weights: Tensor | None = None
        self._pending: tuple[Tensor, Tensor] | None = None

    def num_rounds(self) -> int:
        return 2

    def setup(self, ctx: "RunContext") -> None:
        super().setup(ctx)
        self.initial_state = copy.deepcopy(ctx.model.state_dict())
        self.num_classes = ctx.data.num_classes
        self.head = BiasHead(ctx.model.head.in_features, self.num_classes, device=ctx.device, **self.head_args)
        self.train_y = ctx.loaders["train"].split.y

    def model_replaced(self, ctx: "RunContext", change) -> None:
        """Model surgery (e.g. MiMi shrinking its adapters): the snapshot round 1 starts from follows the kept tensors;
        new tensors start from their value now."""
        if getattr(self, "initial_state", None) is not None:  # None: a surgery before this plugin's set-up
            now = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
            self.initial_state = change.carry_dict(self.initial_state, fill=now)

    # ---- round 0: bias inference ---------------------------------------------------------------------------
    def start_epoch(self, ctx: "RunContext") -> None:
        self.centroids = None
        if ctx.round == INFERENCE and ctx.epoch >= self.warmup_epochs:
            train = collect(ctx.model, ctx.loaders["train"].in_order(), ctx.autocast, device=ctx.device)
            self.centroids = class_centroids(train["features"], self.train_y, train["logits"].argmax(1),
                                             self.num_classes)
            zero = torch.zeros((), device=ctx.device)
            self._epoch = (torch.full_like(self.train_y, -1), zero, zero.long())

    @torch.no_grad()
    def _measure(self, ctx: "RunContext", batch, out) -> None:
        """Record the step's predictions and add its misclassified samples' relative distances to the epoch's sum,
        in device tensors (nothing is read back to the host per step)."""
        predictions, distance_sum, count = self._epoch
        pred = out.logits.argmax(1)
        predictions[batch["index"]] = pred
        y = batch["y"]
        valid = ~torch.isnan(self.centroids[y]).any(1) & ~torch.isnan(self.centroids[pred]).any(1)
        wrong = (pred != y) & valid
        d = relative_distance(bisector_distance(out.features.float(), self.centroids, y, pred), self.centroids)
        distance_sum.add_(torch.where(wrong, d, 0.0).sum())
        count.add_(wrong.sum())

    def _close_epoch(self, epoch: int) -> None:
        """Read the epoch's distance sum once; keep its predictions only while it is the best epoch (e*) so far."""
        predictions, distance_sum, count = self._epoch
        self._epoch = None
        self.distance_sum[epoch], self.distance_count[epoch] = float(distance_sum), int(count)
        distances = self.mean_distances()
        if epoch in distances and select_epoch(distances) == epoch:
            self.best_predictions = predictions

    def mean_distances(self) -> dict[int, float]:
        return {e: self.distance_sum[e] / self.distance_count[e] for e in self.distance_sum if self.distance_count[e]}

    # ---- round 1: re-weighted retraining with information removal ------------------------------------------
    def start_round(self, ctx: "RunContext") -> None:
        if ctx.round == DEBIAS:
            ctx.model.load_state_dict(self.initial_state)

    def sample_weights(self, ctx, batch, out) -> Tensor | None:
        """Round 1: the alignment weights of the batch's samples (round 0 trains unweighted)."""
        return self.weights[batch["index"]] if ctx.round == DEBIAS else None

    def extra_loss(self, ctx, batch, out) -> dict[str, Tensor]:
        if ctx.round == INFERENCE:
            if self.centroids is not None:
                self._measure(ctx, batch, out)
            return {}
        b_hat = self.b_hat[batch["index"]]
        self._pending = (out.features.detach(), b_hat)
        probs = probs_without_head_gradient(self.head.linear, out.features.float())
        mi = mutual_information_proxy(b_hat, probs, self.num_classes, mask=b_hat != batch["y"])
        return {"voronoi_mi": self.gamma * mi}

    def after_backward(self, ctx) -> None:
        if self._pending is not None:
            self.head.step(*self._pending)
            self._pending = None

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    def end_epoch(self, ctx) -> dict[str, Any]:
        if self._epoch is not None:
            self._close_epoch(ctx.epoch)
        record = super().end_epoch(ctx)
        if ctx.round == INFERENCE and ctx.epoch in self.mean_distances():
            record["voronoi_rel_distance"] = self.mean_distances()[ctx.epoch]
        return record

    def end_round(self, ctx: "RunContext") -> dict[str, Any]:
        if ctx.round != INFERENCE:
            return {}
        distances = self.mean_distances()
        if not distances:
            raise ValueError("voronoi: no misclassified training sample was measured in round 0; "
                             "use more epochs than debias.warmup_epochs")
        e_star = select_epoch(distances)
        self.b_hat = pseudo_bias(self.train_y, self.best_predictions)
        self.weights = alignment_weights(self.train_y, self.b_hat, self.num_classes)
        self.best_predictions = None
        found = self.b_hat != self.train_y
        record: dict[str, Any] = {"voronoi_e_star": e_star, "voronoi_num_misaligned": int(found.sum())}
        bias = ctx.loaders["train"].split.extras.get("bias")
        if bias is not None:  # diagnostics only: how well the pseudo-labels find the true bias-conflicting samples
            true = bias != self.train_y
            hits = (found & true).sum().item()
            record.update(voronoi_precision=hits / max(int(found.sum()), 1), voronoi_recall=hits / max(int(true.sum()), 1))
        self.inference_record = record
        return record

    def finalize(self, ctx) -> dict[str, Any]:
        return {**super().finalize(ctx), **getattr(self, "inference_record", {})}

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "b_hat": self.b_hat, "weights": self.weights,
                "distance_sum": self.distance_sum, "distance_count": self.distance_count,
                "best_predictions": self.best_predictions,
                "inference_record": getattr(self, "inference_record", {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        dev = self.train_y.device
        self.b_hat = state["b_hat"].to(dev) if state["b_hat"] is not None else None
        self.weights = state["weights"].to(dev) if state["weights"] is not None else None
        self.distance_sum, self.distance_count = state["distance_sum"], state["distance_count"]
        if "predictions" in state:  # a checkpoint written before only e*'s predictions were kept
            distances = self.mean_distances()
            state["best_predictions"] = state["predictions"][select_epoch(distances)] if distances else None
        best = state["best_predictions"]
        self.best_predictions = best.to(dev) if best is not None else None
        self.inference_record = state["inference_record"]
