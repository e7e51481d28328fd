"""LeanSGD: torch's fused SGD update called directly (regstory.optim); the same numbers as torch.optim.SGD."""
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
