"""Cost of NeuronFreezer (NEq freezing) around an optimizer step, CPU, one thread.

MLP 40-512-512-10 (MNIST-1D), half the rows of each hidden layer frozen (weight and bias). Prints, per optimizer,
the best-of-7 time of ``before_step + after_step``, of ``optimizer.step()`` alone, and of a whole training step
(forward, backward, step at batch 128), and the freezer's cost as a ratio of each.

    OMP_NUM_THREADS=1 python scripts/bench_freezing.py [--reps 2000]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from regstory.freezing import NeuronFreezer
from regstory.optim import LeanSGD


def _best_us(fn, reps: int, rounds: int = 7) -> float:
    for _ in range(reps // 10):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - start) / reps * 1e6)
    return min(times)  # the least disturbed round (the machine is shared)


def bench(name: str, make_opt, reps: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = make_opt(net.parameters())
    x, y = torch.randn(128, 40), torch.randint(0, 10, (128,))
    loss_fn = nn.CrossEntropyLoss()

    def backward():
        opt.zero_grad()
        loss_fn(net(x), y).backward()

    backward()
    opt.step()  # buffers exist
    fr = NeuronFreezer(net)
    g = torch.Generator().manual_seed(1)
    for i in (0, 2):
        rows = torch.zeros(512, dtype=torch.bool)
        rows[torch.randperm(512, generator=g)[:256]] = True
        fr.freeze(net[i].weight, rows, bias=net[i].bias)

    def freezer_only():
        fr.before_step(opt)
        fr.after_step(opt)

    backward()
    t_freeze = _best_us(freezer_only, reps)
    t_step = _best_us(opt.step, reps)

    def train_step():
        backward()
        opt.step()

    t_train = _best_us(train_step, max(reps // 10, 50))
    print(f"{name:>26}: before+after {t_freeze:7.1f} us | step {t_step:7.1f} us (ratio {t_freeze / t_step:.2f}) | "
          f"fwd+bwd+step {t_train:8.1f} us (ratio {t_freeze / t_train:.3f}) | frozen {fr.frozen_count()} neurons")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    bench("SGD m0.9 wd5e-4 (foreach)", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
          args.reps)
    bench("LeanSGD m0.9 wd5e-4", lambda p: LeanSGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4), args.reps)
    bench("Adam", lambda p: torch.optim.Adam(p, lr=1e-3), args.reps)


if __name__ == "__main__":
    main()
