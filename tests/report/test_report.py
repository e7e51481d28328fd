import pandas as pd
import pytest

from regstory.report.cli import main, summarize
from regstory.report.load import load_epochs, load_rounds, load_runs
from regstory.train import run
from tests.conftest import make_cfg


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for rate in (0.0, 0.5):
        for seed in (0, 1):
            run(make_cfg("dataset=digits", "arch=mlp", "arch.width=16", "trainer.epochs=2", f"noise.rate={rate}",
                         f"seed={seed}"), run_dir=root / f"r{rate}_s{seed}")
    return root


def test_loaders_carry_config_columns(sweep):
    runs = load_runs(sweep)
    assert len(runs) == 4 and set(runs["noise.rate"]) == {0.0, 0.5} and runs["finished"].all()
    epochs = load_epochs(sweep)
    assert len(epochs) == 8 and {"epoch", "test_acc", "seed"} <= set(epochs.columns)
    assert len(load_rounds(sweep)) == 4


def test_summarize_gives_mean_std_count_per_group():
    df = pd.DataFrame({"g": ["a", "a", "b"], "m": [1.0, 3.0, 5.0]})
    table = summarize(df, ["g"], ["m"])
    assert table["g"].tolist() == ["a", "b"] and table["m_mean"].tolist() == [2.0, 5.0]
    assert table["m_count"].tolist() == [2, 1]
    assert table["m_std"].iloc[0] == pytest.approx(2 ** 0.5) and pd.isna(table["m_std"].iloc[1])


