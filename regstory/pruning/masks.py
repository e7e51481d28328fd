"""Binary pruning masks and "parameter pinning" (thesis sec. 2.2.2.1): pruned weights stay exactly zero.

One float mask (0/1, the weight's dtype and device) per prunable tensor. Pinning is done in place and without
re-multiplying in the forward pass: gradients of pruned entries are zeroed after backward (so momentum, weight decay
and Adam moments of a pruned entry never become non-zero) and the weights are re-masked after the optimizer step
(a safety net, e.g. against decoupled weight decay). Both use ``torch._foreach_mul_`` over the tensors that have pruned entries
(none while the model is dense), which keeps the per-step cost to two element-wise passes (measured by ``scripts/bench_masks.py``).
Given an optimizer that can fuse the gradient pass into its update (:class:`regstory.optim.LeanSGD` on CPU),
``zero_grads`` hands it the masks instead, and the step reads the gradients once.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from regstory.optim import mask_gradients

PRUNABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def forward_order(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Names of the conv/linear modules in the order a forward pass first calls them (one eval-mode, no-grad
    forward of a zero input of shape ``(1, *input_shape)`` on the model's device and dtype, with hooks removed and
    the train/eval mode restored after). Modules the forward never calls are left out."""
    order: list[str] = []

    def hook(name: str):
        def record(module, args, output):
            if name not in order:
                order.append(name)
        return record

    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    device, dtype = (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)
    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, PRUNABLE_LAYERS)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order


def prunable_parameters(model: nn.Module, first_layer: bool = True, last_layer: bool = True, bias: bool = False,
                        batchnorm: bool = False, input_shape: Sequence[int] | None = None) -> dict[str, nn.Parameter]:
    """The tensors that pruning may zero, by qualified name (model.named_parameters order).

    Default: the weights of every conv and linear layer (thesis sec. 2.2.2: global magnitude pruning over conv and
    linear weights). ``first_layer``/``last_layer`` include the first and last such layer *of the forward pass*
    (the input layer and the classifier head): with ``input_shape`` (one sample's shape) the order is read from one
    forward pass (:func:`forward_order`), so models that register their head before their body (regstory's
    torchvision wrappers) exclude the right layers; without it, registration order stands in for the forward order.
    ``bias`` adds the biases of the chosen layers, ``batchnorm`` the affine parameters of normalisation layers.
    """
    layers = [name for name, m in model.named_modules() if isinstance(m, PRUNABLE_LAYERS)]
    if not layers:
        return {}
    excluded = set()
    if not (first_layer and last_layer):
        called = forward_order(model, input_shape) if input_shape is not None else layers
        called = called or layers
        if not first_layer:
            excluded.add(called[0])
        if not last_layer:
            excluded.add(called[-1])
    chosen: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, PRUNABLE_LAYERS) and name not in excluded:
            chosen[prefix + "weight"] = module.weight
            if bias and module.bias is not None:
                chosen[prefix + "bias"] = module.bias
        elif batchnorm and isinstance(module, NORM_LAYERS) and getattr(module, "weight", None) is not None:
            chosen[prefix + "weight"] = module.weight
            if module.bias is not None:
                chosen[prefix + "bias"] = module.bias
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))


