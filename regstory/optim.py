"""``LeanSGD``: torch's fused SGD update with less per-step bookkeeping around it (issue 8)."""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.optim.optimizer as torch_optimizer
from torch import Tensor

from regstory.kernels import masked_sgd_kernel


def _profiling() -> bool:
    return bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", False))


#: torch's SGD.step with the usual profiler range and step hooks around it (the path every non-lean step takes)
_TORCH_STEP = torch_optimizer.Optimizer.profile_hook_step(inspect.unwrap(torch.optim.SGD.step))


class LeanSGD(torch.optim.SGD):
    """``torch.optim.SGD(fused=True)`` whose ``step`` calls torch's fused kernel (``torch._fused_sgd_``) directly.

    The update is the same kernel on the same tensors as torch's SGD: v <- m v + (1 - dampening) (g + wd w),
    w <- w - lr v (or the Nesterov form). Two pieces of per-step bookkeeping are skipped. One is the profiler range
    and step-hook dispatch that ``Optimizer`` wraps around every ``step``. The other is the regrouping of tensors by
    device and dtype at each call. On this CPU they cost ~125 us a step, ~5% of an MNIST-1D MLP step: ``step`` went
    from ~295 us to ~170 us, which is the kernel alone.

    torch's own path (``SGD.step`` inside its profiler range and hooks) runs whenever the direct call does not
    cover the step. That is the case for the first step (which creates the momentum buffers), a closure, a missing
    or sparse gradient, an unfused group, a tensor learning rate, a group that mixes devices or dtypes, a
    GradScaler's ``grad_scale``/``found_inf``, a registered step hook, an active profiler, or a torch without
    ``_fused_sgd_``.

    ``zero_grad()`` likewise drops the gradients without ``Optimizer.zero_grad``'s profiler range and per-group
    bookkeeping (~11 us against ~1 us a step here); with ``set_to_none=False`` or under a profiler it is torch's.

    ``mask_gradients_in_step(params, masks)`` lets pruning hand its gradient masks to the next ``step`` instead of
    multiplying the gradients itself: on CPU the step then runs :mod:`regstory.kernels`' masked SGD kernel on those
    parameters, one pass over memory instead of two. Every other path of the step multiplies the gradients by the
    masks first, so the update is the same whichever path runs, up to the last bit of some entries (torch's kernel
    fuses some multiply-adds). Pruned weights stay exactly zero on every path.
    """

    def __init__(self, params: Any, **kwargs: Any):
        kwargs.setdefault("fused", True)
        super().__init__(params, **kwargs)
        self._uniform: dict[int, tuple[list[Tensor], bool]] = {}
        self._pending_masks: tuple[list[Tensor], list[Tensor]] | None = None
        self._mask_cache: dict[int, tuple[list[Tensor], list[Tensor], list[Tensor | None] | None]] = {}
        self._kernel: Any = False  # the masked kernel, None where there is none; False: not looked up yet

    def step(self, closure=None):
        pending, self._pending_masks = self._pending_masks, None
        if closure is None and self._direct_step(pending):
            return None
        if pending is not None:
            mask_gradients(*pending)
        return _TORCH_STEP(self, closure)

    # Optimizer.__init__ wraps an unwrapped ``step`` in its profiler range and hooks: the cost skipped here.
    step.hooked = True  # type: ignore[attr-defined]

    def mask_gradients_in_step(self, params: list[Tensor], masks: list[Tensor]) -> bool:
        """Multiply these parameters' gradients by ``masks`` as part of the next ``step`` (or of the ``zero_grad``
        that drops them). Returns False, changing nothing, when there is no kernel to fuse it into (not a CPU model,
        no compiler): the caller then multiplies the gradients itself. The lists must stay the same objects while
        the masks do (the step caches its lookup on them)."""
        if self._kernel is False:  # first call: is there a kernel for these parameters?
            self._kernel = masked_sgd_kernel() if masked_step_possible(params) else None
        if self._kernel is None:
            return False
        self._pending_masks = (params, masks)
        return True

    @property
    def takes_gradient_masks(self) -> bool:
        """True once ``mask_gradients_in_step`` has accepted masks (the masked kernel runs in this optimizer's steps)."""
        return callable(self._kernel)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._pending_masks = None  # their gradients are going
        if not set_to_none or _profiling():
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _direct_step(self, pending: tuple[list[Tensor], list[Tensor]] | None = None) -> bool:
        """Apply the fused update to every group and return True, or change nothing and return False. A group
        with pending gradient masks goes through the masked kernel, the others through torch's fused kernel."""
        if not hasattr(torch, "_fused_sgd_") or self._scaler_attached() or self._hooks_or_profiler():
            return False
        work = []
        for group in self.param_groups:
            params = group["params"]
            if not group.get("fused") or isinstance(group["lr"], Tensor) or not self._one_device_and_dtype(group):
                return False
            grads = [p.grad for p in params]
            if any(g is None or g.is_sparse for g in grads):
                return False
            bufs = [self.state[p].get("momentum_buffer") for p in params] if group["momentum"] != 0 else []
            if any(b is None for b in bufs):
                return False
            masks = self._aligned_masks(group, pending) if pending is not None else None
            if masks is not None and (group["momentum"] == 0 or group["maximize"]):
                return False
            work.append((group, params, grads, bufs, masks))
        for group, params, grads, bufs, masks in work:
            if masks is not None:
                if self._kernel(params, grads, bufs, masks, group["lr"], group["momentum"], group["dampening"],
                                group["weight_decay"], group["nesterov"]):
                    continue
                masked = [(p, m) for p, m in zip(params, masks) if m is not None]  # the kernel refused them
                mask_gradients([p for p, _ in masked], [m for _, m in masked])
            torch._fused_sgd_(params, grads, bufs, weight_decay=group["weight_decay"], momentum=group["momentum"],
                              lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                              maximize=group["maximize"], is_first_step=False)
        return True

    def _aligned_masks(self, group: dict, pending: tuple[list[Tensor], list[Tensor]]) -> list[Tensor | None] | None:
        """The pending mask of each of the group's parameters (None: unmasked), or None when none is masked.
        Cached on the identity of the group's parameter list and of the mask list."""
        params, masks = pending
        key = id(group)
        cached = self._mask_cache.get(key)
        if cached is None or cached[0] is not group["params"] or cached[1] is not masks:
            mask_of = {id(p): m for p, m in zip(params, masks)}
            aligned = [mask_of.get(id(p)) for p in group["params"]]
            cached = (group["params"], masks, aligned if any(m is not None for m in aligned) else None)
            self._mask_cache[key] = cached
        return cached[2]

    def _scaler_attached(self) -> bool:
        return getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None

    def _hooks_or_profiler(self) -> bool:
        return bool(self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                    or getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
                    or getattr(torch_optimizer, "_global_optimizer_post_hooks", None)
                    or _profiling())

    def _one_device_and_dtype(self, group: dict) -> bool:
        params = group["params"]
        cached = self._uniform.get(id(group))
        if cached is None or cached[0] is not params:
            cached = (params, len({(p.device, p.dtype) for p in params}) <= 1)
            self._uniform[id(group)] = cached
        return cached[1]


def masked_step_possible(params: list[Tensor]) -> bool:
    """Whether LeanSGD can apply gradient masks inside its step for these parameters: they are on the CPU and the
    masked kernel exists. Looks the kernel up, building it the first time on a machine (~20 s): pruning calls this
    at set-up, so the build does not land in a training epoch's time."""
    return bool(params) and params[0].device.type == "cpu" and masked_sgd_kernel() is not None


@torch.no_grad()
def mask_gradients(params: list[Tensor], masks: list[Tensor]) -> None:
    """Multiply each parameter's gradient by its 0/1 mask in place (parameters without a gradient are skipped)."""
    pairs = [(p.grad, m) for p, m in zip(params, masks) if p.grad is not None]
    if pairs:
        grads, kept = zip(*pairs)
        torch._foreach_mul_(list(grads), list(kept))
