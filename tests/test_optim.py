"""LeanSGD: torch's fused SGD update called directly (regstory.optim); the same numbers as torch.optim.SGD."""
import contextlib
import importlib.util
import subprocess
import sys

import pytest
import torch

import regstory.optim as optim_module
from regstory import kernels
from regstory.optim import LeanSGD, mask_gradients


def _pair(**hyper):
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    lean = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    return ref, torch.optim.SGD(ref, fused=True, **hyper), lean, LeanSGD(lean, **hyper)


def _set_grads(params, step):
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("hyper", [dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                                   dict(lr=0.1, momentum=0.0), dict(lr=0.1, momentum=0.5, dampening=0.3, maximize=True)])
def test_lean_steps_equal_torch_fused_sgd_bit_for_bit(hyper):
    ref, ref_opt, lean, lean_opt = _pair(**hyper)
    for step in range(5):
        if step == 3:
            for opt in (ref_opt, lean_opt):
                opt.param_groups[0]["lr"] *= 0.1  # a schedule step between optimizer steps
        _set_grads(ref, step)
        _set_grads(lean, step)
        ref_opt.step()
        lean_opt.step()
    for a, b in zip(ref, lean):
        assert torch.equal(a, b)
        if hyper["momentum"]:
            assert torch.equal(ref_opt.state[a]["momentum_buffer"], lean_opt.state[b]["momentum_buffer"])


def test_hand_checked_momentum_step():
    """v = m v + g, w -= lr v from w=1, g=2, lr=0.1, m=0.9: w1 = 0.8, v2 = 3.8, w2 = 0.42 (the second step is lean)."""
    w = torch.nn.Parameter(torch.ones(2))
    opt = LeanSGD([w], lr=0.1, momentum=0.9)
    for _ in range(2):
        w.grad = torch.full((2,), 2.0)
        opt.step()
    assert torch.allclose(w.detach(), torch.full((2,), 0.42))


def test_only_the_first_step_takes_torchs_path(monkeypatch):
    calls = []
    real = optim_module._TORCH_STEP
    monkeypatch.setattr(optim_module, "_TORCH_STEP", lambda opt, closure: calls.append(1) or real(opt, closure))
    _, _, lean, opt = _pair(lr=0.1, momentum=0.9)
    for step in range(4):
        _set_grads(lean, step)
        opt.step()
    assert calls == [1]  # the first step creates the momentum buffers; the rest go straight to the kernel


@pytest.mark.parametrize("case", ["missing_grad", "hook", "scaler", "closure"])
def test_uncovered_steps_fall_back_to_torch_and_give_its_result(case):
    ref, ref_opt, lean, lean_opt = _pair(lr=0.1, momentum=0.9)
    for step in range(3):
        _set_grads(ref, step)
        _set_grads(lean, step)
        if case == "missing_grad" and step == 2:
            ref[1].grad = lean[1].grad = None
        seen = []
        if case == "hook" and step == 2:
            lean_opt.register_step_post_hook(lambda opt, args, kwargs: seen.append(1))
        if case == "scaler" and step == 2:
            lean_opt.found_inf = torch.ones(())  # what GradScaler.step sets on a fused optimizer after an overflow
            ref_opt.found_inf = torch.ones(())
        if case == "closure" and step == 2:
            lean_opt.step(closure=lambda: None)
            ref_opt.step(closure=lambda: None)
        else:
            lean_opt.step()
            ref_opt.step()
        if case == "hook" and step == 2:
            assert seen == [1]
    for a, b in zip(ref, lean):
        assert torch.equal(a, b)


def test_state_dict_round_trip_continues_identically():
    ref, ref_opt, lean, lean_opt = _pair(lr=0.1, momentum=0.9)
    for step in range(2):
        _set_grads(ref, step)
        _set_grads(lean, step)
        ref_opt.step()
        lean_opt.step()
    reloaded = LeanSGD(lean, lr=0.5, momentum=0.1)
    reloaded.load_state_dict(lean_opt.state_dict())
    _set_grads(ref, 2)
    _set_grads(lean, 2)
    ref_opt.step()
    reloaded.step()
    for a, b in zip(ref, lean):
        assert torch.equal(a, b)


def test_zero_grad_drops_gradients_without_torchs_bookkeeping_and_keeps_set_to_none_false(monkeypatch):
    w = torch.nn.Parameter(torch.ones(3))
    opt = LeanSGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.full((3,), 2.0)
    calls = []
    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", lambda self, set_to_none=True: calls.append(set_to_none))
    opt.zero_grad()
    assert w.grad is None and calls == []
    w.grad = torch.full((3,), 2.0)
    opt.zero_grad(set_to_none=False)
    assert calls == [False]  # zeroing in place is torch's


