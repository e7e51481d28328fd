"""Every debiasing method of a set of runs in one table: unbiased and bias-conflicting test accuracy (last epoch and
the epoch selected on validation), the fresh bias probe, each method's own bias metric (the ``last_*`` keys its
plug-in reports beyond the shared ones), whether it is bias-agnostic, and on how many seeds it beats the baseline
row of the same seed.

    python scripts/debias_table.py outputs/debias_all [--by experiment_name] [--baseline debias_digits] [--out t.md]

Rows are the values of ``--by``; mean +- sample std over the runs of a row. Reads the run folders under the root
(``summary.json`` and ``config.yaml``, via :func:`regstory.report.load.load_runs`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from regstory.report.load import load_runs

SHARED = {"last_test_unbiased_acc": "unbiased (last)", "last_test_conflicting_acc": "conflicting (last)",
          "selected_test_unbiased_acc": "unbiased (selected)", "selected_test_conflicting_acc": "conflicting (selected)",
          "last_bias_probe_acc": "bias probe"}
NOT_OWN = {f"last_test_{k}" for k in ("acc", "unbiased_acc", "conflicting_acc", "aligned_acc", "worst_group_acc")}
NOT_OWN |= {"last_bias_probe_acc"}


def mean_std(values: pd.Series) -> str:
    values = values.dropna().astype(float)
    if values.empty:
        return ""
    return f"{values.mean():.3f} ± {values.std():.3f}" if len(values) > 1 else f"{values.mean():.3f}"


def own_metrics(group: pd.DataFrame) -> str:
    """The method's own ``last_*`` keys (e.g. IRENE's head accuracy), as ``name mean``."""
    keys = [c for c in group.columns if c.startswith("last_") and c not in NOT_OWN and group[c].notna().any()]
    return "; ".join(f"{k[len('last_'):]} {group[k].astype(float).mean():.3g}" for k in sorted(keys))


def beats(group: pd.DataFrame, baseline: pd.DataFrame, key: str) -> str:
    """Seeds on which the row's ``key`` is above the baseline's of the same seed, over the seeds both have."""
    base = baseline.set_index("seed")[key]
    pairs = [(v, base[s]) for s, v in zip(group["seed"], group[key]) if s in base.index]
    return f"{sum(v > b for v, b in pairs)}/{len(pairs)}" if pairs else ""


def table(runs: pd.DataFrame, by: str, baseline: str | None) -> pd.DataFrame:
    runs = runs[runs["finished"]]
    base = runs[runs[by] == baseline] if baseline is not None else None
    rows = []
    for name, group in runs.groupby(by, sort=False):
        row = {by: name, "n": len(group)}
        row.update({label: mean_std(group[k]) for k, label in SHARED.items() if k in group})
        row["own bias metric (mean)"] = own_metrics(group)
        if "bias_agnostic" in group:
            row["bias-agnostic"] = "yes" if group["bias_agnostic"].astype(bool).all() else "no"
        if base is not None and len(base) and name != baseline:
            row["beats baseline (unbiased / conflicting)"] = (
                f"{beats(group, base, 'last_test_unbiased_acc')} / {beats(group, base, 'last_test_conflicting_acc')}")
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="a folder of debiasing runs (e.g. one or more multirun sweeps)")
    parser.add_argument("--by", default="experiment_name", help="config key of the rows (default experiment_name)")
    parser.add_argument("--baseline", default=None, help="the row the others are compared with, seed by seed")
    parser.add_argument("--out", default=None, help="also write the table here (.md or .csv)")
    args = parser.parse_args(argv)
    runs = load_runs(args.root)
    if runs.empty or "last_test_unbiased_acc" not in runs:
        raise SystemExit(f"debias_table: no finished debiasing run under {args.root}")
    result = table(runs, args.by, args.baseline)
    text = result.to_markdown(index=False)
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text(result.to_csv(index=False) if out.suffix == ".csv" else text + "\n")


if __name__ == "__main__":
    main()
