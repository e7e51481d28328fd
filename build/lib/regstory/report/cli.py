"""``regstory-report``: tables (mean ± std over seeds) and figures from run folders.

Examples::

    regstory-report outputs/multirun/2026-11-27/12-00-00 --by noise.rate --metrics final_test_acc best_test_acc
    regstory-report outputs/multirun/... --level rounds --by noise.rate round --metrics sparsity test_acc
    regstory-report outputs/multirun/... --level rounds --plot sparsity test_acc --hue noise.rate --out sdd.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from regstory.report.load import load_epochs, load_rounds, load_runs

LEVELS = {"runs": load_runs, "rounds": load_rounds, "epochs": load_epochs}


def summarize(df: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, std and count of ``metrics`` per group of ``by`` (std over seeds / repeats)."""
    missing = [c for c in [*by, *metrics] if c not in df.columns]
    if missing:
        raise KeyError(f"no column(s) {', '.join(missing)}; available: {', '.join(sorted(map(str, df.columns)))}")
    grouped = df.groupby(by, dropna=False)[metrics] if by else df[metrics].assign(_all=0).groupby("_all")[metrics]
    table = grouped.agg(["mean", "std", "count"])
    table.columns = [f"{m}_{stat}" for m, stat in table.columns]
    return table.reset_index(drop=not by)


def display_table(table: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """The summary as text cells: one "mean ± std" column per metric and one ``n`` column (repeats per group)."""
    shown = table[by].copy() if by else pd.DataFrame(index=table.index)
    for m in metrics:
        mean, std = table[f"{m}_mean"], table[f"{m}_std"]
        shown[m] = [f"{a:.4f}" if pd.isna(b) else f"{a:.4f} ± {b:.4f}" for a, b in zip(mean, std)]
    counts = table[[f"{m}_count" for m in metrics]].max(axis=1)
    shown["n"] = counts.astype(int).tolist()
    return shown


def plot(df: pd.DataFrame, x: str, y: str, hue: str | None, out: Path, logit_x: bool = False) -> Path:
    """Mean of ``y`` against ``x`` (one line per ``hue`` value), with a band of ±1 std over repeats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = df.groupby(hue) if hue else [(None, df)]
    for key, part in groups:
        stats = part.groupby(x)[y].agg(["mean", "std"]).reset_index().sort_values(x)
        label = f"{hue}={key}" if hue else y
        ax.plot(stats[x], stats["mean"], marker="o", ms=3, label=label)
        ax.fill_between(stats[x], stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0),
                        alpha=0.2)
    if logit_x:
        ax.set_xscale("logit")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regstory-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="a run folder or a folder of runs (e.g. a multirun sweep)")
    parser.add_argument("--level", choices=list(LEVELS), default="runs")
    parser.add_argument("--by", nargs="*", default=[], help="config keys / columns to group by")
    parser.add_argument("--metrics", nargs="*", default=None, help="columns to aggregate")
    parser.add_argument("--plot", nargs=2, metavar=("X", "Y"), help="save a figure of Y against X")
    parser.add_argument("--hue", help="one line per value of this column (with --plot)")
    parser.add_argument("--logit-x", action="store_true", help="logit scale on x (sparsity close to 1)")
    parser.add_argument("--out", type=Path, help="write the table (.csv/.md) or figure (.png/.pdf) here")
    args = parser.parse_args(argv)
    try:
        df = LEVELS[args.level](args.root)
        if df.empty:
            raise FileNotFoundError(f"no runs with {args.level} records under '{args.root}'")
        if args.plot:
            path = plot(df, *args.plot, args.hue, args.out or Path(f"{args.plot[1]}_vs_{args.plot[0]}.png"),
                        args.logit_x)
            print(f"figure written to {path}")
            return 0
        metrics = args.metrics or [c for c in ("final_test_acc", "best_test_acc", "test_acc") if c in df.columns]
        table = summarize(df, args.by, metrics)
    except (FileNotFoundError, KeyError) as err:
        print(f"regstory-report: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    shown = display_table(table, args.by, metrics)
    text = shown.to_markdown(index=False) if _has_tabulate() else shown.to_string(index=False)
    print(text)
    if args.out:
        if args.out.suffix == ".csv":
            table.to_csv(args.out, index=False)
        else:
            args.out.write_text(text + "\n")
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