# --------------------------------------------------------------------------- gradient masks fused into the step
def _masked_pair(**hyper):
    """torch's SGD with the gradients masked by hand, and LeanSGD handed the same masks; the second tensor of each
    pair is left unmasked (the same kernel call updates it with a mask of ones)."""
    ref, ref_opt, lean, lean_opt = _pair(**hyper)
    torch.manual_seed(1)
    mask = (torch.rand(7, 5) > 0.4).float()
    with torch.no_grad():
        for params in (ref, lean):
            params[0].mul_(mask)
    return ref, ref_opt, lean, lean_opt, mask


def _masked_steps(ref, ref_opt, lean, lean_opt, mask, steps=5, before_step=lambda step: None):
    """``steps`` steps of both; LeanSGD is handed the mask and, where it refuses it, the caller masks the gradient
    itself (as ``MaskSet.zero_grads`` does). Returns whether the last step accepted the mask."""
    masks = [mask]
    for step in range(steps):
        _set_grads(ref, step)
        _set_grads(lean, step)
        ref[0].grad.mul_(mask)
        accepted = lean_opt.mask_gradients_in_step(lean[:1], masks)
        if not accepted:
            mask_gradients(lean[:1], masks)
        before_step(step)
        ref_opt.step()
        lean_opt.step()
    return accepted


def _kernel_or_skip():
    kernel = kernels.masked_sgd_kernel()
    if kernel is None:
        reason = "REGSTORY_NO_KERNELS=1" if kernels.kernels_disabled() else "the kernel could not be built here"
        pytest.skip(f"{reason}: no masked SGD kernel, the two-pass path runs")
    return kernel


@torch.no_grad()
def _reference_kernel(params, grads, bufs, masks, lr, momentum, dampening, weight_decay, nesterov, store_grads):
    """masked_sgd.cpp's update in torch ops (up to rounding), so the optimizer's dispatch is tested without a
    compiler too."""
    for w, g, v, m in zip(params, grads, bufs, masks):
        d = g * m if m is not None else g.clone()
        if store_grads and m is not None:
            g.copy_(d)
        d.add_(w, alpha=weight_decay)
        v.mul_(momentum).add_(d, alpha=1 - dampening)
        w.add_(d.add(v, alpha=momentum) if nesterov else v, alpha=-lr)
    return True


def _fake_kernel(monkeypatch, kernel):
    monkeypatch.setattr(optim_module, "masked_sgd_kernel", lambda: kernel)


def _never_called(*args):
    pytest.fail("the masked kernel must not run on this path")


@pytest.mark.parametrize("hyper", [dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                                   dict(lr=0.1, momentum=0.5, dampening=0.3)])
def test_masks_handed_to_the_step_give_torchs_masked_update_and_pin_pruned_weights(hyper):
    """Either path (the kernel, or the caller's mask pass where it is off): torch's update on masked gradients."""
    ref, ref_opt, lean, lean_opt, mask = _masked_pair(**hyper)
    accepted = _masked_steps(ref, ref_opt, lean, lean_opt, mask)
    assert accepted is (kernels.masked_sgd_kernel() is not None)  # CPU fp32: taken exactly where a kernel exists
    for a, b in zip(lean, ref):  # up to the last bit: torch's kernel fuses some multiply-adds
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.all(lean[0][mask == 0] == 0)
    assert torch.all(lean_opt.state[lean[0]]["momentum_buffer"][mask == 0] == 0)


def test_masked_step_runs_the_kernel_once_per_step_after_the_first(monkeypatch):
    calls = []
    kernel = kernels.masked_sgd_kernel() or _reference_kernel
    _fake_kernel(monkeypatch, lambda *a: calls.append(len(a[0])) or kernel(*a))
    ref, ref_opt, lean, lean_opt, mask = _masked_pair(lr=0.1, momentum=0.9)
    assert _masked_steps(ref, ref_opt, lean, lean_opt, mask, steps=4)
    assert calls == [2, 2, 2]  # one call per group; step 0 is torch's (it creates the buffers), masked first
    for a, b in zip(lean, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["profiler", "hook", "kernel refuses", "no kernel"])
def test_every_other_path_masks_the_gradients_first(monkeypatch, case):
    ref, ref_opt, lean, lean_opt, mask = _masked_pair(lr=0.1, momentum=0.9)
    if case == "hook":
        lean_opt.register_step_post_hook(lambda opt, args, kwargs: None)
    if case in ("profiler", "hook"):  # accepted, but the step is torch's: the kernel is not reached
        _fake_kernel(monkeypatch, _never_called)
    if case == "kernel refuses":  # e.g. a gradient laid out unlike its parameter
        _fake_kernel(monkeypatch, lambda *a: False)
    context = torch.autograd.profiler.profile() if case == "profiler" else contextlib.nullcontext()
    if case == "no kernel":
        monkeypatch.setenv("REGSTORY_NO_KERNELS", "1")
    with context:
        accepted = _masked_steps(ref, ref_opt, lean, lean_opt, mask)
    assert accepted is (case != "no kernel")  # no kernel: the caller masks, as before
    for a, b in zip(ref, lean):
        assert torch.equal(a, b)  # masked first, then torch's own kernel: bit for bit
        assert torch.equal(a.grad, b.grad)


