"""ReBias: Learning De-biased Representations with Biased Representations (Bahng et al., ICML 2020), as in the
authors' code (clovaai/rebias @79d1d1d: ``trainer.py``, ``criterions/hsic.py``, ``criterions/sigma_utils.py``,
``main_biased_mnist.py``, ``models/mnist_models.py``).

The bias is defined by an architecture, not by labels: biased networks g of small receptive field (ReBias's
Biased-MNIST g is the SimpleConvNet with 1x1 kernels, which can only see colour) are trained on the *target*, and the
main model f is made statistically independent of them through the Hilbert-Schmidt Independence Criterion between
their features (f's and g's global-average-pooled bottleneck, ``feature_pos='post'``). The minimax

    min_f max_g  CE(f(x), y) + lambda_f HSIC(f(x), g(x)) - lambda_g HSIC(g(x), f(x)) ... (paper eq. 3-4)

is solved, as in the code (``Trainer._update_g`` then ``Trainer._update_f``), by two alternating minimisations
per batch:

    g:  CE(g(x), y) - lambda_g sum_g HSIC_1(g(x), f(x))        (f's features fixed; g becomes *more* dependent on f,
                                                                 the hardest biased model for f within its class)
    f:  CE(f(x), y) + lambda_f sum_g HSIC_1(f(x), g(x))        (g fixed, already updated on this batch)

HSIC_1 is the unbiased estimator of Song et al. (2012) with RBF kernels (:func:`hsic_unbiased`); ReBias uses it in
the paper. Bias-agnostic: no bias label is read (``uses_bias_labels`` False); the prior is g's architecture.

Here: f is the run's model; the g's are owned by this plugin (``num_biased`` of them, ReBias's ``n_g_nets``, default
1), built from the run's arch with ``biased_arch`` merged over it (default ``{kernel_size: 1}``: the same network with
1x1 kernels, ReBias's g on Biased-MNIST; a dict with its own ``_target_`` builds that arch instead), with one
optimizer and lr schedule of the trainer's kind for all of them (ReBias: one ``g_optimizer``, same settings as f's).
The g update runs inside the step, before f's loss term is formed (the code's order); f's term is a named extra loss
(``rebias_hsic``), so f is still trained by its own (possibly replaced) cross-entropy plus the HSIC.

What was followed and where code and paper differ:

* Kernel radius: ``sigma`` > 0 fixes it for both feature sets (the Biased-MNIST command: ``rbf_sigma_x = 1``);
  ``sigma=null`` takes the median heuristic of ``sigma_utils.median_distance``: sqrt of the median squared distance
  between features within batches of a ``sigma_sample`` fraction (0.25, ``sigma_update_sampling_rate``) of the
  training set, one radius for f's features and one for g's, recomputed at every epoch (the README's ImageNet
  setting). Deviations: the median here leaves out each sample's zero distance to itself (the code keeps the
  diagonal), the subset is a fixed seeded draw, and each radius is applied to its own features in both HSICs (the
  code's inner criterion applies f's radius to g's features: the same configuration dict serves both, with the
  arguments swapped).
* ``update_biased_cls`` false trains g by the HSIC term alone (the code's ``update_g_cls``).
* No pre-training of f or g (ReBias's ``n_*_pretrain_epochs`` are 0 for ReBias).
* Under torchrun the g's are not wrapped in DDP: each rank trains its own copy on its shard.
* The paper's full text was not available here; the formulas follow the code and methods-debias.md sec. 8.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from regstory.config import ConfigError
from regstory.debias.base import DebiasPlugin, Weight
from regstory.options import OneOf, Range, option
from regstory.utils import in_fp32

if TYPE_CHECKING:
    from regstory.loop import RunContext


def squared_distances(x: Tensor) -> Tensor:
    """(n, n) matrix of squared Euclidean distances between the rows of ``x`` (flattened per sample), >= 0."""
    x = x.reshape(len(x), -1)
    gram = x @ x.t()
    norms = gram.diagonal()
    return (norms[:, None] + norms[None, :] - 2 * gram).clamp(min=0)


def rbf_kernel(x: Tensor, sigma: float) -> Tensor:
    """K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))."""
    return torch.exp(-squared_distances(x) / (2 * sigma ** 2))


def hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:
    """Unbiased HSIC estimator (Song et al. 2012, eq. 5; ReBias ``HSIC.unbiased_estimator``) of two (m, m) kernel
    matrices, m >= 4: with K~, L~ the kernels with a zero diagonal,

        HSIC_1 = [tr(K~ L~) + 1'K~1 1'L~1 / ((m-1)(m-2)) - 2/(m-2) 1'K~ L~ 1] / (m (m-3)).
    """
    m = k.shape[0]
    if m < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 samples, got {m}")
    kt = k - torch.diag_embed(k.diagonal())
    lt = l - torch.diag_embed(l.diagonal())
    trace = (kt * lt.t()).sum()
    both_sums = kt.sum() * lt.sum() / ((m - 1) * (m - 2))
    cross = 2 * (kt.sum(0) @ lt.sum(0)) / (m - 2)  # 1'K~L~1 (K~ symmetric)
    return (trace + both_sums - cross) / (m * (m - 3))


def hsic_biased(k: Tensor, l: Tensor) -> Tensor:
    """Biased HSIC estimator (Gretton et al. 2005): tr(K H L H) / (m-1)^2, H = I - 11'/m."""
    m = k.shape[0]
    kh = k - k.mean(0, keepdim=True)
    lh = l - l.mean(0, keepdim=True)
    return (kh * lh.t()).sum() / (m - 1) ** 2


ESTIMATORS = {"unbiased": hsic_unbiased, "biased": hsic_biased}


@in_fp32
def rbf_hsic(x: Tensor, y: Tensor, sigma_x: float, sigma_y: float, estimator: str = "unbiased") -> Tensor:
    """HSIC between two feature batches (rows paired by sample) with RBF kernels of radii ``sigma_x``, ``sigma_y``."""
    return ESTIMATORS[estimator](rbf_kernel(x.flatten(1), sigma_x), rbf_kernel(y.flatten(1), sigma_y))


def median_radius(feature_batches: list[Tensor]) -> float:
    """sqrt of the median squared distance between distinct samples of the same batch, over the batches (ReBias's
    ``median_distance``, self-distances left out)."""
    pairs = []
    for feats in feature_batches:
        d = squared_distances(feats.float())
        off_diagonal = ~torch.eye(len(d), dtype=torch.bool, device=d.device)
        pairs.append(d[off_diagonal])
    median = torch.cat(pairs).median().item() if pairs else 1.0
    return math.sqrt(median) if median > 0 else 1.0


@option("debias", "rebias", extra={"_recursive_": (bool, False)})  # biased_arch is built by the plugin, not by Hydra
class ReBias(DebiasPlugin):
    """ReBias (module docstring). ``outer_weight``: lambda_f of f's HSIC term (ReBias ``f_lambda_outer``, 1);
    ``inner_weight``: lambda_g of g's -HSIC term (``g_lambda_inner``, 1); ``num_biased``: number of biased networks
    (``n_g_nets``, 1); ``biased_arch``: arch options merged over the run's arch for g (a dict with ``_target_`` is a
    whole arch); ``sigma``: RBF radius (null: median heuristic per epoch); ``sigma_sample``: fraction of the training
    set the median is taken on; ``estimator``: ``unbiased`` (the paper's) or ``biased``; ``update_biased_cls``: g
    also minimises its CE on the target (ReBias's ``update_g_cls``)."""

    uses_bias_labels = False  # the bias is defined by g's architecture; no bias label is read

    def __init__(self, outer_weight: Weight = 1.0, inner_weight: Weight = 1.0,
                 num_biased: Annotated[int, Range(ge=1)] = 1, biased_arch: dict[str, Any] | None = None,
                 sigma: Annotated[float | None, Range(gt=0)] = 1.0,
                 sigma_sample: Annotated[float, Range(gt=0, le=1)] = 0.25,
                 estimator: Annotated[str, OneOf(*ESTIMATORS)] = "unbiased", update_biased_cls: bool = True,
                 **options):
        super().__init__(**options)
        self.outer_weight, self.inner_weight, self.num_biased = outer_weight, inner_weight, num_biased
        self.biased_arch = dict(biased_arch) if biased_arch is not None else {"kernel_size": 1}
        self.sigma, self.sigma_sample, self.estimator = sigma, sigma_sample, estimator
        self.update_biased_cls = update_biased_cls
        self.sigma_f = self.sigma_g = sigma if sigma is not None else 1.0
        self._hsic_sum: Tensor | None = None  # sum over the epoch's steps of sum_g HSIC(f, g), on the device
        self._hsic_steps = 0

    # ---- set-up ------------------------------------------------------------------------------------------------
    def setup(self, ctx: "RunContext") -> None:
        from regstory.loop import build_optimizer, build_scheduler

        super().setup(ctx)
        arch = self.biased_arch_config(ctx.cfg.arch)
        self.biased = nn.ModuleList(
            instantiate(arch, input_shape=list(ctx.data.input_shape), num_classes=ctx.data.num_classes)
            for _ in range(self.num_biased)).to(ctx.device).train()
        self.optimizer = build_optimizer(self.biased, ctx.cfg.trainer)
        self.scheduler = build_scheduler(self.optimizer, ctx.cfg.trainer)

    def biased_arch_config(self, run_arch) -> Any:
        """g's arch: ``biased_arch`` merged over the run's arch, or on its own when it names a ``_target_``."""
        if "_target_" in self.biased_arch:
            return OmegaConf.create(self.biased_arch)
        try:
            return OmegaConf.merge(run_arch, self.biased_arch)
        except Exception as exc:  # a key the run's arch does not have (e.g. kernel_size on a torchvision ResNet)
            keys = ", ".join(sorted(self.biased_arch))
            raise ConfigError(f"debias.biased_arch={{{keys}}} does not fit arch {run_arch.get('_target_')}: give "
                              f"options that arch has, or a whole arch with its _target_ "
                              f"(e.g. debias.biased_arch={{_target_:regstory.models.simple_convnet.simple_convnet,"
                              f"kernel_size:1}}) ({type(exc).__name__})") from None

    # ---- kernel radius -----------------------------------------------------------------------------------------
    def start_epoch(self, ctx: "RunContext") -> None:
        if self.sigma is None:
            self.sigma_f, self.sigma_g = self.median_radii(ctx)

    @torch.no_grad()
    def median_radii(self, ctx: "RunContext") -> tuple[float, float]:
        """The median heuristic for f's and g's radii on a seeded ``sigma_sample`` fraction of the training set
        (batches of the training batch size). Models in eval mode, so batch-norm statistics are not moved (ReBias's
        ``median_distance`` runs them in train mode)."""
        loader = ctx.loaders["train"]
        n = len(loader.split)
        count = max(4, math.ceil(self.sigma_sample * n))
        gen = torch.Generator().manual_seed(int(ctx.cfg.seed))
        index = torch.randperm(n, generator=gen)[:count]
        f_feats, g_feats = [], []
        models = [ctx.model, *self.biased]
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            for batch in loader.subset(index):
                with ctx.autocast():
                    f_feats.append(ctx.model(batch["x"], return_features=True)[1].float().flatten(1))
                    g_feats += [g(batch["x"], return_features=True)[1].float().flatten(1) for g in self.biased]
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)
        return median_radius(f_feats), median_radius(g_feats)

    # ---- the minimax step --------------------------------------------------------------------------------------
    def extra_loss(self, ctx: "RunContext", batch: dict[str, Tensor], out) -> dict[str, Tensor]:
        """Update the g's on this batch (ReBias ``_update_g``), then f's term lambda_f sum_g HSIC(f(x), g(x)) with
        the updated g's fixed (``_update_f``)."""
        if len(batch["y"]) < 4:  # the unbiased estimator needs 4 samples (a last batch of fewer: no term)
            return {}
        f_feats = out.features.flatten(1)
        self.update_biased(ctx, batch, f_feats.detach())
        with torch.no_grad():
            g_feats = [g(batch["x"], return_features=True)[1] for g in self.biased]
        hsic = sum(rbf_hsic(f_feats, gf, self.sigma_f, self.sigma_g, self.estimator) for gf in g_feats)
        self._hsic_sum = hsic.detach() if self._hsic_sum is None else self._hsic_sum + hsic.detach()
        self._hsic_steps += 1
        return {"rebias_hsic": self.outer_weight * hsic}

    def update_biased(self, ctx: "RunContext", batch: dict[str, Tensor], f_feats: Tensor) -> None:
        """One step of every g on CE(g(x), y) - lambda_g HSIC(g(x), f(x)) (f's features fixed). Under fp16 the loss
        goes through the run's GradScaler (its ``update()`` after f's step covers this optimizer too)."""
        loss = torch.zeros((), device=f_feats.device)
        for g in self.biased:
            logits, feats = g(batch["x"], return_features=True)
            if self.update_biased_cls:
                loss = loss + F.cross_entropy(logits.float(), batch["y"])
            if self.inner_weight:
                loss = loss - self.inner_weight * rbf_hsic(feats, f_feats, self.sigma_g, self.sigma_f, self.estimator)
        self.optimizer.zero_grad(set_to_none=True)
        if ctx.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            ctx.scaler.scale(loss).backward()
            ctx.scaler.step(self.optimizer)

    # ---- metrics and state -------------------------------------------------------------------------------------
    def end_epoch(self, ctx: "RunContext") -> dict[str, Any]:
        self.scheduler.step()
        record = super().end_epoch(ctx)
        accuracies = [ctx.evaluate("test", model=g)["acc"] for g in self.biased]
        record["rebias_biased_test_acc"] = sum(accuracies) / len(accuracies)  # g's target accuracy, unbiased test
        if self._hsic_steps:  # ReBias's own measure of bias: f's dependence on the biased networks, unweighted
            record["rebias_hsic_fg"] = self._hsic_sum.item() / self._hsic_steps
        self._hsic_sum, self._hsic_steps = None, 0
        record.update(rebias_sigma_f=self.sigma_f, rebias_sigma_g=self.sigma_g)
        return record

    def summary_keys(self) -> list[str]:
        return ["rebias_hsic_fg", "rebias_biased_test_acc"]

    def state_dict(self) -> dict[str, Any]:
        return {"biased": self.biased.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "sigma": (self.sigma_f, self.sigma_g)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.biased.load_state_dict(state["biased"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sigma_f, self.sigma_g = state["sigma"]
