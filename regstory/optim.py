"""``LeanSGD``: torch's fused SGD update with less per-step bookkeeping around it (issue 8)."""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.autograd.profiler as torch_profiler
import torch.optim.optimizer as torch_optimizer
from torch import Tensor

from regstory.kernels import masked_sgd_kernel

# LeanSGD leans on private torch attributes, each read through getattr (Optimizer.profile_hook_step at import, the
# others at each step): where one is missing, the step takes torch's public path instead (see LeanSGD).
_MISSING = object()


def _profiling() -> bool:
    """Whether a profiler may be recording: True where this torch has no ``_is_profiler_enabled`` to ask."""
    return bool(getattr(torch_profiler, "_is_profiler_enabled", True))


def _torch_step_with_hooks(optimizer_module: Any = torch_optimizer) -> Any:
    """torch's ``SGD.step`` inside Optimizer's profiler range and step hooks (the path every non-lean step takes),
    or None where this torch has no ``Optimizer.profile_hook_step`` or its ``SGD.step`` cannot be unwrapped to the
    function below those hooks. Only the hook layers are unwrapped: torch's grad-mode wrapper stays."""
    wrap = getattr(optimizer_module.Optimizer, "profile_hook_step", None)
    if wrap is None:
        return None
    step = inspect.unwrap(torch.optim.SGD.step, stop=lambda f: not getattr(f, "hooked", False))
    return None if getattr(step, "hooked", False) else wrap(step)


_TORCH_STEP = _torch_step_with_hooks()


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
    ``_fused_sgd_``, ``_is_profiler_enabled`` or ``_global_optimizer_pre_hooks``/``_post_hooks``. Where torch has
    no ``Optimizer.profile_hook_step`` to put around this class's step, LeanSGD keeps torch's ``SGD.step`` as it is
    (the class then steps exactly as ``torch.optim.SGD``) and refuses gradient masks.

    ``zero_grad()`` likewise drops the gradients without ``Optimizer.zero_grad``'s profiler range and per-group
    bookkeeping (~11 us against ~1 us a step here); with ``set_to_none=False`` or under a profiler it is torch's.

    ``mask_gradients_in_step(params, masks)`` lets pruning hand its gradient masks to the next ``step`` instead of
    multiplying the gradients itself: on CPU the step then runs :mod:`regstory.kernels`' masked SGD kernel on those
    parameters, one pass over memory instead of two. Every other path of the step multiplies the gradients by the
    masks first, so the update is the same whichever path runs, up to the last bit of some entries (torch's kernel
    fuses some multiply-adds). Pruned weights stay exactly zero on every path. With ``masked_grads_visible`` (the
    default) the kernel also writes ``grad * mask`` back, so after ``step`` the gradients (what an ``after_step``
    hook reads) are bit for bit those of the two-pass path; set it False to skip that store where nothing reads the
    gradients after the step.
    """

    #: leave ``grad * mask`` in the masked gradients after a kernel step, as the two-pass path does
    masked_grads_visible: bool = True

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
        if self._kernel is False:  # first call: is there a kernel for these parameters (and a step to run it)?
            self._kernel = masked_sgd_kernel() if _TORCH_STEP is not None and masked_step_possible(params) else None
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
        fused_sgd_ = getattr(torch, "_fused_sgd_", None)
        if fused_sgd_ is None or self._scaler_attached() or self._hooks_or_profiler():
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
                                group["weight_decay"], group["nesterov"], bool(self.masked_grads_visible)):
                    continue
                masked = [(p, m) for p, m in zip(params, masks) if m is not None]  # the kernel refused them
                mask_gradients([p for p, _ in masked], [m for _, m in masked])
            fused_sgd_(params, grads, bufs, weight_decay=group["weight_decay"], momentum=group["momentum"],
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
        """Whether a step hook is registered or a profiler records; True where torch's global hook dicts are
        missing (a hook could be registered elsewhere)."""
        return bool(getattr(self, "_optimizer_step_pre_hooks", _MISSING)
                    or getattr(self, "_optimizer_step_post_hooks", _MISSING)
                    or getattr(torch_optimizer, "_global_optimizer_pre_hooks", _MISSING)
                    or getattr(torch_optimizer, "_global_optimizer_post_hooks", _MISSING)
                    or _profiling())

    def _one_device_and_dtype(self, group: dict) -> bool:
        params = group["params"]
        cached = self._uniform.get(id(group))
        if cached is None or cached[0] is not params:
            cached = (params, len({(p.device, p.dtype) for p in params}) <= 1)
            self._uniform[id(group)] = cached
        return cached[1]


if _TORCH_STEP is None:  # nothing to wrap our step in torch's hooks with: keep torch's own SGD.step
    del LeanSGD.step


def masked_step_possible(params: list[Tensor]) -> bool:
    """Whether LeanSGD can apply gradient masks inside its step for these parameters: they are on the CPU and the
    masked kernel exists. Looks the kernel up, building it the first time in an environment (~20 s): pruning calls this
    at set-up, so the build does not land in a training epoch's time."""
    return bool(params) and params[0].device.type == "cpu" and masked_sgd_kernel() is not None


@torch.no_grad()
def mask_gradients(params: list[Tensor], masks: list[Tensor]) -> None:
    """Multiply each parameter's gradient by its 0/1 mask in place (parameters without a gradient are skipped)."""
    pairs = [(p.grad, m) for p, m in zip(params, masks) if p.grad is not None]
    if not pairs:
        return
    foreach_mul_ = getattr(torch, "_foreach_mul_", None)
    if foreach_mul_ is None:
        for g, m in pairs:
            g.mul_(m)
    else:
        grads, kept = zip(*pairs)
        foreach_mul_(list(grads), list(kept))
