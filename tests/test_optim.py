"""LeanSGD: torch's fused SGD update called directly (regstory.optim); the same numbers as torch.optim.SGD."""
import contextlib

import pytest
import torch

from regstory.optim import LeanSGD


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
    import regstory.optim as optim_module

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
    masks = [mask]
    for step in range(steps):
        _set_grads(ref, step)
        _set_grads(lean, step)
        ref[0].grad.mul_(mask)
        accepted = lean_opt.mask_gradients_in_step(lean[:1], masks)
        before_step(step)
        ref_opt.step()
        lean_opt.step()
    return accepted


@pytest.mark.parametrize("hyper", [dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                                   dict(lr=0.1, momentum=0.5, dampening=0.3)])
def test_masks_handed_to_the_step_give_torchs_masked_update_and_pin_pruned_weights(hyper):
    ref, ref_opt, lean, lean_opt, mask = _masked_pair(**hyper)
    assert _masked_steps(ref, ref_opt, lean, lean_opt, mask)  # CPU fp32 with a compiler: the kernel runs
    for a, b in zip(lean, ref):  # up to the last bit: torch's kernel fuses some multiply-adds
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.all(lean[0][mask == 0] == 0)
    assert torch.all(lean_opt.state[lean[0]]["momentum_buffer"][mask == 0] == 0)


def test_masked_step_runs_the_kernel_once_per_step_after_the_first(monkeypatch):
    import regstory.optim as optim_module

    calls = []
    real = optim_module.masked_sgd_kernel()
    monkeypatch.setattr(optim_module, "masked_sgd_kernel", lambda: lambda *a: calls.append(len(a[0])) or real(*a))
    _masked_steps(*_masked_pair(lr=0.1, momentum=0.9), steps=4)
    assert calls == [2, 2, 2]  # one call per group; step 0 is torch's (it creates the buffers), masked first


@pytest.mark.parametrize("case", ["profiler", "hook", "kernel refuses", "no kernel"])
def test_every_other_path_masks_the_gradients_first(monkeypatch, case):
    import regstory.optim as optim_module

    ref, ref_opt, lean, lean_opt, mask = _masked_pair(lr=0.1, momentum=0.9)
    if case == "hook":
        lean_opt.register_step_post_hook(lambda opt, args, kwargs: None)
    if case == "kernel refuses":  # e.g. a gradient laid out unlike its parameter
        monkeypatch.setattr(optim_module, "masked_sgd_kernel", lambda: lambda *a: False)
    context = torch.autograd.profiler.profile() if case == "profiler" else contextlib.nullcontext()
    if case == "no kernel":
        monkeypatch.setenv("REGSTORY_NO_KERNELS", "1")
    with context:
        accepted = _masked_steps(ref, ref_opt, lean, lean_opt, mask)
    assert accepted is (case != "no kernel")  # no kernel: the caller masks, as before
    if case == "no kernel":
        return
    for a, b in zip(ref, lean):
        assert torch.equal(a, b)  # masked first, then torch's own kernel: bit for bit


def test_zero_grad_drops_pending_masks():
    _, _, lean, lean_opt, mask = _masked_pair(lr=0.1, momentum=0.9)
    _set_grads(lean, 0)
    assert lean_opt.mask_gradients_in_step(lean[:1], [mask])
    lean_opt.zero_grad()
    assert lean_opt._pending_masks is None


def test_non_cpu_parameters_are_refused_without_building_anything(monkeypatch):
    import regstory.optim as optim_module

    monkeypatch.setattr(optim_module, "masked_sgd_kernel", lambda: pytest.fail("must not build for a meta tensor"))
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    assert LeanSGD([p], lr=0.1, momentum=0.9).mask_gradients_in_step([p], [torch.ones(3, device="meta")]) is False
