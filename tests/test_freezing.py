"""NeuronFreezer (regstory.freezing): NEq's per-neuron freeze, bit-exact through SGD, Adam, AdamW and LeanSGD."""
import pytest
import torch
from torch import nn

from regstory.freezing import NeuronFreezer
from regstory.optim import LeanSGD, mask_gradients

OPTIMIZERS = {
    "sgd_nesterov_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd_foreach_dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5, dampening=0.2, weight_decay=1e-3,
                                                        foreach=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "lean_sgd": lambda ps: LeanSGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "lean_sgd_nesterov": lambda ps: LeanSGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    # pruning masks handed to the step: with REGSTORY_NO_KERNELS=1 the two-pass path (the masked CPU kernel is not
    # exercised here: its first build takes ~20 s; it is element-wise like the rest)
    "lean_sgd_masked": lambda ps: LeanSGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4),
}
CASES = [(name, kernels) for name in OPTIMIZERS
         for kernels in (["off"] if name.endswith("masked") else ["on", "off"] if name.startswith("lean") else ["on"])]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def _params(device="cpu"):
    """A Linear weight/bias, a channels-last conv filter bank, and a parameter that is never frozen."""
    g = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4, generator=g).to(device))
    b = nn.Parameter(torch.randn(6, generator=g).to(device))
    conv = nn.Parameter(torch.randn(5, 3, 3, 3, generator=g).to(device, memory_format=torch.channels_last))
    other = nn.Parameter(torch.randn(3, 2, generator=g).to(device))
    return [w, b, conv, other]


ROWS_W = torch.tensor([True, False, False, True, True, False])
ROWS_CONV = torch.tensor([False, True, False, False, True])


def _set_grads(params, step, grad_layout=torch.channels_last):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device, memory_format=grad_layout if p.dim() == 4
                                                       else torch.contiguous_format)


def _state(opt, p):
    return {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.shape == p.shape}


def _run(name, freeze_at, steps=6, use_freezer=True, device="cpu", grad_layout=torch.channels_last):
    params = _params(device)
    opt = OPTIMIZERS[name](params)
    fr = NeuronFreezer()
    snap = None
    g = torch.Generator().manual_seed(7)
    masks = [(torch.rand(p.shape, generator=g) > 0.3).float().to(
        device, memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format) for p in params]
    for step in range(steps):
        if use_freezer and step == freeze_at:
            w, b, conv, _ = params
            fr.freeze(w, ROWS_W, bias=b, key="fc.weight")
            fr.freeze(conv, ROWS_CONV, key="conv.weight")
            snap = ([p.detach().clone() for p in params], [_state(opt, p) for p in params])
        _set_grads(params, step, grad_layout)
        if name.endswith("masked") and not opt.mask_gradients_in_step(params, masks):
            mask_gradients(params, masks)  # what pruning does when the step takes no masks
        fr.before_step(opt)
        opt.step()
        fr.after_step(opt)
    return params, opt, snap, fr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("freeze_at", [0, 2])  # before the first step (no state yet) / after buffers exist
@pytest.mark.parametrize("name,kernels", CASES)
def test_frozen_rows_bit_identical_and_others_as_unfrozen(name, freeze_at, kernels, device, monkeypatch):
    if kernels == "off":
        monkeypatch.setenv("REGSTORY_NO_KERNELS", "1")
    else:
        monkeypatch.delenv("REGSTORY_NO_KERNELS", raising=False)
    # contiguous conv gradients on a channels-last filter bank: SGD's momentum buffer (a clone of the first
    # gradient) is then laid out unlike its parameter
    layout = torch.contiguous_format if name.startswith("sgd_nesterov") else torch.channels_last
    params, opt, (before, before_state), fr = _run(name, freeze_at, device=device, grad_layout=layout)
    ref, ref_opt, _, _ = _run(name, freeze_at, use_freezer=False, device=device, grad_layout=layout)
    assert fr.frozen_count() == 5
    if name.endswith("masked"):
        assert not opt.takes_gradient_masks  # the two-pass path: gradients masked, then torch's fused step
    w, b, conv, other = params
    frozen_rows = {0: ROWS_W, 1: ROWS_W, 2: ROWS_CONV, 3: torch.zeros(3, dtype=torch.bool)}
    for i, (p, r) in enumerate(zip(params, ref)):
        rows = frozen_rows[i].to(device)
        assert torch.equal(p[rows], before[i][rows]), i  # frozen rows: exactly as when frozen
        assert torch.equal(p[~rows], r[~rows]), i  # the rest: exactly the unfrozen run
        assert not torch.equal(p[~rows], before[i][~rows])  # (and they did train)
        state, ref_state = _state(opt, p), _state(ref_opt, r)
        assert set(state) == set(ref_state) and state
        for k, v in state.items():
            rows = rows.to(device)
            frozen_value = before_state[i][k][rows] if k in before_state[i] else torch.zeros_like(v[rows])
            assert torch.equal(v[rows], frozen_value), (i, k)  # momentum / moments: untouched (or never started)
            assert torch.equal(v[~rows], ref_state[k][~rows]), (i, k)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    if "step" in opt.state[w]:  # Adam's scalar step is the parameter's: left alone
        assert torch.equal(opt.state[w]["step"], ref_opt.state[ref[0]]["step"])


