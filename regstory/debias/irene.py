"""IRENE: Information REmoval at the bottleNEck (Tartaglione et al., BMVC 2022; thesis sec. 3.5.1, Fig. 3.2).

Three terms are minimised (thesis sec. 3.5.1):
1. the task loss L(y, y_hat) (weighted by ``alpha``, the authors' weight on the task CE);
2. L(b, b_hat): the privacy head H, a Linear layer on the bottleneck z, is trained to predict the bias from a
   *detached* z with its own optimizer;
3. gamma * I(b, b_hat): a differentiable mutual-information proxy between the bias labels and H's softmax on z,
   minimised by the encoder only. "It is evidently key not to update the parameters within the information removal
   head": the MI term reaches the encoder through H's weights, but H receives no gradient from it (the behaviour of
   the authors' code after commit aec198c, "MI not updating PH").

``head_steps`` (default 1, the authors' code: one update of H per batch) gives H several updates per batch on the
same detached z, i.e. a stronger adversary that stays closer to the best bias classifier of the current bottleneck
(the role the thesis gives H: "to extract all the information about b from the bottleneck z"). H still never sees
the MI gradient.

``irene_head_bias_acc`` (H's accuracy on the test split) is the bias metric the authors' code reports
(``top1_private``), i.e. Table 3.1's "gender prediction accuracy". Measured on the offline biased digits (README,
"Measured on the offline set"): the preset drives it from 0.99 to 0.36 (chance 0.10), while a fresh post-hoc probe
still reads the colour; a stronger H lowers that probe only where the task collapses.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regstory.debias.base import DebiasPlugin, Rate, Weight
from regstory.options import Range, option
from regstory.utils import in_fp32

if TYPE_CHECKING:
    from regstory.loop import RunContext

EPS = 1e-15


@in_fp32
def mutual_information_proxy(bias: Tensor, probs: Tensor, num_bias: int, mask: Tensor | None = None) -> Tensor:
    """IRENE's MI proxy (authors' ``MI`` class), normalised to about [0, 1]:

    P_ij = max(1/N sum_n [b_n = i] softmax(H(z_n))_j, 1e-15),  p_i = sum_j P_ij,  q_j = sum_i P_ij,
    I = 1/ln(K_b) * sum_ij P_ij ln(P_ij / max(p_i q_j, 1e-15)).

    ``mask`` (bool, per sample) restricts the sums to the masked samples (N = their count) without indexing, so no
    value is read back to the host; with no masked sample the proxy is 0 and has no gradient.
    """
    onehot = F.one_hot(bias, num_bias).to(probs.dtype)
    count = len(bias)
    if mask is not None:
        onehot = onehot * mask[:, None]
        count = mask.sum().clamp(min=1)
    joint = (onehot.t() @ probs / count).clamp(min=EPS)
    p = joint.sum(1, keepdim=True)
    q = joint.sum(0, keepdim=True)
    return (joint * torch.log(joint / (p * q).clamp(min=EPS))).sum() / math.log(num_bias)


@in_fp32
def probs_without_head_gradient(head: nn.Linear, z: Tensor) -> Tensor:
    """softmax(H(z)) with gradients flowing to z only: H's weights are used as constants (post-fix IRENE)."""
    return F.softmax(F.linear(z, head.weight.detach(), head.bias.detach()), dim=1)


class BiasHead:
    """The privacy head H (Linear bottleneck -> bias classes) and its own SGD optimizer, trained on detached z."""

    def __init__(self, in_dim: int, num_bias: int, lr: float, momentum: float, weight_decay: float, device):
        self.linear = nn.Linear(in_dim, num_bias).to(device)
        self.optimizer = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def step(self, z: Tensor, bias: Tensor, steps: int = 1) -> Tensor:
        """``steps`` updates of H on CE(b, H(stopgrad z)) on the same batch; returns the last loss. H stays fp32: z
        from a bf16/fp16 autocast forward is cast up (the step runs after backward, outside autocast)."""
        z = z.detach().float()
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.linear(z), bias)
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"linear": self.linear.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.linear.load_state_dict(state["linear"])
        self.optimizer.load_state_dict(state["optimizer"])


@option("debias", "irene")
class IRENE(DebiasPlugin):
    """IRENE (thesis sec. 3.5.1). Defaults from the authors' ``train.py``: alpha 0.5 (task-CE weight), gamma 0.2,
    head SGD lr 0.1, momentum 0.9, weight decay 1e-4, one head update per batch (``head_steps`` = 1)."""

    def __init__(self, alpha: Weight = 0.5, gamma: Weight = 0.2, head_lr: Rate = 0.1, head_momentum: Weight = 0.9,
                 head_weight_decay: Weight = 1e-4, head_steps: Annotated[int, Range(ge=1)] = 1, **options):
        super().__init__(**options)
        self.alpha, self.gamma, self.head_steps = alpha, gamma, head_steps
        self.head_args = dict(lr=head_lr, momentum=head_momentum, weight_decay=head_weight_decay)
        self._pending: tuple[Tensor, Tensor] | None = None

    def setup(self, ctx: "RunContext") -> None:
        super().setup(ctx)
        self.head = BiasHead(ctx.model.head.in_features, self.num_bias, device=ctx.device, **self.head_args)

    def sample_weights(self, ctx, batch, out) -> float:
        """alpha, IRENE's weight on the task loss."""
        return self.alpha

    def extra_loss(self, ctx, batch, out) -> dict[str, Tensor]:
        self._pending = (out.features.detach(), batch["bias"])
        probs = probs_without_head_gradient(self.head.linear, out.features.float())
        return {"irene_mi": self.gamma * mutual_information_proxy(batch["bias"], probs, self.num_bias)}

    def after_backward(self, ctx) -> None:
        z, bias = self._pending
        self.head.step(z, bias, self.head_steps)
        self._pending = None

    def method_metrics(self, ctx, outputs) -> dict[str, Any]:
        """Accuracy of IRENE's own head H at predicting the bias on the test split (what H can still read)."""
        test = outputs["test"]
        with torch.no_grad():
            pred = self.head.linear(test["features"].to(ctx.device, torch.float32)).argmax(1).cpu()
        return {"irene_head_bias_acc": (pred == test["bias"]).float().mean().item()}

    def summary_keys(self) -> list[str]:
        return ["irene_head_bias_acc"]

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
