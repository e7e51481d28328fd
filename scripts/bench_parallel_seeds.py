#!/usr/bin/env python
"""Does training k seeds of a small MLP at once pay? (issue 8, the optional ``trainer.parallel_seeds=k``)

In ONE process, for k = 1, 2, 4, ...: (a) **sequential**: k independent MLPs (default 40-512-512-10, the MNIST-1D
net), each trained for one epoch the way regstory's loop trains it (data on the device, fused SGD with momentum,
no per-step host sync), through the same code as (b) with a stack of one; (b) **stacked**: the same k models held
as ``[k, out, in]`` weights and trained together, one ``baddbmm`` per layer, the loss the sum of the k per-seed mean
cross-entropies (so each seed's gradient is its own). Both see the same batches and start from the same weights, and the script first checks that after a few steps
the stacked weights equal the sequential ones. It prints model-epochs/s for each and their ratio.

    python scripts/bench_parallel_seeds.py                      # CPU, 1 thread
    python scripts/bench_parallel_seeds.py --device cuda --ks 1 4 16 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor


def init_stack(k: int, dims: list[int], gen: torch.Generator, device: str) -> list[Tensor]:
    """k MLPs' weights and biases stacked on a leading seed dim, PyTorch's default Linear init per seed."""
    params = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        bound = fan_in ** -0.5
        params.append((torch.rand(k, fan_out, fan_in, generator=gen) * 2 - 1) * bound)
        params.append((torch.rand(k, fan_out, generator=gen) * 2 - 1) * bound)
    return [p.to(device).requires_grad_() for p in params]


def stacked_logits(params: list[Tensor], x: Tensor) -> Tensor:
    """Forward of k MLPs at once: ``x`` is ``[B, in]`` (shared batch); returns ``[k, B, classes]``."""
    h = x.expand(params[0].shape[0], *x.shape)
    for i in range(0, len(params), 2):
        h = torch.baddbmm(params[i + 1].unsqueeze(1), h, params[i].transpose(1, 2))
        if i + 2 < len(params):
            h = torch.relu(h)
    return h


def stacked_loss(params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Sum over seeds of each seed's mean cross-entropy: d(loss)/d(seed i's weights) is seed i's own gradient."""
    logits = stacked_logits(params, x)
    k = logits.shape[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(k), reduction="sum") / y.shape[0]


def make_sgd(params: list[Tensor], lr: float, device: str) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, **({"fused": True} if device == "cuda" else {"foreach": True}))


def train_epoch(models: list[tuple[list[Tensor], torch.optim.Optimizer]], x: Tensor, y: Tensor, perm: Tensor,
                batch: int, steps: int | None = None) -> None:
    """One epoch (or ``steps`` steps) over ``x[perm]`` for each (params, optimizer) pair in turn."""
    for params, opt in models:
        for s, start in enumerate(range(0, len(perm), batch)):
            if steps is not None and s >= steps:
                break
            idx = perm[start:start + batch]
            opt.zero_grad(set_to_none=True)
            stacked_loss(params, x[idx], y[idx]).backward()
            opt.step()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_equivalence(dims: list[int], x: Tensor, y: Tensor, perm: Tensor, args) -> tuple[float, float]:
    """Max |stacked - sequential| over all weights after 20 steps of k=3 seeds, and how far the weights moved."""
    k = 3
    stacked = init_stack(k, dims, torch.Generator().manual_seed(0), args.device)
    start = [p.detach().clone() for p in stacked]
    singles = [[p[i:i + 1].detach().clone().requires_grad_() for p in stacked] for i in range(k)]
    train_epoch([(stacked, make_sgd(stacked, args.lr, args.device))], x, y, perm, args.batch_size, steps=20)
    train_epoch([(p, make_sgd(p, args.lr, args.device)) for p in singles], x, y, perm, args.batch_size, steps=20)
    diff = max((s[i] - p[0]).abs().max().item() for i, single in enumerate(singles) for s, p in zip(stacked, single))
    return diff, max((s - s0).abs().max().item() for s, s0 in zip(stacked, start))


def main(argv: list[str] | None = None) -> dict[int, float]:
    """Prints the table; returns {k: stacked speedup over sequential}."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--input-dim", type=int, default=40)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dims = [args.input_dim, *[args.width] * args.depth, args.classes]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.num_train, args.input_dim, generator=gen).to(args.device)
    y = torch.randint(args.classes, (args.num_train,), generator=gen).to(args.device)
    perm = torch.randperm(args.num_train, generator=gen).to(args.device)
    print(f"# bench_parallel_seeds: mlp {'-'.join(map(str, dims))} n_train={args.num_train} batch={args.batch_size} "
          f"device={args.device} threads={torch.get_num_threads()} repeats={args.repeats} torch={torch.__version__}")
    diff, moved = check_equivalence(dims, x, y, perm, args)
    print(f"stacked == sequential after 20 steps (k=3): max |diff| = {diff:.2e} (weights moved by up to {moved:.2e})")
    if diff > 1e-4:
        raise SystemExit(f"stacked training differs from sequential training by {diff:.2e}: the bench is broken")
    ratios = {}
    print(f"{'k':>4} {'sequential ms':>14} {'stacked ms':>11} {'seq model-epochs/s':>19} {'stacked model-epochs/s':>23} "
          f"{'ratio':>6}")
    for k in args.ks:
        stacked = init_stack(k, dims, torch.Generator().manual_seed(1), args.device)
        singles = [[q[i:i + 1].detach().clone().requires_grad_() for q in stacked] for i in range(k)]
        variants = {"sequential": [(q, make_sgd(q, args.lr, args.device)) for q in singles],
                    "stacked": [(stacked, make_sgd(stacked, args.lr, args.device))]}
        times = {name: [] for name in variants}
        for name, models in variants.items():  # warm-up epoch each
            train_epoch(models, x, y, perm, args.batch_size)
        sync(args.device)
        for r in range(args.repeats):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                t = time.perf_counter()
                train_epoch(variants[name], x, y, perm, args.batch_size)
                sync(args.device)
                times[name].append(time.perf_counter() - t)
        seq, stk = statistics.median(times["sequential"]), statistics.median(times["stacked"])
        print(f"{k:>4} {seq * 1e3:>14.1f} {stk * 1e3:>11.1f} {k / seq:>19.1f} {k / stk:>23.1f} {seq / stk:>5.2f}x")
        ratios[k] = seq / stk
    return ratios


if __name__ == "__main__":
    main()
