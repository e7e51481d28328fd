"""What a new user meets on the command line: errors as one line before anything is created, a sweep checked as a
whole, an architecture's own data set, Ctrl-C that keeps the work, and a resume that keeps the run's record."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from regstory.tracking import wandb_login_missing
from tests.conftest import FAST, REPO, read_jsonl, run_cli

TINY = ["dataset=digits", "arch=mlp", "arch.width=32", "trainer.epochs=2"]


def test_a_sweep_with_bad_points_names_them_all_and_runs_nothing(tmp_path):
    proc = run_cli("-m", *TINY, "noise.rate=1.5,0.0,2.0", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "regstory-run: error: 2 of 3 sweep points are invalid, nothing was run: [noise.rate=1.5] noise.rate must be "
        "a number in [0, 1), got 1.5; [noise.rate=2.0] noise.rate must be a number in [0, 1), got 2.0"]
    assert not (tmp_path / "sweep").exists()


def test_an_architecture_alone_trains_on_its_own_data_set_and_a_missing_set_leaves_no_folder(tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    proc = run_cli("arch=resnet20", "data.download=false", f"data.root={empty}", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "regstory-run: cifar10 is this architecture's data set (dataset=... for another)"
    assert lines[1].startswith("regstory-run: error: dataset 'cifar10' not found") and len(lines) == 2
    assert "[ERROR]" not in proc.stdout  # the error is printed once
    assert not (tmp_path / "run").exists()  # the folder made for the failed start is gone


def test_wandb_online_without_a_login_is_caught_before_the_run(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert "wandb login" in wandb_login_missing("online")
    assert wandb_login_missing("offline") is None
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_login_missing("online") is None


def test_ctrl_c_checkpoints_exits_130_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    exe = str(Path(sys.executable).parent / "regstory-run")
    args = [exe, *FAST, "dataset=digits", "arch=mlp", "arch.width=32", "trainer.epochs=30",
            "trainer.checkpoint_interval_s=3600", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "stopped by SIGINT: checkpoint written" in err and "resume=true" in err
    epochs_done = len(read_jsonl(run_dir / "metrics.jsonl"))
    assert (run_dir / "checkpoints" / "last.pt").exists() and 1 <= epochs_done < 30
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_bytes()
    resumed = run_cli(*FAST, "resume=true", "trainer.epochs=31", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(31))
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == overrides  # the record of how it started
    assert read_jsonl(run_dir / "resumes.jsonl")[-1]["changed"]["trainer.epochs"] == [30, 31]


def test_an_architecture_that_cannot_take_the_data_is_one_line_naming_the_fit(tmp_path):
    proc = run_cli("arch=resnet20", "dataset=mnist1d", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("regstory-run: error: arch resnet20 cannot take dataset=mnist1d's inputs of shape (40,)")
    assert line.endswith("it is made for dataset=cifar10")
    assert not (tmp_path / "run").exists()


def test_an_added_unknown_key_is_refused_however_it_is_added(tmp_path):
    for typo in ("+trainer.epoch=3", "++trainer.epoch=3"):
        proc = run_cli(*TINY, typo, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
        assert proc.returncode == 2
        assert proc.stderr.startswith("regstory-run: error: trainer.epoch is not a key of trainer; allowed: epochs,")
        assert not (tmp_path / "run").exists()
