"""BiasCon and BiasBal (Hong & Yang, NeurIPS 2021, "Unbiased Classification Through Bias-Contrastive and Bias-Balanced
Learning"; authors' code grayhong/bias-contrastive-learning @35562b6: ``debias/losses/bias_contrastive.py``,
``train_biased_mnist_bc.py``, ``debias/datasets/biased_mnist.py``, ``debias/datasets/utils.py``).

**BiasCon** (bias-contrastive loss): a supervised contrastive loss on the L2-normalised bottleneck z in which the
positives of an anchor i are the samples of the *same target and a different bias*, P(i) = {p : y_p = y_i, b_p != b_i}
(the authors' ``DebiasSupConLoss``: ``label_mask & bias_mask``); every other sample of the batch is in the
denominator:

    L_con = mean_i [ -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) ) ]

with anchors without a positive contributing 0 to the mean (as the code: ``sum_mask[sum_mask == 0] = 1``). Pulling
a bias-aligned sample towards the conflicting samples of its class (and vice versa) makes the target, not the bias,
what the class's samples share. Total loss (``train_biased_mnist_bc.py``): ``ce_weight`` * CE + ``contrast_weight``
* L_con, with the authors' ``--weight 0.01`` on the CE.

**BiasBal** (``balanced=true``, BiasCon + BiasBal = the paper's "BC+BB"): bias-balanced regression trains the
classifier toward the distribution where target and bias are independent by shifting the training logits by the
log of the training split's p(y | b): CE(f(x) + log(p(y | b) + 1e-9), y) (``BiasContrastiveLoss(bb=1)``:
``logits += log(confusion_matrix[biases] + min_prob)``); at test time the model's own logits are used. The shifted CE
replaces the task cross-entropy per sample (:class:`regstory.debias.rubi.TaskLossPlugin`).

**Contrastive batch** (the authors' ``cont_train_loader``): each step the plugin draws ``contrast_batch_size``
training samples with replacement, with probability proportional to 1 / p(b | y) clipped at ``ratio`` times the
smallest such weight (``WeightedRandomSampler`` over ``confusion_matrix_by``, ``clip_max_ratio``; default 64 samples,
ratio 10), so batches hold bias-conflicting samples to form positives; it is fed through the model (train mode) for
z. The draws are seeded by (seed, round, epoch): a resumed run draws the same batches. ``contrast_batch_size=0``
uses the step's own training batch instead. Reads the bias labels: **not bias-agnostic**.

Where code and paper / this implementation differ:

* The authors feed *two augmented views* of each contrastive sample (``TwoCropTransform``: RandomRotation(20) and
  ColorJitter on Biased-MNIST). The two views of one sample share their bias, so they are not positives of each other
  (the mask needs b_p != b_i): the views add samples and augmentation, not pairs. Here one view is used, unaugmented
  (the loop's batched augmentation is crop/flip only, and the biased digits have none).
* The code subtracts each row's maximum and adds 1e-9 inside the log of the denominator (numerics only); here an
  exact log-sum-exp over a != i.
* Authors' Biased-MNIST schedule: Adam 1e-3, wd 1e-4, MultiStepLR at 1/3 and 2/3 of 80 epochs, T = 0.07.

The paper's full text was not available here (its abstract only); the losses, the sampler and the defaults follow
the authors' code above.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from regstory.config import ConfigError
from regstory.data.device_loader import epoch_generator
from regstory.debias.base import Rate, Weight
from regstory.debias.rubi import TaskLossPlugin
from regstory.options import Range, option
from regstory.utils import in_fp32

if TYPE_CHECKING:
    from regstory.loop import RunContext

MIN_PROB = 1e-9  # the authors' min_prob in log(p(y | b) + min_prob)


@in_fp32
def bias_contrastive_loss(features: Tensor, y: Tensor, bias: Tensor, temperature: float = 0.07) -> Tensor:
    """L_con of the module docstring on one view of a batch: positives = same target, different bias; denominator =
    every other sample; anchors without positives count 0 in the mean over anchors."""
    z = F.normalize(features.flatten(1), dim=1)
    sim = z @ z.t() / temperature
    self_pair = torch.eye(len(y), dtype=torch.bool, device=z.device)
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_pair, float("-inf")), dim=1, keepdim=True)
    positive = (y[:, None] == y[None, :]) & (bias[:, None] != bias[None, :])
    per_anchor = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(1) / positive.sum(1).clamp(min=1)
    return -per_anchor.mean()


def conditional_table(rows: Tensor, cols: Tensor, num_rows: int, num_cols: int) -> Tensor:
    """(num_rows, num_cols) table of p(col | row) from paired labels (a row without samples: zeros)."""
    counts = torch.zeros(num_rows, num_cols, dtype=torch.float64, device=rows.device)
    counts.index_put_((rows, cols), torch.ones_like(rows, dtype=torch.float64), accumulate=True)
    return (counts / counts.sum(1, keepdim=True).clamp(min=1)).float()


@in_fp32
def bias_balanced_logits(logits: Tensor, bias: Tensor, class_given_bias: Tensor, min_prob: float = MIN_PROB) -> Tensor:
    """BiasBal's training logits: f(x) + log(p(y | b) + min_prob) for every class y (``class_given_bias[b]``)."""
    return logits + torch.log(class_given_bias[bias] + min_prob)


