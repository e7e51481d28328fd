"""MiMi runs (method=mimi) as the thesis shows them (Fig. 2.10): test accuracy against trainable parameters, round by
round, and the number of hidden units left in each adapter.

Runs are grouped by the config keys that differ between them (``dataset.transform``, ``method.allocation``...), the
seed excepted, and each group is averaged over its runs (seeds); error bars are the standard deviation. Left panel:
accuracy vs trainable parameters (adapters + head, log scale), one line per group; right panels: per-adapter sizes
(mean over seeds) after round ``--round`` (default: the last), one panel per group. A text table of the same numbers
goes to the standard output.

    python scripts/plot_mimi.py RUN_DIR [RUN_DIR ...] [--out mimi.png] [--round R]
    python scripts/plot_mimi.py outputs/multirun/<date>/<time>/*      # every job of a sweep
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from omegaconf import OmegaConf

from regstory.config import flat_config
from regstory.tracking import ROUNDS_FILE, read_jsonl

#: config keys that never tell groups apart (the seed is what a group averages over)
IGNORED = ("seed", "dataset.colour_seed", "data.root", "data.download", "logger.", "trainer.num_threads",
           "trainer.device", "resume")
UNITS = "adapter_units/"


def load(run_dirs: list[Path]) -> list[dict]:
    runs = []
    for run_dir in run_dirs:
        rounds = read_jsonl(run_dir / ROUNDS_FILE)
        if not (run_dir / "config.yaml").exists() or not rounds or UNITS.rstrip("/") not in rounds[0]:
            print(f"plot_mimi: skipping {run_dir} (not a MiMi run with rounds)", file=sys.stderr)
            continue
        runs.append({"dir": run_dir, "config": flat_config(OmegaConf.load(run_dir / "config.yaml")), "rounds": rounds})
    return runs


def group(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs by the values of the config keys that differ between them (seed and run settings left out)."""
    keys = sorted({k for r in runs for k in r["config"]})
    varying = [k for k in keys if not k.startswith(IGNORED) and len({repr(r["config"].get(k)) for r in runs}) > 1]
    groups: dict[str, list[dict]] = {}
    for r in runs:
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={r['config'].get(k)}" for k in varying) or "runs"
        groups.setdefault(label, []).append(r)
    return dict(sorted(groups.items()))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def curve(runs: list[dict]) -> list[tuple[float, float, float]]:
    """Per round (as far as every run got): mean trainable parameters, mean and std of the test accuracy."""
    n = min(len(r["rounds"]) for r in runs)
    out = []
    for i in range(n):
        params = statistics.fmean(r["rounds"][i]["trainable_params"] for r in runs)
        out.append((params, *mean_std([r["rounds"][i]["test_acc"] for r in runs])))
    return out


def sizes(runs: list[dict], round_: int) -> tuple[list[str], list[float], list[float]]:
    """Adapter labels and the mean / std of their sizes after ``round_`` (negative: from the end)."""
    records = [r["rounds"][round_] for r in runs]
    labels = [k[len(UNITS):] for k in records[0] if k.startswith(UNITS)]
    stats = [mean_std([rec[UNITS + label] for rec in records]) for label in labels]
    return labels, [m for m, _ in stats], [s for _, s in stats]


def early_share(record: dict) -> float:
    """The fraction of a round's adapter units that sit in the first half of the blocks (closer to the input)."""
    units = {k[len(UNITS):]: v for k, v in record.items() if k.startswith(UNITS)}
    blocks = sorted({int(label.split(".")[0]) for label in units})
    early = sum(v for label, v in units.items() if int(label.split(".")[0]) < (len(blocks) + 1) // 2)
    total = sum(units.values())
    return early / total if total else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("mimi.png"))
    parser.add_argument("--round", type=int, default=-1, help="the round whose adapter sizes the bars show")
    args = parser.parse_args(argv)
    runs = load(args.runs)
    if not runs:
        raise SystemExit("plot_mimi: no MiMi run among the folders given")
    groups = group(runs)

    for label, members in groups.items():
        print(f"## {label}  ({len(members)} run(s))")
        print("round  trainable_params  test_acc")
        for i, (params, acc, std) in enumerate(curve(members)):
            print(f"{i:5d}  {params:16.0f}  {acc:.3f} +- {std:.3f}")
        names, means, stds = sizes(members, args.round)
        print(f"adapter units after round {args.round % len(members[0]['rounds'])}: "
              + "  ".join(f"{n}={m:.1f}" for n, m in zip(names, means)))
        shares = [early_share(r["rounds"][args.round]) for r in members]
        print("share of those units in the first half of the blocks: %.2f +- %.2f" % mean_std(shares))
        print()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 1 + len(groups), figsize=(5 + 3.2 * len(groups), 3.6), squeeze=False)
    left = axes[0, 0]
    for label, members in groups.items():
        points = curve(members)
        left.errorbar([p for p, _, _ in points], [a for _, a, _ in points], yerr=[s for _, _, s in points],
                      marker="o", capsize=3, label=label)
    left.set_xscale("log")
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xlabel("trainable parameters (adapters + head)")
    left.set_ylabel("test accuracy")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    highest = max(m + s for members in groups.values() for m, s in zip(*sizes(members, args.round)[1:]))
    for ax, (label, members) in zip(axes[0, 1:], groups.items()):
        names, means, stds = sizes(members, args.round)
        ax.bar(range(len(names)), means, yerr=stds, capsize=2, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_ylim(0, highest * 1.05)
        ax.set_title(label, fontsize=8)
        ax.set_ylabel(f"hidden units after round {args.round % len(members[0]['rounds'])}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(f"plot_mimi: wrote {args.out}")


if __name__ == "__main__":
    main()