def test_raw_copies_keep_every_bit_and_replaced_state_tensors():
    """Frozen rows holding NaN payloads and -0.0 come back bit for bit; an optimizer that replaces its state tensor
    every step (no in-place update) is restored by logical index."""

    class ReplacingSGD(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, dict(lr=0.1))

        @torch.no_grad()
        def step(self):
            for p in self.param_groups[0]["params"]:
                state = self.state[p]
                buf = state.get("buf")
                state["buf"] = p.grad.clone() if buf is None else buf * 0.9 + p.grad  # a new tensor each step
                p.add_(state["buf"], alpha=-0.1)

    w, b, conv, other = params = _params()
    opt = ReplacingSGD(params)
    fr = NeuronFreezer()
    for step in range(5):
        _set_grads(params, step)
        if step == 2:  # the buffers exist (and are not zero)
            with torch.no_grad():  # a signalling NaN, a quiet NaN with a payload, -0.0
                w.view(torch.int32)[0, :3] = torch.tensor([0x7F800001, 0x7FC12345, -2147483648], dtype=torch.int32)
                conv[1].view(torch.int32)[0, 0, 0] = 0x7F800001
            fr.freeze(w, ROWS_W, bias=b)
            fr.freeze(conv, ROWS_CONV)
            before = [p.detach().clone() for p in params]
            bufs = [opt.state[p]["buf"].clone() for p in params]
        fr.before_step(opt)
        opt.step()
        fr.after_step(opt)
    for i, rows in ((0, ROWS_W), (1, ROWS_W), (2, ROWS_CONV)):
        assert torch.equal(params[i][rows].view(torch.int32), before[i][rows].view(torch.int32)), i
        assert torch.equal(opt.state[params[i]]["buf"][rows], bufs[i][rows]), i
        assert not torch.equal(opt.state[params[i]]["buf"][~rows], bufs[i][~rows]), i
    assert w.view(torch.int32)[0, 2] == -2147483648  # -0.0 kept its sign


def test_lean_sgd_first_step_through_torch_then_direct(monkeypatch):
    """LeanSGD's first step creates the buffers via torch's SGD.step, later ones call the fused kernel directly:
    frozen rows survive both paths."""
    import regstory.optim as optim_module

    calls = []
    real = optim_module._TORCH_STEP
    monkeypatch.setattr(optim_module, "_TORCH_STEP", lambda opt, closure: calls.append(1) or real(opt, closure))
    params, opt, (before, _), _ = _run("lean_sgd", freeze_at=0, steps=4)
    assert calls == [1]
    assert torch.equal(params[0][ROWS_W], before[0][ROWS_W])
    assert torch.equal(opt.state[params[0]]["momentum_buffer"][ROWS_W], torch.zeros(3, 4))


def test_training_mlp_with_half_the_rows_frozen():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(2):  # some training before the freeze: momentum buffers exist
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    fr = NeuronFreezer(net)
    rows = torch.arange(16) % 2 == 0
    for i in (0, 2):
        fr.freeze(net[i].weight, rows, bias=net[i].bias)
    assert fr.frozen_count() == 16
    assert set(fr.state_dict()) == {"0.weight", "2.weight"} and fr.state_dict()["0.weight"]["bias"] == "0.bias"
    frozen = {n: p.detach().clone() for n, p in net.named_parameters()}
    bufs = {n: opt.state[p]["momentum_buffer"].clone() for n, p in net.named_parameters()}
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        fr.before_step(opt)
        opt.step()
        fr.after_step(opt)
    for n, p in net.named_parameters():
        if n == "4.weight" or n == "4.bias":
            assert not torch.equal(p, frozen[n])
            continue
        assert torch.equal(p[rows], frozen[n][rows]), n
        assert torch.equal(opt.state[p]["momentum_buffer"][rows], bufs[n][rows]), n
        assert not torch.equal(p[~rows], frozen[n][~rows]), n