def contrast_sampling_weights(y: Tensor, bias: Tensor, num_classes: int, num_bias: int, ratio: float) -> Tensor:
    """The authors' contrastive sampler: weight 1 / p(b_i | y_i), clipped at ``ratio`` x the smallest weight
    (``ratio`` 0: uniform)."""
    if ratio == 0:
        return torch.ones(len(y), dtype=torch.float64)
    bias_given_class = conditional_table(y, bias, num_classes, num_bias).double()
    weights = 1.0 / bias_given_class[y, bias]
    return weights.clamp(max=weights.min() * ratio).cpu()


@option("debias", "biascon")
class BiasCon(TaskLossPlugin):
    """BiasCon (+ BiasBal with ``balanced``). Defaults from the authors' Biased-MNIST script: ``ce_weight`` 0.01
    (``--weight``), ``temperature`` 0.07, ``contrast_batch_size`` 64 (``--cbs``), ``ratio`` 10 (``--ratio``)."""

    uses_bias_labels = True  # positives are defined by the bias labels; BiasBal's prior too

    def __init__(self, ce_weight: Weight = 0.01, contrast_weight: Weight = 1.0, temperature: Rate = 0.07,
                 balanced: bool = False, contrast_batch_size: Annotated[int, Range(ge=0)] = 64,
                 ratio: Annotated[float, Range(ge=0)] = 10.0, **options):
        super().__init__(**options)
        self.ce_weight, self.contrast_weight, self.temperature = ce_weight, contrast_weight, temperature
        self.balanced, self.contrast_batch_size, self.ratio = balanced, contrast_batch_size, ratio
        self._gen: torch.Generator | None = None

    def claims(self) -> set[str]:
        mine = super().claims()
        return mine if self.balanced else mine - {"task_cross_entropy"}  # BiasCon alone keeps the model's CE

    def setup(self, ctx: "RunContext") -> None:
        super().setup(ctx)
        loader = ctx.loaders["train"]
        if self.contrast_weight > 0 and self.contrast_batch_size > 0 and not hasattr(loader, "make_batch"):
            raise ConfigError(f"debias.contrast_batch_size={self.contrast_batch_size} draws contrastive batches from "
                              f"a training split held as tensors; dataset '{ctx.data.name}' is read by a DataLoader: "
                              f"set debias.contrast_batch_size=0 (contrast the training batch itself)")
        y, bias = loader.split.y, loader.split.extras["bias"]
        self.class_given_bias = conditional_table(bias, y, self.num_bias, ctx.data.num_classes).to(ctx.device)
        self.weights = contrast_sampling_weights(y, bias, ctx.data.num_classes, self.num_bias, self.ratio)

    def start_epoch(self, ctx) -> None:
        self._gen = epoch_generator(int(ctx.cfg.seed), ctx.round + 7919, ctx.epoch)  # its own stream, resumable

    def sample_weights(self, ctx, batch, out) -> float:
        """``ce_weight``, the authors' weight on the (possibly bias-balanced) cross-entropy."""
        return self.ce_weight

    def task_cross_entropy(self, ctx, batch, out) -> Tensor | None:
        if not self.balanced:
            return None
        shifted = bias_balanced_logits(out.logits, batch["bias"], self.class_given_bias)
        return F.cross_entropy(shifted, batch["y"], reduction="none")

    def extra_loss(self, ctx, batch, out) -> dict[str, Tensor]:
        if self.contrast_weight == 0:
            return {}
        if self.contrast_batch_size == 0:
            z, y, bias = out.features, batch["y"], batch["bias"]
        else:
            if self._gen is None:
                self.start_epoch(ctx)
            loader = ctx.loaders["train"]
            index = torch.multinomial(self.weights, self.contrast_batch_size, replacement=True, generator=self._gen)
            contrast = loader.make_batch(index.to(loader.split.x.device))
            _, z = ctx.net(contrast["x"], return_features=True)
            y, bias = contrast["y"], contrast["bias"]
        return {"biascon": self.contrast_weight * bias_contrastive_loss(z, y, bias, self.temperature)}
