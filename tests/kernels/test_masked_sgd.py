"""regstory.kernels: the masked SGD step (mask pass fused into SGD with momentum), against hand-computed values and
against the two-pass path it replaces (mask the gradients, then torch's fused SGD)."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

from regstory import kernels


@pytest.fixture(scope="module")
def masked_sgd_():
    if kernels.kernels_disabled():
        pytest.skip("REGSTORY_NO_KERNELS=1: the masked kernel is off (regstory takes the two-pass path)")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: regstory falls back to the two-pass path")
    kernel = kernels.masked_sgd_kernel()
    assert kernel is not None, "a C++ compiler is here, so the kernel must build"
    return kernel


@pytest.mark.parametrize("store", [True, False])
def test_hand_computed_momentum_step(masked_sgd_, store):
    """w=(1,2,3), g=0.5, v=1, m=(1,0,1), lr=0.1, mu=0.9: kept v = 0.9 + 0.5 = 1.4, w = 1 - 0.14 = 0.86;
    pruned entry: its gradient is masked, v = 0.9, w = 2 - 0.09 = 1.91. With ``store`` the gradient becomes g*m."""
    w, g, v, m = torch.tensor([1.0, 2.0, 3.0]), torch.full((3,), 0.5), torch.ones(3), torch.tensor([1.0, 0.0, 1.0])
    assert masked_sgd_([w], [g], [v], [m], 0.1, 0.9, 0.0, 0.0, False, store)
    torch.testing.assert_close(v, torch.tensor([1.4, 0.9, 1.4]))
    torch.testing.assert_close(w, torch.tensor([0.86, 1.91, 2.86]))
    assert torch.equal(g, torch.tensor([0.5, 0.0, 0.5]) if store else torch.full((3,), 0.5))


def test_hand_computed_weight_decay_dampening_nesterov(masked_sgd_):
    """w=2, g=1, v=1, m=1, wd=0.5, dampening=0.5, mu=0.9, lr=0.1, Nesterov:
    d = 1 + 0.5*2 = 2; v = 0.9 + 0.5*2 = 1.9; d = 2 + 0.9*1.9 = 3.71; w = 2 - 0.371 = 1.629."""
    w, g, v, m = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1.0])
    assert masked_sgd_([w], [g], [v], [m], 0.1, 0.9, 0.5, 0.5, True, True)
    torch.testing.assert_close(v, torch.tensor([1.9]))
    torch.testing.assert_close(w, torch.tensor([1.629]))


@pytest.mark.parametrize("hyper", [dict(weight_decay=0.0, dampening=0.0, nesterov=False),
                                   dict(weight_decay=5e-4, dampening=0.0, nesterov=True),
                                   dict(weight_decay=1e-3, dampening=0.2, nesterov=False)])
@pytest.mark.parametrize("threads", [1, 2])
def test_equals_mask_pass_then_torch_fused_sgd_up_to_rounding(masked_sgd_, hyper, threads):
    """Same update as the two-pass path; torch's kernel fuses some multiply-adds (only in its vector body), so
    entries may differ in the last bit. Pruned weights stay exactly zero on both paths, and the gradients end
    exactly as the mask pass leaves them. Covers a large tensor (split over torch's threads when there are 2), a
    channels-last conv weight, and an unmasked bias (mask None)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_against_two_pass(masked_sgd_, hyper)
    finally:
        torch.set_num_threads(previous)


def _check_against_two_pass(masked_sgd_, hyper):
    torch.manual_seed(0)
    shapes = [(64, 9), (300, 700), (64, 32, 5, 5), (5,)]
    like = lambda t: t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t  # noqa: E731
    masks = [like((torch.rand(s) > 0.3).float()) for s in shapes[:-1]] + [None]
    ones = [m if m is not None else torch.ones(shapes[-1]) for m in masks]
    w_ref = [like(torch.randn(s)) * m for s, m in zip(shapes, ones)]
    v_ref = [like(torch.randn(s)) * m for s, m in zip(shapes, ones)]
    w, v = [t.clone() for t in w_ref], [t.clone() for t in v_ref]
    assert w[2].is_contiguous(memory_format=torch.channels_last) and not w[2].is_contiguous()
    for step in range(4):
        grads = [like(torch.randn(s)) for s in shapes]
        masked = [g * m for g, m in zip(grads, ones)]
        assert masked_sgd_(w, grads, v, masks, 0.05, 0.9, hyper["dampening"], hyper["weight_decay"], hyper["nesterov"],
                           True)
        torch._fused_sgd_(w_ref, masked, v_ref, momentum=0.9, lr=0.05, maximize=False, is_first_step=False, **hyper)
        for g, g_ref in zip(grads, masked):
            assert torch.equal(g, g_ref) and g.stride() == g_ref.stride()
    for a, b, c, d in zip(w, w_ref, v, v_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(c, d, rtol=1e-6, atol=1e-6)
    for weights, m in zip(w, ones):
        assert torch.all(weights[m == 0] == 0)  # pinned: pruned weights never move


@pytest.mark.parametrize("odd", ["float64 mask", "transposed grad", "other shape"])
def test_refuses_what_it_cannot_run_and_changes_nothing(masked_sgd_, odd):
    w, g, v, m = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6), torch.ones(4, 6)
    if odd == "float64 mask":
        m = m.double()
    elif odd == "transposed grad":
        g = torch.randn(6, 4).t()
    else:
        v = torch.randn(24)
    before = (w.clone(), v.clone(), g.clone())
    assert masked_sgd_([w], [g], [v], [m], 0.1, 0.9, 0.0, 0.0, False, True) is False
    assert torch.equal(w, before[0]) and torch.equal(v, before[1]) and torch.equal(g, before[2])


def test_regstory_no_kernels_turns_it_off(monkeypatch):
    monkeypatch.setenv("REGSTORY_NO_KERNELS", "1")
    assert kernels.masked_sgd_kernel() is None


def test_a_failed_build_warns_once_and_gives_none(monkeypatch):
    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.delenv("REGSTORY_NO_KERNELS", raising=False)  # the build is attempted (and fails) either way
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    with pytest.warns(RuntimeWarning, match="could not be built .*Ninja is required.*REGSTORY_NO_KERNELS"):
        assert kernels.masked_sgd_kernel() is None
    assert kernels.masked_sgd_kernel() is None  # not retried, no second warning


def test_each_torch_version_gets_its_own_build(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    name = kernels.extension_name("regstory_masked_sgd")
    assert name.startswith("regstory_masked_sgd_torch2_14_1_cu130_") and name.isidentifier()
    monkeypatch.setattr(torch, "__version__", "2.14.2")
    assert kernels.extension_name("regstory_masked_sgd").startswith("regstory_masked_sgd_torch2_14_2_")


@pytest.mark.parametrize("change", ["sys.prefix", "sys.executable", "cflags", "source", "checkout"])
def test_each_environment_flag_set_and_source_gets_its_own_build(monkeypatch, tmp_path, change):
    """Two venvs (or checkouts) with one torch share torch's extension cache: the name (torch's cache key) must
    differ, or each would rebuild, or load, the other's module."""
    source = tmp_path / "masked_sgd.cpp"
    source.write_bytes(Path(kernels.__file__).with_name("masked_sgd.cpp").read_bytes())
    before = kernels.extension_name("regstory_masked_sgd", sources=(source,))
    assert kernels.extension_name("regstory_masked_sgd", sources=(source,)) == before  # stable: reused next run
    cflags = kernels._CFLAGS
    if change == "sys.prefix":
        monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    elif change == "sys.executable":
        monkeypatch.setattr(sys, "executable", str(tmp_path / "other-venv" / "bin" / "python"))
    elif change == "cflags":
        cflags = ("-O2",)
    elif change == "source":
        source.write_bytes(source.read_bytes() + b"// edited\n")
    else:  # the same file in a second checkout: torch's build files name the source path
        (tmp_path / "checkout2").mkdir()
        source = (tmp_path / "checkout2" / "masked_sgd.cpp")
        source.write_bytes((tmp_path / "masked_sgd.cpp").read_bytes())
    after = kernels.extension_name("regstory_masked_sgd", sources=(source,), cflags=cflags)
    assert after != before and after.isidentifier()


def test_the_build_is_loaded_under_the_environments_name(monkeypatch, tmp_path):
    """What ``load`` is given (no real build): the keyed name, the flags that went into the key."""
    seen = []

    class Module:
        masked_sgd_ = staticmethod(lambda *a: True)

    monkeypatch.delenv("REGSTORY_NO_KERNELS", raising=False)
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kwargs: seen.append(kwargs) or Module)
    names = []
    for prefix in (sys.prefix, str(tmp_path / "other-venv")):
        monkeypatch.setattr(sys, "prefix", prefix)
        monkeypatch.setattr(kernels, "_built", {})
        assert kernels.masked_sgd_kernel() is Module.masked_sgd_
        names.append(kernels.extension_name("regstory_masked_sgd"))
    assert [k["name"] for k in seen] == names and names[0] != names[1]
    assert all(tuple(k["extra_cflags"]) == kernels._CFLAGS for k in seen)
