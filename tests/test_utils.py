"""Shared helpers (regstory.utils)."""
import torch

from regstory.utils import in_fp32


def test_in_fp32_turns_autocast_off_and_casts_inputs_up_differentiably():
    @in_fp32
    def product(a, b):
        return a @ b

    a = torch.randn(3, 4, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = a.float() @ b
        fp32 = product(a, b)
    assert plain.dtype == torch.bfloat16  # what autocast does to a matmul
    assert fp32.dtype == torch.float32
    assert torch.equal(fp32, a.detach().float() @ b)
    fp32.sum().backward()
    assert a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad.float()).all()
