from regstory.train import run
from tests.conftest import make_cfg


def test_plain_training_runs_and_writes_summary(tmp_path):
    summary = run(make_cfg("dataset=digits", "arch=mlp", "trainer.epochs=2"), run_dir=tmp_path)
    assert (tmp_path / "summary.json").exists()
    assert 0.0 <= summary["final_test_acc"] <= 1.0