class MaskSet:
    """Masks over named parameters; all edits are in place so optimizers built over the parameters stay valid."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        # same memory layout as each parameter (channels_last conv weights too), so in-place products stay vectorised
        self.masks = [torch.ones_like(p).detach() for p in self.params]
        self._sparse: list[int] = []  # indices of tensors with at least one pruned entry (the only ones pinned)
        self._sparse_params: list[Tensor] = []
        self._sparse_masks: list[Tensor] = []

    def _refresh(self) -> None:
        self._sparse = [i for i, m in enumerate(self.masks) if not bool(m.all())]
        self._sparse_params = [self.params[i] for i in self._sparse]
        self._sparse_masks = [self.masks[i] for i in self._sparse]

    # -- pinning -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_to_weights(self) -> None:
        """Zero the pruned weights in place."""
        if self._sparse:
            torch._foreach_mul_(self._sparse_params, self._sparse_masks)

    @torch.no_grad()
    def zero_grads(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the gradients of pruned weights in place (call after backward, before the optimizer step).

        With an ``optimizer`` that has ``mask_gradients_in_step`` and accepts, the masks go to its next step
        instead, which applies them as part of the update: pass one only when nothing reads the gradients between
        this call and ``optimizer.step()``."""
        if not self._sparse:
            return
        fuse = getattr(optimizer, "mask_gradients_in_step", None)
        if fuse is None or not fuse(self._sparse_params, self._sparse_masks):
            mask_gradients(self._sparse_params, self._sparse_masks)

    @torch.no_grad()
    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Zero every per-parameter optimizer buffer (SGD momentum, Adam moments) at pruned entries."""
        if optimizer is None:
            return
        for p, m in zip(self.params, self.masks):
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.mul_(m)

    # -- editing -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set(self, new_masks: Iterable[Tensor]) -> None:
        """Replace the masks (in place) by ``new_masks`` (bool or 0/1 tensors, same order and shapes)."""
        for m, new in zip(self.masks, new_masks):
            m.copy_(new.to(m.dtype))
        self._refresh()

    def state_dict(self) -> dict[str, Tensor]:
        return {n: m.detach().to("cpu", torch.bool) for n, m in zip(self.names, self.masks)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.names) ^ set(state)
        if missing:
            raise KeyError(f"mask state does not match the prunable tensors: {sorted(missing)}")
        self.set(state[n].to(m.device) for n, m in zip(self.names, self.masks))

    # -- measuring -----------------------------------------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        """(remaining weights, total prunable weights)."""
        alive = sum(int(m.sum().item()) for m in self.masks)
        return alive, sum(m.numel() for m in self.masks)

    def sparsity(self) -> float:
        alive, total = self.counts()
        return 1.0 - alive / total if total else 0.0


def keep_masks_from_scores(scores: list[Tensor], masks: list[Tensor], n_prune: int | list[int],
                           scope: str = "global") -> list[Tensor]:
    """Prune the ``n_prune`` lowest-scored remaining entries (global: over all tensors together; layerwise:
    ``n_prune[i]`` in tensor i). Already-pruned entries stay pruned. Exactly that many entries are removed,
    ties broken by position. Returns new 0/1 masks."""
    if scope == "global":
        flat_scores = torch.cat([s.detach().flatten().float() for s in scores])
        flat_alive = torch.cat([m.flatten() > 0 for m in masks])
        flat_keep = _drop_lowest(flat_scores, flat_alive, int(n_prune))
        return [k.view_as(m).to(m.dtype) for k, m in zip(flat_keep.split([m.numel() for m in masks]), masks)]
    if scope == "layerwise":
        counts = n_prune if isinstance(n_prune, list) else [n_prune] * len(masks)
        return [_drop_lowest(s.detach().flatten().float(), m.flatten() > 0, int(k)).view_as(m).to(m.dtype)
                for s, m, k in zip(scores, masks, counts)]
    raise ValueError(f"pruning scope '{scope}' is unknown: use global or layerwise")


def _drop_lowest(scores: Tensor, alive: Tensor, n: int) -> Tensor:
    keep = alive.clone()
    n = max(0, min(n, int(alive.sum())))
    if n == 0:
        return keep
    ranked = torch.where(alive, scores, torch.full_like(scores, float("inf")))
    lowest = torch.topk(ranked, n, largest=False, sorted=False).indices
    keep[lowest] = False
    return keep


def prune_fraction(mask_set: MaskSet, scores: list[Tensor], rate: float, scope: str = "global") -> None:
    """Remove a fraction ``rate`` of the remaining weights, lowest scores first (IMP: scores = |w|)."""
    if scope == "global":
        alive, _ = mask_set.counts()
        n_prune: int | list[int] = int(round(rate * alive))
    else:
        n_prune = [int(round(rate * int(m.sum().item()))) for m in mask_set.masks]
    mask_set.set(keep_masks_from_scores(scores, mask_set.masks, n_prune, scope))
    mask_set.apply_to_weights()


def prune_to_sparsity(mask_set: MaskSet, scores: list[Tensor], sparsity: float, scope: str = "global") -> None:
    """Prune (lowest scores first) until the prunable tensors reach ``sparsity`` (never un-prunes)."""
    if scope == "global":
        alive, total = mask_set.counts()
        n_prune: int | list[int] = max(0, alive - int(round((1 - sparsity) * total)))
    else:
        n_prune = [max(0, int(m.sum().item()) - int(round((1 - sparsity) * m.numel()))) for m in mask_set.masks]
    mask_set.set(keep_masks_from_scores(scores, mask_set.masks, n_prune, scope))
    mask_set.apply_to_weights()
