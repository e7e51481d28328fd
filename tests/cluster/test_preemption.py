"""Preemption: a signalled run checkpoints at the epoch boundary, exits 75 (or requeues through submitit), and a
resumed run ends exactly where an uninterrupted run ends. Also a hard kill (SIGKILL) between checkpoints."""
from __future__ import annotations

import signal

import pytest

from regstory.checkpoint import load_checkpoint
from regstory.preemption import PREEMPTED_EXIT_CODE, auto_resume
from regstory.train import run, run_or_exit
from tests.cluster.common import TINY, comparable, final_metrics, metrics_lines, start_cli, wait_for
from tests.conftest import make_cfg, read_jsonl, run_cli

EPOCHS = 8
SLOW = ["method._target_=tests.cluster.helpers.SlowEpochs", "+method.sleep_s=0.05", f"trainer.epochs={EPOCHS}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same run, straight through, in-process."""
    run_dir = tmp_path_factory.mktemp("straight")
    run(make_cfg(*TINY, *SLOW), run_dir=run_dir)
    return run_dir


def assert_same_run(resumed, straight):
    assert comparable(read_jsonl(resumed / "metrics.jsonl")) == comparable(read_jsonl(straight / "metrics.jsonl"))
    assert read_jsonl(resumed / "rounds.jsonl")[0]["test_acc"] == read_jsonl(straight / "rounds.jsonl")[0]["test_acc"]
    assert final_metrics(resumed) == final_metrics(straight)


def test_sigterm_mid_run_checkpoints_exits_75_and_resume_matches_uninterrupted(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start_cli(*TINY, *SLOW, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for(lambda: metrics_lines(run_dir) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert [line for line in err.splitlines() if line.strip()] == [next(l for l in err.splitlines() if l.strip())]
    assert err.startswith("regstory-run: preempted: stopped by SIGTERM") and "resume=true" in err
    done = metrics_lines(run_dir)
    assert 1 <= done < EPOCHS, "the signal must stop the run before its end"
    position = load_checkpoint(run_dir / "checkpoints" / "last.pt")["position"]
    assert (position["epoch"], position["finished"]) == (done, False), "checkpoint at the epoch boundary it stopped"
    assert not (run_dir / "summary.json").exists()

    run_cli(*TINY, *SLOW, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_same_run(run_dir, uninterrupted)


def test_sigkill_after_first_checkpoint_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    """No warning at all: the atomic per-epoch checkpoint is all there is; metric lines past it are rewound."""
    run_dir = tmp_path / "run"
    proc = start_cli(*TINY, *SLOW, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for(lambda: (run_dir / "checkpoints" / "last.pt").exists(), proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()
    assert metrics_lines(run_dir) < EPOCHS

    run(make_cfg(*TINY, *SLOW, "resume=true"), run_dir=run_dir)  # in-process: the CLI path is tested above
    assert_same_run(run_dir, uninterrupted)


def fake_submitit_handler(calls):
    """Stands in for submitit's checkpoint_and_try_requeue (recognised by its module name); it requeues and exits."""
    def handler(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)

    handler.__module__ = "submitit.core.job_environment"
    return handler


def test_sigusr2_in_submitit_job_hands_over_to_submitit_requeue_and_requeued_job_resumes(tmp_path, uninterrupted,
                                                                                          monkeypatch):
    """In a submitit job the handler we replaced (submitit's) is called after our checkpoint, and the requeued job,
    started with its original overrides (resume=false), resumes from the checkpoint by itself."""
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, fake_submitit_handler(calls))
    try:
        signalled = make_cfg(*TINY, *SLOW, "method._target_=tests.cluster.helpers.SignalSelf",
                             "+method.at_epoch=2", "+method.signal_name=SIGUSR2")
        with pytest.raises(SystemExit) as exit_info:
            run_or_exit(signalled, run_dir=tmp_path)
        assert exit_info.value.code == -1 and calls == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is not None and metrics_lines(tmp_path) == 3
        assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["position"]["epoch"] == 3

        monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")  # the requeued job: the same overrides
        monkeypatch.setattr("tests.cluster.helpers.SignalSelf.armed", False)  # no signal this time
        run(signalled, run_dir=tmp_path)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert comparable(read_jsonl(tmp_path / "metrics.jsonl")) == comparable(read_jsonl(uninterrupted / "metrics.jsonl"))


def test_sigusr1_outside_a_cluster_job_exits_with_preempted_code(tmp_path, capsys):
    cfg = make_cfg(*TINY, "trainer.epochs=4", "method._target_=tests.cluster.helpers.SignalSelf", "+method.at_epoch=0",
                   "+method.signal_name=SIGUSR1")
    with pytest.raises(SystemExit) as exit_info:
        run_or_exit(cfg, run_dir=tmp_path)
    assert exit_info.value.code == PREEMPTED_EXIT_CODE
    assert "stopped by SIGUSR1" in capsys.readouterr().err
    assert metrics_lines(tmp_path) == 1
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL, "the guard puts the previous handler back"


def test_auto_resume_only_for_requeued_cluster_jobs_with_a_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "last.pt"
    for var in ("SUBMITIT_EXECUTOR", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    assert auto_resume(True, ckpt) and not auto_resume(False, ckpt)
    ckpt.write_bytes(b"x")
    assert not auto_resume(False, ckpt), "outside a cluster job an old checkpoint is never picked up silently"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert auto_resume(False, ckpt)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert not auto_resume(False, ckpt)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert auto_resume(False, ckpt) and not auto_resume(False, tmp_path / "missing.pt")
