"""scripts/debias_table.py: every debiasing method of a set of runs in one table, with its own bias metric and the
seeds on which it beats the baseline row of the same seed."""
import importlib.util
from pathlib import Path

import pandas as pd

from tests.report.test_report import fake_run


def load_script():
    script = Path(__file__).parents[2] / "scripts" / "debias_table.py"
    spec = importlib.util.spec_from_file_location("debias_table", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(unbiased, conflicting, agnostic, **own):
    return {"last_test_unbiased_acc": unbiased, "last_test_conflicting_acc": conflicting,
            "selected_test_unbiased_acc": unbiased, "selected_test_conflicting_acc": conflicting,
            "last_bias_probe_acc": 0.9, "last_test_acc": 0.5, "bias_agnostic": agnostic,
            **{f"last_{k}": v for k, v in own.items()}}


def test_one_row_per_method_with_own_metric_and_seedwise_wins(tmp_path):
    runs = {("debias_digits", 0): summary(0.20, 0.10, True), ("debias_digits", 1): summary(0.30, 0.20, True),
            ("debias_digits_irene", 0): summary(0.25, 0.05, False, irene_head_bias_acc=0.4),
            ("debias_digits_irene", 1): summary(0.40, 0.30, False, irene_head_bias_acc=0.6)}
    for (name, seed), values in runs.items():
        fake_run(tmp_path / f"{name}_{seed}", f"experiment={name}", f"seed={seed}", summary=values)
    out = tmp_path / "t.csv"
    load_script().main([str(tmp_path), "--baseline", "debias_digits", "--out", str(out)])
    table = pd.read_csv(out, keep_default_na=False).set_index("experiment_name")
    irene = table.loc["debias_digits_irene"]
    assert irene["unbiased (last)"] == "0.325 ± 0.106"  # mean 0.325, sample std 0.15 / sqrt(2)
    assert irene["own bias metric (mean)"] == "irene_head_bias_acc 0.5"
    assert irene["bias-agnostic"] == "no" and table.loc["debias_digits", "bias-agnostic"] == "yes"
    # seed 0: 0.25 > 0.20 but 0.05 < 0.10; seed 1: 0.40 > 0.30 and 0.30 > 0.20
    assert irene["beats baseline (unbiased / conflicting)"] == "2/2 / 1/2"
    assert table.loc["debias_digits", "own bias metric (mean)"] == ""
