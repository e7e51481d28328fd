"""EnD: Entangling and Disentangling deep representations for bias correction (Tartaglione et al., CVPR 2021;
thesis sec. 3.4).

On the bottleneck outputs y_i of a mini-batch, normalised to unit length (y~), EnD builds the Gram matrix
G = y~ y~' (g_ij in [-1, 1]) and adds two terms to the task loss (thesis sec. 3.4; authors' ``src/EnD.py``):

* disentangling R_perp (``abs_orthogonal_blind``): for each bias class c, S_c = sum of g_ij over pairs i > j with
  b_i = b_j = c; R_perp = sum_c |S_c| / sum_c M_c (M_c = number of such pairs). It ignores the target.
* entangling R_par (``abs_parallel``): over the pairs i > j with the same target and different bias,
  R_par = 1 - mean (1 + g_ij) / 2 = mean (1 - g_ij) / 2.

L = CE + alpha * R_perp + beta * R_par. The thesis: the disentangling term should weigh less than the entangling one.

Deviations from the authors' code, both cheap to state: (1) the normalised features feed only the regulariser,
not the classifier (the code normalises in the forward path, so its classifier sees unit-norm features); (2) every
same-target different-bias pair is counted (the code's strict-lower-triangle mask keeps about half of them).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from regstory.debias.base import DebiasPlugin, Weight
from regstory.options import option
from regstory.utils import in_fp32

if TYPE_CHECKING:
    from regstory.loop import RunContext


@in_fp32
def gram_matrix(features: Tensor) -> Tensor:
    """G = y~ y~' of the L2-normalised features, clamped to [-1, 1]; in fp32 under autocast (a batch x batch
    product: cheap, and the terms below then keep one dtype whatever the device's autocast policy)."""
    z = F.normalize(features.flatten(1), dim=1)
    return (z @ z.t()).clamp(-1.0, 1.0)


def lower_pairs(n: int, device) -> Tensor:
    """Mask of the pairs i > j (each unordered pair once, no diagonal)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(diagonal=-1)


@in_fp32
def disentangling_term(gram: Tensor, bias: Tensor, num_bias: int) -> Tensor:
    """R_perp = sum_c |sum_{i>j, b_i=b_j=c} g_ij| / sum_c M_c; 0 when no pair shares a bias class. Computed with
    masks and one ``index_add`` (no per-class loop, no host read per step)."""
    same = lower_pairs(len(bias), gram.device) & (bias[:, None] == bias[None, :])
    per_class = gram.new_zeros(num_bias).index_add(0, bias, (gram * same).sum(1))  # row i's pairs land in class b_i
    return per_class.abs().sum() / same.sum().clamp(min=1)


@in_fp32
def entangling_term(gram: Tensor, target: Tensor, bias: Tensor) -> Tensor:
    """R_par = mean over pairs i > j with y_i = y_j and b_i != b_j of (1 - g_ij) / 2; 0 when there is none."""
    mask = lower_pairs(len(target), gram.device) & (target[:, None] == target[None, :]) & (bias[:, None] != bias[None, :])
    return ((1 - gram) / 2 * mask).sum() / mask.sum().clamp(min=1)


@option("debias", "end")
class EnD(DebiasPlugin):
    """EnD regulariser on the bottleneck (thesis sec. 3.4). Defaults alpha = beta = 0.1 are the authors'
    ``src/configs.py`` values; on the offline biased digits set alpha 5, beta 10 work (see the debias_digits_end
    preset)."""

    def __init__(self, alpha: Weight = 0.1, beta: Weight = 0.1, **options):
        super().__init__(**options)
        self.alpha, self.beta = alpha, beta

    def extra_loss(self, ctx: "RunContext", batch, out) -> dict[str, Tensor]:
        gram = gram_matrix(out.features)
        return {
            "end_disentangle": self.alpha * disentangling_term(gram, batch["bias"], self.num_bias),
            "end_entangle": self.beta * entangling_term(gram, batch["y"], batch["bias"]),
        }