def test_zero_grad_drops_pending_masks(monkeypatch):
    _fake_kernel(monkeypatch, _never_called)
    _, _, lean, lean_opt, mask = _masked_pair(lr=0.1, momentum=0.9)
    _set_grads(lean, 0)
    assert lean_opt.mask_gradients_in_step(lean[:1], [mask])
    lean_opt.zero_grad()
    assert lean_opt._pending_masks is None
    lean_opt.step()  # torch's first step, with nothing pending: the kernel is not called


def _two_paths(hyper, steps=4, visible=True):
    """The same masked training on the kernel path (masks handed to the step) and on the fallback path (the
    caller masks the gradients, then a plain step); yields both parameter lists after each step."""
    torch.manual_seed(0)
    shapes = [(64, 33), (33,), (300, 70), (70,)]  # masked weights, unmasked biases
    masks = [(torch.rand(s) > 0.4).float() for s in shapes[::2]]
    start = [torch.randn(s) for s in shapes]
    for w, m in zip(start[::2], masks):
        w.mul_(m)
    kernel_params = [torch.nn.Parameter(t.clone()) for t in start]
    fallback_params = [torch.nn.Parameter(t.clone()) for t in start]
    kernel_opt, fallback_opt = LeanSGD(kernel_params, **hyper), LeanSGD(fallback_params, **hyper)
    kernel_opt.masked_grads_visible = visible
    for step in range(steps):
        _set_grads(kernel_params, step)
        _set_grads(fallback_params, step)
        assert kernel_opt.mask_gradients_in_step(kernel_params[::2], masks)
        mask_gradients(fallback_params[::2], masks)
        kernel_opt.step()
        fallback_opt.step()
        yield kernel_opt, kernel_params, fallback_params, masks


@pytest.mark.parametrize("hyper", [dict(lr=0.1, momentum=0.9),
                                   dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                                   dict(lr=0.1, momentum=0.5, dampening=0.3, weight_decay=5e-4)])
def test_gradients_after_the_step_are_the_same_on_the_kernel_and_the_fallback_path(hyper):
    """What an ``after_step`` hook reads: every .grad, masked or not, bit for bit the two-pass path's."""
    _kernel_or_skip()
    for kernel_opt, kernel_params, fallback_params, masks in _two_paths(hyper):
        for a, b in zip(kernel_params, fallback_params):
            assert torch.equal(a.grad, b.grad)
        for p, m in zip(kernel_params[::2], masks):
            assert torch.all(p.grad[m == 0] == 0)
        assert kernel_opt.takes_gradient_masks


def test_masked_grads_visible_false_leaves_the_gradients_unmasked():
    """The store is skipped on request: the gradients keep their pruned entries, the update is unchanged."""
    _kernel_or_skip()
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    visible = list(_two_paths(hyper))[-1]
    hidden = list(_two_paths(hyper, visible=False))[-1]
    unmasked = torch.randn(hidden[1][0].shape, generator=torch.Generator().manual_seed(3))  # step 3's gradient
    assert torch.equal(hidden[1][0].grad, unmasked)
    assert torch.equal(visible[1][0].grad, unmasked * visible[3][0])
    for a, b in zip(hidden[1], visible[1]):
        assert torch.equal(a, b)


def test_non_cpu_parameters_are_refused_without_building_anything(monkeypatch):
    monkeypatch.setattr(optim_module, "masked_sgd_kernel", lambda: pytest.fail("must not build for a meta tensor"))
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    assert LeanSGD([p], lr=0.1, momentum=0.9).mask_gradients_in_step([p], [torch.ones(3, device="meta")]) is False


# --------------------------------------------------------------------------- a torch without the private attributes
class _Without:
    """A module as a torch without some of its attributes would show it."""

    def __init__(self, module, *names):
        self._module, self._names = module, names

    def __getattr__(self, name):
        if name in self._names:
            raise AttributeError(name)
        return getattr(self._module, name)


