from regstory.train import run
from tests.conftest import make_cfg, read_jsonl


def test_plain_training_learns_and_writes_summary(tmp_path):
    """Three epochs of an MLP on the 8x8 digits: the training loss falls every epoch and the test accuracy ends far
    above chance (0.1); the summary holds the last epoch's record."""
    summary = run(make_cfg("dataset=digits", "arch=mlp", "trainer.epochs=3"), run_dir=tmp_path)
    assert (tmp_path / "summary.json").exists()
    losses = [r["train_loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert len(losses) == 3 and all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert summary["final_test_acc"] > 0.8
