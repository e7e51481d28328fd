"""``regstory-report``: tables (mean ± std over seeds) and figures from run folders.

Without ``--by``, a table has one row per combination of the config keys that differ between the runs (seeds,
output and display settings excepted, see ``NOT_GROUPED``), so runs of different setups are never averaged together;
unfinished or unreadable runs are left out and listed.

Examples::

    regstory-report outputs/multirun/2026-11-27/12-00-00
    regstory-report outputs/multirun/2026-11-27/12-00-00 --by noise.rate --metrics final_test_acc best_test_acc
    regstory-report outputs/multirun/... --level rounds --by noise.rate round --metrics sparsity test_acc
    regstory-report outputs/multirun/... --level rounds --plot sparsity test_acc --hue noise.rate --out sdd.png
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from regstory.report.load import load_epochs, load_rounds, load_runs

LEVELS = {"runs": load_runs, "rounds": load_rounds, "epochs": load_epochs}

#: the columns that number the records of a level: each value is its own row of a table without ``--by``
LEVEL_KEYS = {"runs": [], "rounds": ["round"], "epochs": ["round", "epoch"]}

#: config keys that never split a table (patterns): the repeat (seed), and settings that change where or how a run
#: is stored or shown, not its results
NOT_GROUPED = ("seed", "resume", "logger.*", "hydra.*", "data.root", "data.download", "trainer.num_threads",
               "trainer.num_workers", "trainer.checkpoint_every", "trainer.checkpoint_interval_s")


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def differing_keys(df: pd.DataFrame) -> list[str]:
    """The config columns (``df.attrs["config_columns"]``) whose value is not the same in every row, in config
    order, except those of :data:`NOT_GROUPED`. A ``_target_`` key, or one that only some runs have (a key of one
    dataset or method), is left out when the keys before it already tell its value (``dataset.name`` tells
    ``dataset._target_`` and the options of that dataset)."""
    keys: list[str] = []
    for key in df.attrs.get("config_columns", []):
        if key not in df.columns or any(fnmatch.fnmatchcase(key, p) for p in NOT_GROUPED):
            continue
        values = df[key].map(_hashable)
        if values.nunique(dropna=False) < 2:
            continue
        told = bool(keys) and not _varies_within(df, keys, key)
        if not (told and (key.endswith("._target_") or df[key].isna().any())):
            keys.append(key)
    return keys


def _varies_within(df: pd.DataFrame, by: list[str], key: str) -> bool:
    """Whether ``key`` takes more than one value among the rows of some group of ``by``."""
    if not by:
        return df[key].map(_hashable).nunique(dropna=False) > 1
    keys = pd.DataFrame({k: df[k].map(lambda v: str(v) if isinstance(v, list) else v) for k in by})
    values = df[key].map(_hashable)
    return bool((values.groupby([keys[k] for k in by], dropna=False).nunique(dropna=False) > 1).any())


def averaged_keys(df: pd.DataFrame, by: list[str], level: str = "runs") -> list[str]:
    """The keys of :func:`differing_keys`, and the round/epoch columns of ``level``, that vary inside a group of
    ``by``: a table grouped by ``by`` averages records that differ in them."""
    keys = differing_keys(df) + [k for k in LEVEL_KEYS[level] if k in df.columns]
    return [k for k in keys if k not in by and _varies_within(df, [b for b in by if b in df], k)]


def summarize(df: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, std and count of ``metrics`` per group of ``by`` (std over seeds / repeats)."""
    missing = [c for c in [*by, *metrics] if c not in df.columns]
    if missing:
        raise KeyError(f"no column(s) {', '.join(missing)}; available: {', '.join(sorted(map(str, df.columns)))}")
    df = df.assign(**{k: df[k].map(lambda v: str(v) if isinstance(v, list) else v) for k in by})
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


def logit_ticks(low: float, high: float) -> list[float]:
    """Ticks for a logit axis between ``low`` and ``high``: 0.5, 0.9, 0.99, 0.999... and their mirror images 0.1,
    0.01...; with 0.8, 0.95, 0.98, 0.995... (and mirrors) added when that gives fewer than 3."""
    def within(steps: tuple[int, ...]) -> list[float]:
        small = [float(f"{m}e-{k}") for k in range(1, 10) for m in steps if m * 10.0 ** -k < 0.5]
        return sorted(t for t in {0.5, *small, *(round(1 - v, 12) for v in small)} if low <= t <= high)

    ticks = within((1,))
    return ticks if len(ticks) >= 3 else within((1, 2, 5))


def _decimal(value: float) -> str:
    return np.format_float_positional(value, precision=10, trim="-")


def plot(df: pd.DataFrame, x: str, y: str, hue: str | None, out: Path, logit_x: bool = False
         ) -> tuple[Path, list[str]]:
    """Mean of ``y`` against ``x`` (one line per ``hue`` value), with a band of ±1 std over repeats. Returns the
    figure's path and notes on what it does not show: on a logit x axis, points at x = 0 (the dense network on a
    sparsity axis) are drawn as a dashed line at their mean y, and points at x = 1 are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

    missing = [c for c in (x, y, hue) if c and c not in df.columns]
    if missing:
        raise KeyError(f"no column(s) {', '.join(missing)}; available: {', '.join(sorted(map(str, df.columns)))}")
    notes = []
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = df.groupby(hue) if hue else [(None, df)]
    dense_drawn = outside = 0
    for key, part in groups:
        stats = part.groupby(x)[y].agg(["mean", "std"]).reset_index().sort_values(x)
        label = f"{hue}={key}" if hue else y
        if logit_x:
            inside = (stats[x] > 0) & (stats[x] < 1)
            dense = stats[stats[x] == 0]
            outside += int((~inside).sum() - len(dense))
            stats = stats[inside]
        line, = ax.plot(stats[x], stats["mean"], marker="o", ms=3, label=label)
        ax.fill_between(stats[x], stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0),
                        alpha=0.2, color=line.get_color())
        if logit_x and len(dense):
            ax.axhline(dense["mean"].iloc[0], ls="--", lw=1, color=line.get_color(), label=f"{label}, {x}=0")
            dense_drawn += 1
    if logit_x:
        ax.set_xscale("logit")
        ax.xaxis.set_major_locator(FixedLocator(logit_ticks(*sorted(ax.get_xlim()))))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _decimal(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if dense_drawn:
            notes.append(f"--logit-x: {x}=0 has no place on a logit axis; its mean {y} is the dashed line "
                         f"('{x}=0' in the legend)")
        if outside:
            notes.append(f"--logit-x: {outside} point(s) with {x} < 0 or >= 1 left out")
    elif pd.api.types.is_integer_dtype(df[x]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out, notes


def _finished_only(df: pd.DataFrame, include_unfinished: bool) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The rows of finished runs (all rows with ``include_unfinished``), and the unfinished runs left out."""
    skipped = list(df.attrs.get("skipped", []))
    if include_unfinished or df.empty or "finished" not in df.columns:
        return df, skipped
    unfinished = sorted(set(df.loc[~df["finished"].astype(bool), "run_dir"]))
    skipped += [(d, "no summary.json: unfinished (running, stopped or crashed); --include-unfinished to show it")
                for d in unfinished]
    kept = df[df["finished"].astype(bool)].copy()
    kept.attrs = {**df.attrs, "skipped": skipped}
    return kept, sorted(skipped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regstory-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("root", help="a run folder or a folder of runs (e.g. a multirun sweep)")
    parser.add_argument("--level", choices=list(LEVELS), default="runs")
    parser.add_argument("--by", nargs="*", default=None,
                        help="config keys / columns to group by (default: every config key that differs between "
                             "the runs, and the round/epoch of --level rounds/epochs; --by alone: one group)")
    parser.add_argument("--metrics", nargs="*", default=None, help="columns to aggregate")
    parser.add_argument("--plot", nargs=2, metavar=("X", "Y"), help="save a figure of Y against X")
    parser.add_argument("--hue", help="one line per value of this column (with --plot)")
    parser.add_argument("--logit-x", action="store_true", help="logit scale on x (sparsity close to 1)")
    parser.add_argument("--include-unfinished", action="store_true",
                        help="also use the runs without a summary.json (running, stopped or crashed)")
    parser.add_argument("--out", type=Path, help="write the table (.csv/.md) or figure (.png/.pdf) here")
    args = parser.parse_args(argv)
    try:
        df = LEVELS[args.level](args.root)
        df, skipped = _finished_only(df, args.include_unfinished)
        if df.empty:
            _print_skipped(skipped, sys.stderr)
            raise FileNotFoundError(f"no finished runs with {args.level} records under '{args.root}'"
                                    if skipped else f"no runs with {args.level} records under '{args.root}'")
        if args.plot:
            path, notes = plot(df, *args.plot, args.hue, args.out or Path(f"{args.plot[1]}_vs_{args.plot[0]}.png"),
                               args.logit_x)
            averaged = averaged_keys(df, [k for k in (args.hue, args.plot[0]) if k], args.level)
            if averaged:
                notes.append(f"each point averages records that differ in {', '.join(averaged)} "
                             f"(--hue one of them, or report one folder per setup)")
            print(f"figure written to {path}")
            for note in notes:
                print(f"note: {note}")
            _print_skipped(skipped)
            return 0
        metrics = args.metrics or [c for c in ("final_test_acc", "best_test_acc", "test_acc") if c in df.columns]
        if args.by is None:
            by = differing_keys(df) + [k for k in LEVEL_KEYS[args.level] if k in df.columns and df[k].nunique() > 1]
            header = (f"grouped by {', '.join(by)}: the keys that differ between runs (choose with --by)" if by else
                      "one group: the runs differ in seed only (choose with --by)")
        else:
            by = args.by
            averaged = averaged_keys(df, by, args.level)
            header = (f"note: averaged over records that differ in {', '.join(averaged)} (not in --by)"
                      if averaged else None)
        table = summarize(df, by, metrics)
    except (FileNotFoundError, KeyError) as err:
        print(f"regstory-report: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    shown = display_table(table, by, metrics)
    text = shown.to_markdown(index=False) if _has_tabulate() else shown.to_string(index=False)
    if header:
        print(header)
    print(text)
    _print_skipped(skipped)
    if args.out:
        if args.out.suffix == ".csv":
            table.to_csv(args.out, index=False)
        else:
            args.out.write_text(text + "\n")
    return 0


def _print_skipped(skipped: list[tuple[str, str]], file=None) -> None:
    if skipped:
        print(f"skipped {len(skipped)} run folder(s):", file=file or sys.stdout)
        for run_dir, reason in skipped:
            print(f"  {run_dir}: {reason}", file=file or sys.stdout)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
