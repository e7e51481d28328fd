"""EnD: Entangling and Disentangling deep representations for bias correction (Tartaglione et al., CVPR 2021;
thesis sec. 3.4).

On the bottleneck outputs y_i of a mini-batch, normalised to unit length (y~), EnD builds the Gram matrix
G = y~ y~' (g_ij in [-1, 1]) and adds two terms to the task loss (thesis sec. 3.4; authors' ``src/EnD.py``):

* disentangling R_perp (``abs_orthogonal_blind``): for each bias class c, S_c = sum of g_ij over pairs i > j with
  b_i = b_j = c; R_perp = sum_c |S_c| / sum_c M_c (M_c = number of such pairs). It ignores the target.
* entangling R_par (``abs_parallel``): over the pairs i > j with the same target and different bias,
  R_par = 1 - mean (1 + g_ij) / 2 = mean (1 - g_ij) / 2.

L = CE + alpha * R_perp + beta * R_par. The thesis: the disentangling term should weigh less than the entangling one.

Normalised bottleneck (``normalize_classifier_input``, default true as the authors): the authors' code wraps the
global average pool as ``Sequential(GAP, pattern_norm)`` (``src/models.py``), so the L2 normalisation sits in the
forward path: the classifier is trained and tested on the unit-norm features z~, and the forward hook that feeds
the regulariser reads the same z~. Here the plugin puts a forward pre-hook on the model's ``head`` (the classifier
sees z / ||z||, in training and in every evaluation) and a forward hook on the model, so the bottleneck features
it returns (the regulariser's input, and the bias probe's) are the same z~. ``false`` feeds z~ to the regulariser
only and leaves the network as built. (The authors' ``pattern_norm`` acts only on tensors of more than 2 dims; on
the 4-D GAP output it does act.) The bottleneck must be able to take negative values for the disentangling term to
reach 0: the authors replace the last ReLU by Tanh (SimpleConvNet's default here; ``arch.last_activation=tanh``
for the CelebA ResNet-18, which the ``table3_2`` preset sets for EnD).

Deviation from the authors' code: every same-target different-bias pair is counted (the code's strict-lower-
triangle mask keeps about half of them).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def unit_norm(z: Tensor) -> Tensor:
    """z / ||z|| per sample (flattened), computed in fp32 and returned in z's dtype (fp16's eps would be 0)."""
    return F.normalize(z.float().flatten(1), dim=1).to(z.dtype)


def normalise_bottleneck(model: nn.Module) -> list[Any]:
    """Make ``model`` (a :class:`regstory.models.base.Classifier`) feed unit-norm bottleneck features to its head and
    return them as its features (the authors' ``Sequential(GAP, pattern_norm)``). Returns the hook handles."""
    def head_input(module, args):
        return (unit_norm(args[0]), *args[1:])

    def returned_features(module, args, output):
        if isinstance(output, tuple):  # forward(x, return_features=True): (logits, z)
            return (output[0], unit_norm(output[1]), *output[2:])
        return output

    return [model.head.register_forward_pre_hook(head_input), model.register_forward_hook(returned_features)]


@option("debias", "end")
class EnD(DebiasPlugin):
    """EnD regulariser on the bottleneck (thesis sec. 3.4). Defaults alpha = beta = 0.1 are the authors'
    ``src/configs.py`` values; on the offline biased digits set alpha 5, beta 10 work (see the debias_digits_end
    preset). ``normalize_classifier_input``: the classifier sees the unit-norm features too (the authors' code)."""

    def __init__(self, alpha: Weight = 0.1, beta: Weight = 0.1, normalize_classifier_input: bool = True, **options):
        super().__init__(**options)
        self.alpha, self.beta = alpha, beta
        self.normalize_classifier_input = normalize_classifier_input
        self._hooks: list[Any] = []
        self._hooked: nn.Module | None = None

    def setup(self, ctx: "RunContext") -> None:
        super().setup(ctx)
        self._attach(ctx.model)

    def model_replaced(self, ctx: "RunContext", change) -> None:
        self._attach(ctx.model)

    def _attach(self, model: nn.Module) -> None:
        if not self.normalize_classifier_input or model is self._hooked:
            return
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._hooked = normalise_bottleneck(model), model

    def extra_loss(self, ctx: "RunContext", batch, out) -> dict[str, Tensor]:
        gram = gram_matrix(out.features)
        return {
            "end_disentangle": self.alpha * disentangling_term(gram, batch["bias"], self.num_bias),
            "end_entangle": self.beta * entangling_term(gram, batch["y"], batch["bias"]),
        }