def _fresh_optim_module():
    """A second, independent execution of regstory/optim.py (the imported one stays as it is)."""
    spec = importlib.util.spec_from_file_location("regstory_optim_fresh", optim_module.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _steps_with_post_hook(opt, params, steps=4):
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    for step in range(steps):
        _set_grads(params, step)
        opt.step()
    return calls


def test_without_profile_hook_step_lean_sgd_is_torchs_sgd(monkeypatch):
    """No ``Optimizer.profile_hook_step`` at import: LeanSGD keeps torch's SGD.step (hooks and all) and refuses
    gradient masks, so pruning masks in its own pass."""
    with monkeypatch.context() as patch:
        patch.delattr(torch.optim.Optimizer, "profile_hook_step")
        fresh = _fresh_optim_module()
    assert fresh._TORCH_STEP is None and "step" not in vars(fresh.LeanSGD)
    ref, ref_opt, lean, _ = _pair(lr=0.1, momentum=0.9, weight_decay=1e-3)
    lean_opt = fresh.LeanSGD(lean, lr=0.1, momentum=0.9, weight_decay=1e-3)
    assert _steps_with_post_hook(lean_opt, lean) == _steps_with_post_hook(ref_opt, ref) == [1] * 4
    for a, b in zip(ref, lean):
        assert torch.equal(a, b)
    assert lean_opt.mask_gradients_in_step(lean[:1], [torch.ones(7, 5)]) is False


@pytest.mark.parametrize("missing", ["torch._fused_sgd_", "torch_profiler._is_profiler_enabled",
                                     "torch_optimizer._global_optimizer_pre_hooks",
                                     "torch_optimizer._global_optimizer_post_hooks"])
def test_a_missing_private_attribute_sends_every_step_through_torchs_step(monkeypatch, missing):
    module_name, attribute = missing.split(".")
    monkeypatch.setattr(optim_module, module_name, _Without(getattr(optim_module, module_name), attribute))
    calls = []
    real = optim_module._TORCH_STEP
    monkeypatch.setattr(optim_module, "_TORCH_STEP", lambda opt, closure: calls.append(1) or real(opt, closure))
    ref, ref_opt, lean, lean_opt = _pair(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    assert _steps_with_post_hook(lean_opt, lean) == _steps_with_post_hook(ref_opt, ref) == [1] * 4
    assert calls == [1] * 4
    for a, b in zip(ref, lean):
        assert torch.equal(a, b)


def test_mask_gradients_without_foreach_mul(monkeypatch):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    masks = [(torch.rand(4, 3) > 0.5).float(), (torch.rand(3) > 0.5).float()]
    grads = [torch.randn(4, 3), torch.randn(3)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    monkeypatch.setattr(optim_module, "torch", _Without(torch, "_foreach_mul_"))
    mask_gradients(params, masks)
    for p, g, m in zip(params, grads, masks):
        assert torch.equal(p.grad, g * m)


def test_regstory_imports_and_steps_with_none_of_the_private_torch_attributes():
    """In a fresh interpreter with the attributes deleted from torch itself, regstory.loop imports and LeanSGD
    keeps torch's SGD.step. They are put back before training (torch's own step needs them); the steps and the
    mask pass without them at step time are the tests above."""
    code = """
import torch, torch.autograd.profiler as profiler, torch.optim.optimizer as optimizer
private = [(optimizer.Optimizer, "profile_hook_step"), (torch, "_fused_sgd_"), (torch, "_foreach_mul_"),
           (profiler, "_is_profiler_enabled"), (optimizer, "_global_optimizer_pre_hooks"),
           (optimizer, "_global_optimizer_post_hooks")]
saved = [vars(owner)[name] for owner, name in private]
for owner, name in private:
    delattr(owner, name)
import regstory.loop, regstory.optim as m
assert m._TORCH_STEP is None and "step" not in vars(m.LeanSGD)
for (owner, name), value in zip(private, saved):
    setattr(owner, name, value)
w = torch.nn.Parameter(torch.ones(3))
opt = m.LeanSGD([w], lr=0.1, momentum=0.9)
for _ in range(2):
    w.grad = torch.full((3,), 2.0)
    opt.step()
assert torch.allclose(w.detach(), torch.full((3,), 0.42)), w
m.mask_gradients([w], [torch.tensor([1.0, 0.0, 1.0])])
assert w.grad.tolist() == [2.0, 0.0, 2.0]
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_an_unfused_group_steps_as_torchs_sgd():
    """torch's path keeps SGD.step's own grad-mode wrapper: the unfused in-place update on a leaf parameter works."""
    ref, ref_opt, lean, _ = _pair(lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, fused=False)
    lean_opt = LeanSGD(lean, lr=0.1, momentum=0.9, fused=False)
    for step in range(3):
        _set_grads(ref, step)
        _set_grads(lean, step)
        ref_opt.step()
        lean_opt.step()
    for a, b in zip(ref, lean):
        assert torch.equal(a, b)
