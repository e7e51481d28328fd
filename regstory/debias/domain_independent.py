"""Domain-independent training, DI (Wang et al., CVPR 2020, "Towards Fairness in Visual Recognition: Effective
Strategies for Bias Mitigation"; authors' code princetonvisualai/DomainBiasMitigation @c432e75,
``models/cifar_domain_independent.py``; and the DI baseline of Hong & Yang 2021, grayhong/bias-contrastive-learning
@35562b6, ``debias/losses/diloss.py``, ``train_biased_mnist_di.py``).

One classifier head per bias value d ("domain") on a shared encoder: s(y, d, x) = W_d z + c_d. In training each
sample is classified by the head of its own bias value only, with a softmax over the classes of that head:

    L = CE(s(., b_i, x_i), y_i)                       (DI's per-domain softmax, ``_criterion`` / ``DILoss``)

At inference the bias is not used: the heads' scores are **summed**, y^ = argmax_y sum_d s(y, d, x) (the paper's
"sum of outputs", ``compute_accuracy_sum_out``). Summing logits or per-head log-softmaxes (Hong & Yang's
``validate``) gives the same prediction and the same cross-entropy, since they differ by a per-sample constant.

Implementation: the model's own ``head`` is the head of bias value 0; this plugin owns the heads of bias values
1..D-1 (one Linear of D-1 x K outputs on the bottleneck), trained by the run's loss with an optimizer and lr schedule
of the trainer's kind, checkpointed with the run. A forward hook on the model's head adds the other heads' scores to
its output, so the model's logits are the summed scores wherever the model is called (training accuracy, every
evaluation, the selected checkpoint's metrics); the training loss takes the head of each sample's bias value
(:class:`regstory.debias.rubi.TaskLossPlugin`: it replaces the task cross-entropy per sample). Reads the bias label
of every training sample: **not bias-agnostic**.

Where code and paper differ: the paper discusses several inference rules (conditional on the known domain, max, sum
of probabilities, sum of outputs) and recommends the sum of outputs, which both codes report; followed. Wang et al.'s
CelebA code uses per-attribute sigmoids (multi-label); this is the single-label softmax version of their CIFAR-10S code
and of Hong & Yang's. Caveat: a pruning method prunes the model's own head (bias value 0) but not the plugin's heads.
The paper's full text was not available here; the loss and the inference follow the two codes above.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regstory.config import ConfigError
from regstory.debias.rubi import OwnedModule, TaskLossPlugin, follow_bottleneck
from regstory.options import option
from regstory.utils import in_fp32

if TYPE_CHECKING:
    from regstory.loop import RunContext


def per_domain_logits(own: Tensor, others: Tensor, num_classes: int) -> Tensor:
    """(B, D, K) scores s(., d, x): the model head's (d = 0) then the other heads' (B, (D-1) K) outputs."""
    return torch.cat([own[:, None, :], others.reshape(len(others), -1, num_classes)], dim=1)


@in_fp32
def di_cross_entropy(domain_logits: Tensor, y: Tensor, bias: Tensor) -> Tensor:
    """Per sample CE(s(., b_i, x_i), y_i): the softmax of the head of the sample's own bias value only."""
    own = domain_logits[torch.arange(len(y), device=y.device), bias]
    return F.cross_entropy(own, y, reduction="none")


def di_inference(domain_logits: Tensor) -> Tensor:
    """sum_d s(., d, x): the scores DI predicts with (argmax over classes)."""
    return domain_logits.sum(1)


@option("debias", "di")
class DomainIndependent(TaskLossPlugin):
    """Domain-independent heads, one per bias value, summed at inference (module docstring). No options of its own:
    the heads train with the trainer's optimizer settings."""

    uses_bias_labels = True  # each training sample is classified by the head of its own bias value

    def __init__(self, **options):
        super().__init__(**options)
        self._hook: Any = None
        self._hooked: nn.Module | None = None

    def setup(self, ctx: "RunContext") -> None:
        super().setup(ctx)
        if self.num_bias < 2:
            raise ConfigError(f"debias=di needs at least 2 bias values (one head each); dataset '{ctx.data.name}' "
                              f"has {self.num_bias}")
        self.num_classes = ctx.data.num_classes
        head = ctx.model.head
        self.heads = OwnedModule(nn.Linear(head.in_features, (self.num_bias - 1) * self.num_classes).to(ctx.device),
                                 ctx.cfg.trainer)
        self._attach(ctx.model)

    def _attach(self, model: nn.Module) -> None:
        """A forward hook on ``model.head``: its output becomes the sum of every head's scores."""
        if model.head is self._hooked:
            return
        if self._hook is not None:
            self._hook.remove()

        def summed(module, args, output):
            others = self.heads.module(args[0])
            return output + others.reshape(len(output), -1, self.num_classes).sum(1).to(output.dtype)

        self._hook, self._hooked = model.head.register_forward_hook(summed), model.head

    def domain_logits(self, model: nn.Module, z: Tensor) -> Tensor:
        """(B, D, K) per-head scores of the bottleneck z (the model head read directly, past the summing hook)."""
        head = model.head
        own = F.linear(z, head.weight.to(z.dtype), head.bias.to(z.dtype) if head.bias is not None else None)
        return per_domain_logits(own, self.heads.module(z), self.num_classes)

    def task_cross_entropy(self, ctx, batch, out) -> Tensor:
        return di_cross_entropy(self.domain_logits(ctx.model, out.features.flatten(1)), batch["y"], batch["bias"])

    def after_backward(self, ctx) -> None:
        self.heads.step(ctx.scaler)

    def end_epoch(self, ctx) -> dict[str, Any]:
        self.heads.scheduler.step()
        return super().end_epoch(ctx)

    def model_replaced(self, ctx, change) -> None:
        self.heads = follow_bottleneck(self.heads, ctx, change)
        self._attach(ctx.model)

    def state_dict(self) -> dict[str, Any]:
        return {"heads": self.heads.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.heads.load_state_dict(state["heads"])