def test_cli_table_and_figure(sweep, tmp_path, capsys):
    assert main([str(sweep), "--by", "noise.rate", "--metrics", "final_test_acc", "--out", str(tmp_path / "t.csv")]) == 0
    table = pd.read_csv(tmp_path / "t.csv")
    assert table["final_test_acc_count"].tolist() == [2, 2]
    runs = load_runs(sweep)
    expected = runs[runs["noise.rate"] == 0.5]["final_test_acc"].mean()
    assert table.loc[table["noise.rate"] == 0.5, "final_test_acc_mean"].item() == pytest.approx(expected)
    assert main([str(sweep), "--level", "epochs", "--plot", "epoch", "test_acc", "--hue", "noise.rate",
                 "--out", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_display_table_shows_mean_plus_minus_std_and_n():
    from regstory.report.cli import display_table

    df = pd.DataFrame({"g": [1, 1, 2], "m": [0.25, 0.75, 0.5]})
    shown = display_table(summarize(df, ["g"], ["m"]), ["g"], ["m"])
    assert shown.to_dict("list") == {"g": [1, 2], "m": ["0.5000 ± 0.3536", "0.5000"], "n": [2, 1]}


def fake_run(run_dir, *overrides, metrics=({"round": 0, "epoch": 0, "test_acc": 0.5},), summary=None):
    """A run folder as regstory-run leaves it (config.yaml, metrics.jsonl, summary.json unless None), without
    training."""
    import json

    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True)
    OmegaConf.save(make_cfg(*overrides), run_dir / "config.yaml", resolve=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_without_by_the_table_splits_by_every_config_key_that_differs(sweep, capsys):
    assert main([str(sweep), "--metrics", "final_test_acc"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "grouped by noise.rate: the keys that differ between runs (choose with --by)"
    table = [line for line in out.splitlines() if line.startswith("|") and "---" not in line]
    assert len(table) == 3 and all(line.rstrip(" |").endswith("2") for line in table[1:])  # 2 rates, n=2 each


def test_a_folder_of_different_setups_is_not_averaged_together(tmp_path, capsys):
    for seed in (0, 1):
        fake_run(tmp_path / f"a{seed}", "dataset=digits", "trainer.epochs=2", f"seed={seed}",
                 f"logger.progress={'bar' if seed else 'none'}", summary={"final_test_acc": 0.5 + seed / 10})
        fake_run(tmp_path / f"b{seed}", "dataset=mnist1d", "trainer.epochs=5", f"seed={seed}",
                 summary={"final_test_acc": 0.8})
    assert main([str(tmp_path), "--metrics", "final_test_acc", "--out", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    # seed and logger.* never split a table; dataset.name tells dataset._target_ and the keys of each dataset
    assert out.startswith("grouped by dataset.name, trainer.epochs: the keys that differ between runs")
    table = pd.read_csv(tmp_path / "t.csv")
    assert table["final_test_acc_count"].tolist() == [2, 2]
    assert table.set_index("dataset.name")["final_test_acc_mean"].to_dict() == pytest.approx({"digits": 0.55,
                                                                                             "mnist1d": 0.8})
    fake_run(tmp_path / "c", "dataset=mnist1d", "trainer.epochs=2", summary={"final_test_acc": 0.2})
    assert main([str(tmp_path), "--metrics", "final_test_acc", "--by", "trainer.epochs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("note: averaged over records that differ in dataset.name (not in --by)\n"), out
    assert main([str(tmp_path), "--metrics", "final_test_acc", "--by", "dataset.name", "trainer.epochs"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_unfinished_and_unreadable_runs_are_listed_not_skipped_silently(tmp_path, capsys):
    fake_run(tmp_path / "done", summary={"final_test_acc": 0.5})
    fake_run(tmp_path / "crashed")  # metrics but no summary.json
    (tmp_path / "corrupt").mkdir()
    fake_run(tmp_path / "corrupt" / "run", summary={"final_test_acc": 0.7})
    (tmp_path / "corrupt" / "run" / "config.yaml").write_text("a: [unclosed\n")
    (tmp_path / "early" / ".hydra").mkdir(parents=True)  # a Hydra job that stopped before config.yaml
    assert main([str(tmp_path), "--metrics", "final_test_acc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("skipped 3 run folder(s):")
    listed = dict(line.strip().split(": ", 1) for line in lines[start + 1:])
    assert set(listed) == {str(tmp_path / name) for name in ("crashed", "corrupt/run", "early")}
    assert "no summary.json" in listed[str(tmp_path / "crashed")]
    assert listed[str(tmp_path / "corrupt" / "run")].startswith("unreadable")
    assert "no config.yaml" in listed[str(tmp_path / "early")]
    assert main([str(tmp_path), "--level", "epochs", "--include-unfinished", "--by"]) == 0
    assert "| 0.5000 ± 0.0000 |   2 |" in capsys.readouterr().out  # done + crashed, one epoch each


def test_plugin_entries_of_the_summary_are_columns(tmp_path):
    fake_run(tmp_path / "r", summary={"final_test_acc": 0.5, "final_sparsity": 0.9,
                                      "plugins": {"method": {"final_sparsity": 0.9}, "debias": {"bias_acc": 0.3}}})
    runs = load_runs(tmp_path)
    assert runs["plugins.method.final_sparsity"].item() == 0.9 and runs["plugins.debias.bias_acc"].item() == 0.3
    assert runs["final_sparsity"].item() == 0.9 and "plugins" not in runs.columns


@pytest.fixture
def figures(monkeypatch):
    """The figures plot() makes, kept open to read their axes."""
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    return kept


def test_logit_x_labels_are_plain_decimals_and_the_dense_point_is_a_dashed_line(tmp_path, figures):
    from regstory.report.cli import plot

    df = pd.DataFrame({"sparsity": [0.0, 0.2, 0.5, 0.9, 0.99, 0.999] * 2, "test_acc": [0.8, 0.7, 0.75, 0.8, 0.6, 0.3] * 2,
                       "noise.rate": [0.2] * 6 + [0.5] * 6})
    path, notes = plot(df, "sparsity", "test_acc", "noise.rate", tmp_path / "f.png", logit_x=True)
    (fig,) = figures
    ax = fig.axes[0]
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(lab.startswith("0.") and "10" not in lab for lab in labels), labels
    assert {"0.5", "0.9", "0.99"} <= set(labels)
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_ydata()[0] for line in dashed] == [0.8, 0.8]
    assert any("sparsity=0" in note and "dashed" in note for note in notes)


def test_integer_x_gets_integer_ticks(tmp_path, figures):
    from regstory.report.cli import plot

    plot(pd.DataFrame({"epoch": [0, 1, 2], "test_acc": [0.1, 0.5, 0.6]}), "epoch", "test_acc", None,
         tmp_path / "f.png")
    ax = figures[0].axes[0]
    lo, hi = ax.get_xlim()
    assert all(float(t).is_integer() for t in ax.get_xticks() if lo <= t <= hi)


def test_logit_ticks_cover_the_range():
    from regstory.report.cli import logit_ticks

    assert logit_ticks(0.05, 0.9995) == [0.1, 0.5, 0.9, 0.99, 0.999]
