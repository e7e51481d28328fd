"""The console: the run folder first, ``round r/R epoch e/N`` numbered from 1 with an ETA, ``[job N]`` in parallel
sweeps; the files keep their 0-based fields."""
from __future__ import annotations

import logging
import signal
import sys

import pytest
from omegaconf import OmegaConf

from regstory.config import Progress
from regstory.tracking import JobPrefix, Progressbar, RunLogger, label_console, sweep_job
from tests.conftest import make_cfg, read_jsonl, run_cli

QUIET = OmegaConf.create({"progress": "plain", "wandb": {"mode": "disabled"}})


@pytest.fixture
def clock(monkeypatch):
    """A settable ``time.monotonic`` for the tracking module."""
    import regstory.tracking as tracking

    now = [0.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: now[0])
    return now


def test_epoch_lines_number_rounds_and_epochs_from_one_with_an_eta(caplog, clock):
    bar = Progressbar(Progress.plain)
    bar.plan(rounds=2, epochs=5)
    clock[0] = 10.0  # 10 s for the first epoch: 9 epochs left
    with caplog.at_level(logging.INFO, logger="regstory"):
        bar.epoch_line({"round": 0, "epoch": 0, "train_loss": 0.5, "lr": 0.1})
        clock[0] = 100.0
        bar.epoch_line({"round": 1, "epoch": 4, "train_loss": 0.25, "lr": 0.1})
    first, last = caplog.messages
    assert first == "round 1/2 epoch 1/5: train_loss=0.5 lr=0.1 | ETA 0:01:30"
    assert last == "round 2/2 epoch 5/5: train_loss=0.25 lr=0.1"  # the last epoch: nothing left
    assert "epoch=" not in first and "round=" not in first


def test_one_round_runs_show_the_epoch_only():
    bar = Progressbar(Progress.plain)
    bar.plan(rounds=1, epochs=300)
    assert bar.label(0, 299) == "epoch 300/300"


def test_the_eta_of_a_resumed_run_counts_from_where_it_resumed(clock):
    bar = Progressbar(Progress.plain)
    bar.plan(rounds=3, epochs=10, round_=1, epoch=4)  # 14 epochs done before this process
    clock[0] = 60.0
    assert bar.eta(1, 4) == "0:15:00"  # its first epoch (round 2, epoch 5) took 60 s; 15 left


def test_without_a_plan_the_label_still_numbers_from_one():
    bar = Progressbar(Progress.plain, epochs=20)
    assert bar.label(0, 2) == "round 1 epoch 3/20" and bar.eta(0, 2) is None


def test_round_lines_say_round_r_of_r(tmp_path, caplog):
    logger = RunLogger(tmp_path, QUIET, {"trainer.epochs": 2}, None, None)
    logger.start(rounds=31, epochs=2)
    with caplog.at_level(logging.INFO, logger="regstory"):
        logger.log_round({"round": 0, "test_acc": 0.5, "sparsity": 0.0})
    assert caplog.messages == ["end of round 1/31: test_acc=0.5 sparsity=0"]
    assert read_jsonl(tmp_path / "rounds.jsonl") == [{"round": 0, "test_acc": 0.5, "sparsity": 0.0}]


def test_the_run_folder_is_the_first_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="regstory"):
        RunLogger(tmp_path / "run", QUIET, {}, None, None)
        RunLogger(tmp_path / "rank1", QUIET, {}, None, None, enabled=False)  # other DDP ranks say nothing
    assert caplog.messages == [f"run folder: {(tmp_path / 'run').resolve()}"]


def test_metrics_files_keep_their_zero_based_fields(tmp_path):
    from regstory.train import run

    run(make_cfg("dataset=digits", "arch=mlp", "arch.width=8", "trainer.epochs=2", "logger.progress=plain"),
        run_dir=tmp_path)
    assert [(r["round"], r["epoch"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(0, 0), (0, 1)]
    assert [r["round"] for r in read_jsonl(tmp_path / "rounds.jsonl")] == [0]


def test_job_prefix_on_each_console_line_not_in_the_log_file(tmp_path):
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("[%(levelname)s] - %(message)s"))
    file = logging.FileHandler(tmp_path / "job.log")
    root.addHandler(console)
    root.addHandler(file)
    try:
        label_console(3)
        label_console(3)  # once only
        assert isinstance(console.formatter, JobPrefix) and not isinstance(file.formatter, JobPrefix)
        record = logging.LogRecord("regstory", logging.INFO, __file__, 1, "two\nlines", None, None)
        assert console.format(record) == "[job 3] [INFO] - two\n[job 3] lines"
        label_console(None)
    finally:
        root.removeHandler(console)
        root.removeHandler(file)
        file.close()


def _hydra_config(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from regstory.config import register_configs
    from regstory.train import conf_dir

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("overrides, job", [
    (["hydra/launcher=joblib", "hydra.mode=MULTIRUN", "hydra.job.num=3"], 3),
    (["hydra/launcher=local_parallel", "hydra.mode=MULTIRUN", "hydra.job.num=1"], 1),
    (["hydra.mode=MULTIRUN", "hydra.job.num=2"], None),  # the basic launcher: one job after another
    (["hydra/launcher=joblib", "hydra.mode=RUN"], None),
])
def test_sweep_job_is_the_job_number_in_parallel_sweeps_only(overrides, job):
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(_hydra_config(*overrides))
    try:
        assert sweep_job() == job
    finally:
        HydraConfig.instance().cfg = None
    assert sweep_job() is None  # outside Hydra


def test_a_parallel_job_on_a_terminal_prints_lines_not_bars(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert Progressbar(Progress.auto, job=2).mode is Progress.plain
    assert Progressbar(Progress.auto).mode is Progress.bar


def test_preemption_message_numbers_epochs_as_the_console_does(tmp_path):
    from regstory.preemption import Preempted

    message = str(Preempted(signal.SIGTERM, tmp_path, round_=0, next_epoch=300))
    assert "after epoch 300 of round 1 " in message  # the console's last line said "epoch 300/300"
    assert Progressbar(Progress.plain, epochs=300).label(0, 299).endswith("epoch 300/300")


def test_parallel_sweep_lines_carry_their_job(tmp_path):
    proc = run_cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "dataset=digits", "arch=mlp",
                   "arch.width=8", "trainer.epochs=2", "seed=0,1", "logger.wandb.mode=disabled",
                   "logger.progress=plain", "trainer.num_threads=1", cwd=tmp_path)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "[regstory]" in line]
    for job in (0, 1):
        mine = [line for line in lines if line.startswith(f"[job {job}] ")]
        assert any("run folder: " in line and f"/{job}_" in line for line in mine), lines
        assert sum("epoch 2/2: " in line for line in mine) == 1, lines
    assert all(line.startswith("[job ") for line in lines), lines
