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
