"""LNL: Learning Not to Learn (Kim et al., CVPR 2019), as in the authors' code (feidfoe/learning-not-to-learn
@fad2ec8, ``trainer.py`` ``_train_step``, ``models.py`` ``Predictor``) and in Hong & Yang's re-implementation
(grayhong/bias-contrastive-learning @35562b6, ``train_celeba_lnl.py``, ``train_biased_mnist_lnl.py``,
``debias/networks/resnet_lnl.py``, ``debias/networks/simple_conv_lnl.py``, ``debias/utils/training.py``), the one
behind the CelebA figures of the thesis' Table 3.2.

A bias predictor h reads f's features and is trained adversarially against them:

    f:  CE(f(x), y) + lambda * mean_n sum_k p_nk log p_nk,   p_n = softmax(h(feat_n))   (minus h's entropy)
    h:  CE(h(GRL(feat)), b),   GRL: identity forward, gradient times -grl_scale backward

Minimising the negative entropy makes h uncertain about the bias of f's features; h itself is not trained by that
term (its parameters are constants there), only by its cross-entropy on the bias label, whose gradient reaches f
reversed and scaled by ``grl_scale`` (f learns to make h's job harder). **At test time f alone is used**; h is
owned by this plugin (:class:`regstory.debias.rubi.OwnedModule`: an optimizer and lr schedule of the trainer's kind,
``predictor_lr`` overriding the lr, checkpointed with the run). Because h is trained on the bias labels, LNL is **not
bias-agnostic** (``uses_bias_labels`` True).

What h reads. By default the bottleneck (``out.features``, flattened); ``site`` names a module of f whose recorded
output (the loop's :class:`regstory.activations.ActivationRecorder`, kept in the graph so gradients reach f) is read
instead, global-average-pooled over its spatial dimensions when it has any (channels on dim 1, the layout of
Conv/Linear outputs): ``debias.site=body.layer2`` on ``arch=simple_convnet_resnet18`` is Hong & Yang's CelebA
predictor (GAP + Linear on ResNet-18's 128-channel layer2 map). The site's width is found by one dry forward at
set-up (eval mode, no grad, a zero batch: BatchNorm statistics are untouched). h is one Linear layer in both cases.
A model surgery that narrows the bottleneck is followed (the columns of the surviving features are kept,
:func:`regstory.debias.rubi.follow_bottleneck`); a surgery that changes a ``site``'s width is refused (which channels
survive is not tracked for a site).

``lnl_predictor_bias_acc``: h's accuracy on the test split's bias labels, every epoch (eval mode, no grad): on the
bottleneck features :class:`regstory.debias.base.DebiasPlugin` already collects, or, for a ``site``, on one extra
no-grad pass over the test split recording the site. Low = f's features no longer tell h the bias (chance
1 / num_bias); it is what h can read, not what a fresh probe can (``bias_probe_acc``).

What was followed and where code and paper differ:

* **One merged step.** Both codes make two sequential updates per batch: (1) forward f, backward CE + lambda * the
  negative entropy, step f only (h's gradients from this term are zeroed before step 2); (2) forward f again, backward
  CE(h(GRL(feat)), b), step f and h. This loop does one forward and one backward per batch, so here both terms are
  summed into one loss: f takes one step on CE + lambda * negative entropy + the reversed bias CE; h one step on its
  bias CE. The entropy is computed with h's parameters detached (their gradient is not computed, rather than
  computed and zeroed: the same update of h). Differences: f makes one optimizer step per batch instead of two (with
  Adam, one moment update instead of two), and the reversed gradient is taken at f's pre-step features (the codes
  re-run f after step 1).
* **Bias labels and predictor.** The authors' Colored-MNIST bias is the colour quantised into 8 bins per RGB
  channel, predicted per pixel by three predictors (conv3x3-BN-ReLU-conv3x3 on a 32-channel early map, ``Predictor``;
  the negative entropy averaged over the three, the CEs summed); Hong & Yang predict one categorical bias label per
  image (Biased-MNIST: two 7x7 conv blocks + GAP + Linear on the map after the second conv block, ``simple_conv_lnl``;
  CelebA: GAP + Linear on layer2). Here: the dataset's categorical bias label ``batch["bias"]`` (``num_bias`` classes)
  and a single Linear predictor on the bottleneck or a GAP'd site: a weaker adversary than the codes' conv predictors
  on Colored/Biased-MNIST, the same as Hong & Yang's on CelebA.
* **Weights.** ``entropy_weight`` lambda: 0.01 in the authors' code (``_lambda``), 1 in Hong & Yang's (``--weight``,
  both datasets); ``grl_scale`` 0.1 in both codes (``GradReverse.backward``: ``grad_output.neg() * 0.1``).
* **Optimizers.** The authors train h with SGD of f's lr, momentum, weight decay and step decay; Hong & Yang with Adam
  of f's lr, weight decay 1e-4 and f's MultiStepLR: both "an optimizer of the trainer's kind", followed
  (``predictor_lr`` null = the trainer's lr).
* The negative entropy is computed as sum_k softmax * log_softmax (Hong & Yang), in fp32; the authors' p * log(p)
  is the same value but NaN where a probability underflows to 0.

The paper's full text was not available here (its abstract: an additional network predicts the bias distribution
and is trained adversarially against the feature embedding, minimising a mutual-information regulariser); the
formulas follow the two codes above.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regstory.activations import ActivationRecorder
from regstory.config import ConfigError
from regstory.debias.base import DebiasPlugin, Weight
from regstory.debias.rubi import OwnedModule, follow_bottleneck
from regstory.options import Range, option
from regstory.utils import in_fp32

if TYPE_CHECKING:
    from regstory.loop import RunContext


class _GradReverse(torch.autograd.Function):
    """Identity forward; the upstream gradient times ``-scale`` backward (the codes' ``GradReverse``)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.neg() * ctx.scale, None


def grad_reverse(x: Tensor, scale: float = 0.1) -> Tensor:
    """The gradient-reversal layer: ``x`` unchanged, its gradient multiplied by ``-scale`` on the way back."""
    return _GradReverse.apply(x, float(scale))


@in_fp32
def negative_entropy(logits: Tensor) -> Tensor:
    """mean_n sum_k p_nk log p_nk with p_n = softmax(logits_n): minus the mean entropy of the rows' softmax (fp32;
    0 for a one-hot prediction, -ln K for a uniform one)."""
    return (F.softmax(logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


@in_fp32
def linear_logits(feats: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """h's logits in fp32 (features cast up differentiably under autocast)."""
    return F.linear(feats, weight, bias)


def pooled(t: Tensor) -> Tensor:
    """(N, C) features of a recorded site: global average over the dimensions after the channels (dim 1)."""
    return t.flatten(2).mean(2) if t.dim() > 2 else t.flatten(1)


@torch.no_grad()
def site_width(model: nn.Module, module: str, site: str, input_shape, device) -> int:
    """The channel width (dim 1) of ``site``'s output: one forward of a zero batch of two, in eval mode (BatchNorm's
    running statistics untouched; the mode is restored)."""
    recorder = ActivationRecorder(model, [module])
    was_training = model.training
    model.eval()
    try:
        with recorder.capture(record=("post",)):
            model(torch.zeros(2, *input_shape, device=device))
    finally:
        model.train(was_training)
    if site not in recorder.post:
        raise ConfigError(f"debias.site={site}: module {module} is called only {len(recorder.sites)} time(s) in a "
                          f"forward (sites: {', '.join(recorder.sites)})")
    return pooled(recorder.post[site]).shape[1]


@option("debias", "lnl")
class LNL(DebiasPlugin):
    """Learning Not to Learn (module docstring). ``entropy_weight``: lambda, the weight of the negative entropy of
    h's softmax in f's loss (authors 0.01, Hong & Yang 1); ``grl_scale``: the factor of the reversed gradient of h's
    bias CE into f (both codes 0.1); ``site``: a module of f whose output h reads (GAP'd; e.g. ``body.layer2`` on
    ResNet-18, Hong & Yang's CelebA choice; ``name#k`` for its k-th call), null = the bottleneck;
    ``predictor_lr``: h's learning rate (null: the trainer's, as both codes)."""

    uses_bias_labels = True  # h is trained to predict the bias label

    def __init__(self, entropy_weight: Weight = 0.01, grl_scale: Weight = 0.1, site: str | None = None,
                 predictor_lr: Annotated[float | None, Range(gt=0)] = None, **options):
        super().__init__(**options)
        self.entropy_weight, self.grl_scale, self.predictor_lr = entropy_weight, grl_scale, predictor_lr
        self.site = site
        self.site_module = site.split("#")[0] if site else None
        # the loop records the site's output in the autograd graph, so both terms' gradients reach f through it
        self.activation_sites = [self.site_module] if site else None
        self.activation_grads = site is not None

    def setup(self, ctx: "RunContext") -> None:
        super().setup(ctx)
        if self.site is None:
            width = ctx.model.head.in_features
        else:
            names = [n for n, _ in ctx.model.named_modules() if n]
            if self.site_module not in names:
                model = type(ctx.model).__name__
                raise ConfigError(f"debias.site={self.site}: no module {self.site_module} in {model} "
                                  f"(its modules: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")
            width = site_width(ctx.model, self.site_module, self.site, tuple(ctx.data.input_shape), ctx.device)
        self.width = width
        self.predictor = OwnedModule(nn.Linear(width, self.num_bias).to(ctx.device), ctx.cfg.trainer,
                                     self.predictor_lr)

    # ---- training ------------------------------------------------------------------------------------------
    def features_of(self, out) -> Tensor:
        """What h reads in this step: the bottleneck, or the GAP'd site recorded by the loop (in the graph)."""
        if self.site is None:
            return out.features.flatten(1)
        return pooled(out.activations.post[self.site])

    def extra_loss(self, ctx, batch, out) -> dict[str, Tensor]:
        """``lnl_entropy``: lambda * the negative entropy of h's softmax, h's parameters as constants (trains f
        only); ``lnl_bias``: CE(h(GRL(feat)), b) (trains h; f receives -grl_scale times its gradient)."""
        feats, linear = self.features_of(out), self.predictor.module
        frozen = linear_logits(feats, linear.weight.detach(), linear.bias.detach())
        adversary = linear_logits(grad_reverse(feats, self.grl_scale), linear.weight, linear.bias)
        return {"lnl_entropy": self.entropy_weight * negative_entropy(frozen),
                "lnl_bias": F.cross_entropy(adversary, batch["bias"])}

    def after_backward(self, ctx) -> None:
        self.predictor.step(ctx.scaler)

    def end_epoch(self, ctx) -> dict[str, Any]:
        self.predictor.scheduler.step()
        return super().end_epoch(ctx)

    # ---- metrics -------------------------------------------------------------------------------------------
    def method_metrics(self, ctx, outputs) -> dict[str, Any]:
        """Accuracy of h at predicting the bias on the test split (what h can still read from f's features)."""
        if "test" not in outputs:
            return {}
        if self.site is None:
            test = outputs["test"]
            with torch.no_grad():
                pred = self.predict(test["features"].to(ctx.device, torch.float32)).cpu()
            return {"lnl_predictor_bias_acc": (pred == test["bias"].cpu()).float().mean().item()}
        return {"lnl_predictor_bias_acc": self.site_accuracy(ctx)}

    def predict(self, feats: Tensor) -> Tensor:
        linear = self.predictor.module
        return linear_logits(feats, linear.weight, linear.bias).argmax(1)

    @torch.no_grad()
    def site_accuracy(self, ctx) -> float:
        """h's test bias accuracy on the site: one no-grad pass of f (eval mode) over the test split."""
        model, recorder = ctx.model, ActivationRecorder(ctx.model, [self.site_module])
        hits = torch.zeros((), device=ctx.device, dtype=torch.long)
        seen = 0
        was_training = model.training
        model.eval()
        try:
            for batch in ctx.loaders["test"]:
                with ctx.autocast(), recorder.capture(record=("post",)):
                    model(batch["x"])
                pred = self.predict(pooled(recorder.post[self.site]))
                hits += (pred == batch["bias"].to(pred.device)).sum()
                seen += len(pred)
        finally:
            model.train(was_training)
        return hits.item() / max(seen, 1)

    def summary_keys(self) -> list[str]:
        return ["lnl_predictor_bias_acc"]

    # ---- surgery and checkpoints ---------------------------------------------------------------------------
    def model_replaced(self, ctx, change) -> None:
        if self.site is None:
            self.predictor = follow_bottleneck(self.predictor, ctx, change)
            self.width = self.predictor.module.in_features
            return
        width = site_width(ctx.model, self.site_module, self.site, tuple(ctx.data.input_shape), ctx.device)
        if width != self.width:
            raise ValueError(f"debias.site={self.site}: the surgery changed the site's width from {self.width} to "
                             f"{width}; LNL's predictor on a site cannot follow (it can on the bottleneck)")

    def state_dict(self) -> dict[str, Any]:
        return {"predictor": self.predictor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.predictor.load_state_dict(state["predictor"])
