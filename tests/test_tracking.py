import json

from regstory.train import run
from tests.conftest import make_cfg


def test_wandb_offline_run_is_written_under_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg("dataset=digits", "arch=mlp", "arch.width=16", "trainer.epochs=2", "logger.wandb.mode=offline",
                   "logger.wandb.group=g1", "logger.wandb.tags=[a,b]")
    run(cfg, run_dir=tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "offline run has no .wandb file to sync"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["num_params"] > 0


def test_wandb_disabled_writes_nothing(tmp_path):
    run(make_cfg("dataset=digits", "arch=mlp", "arch.width=16", "trainer.epochs=1"), run_dir=tmp_path)
    assert not (tmp_path / "wandb").exists()
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "provenance.json").exists()


def test_flat_config_has_dotted_keys():
    from regstory.config import flat_config

    flat = flat_config(make_cfg("dataset=digits", "trainer.lr=0.3"))
    assert flat["trainer.lr"] == 0.3 and flat["dataset.name"] == "digits" and flat["trainer.optimizer"] == "sgd"


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise(monkeypatch, caplog):
    import logging
    import sys

    from regstory.config import Progress
    from regstory.tracking import Progressbar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    plain = Progressbar(Progress.auto)
    assert plain.mode is Progress.plain and list(plain.wrap([1, 2], 2, "x")) == [1, 2]
    plain.plan(rounds=1, epochs=10)
    with caplog.at_level(logging.INFO, logger="regstory"):
        plain.epoch_line({"round": 0, "epoch": 3, "train_loss": 0.5})
    assert "epoch 4/10: " in caplog.text and "train_loss=0.5" in caplog.text
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = Progressbar(Progress.auto)
    assert bar.mode is Progress.bar
    wrapped = bar.wrap(range(3), 3, "epoch 1")
    assert type(wrapped).__name__ != "range_iterator" and list(wrapped) == [0, 1, 2]


def test_metric_lines_are_made_durable_when_a_checkpoint_records_them_not_per_line(tmp_path, monkeypatch):
    """One fsync per epoch line cost small models ~1.6 ms an epoch; the lines only need to be on disk before a
    checkpoint points at them."""
    import os

    from omegaconf import OmegaConf

    from regstory.tracking import RunLogger

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    cfg = OmegaConf.create({"progress": "none", "wandb": {"mode": "disabled"}})
    logger = RunLogger(tmp_path, cfg, {}, None, None)
    for epoch in range(3):
        logger.log_epoch({"epoch": epoch})
    assert synced == []
    assert logger.positions() == {"metrics_lines": 3, "rounds_lines": 0}
    assert synced == [str(tmp_path / "metrics.jsonl")]


def test_the_suite_keeps_wandb_and_data_out_of_the_home_folder():
    """conftest points W&B's folders and the data root at a temporary folder before wandb is imported."""
    import os
    from pathlib import Path

    home = Path.home().resolve()
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "REGSTORY_DATA"):
        path = Path(os.environ[var]).resolve()
        assert path.is_dir() and not path.is_relative_to(home), (var, path)


def test_an_offline_wandb_run_writes_nothing_under_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(make_cfg("dataset=mnist1d", "arch=mlp", "arch.width=8", "trainer.epochs=1", "logger.wandb.mode=offline"),
        run_dir=tmp_path / "run")
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []
