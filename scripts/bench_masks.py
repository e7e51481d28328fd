"""Cost of parameter pinning (masks) per training step, as a ratio of step time.

Runs the same training step (default: MLP 40-512-512-10, batch 128, regstory's SGD with momentum 0.9, the MNIST-1D
SDD protocol) with and without the pruning plugin's per-step hooks, interleaved in one process so that machine load
affects all alike: zero pruned gradients after backward in a separate pass (``grads_only``, what runs where the
masked kernel is not available), the same plus re-masking the weights after the step (``masked``,
``remask_after_step=true``), the masks handed to ``LeanSGD``'s step (``fused``, regstory's default on CPU: the kernel
also writes the masked gradients back), and the same without that write-back (``fused_nostore``,
``LeanSGD.masked_grads_visible = False``). Prints min and median step times and the ratios (target: overhead <= 5%).

    OMP_NUM_THREADS=1 python scripts/bench_masks.py [--steps 300] [--repeats 7] [--sparsity 0.8] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from regstory.models.mlp import mlp
from regstory.optim import LeanSGD
from regstory.pruning.masks import MaskSet, prunable_parameters, prune_to_sparsity


def make_step(model, optimizer, x, y, masks: MaskSet | None, remask: bool = True, fuse: bool = False):
    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if masks is not None:
            masks.zero_grads(optimizer if fuse else None)
        optimizer.step()
        if masks is not None and remask:
            masks.apply_to_weights()
    return step


def time_steps(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 40), torch.randint(0, 10, (args.batch,))
    runs = {}
    for name in ("plain", "masked", "grads_only", "fused", "fused_nostore"):
        model = mlp([40], 10)
        opt = LeanSGD(model.parameters(), lr=0.05, momentum=0.9)
        opt.masked_grads_visible = name != "fused_nostore"
        masks = None
        if name != "plain":
            masks = MaskSet(prunable_parameters(model))
            prune_to_sparsity(masks, [p.detach().abs() for p in masks.params], args.sparsity)
        runs[name] = make_step(model, opt, x, y, masks, remask=name == "masked", fuse=name.startswith("fused"))
    for step in runs.values():  # warm-up
        time_steps(step, 50)
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, step in runs.items():
            times[name].append(time_steps(step, args.steps))
    for stat in (min, statistics.median):
        plain, masked, grads, fused, nostore = (stat(times[k]) for k in
                                                ("plain", "masked", "grads_only", "fused", "fused_nostore"))
        print(f"{stat.__name__:>6} of {args.repeats} x {args.steps} steps: plain {plain * 1e3:.3f} ms, masked "
              f"{masked * 1e3:.3f} ms (sparsity {args.sparsity:.2f}); ratio masked/plain = {masked / plain:.3f} "
              f"({(masked / plain - 1) * 100:+.1f}%); grads zeroed only (remask_after_step=false): "
              f"{grads / plain:.3f}; masks in the SGD step (default on CPU): {fused / plain:.3f}; the same without "
              f"writing the masked gradients back (masked_grads_visible=False): {nostore / plain:.3f}")
    mask_only = MaskSet(prunable_parameters(mlp([40], 10)))
    prune_to_sparsity(mask_only, [p.detach().abs() for p in mask_only.params], args.sparsity)
    for p in mask_only.params:
        p.grad = torch.randn_like(p)
    hooks = lambda: (mask_only.zero_grads(), mask_only.apply_to_weights())  # noqa: E731
    time_steps(hooks, 50)
    alone = min(time_steps(hooks, args.steps) for _ in range(args.repeats))
    print(f"the two mask hooks alone: {alone * 1e3:.4f} ms per step = {alone / min(times['plain']) * 100:.1f}% "
          f"of the fastest plain step")


if __name__ == "__main__":
    main()