def test_zero_cost_when_nothing_frozen(monkeypatch):
    params = _params()
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    fr = NeuronFreezer()
    assert not fr and fr.frozen_count() == 0
    monkeypatch.setattr(torch, "index_select", lambda *a, **k: pytest.fail("copied with nothing frozen"))
    _set_grads(params, 0)
    fr.after_step(opt)  # no snapshot needed, no error
    fr.before_step(opt)
    opt.step()
    fr.after_step(opt)
    fr.freeze(params[0], torch.zeros(6, dtype=torch.bool))  # no row: nothing frozen
    fr.before_step(opt)
    assert not fr and fr._pending is None and not fr._slots


def test_freeze_replace_unfreeze_and_validation():
    w, b, conv, _ = _params()
    fr = NeuronFreezer()
    fr.freeze(w, ROWS_W, bias=b)
    assert fr.frozen_count() == 3
    fr.freeze(w, torch.tensor([True] + [False] * 5))  # set again: replaces (and drops the bias)
    assert fr.frozen_count() == 1 and len(fr._targets) == 1
    fr.freeze(conv, ROWS_CONV)
    fr.unfreeze(w)
    assert fr.frozen_count() == 2
    fr.clear()
    assert fr.frozen_count() == 0 and not fr
    with pytest.raises(ValueError):
        fr.freeze(w, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError):
        fr.freeze(w, torch.ones(6))
    with pytest.raises(ValueError):
        fr.freeze(w, ROWS_W, bias=torch.zeros(5))
    with pytest.raises(RuntimeError):
        fr.freeze(w, ROWS_W)
        fr.after_step(torch.optim.SGD([w], lr=0.1))  # after_step without before_step
    unnamed = NeuronFreezer()
    unnamed.freeze(w, ROWS_W)
    with pytest.raises(ValueError):
        unnamed.state_dict()  # no key to save it under


def test_zero_grads():
    w, b, _, _ = _params()
    fr = NeuronFreezer()
    fr.freeze(w, ROWS_W, bias=b)
    _set_grads([w, b], 0)
    g = w.grad.clone()
    fr.zero_grads()
    assert torch.equal(w.grad[ROWS_W], torch.zeros(3, 4)) and torch.equal(w.grad[~ROWS_W], g[~ROWS_W])
    assert torch.equal(b.grad[ROWS_W], torch.zeros(3))


def test_state_dict_round_trip_and_remap_after_shape_change():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    fr = NeuronFreezer(net)
    fr.freeze(net[0].weight, ROWS_W, bias=net[0].bias)
    sd = fr.state_dict()
    assert torch.equal(sd["0.weight"]["rows"], ROWS_W) and sd["0.weight"]["bias"] == "0.bias"

    fresh = NeuronFreezer(net)
    fresh.load_state_dict(sd)
    assert fresh.frozen_count() == 3 and fresh._targets[0][0] is net[0].weight and fresh._targets[1][0] is net[0].bias
    by_key = NeuronFreezer()  # without a model: the caller gives the names
    by_key.load_state_dict(sd, dict(net.named_parameters()))
    assert torch.equal(by_key.state_dict()["0.weight"]["rows"], ROWS_W)

    # channel removal: neurons 1 and 5 of layer 0 go; rows kept = [0, 2, 3, 4] -> frozen [T, F, T, T]
    keep = torch.tensor([0, 2, 3, 4])
    with torch.no_grad():
        new0 = nn.Linear(4, 4)
        new0.weight.copy_(net[0].weight[keep])
        new0.bias.copy_(net[0].bias[keep])
    net[0] = new0
    with pytest.raises(ValueError):
        NeuronFreezer(net).load_state_dict(sd)  # 6 rows do not fit 4
    fr.remap(keep={"0.weight": keep})
    assert torch.equal(fr.state_dict()["0.weight"]["rows"], torch.tensor([True, False, True, True]))
    assert fr._targets[0][0] is new0.weight and fr._targets[1][0] is new0.bias
    net[0] = nn.Identity()  # the layer is gone: its entry is dropped
    fr.remap()
    assert fr.frozen_count() == 0
