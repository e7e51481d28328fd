"""Backward-pass wall time with NEq's frozen neurons actually skipped, against plain training at the same state.

For each network and each fraction of frozen neurons (drawn at random in every hidden layer; the head always trains,
NEq's default), the same weights, batch and loss are run through a plain backward and through the backward of
``regstory.pruning.neq`` with ``skip_frozen_grads`` (the weight gradients of the trainable rows only; the full input
gradients). Prints, side by side, the median backward time of each, their ratio (NEq / plain), the ratio of the
back-propagation FLOPs NEq counts (the ideal), and the ratio of a whole step (forward + backward). ``--first-frozen``
adds a case where the first layer is entirely frozen (its input gradient is then skipped too).

    OMP_NUM_THREADS=1 python scripts/bench_neq.py                     # CPU, one thread
    python scripts/bench_neq.py --device cuda --reps 200              # a GPU

The reps of the two variants alternate, so a machine shared with other processes disturbs both alike; the median
over reps is reported.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from regstory.pruning.neq import backprop_costs, install_skip, probe_layers, remove_skip


def networks(device: torch.device):
    """(name, model, batch): an MLP (MNIST-shaped, wide), the MNIST-1D MLP of docs/performance.md, a small CNN."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                        nn.Linear(1024, 10))
    mlp_small = nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    cnn = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(128 * 8 * 8, 10))
    return [("mlp 784-1024-1024-10, batch 256", mlp.to(device), torch.randn(256, 1, 28, 28, device=device)),
            ("mlp 40-512-512-10, batch 128", mlp_small.to(device), torch.randn(128, 40, device=device)),
            ("cnn 32-64-128 conv + fc, 3x32x32, batch 64", cnn.to(device), torch.randn(64, 3, 32, 32, device=device))]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(model: nn.Module, x: torch.Tensor, frozen: float, first_frozen: bool, reps: int,
          device: torch.device) -> dict[str, float]:
    layers, others = probe_layers(model, x[:2])
    gen = torch.Generator().manual_seed(1)
    trainable = {}
    for layer in layers:
        if layer.managed:
            rows = torch.ones(layer.neurons, dtype=torch.bool)
            rows[torch.randperm(layer.neurons, generator=gen)[: round(frozen * layer.neurons)]] = False
            trainable[layer.name] = rows
    if first_frozen:
        trainable[layers[0].name][:] = False
    y = torch.randint(0, 10, (x.shape[0],), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step(skip: bool) -> tuple[float, float]:
        if skip:
            for layer in layers:
                if layer.managed:
                    install_skip(layer.module, trainable[layer.name])
        model.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        for layer in layers:
            remove_skip(layer.module)
        return t2 - t1, t2 - t0

    for _ in range(max(3, reps // 10)):
        step(False)
        step(True)
    plain, neq, plain_step, neq_step = [], [], [], []
    for _ in range(reps):
        b, s = step(False)
        plain.append(b)
        plain_step.append(s)
        b, s = step(True)
        neq.append(b)
        neq_step.append(s)
    costs = backprop_costs(layers, trainable, others)
    med = statistics.median
    return {"plain_ms": med(plain) * 1e3, "neq_ms": med(neq) * 1e3, "ratio": med(neq) / med(plain),
            "flops_ratio": costs.flops_frac, "step_ratio": med(neq_step) / med(plain_step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--first-frozen", action="store_true", help="also: first layer fully frozen, rest 50%%")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"NEq backward with frozen rows skipped vs plain backward ({where}, torch {torch.__version__}, "
          f"median of {args.reps} reps)")
    header = (f"{'network':44s} {'frozen':>7s} {'plain ms':>9s} {'NEq ms':>8s} {'NEq/plain':>9s} {'FLOPs':>6s} "
              f"{'step':>6s}")
    print(header)
    print("-" * len(header))
    cases = [(f, False) for f in args.fractions] + ([(0.5, True)] if args.first_frozen else [])
    for name, model, x in networks(device):
        for frozen, first in cases:
            r = bench(model, x, frozen, first, args.reps, device)
            label = f"{frozen:.0%}" + ("+L1" if first else "")
            print(f"{name:44s} {label:>7s} {r['plain_ms']:9.3f} {r['neq_ms']:8.3f} {r['ratio']:9.2f} "
                  f"{r['flops_ratio']:6.2f} {r['step_ratio']:6.2f}", flush=True)
    print("NEq/plain: backward time ratio; FLOPs: NEq's counted back-propagation FLOPs / a full backward's (the "
          "ideal ratio); step: forward + backward time ratio. +L1: first layer fully frozen, 50% elsewhere.")


if __name__ == "__main__":
    main()
