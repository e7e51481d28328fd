"""A relaunched sweep (the same command, the same hydra.sweep.dir) skips finished runs, resumes killed ones, starts
the rest, and ends as an uninterrupted sweep; a dry run prints that plan and writes nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from regstory import loop
from regstory.train import run
from tests.conftest import FAST, make_cfg, read_jsonl, run_cli
from tests.test_loop import strip_times

TINY = ["dataset=digits", "arch=mlp", "arch.width=16", "trainer.epochs=2"]


class Killed(Exception):
    pass


def killed_at_epoch(monkeypatch, epoch: int, overrides: list[str], run_dir: Path) -> None:
    """Run ``overrides`` into ``run_dir`` and kill it as epoch ``epoch`` (0-based) starts."""
    original = loop.run_epoch

    def run_epoch(ctx, hooks):
        if ctx.epoch == epoch:
            raise Killed
        return original(ctx, hooks)

    monkeypatch.setattr(loop, "run_epoch", run_epoch)
    with pytest.raises(Killed):
        run(make_cfg(*overrides), run_dir=run_dir)
    monkeypatch.setattr(loop, "run_epoch", original)


def job_folders(sweep: Path, *overrides: str) -> list[Path]:
    """The folder Hydra gives each job of ``-m OVERRIDES hydra.sweep.dir=SWEEP`` (as the preflight plans it)."""
    from regstory.planning import plan_runs

    plan = plan_runs([*FAST, *overrides], [f"hydra.sweep.dir={sweep}"], "config", multirun=True, dry_run=True)
    return [r.folder.path for r in plan.runs]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_killed_sweep_relaunched_trains_only_what_is_left_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    seeds = ["seed=0,1,2,3"]
    run_cli("-m", *FAST, *TINY, "seed=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # one run, finished
    folders = job_folders(sweep, *TINY, *seeds)
    killed_at_epoch(monkeypatch, 1, [*TINY, "seed=1"], folders[1])  # checkpoint after epoch 1 of 2
    killed_at_epoch(monkeypatch, 1, [*TINY, "seed=3", "trainer.checkpoint_interval_s=3600"], folders[3])  # none
    assert (folders[1] / "checkpoints/last.pt").exists() and not (folders[3] / "checkpoints").exists()
    before = snapshot(tmp_path)

    plan = run_cli("-m", *FAST, *TINY, *seeds, f"hydra.sweep.dir={sweep}", "dry_run=true", cwd=tmp_path)
    rows = plan.stdout.splitlines()
    assert rows[0] == f"regstory-run: dry run, nothing is run or written: 4 sweep points in {sweep}"
    assert [row.split()[:2] for row in rows[1:5]] == [
        [folders[0].name, "finished"], [folders[1].name, "resumable,"], [folders[2].name, "new"],
        [folders[3].name, "new"]]
    assert "started over: killed before its first checkpoint" in rows[4] and "~" in rows[2]
    assert rows[5] == "4 runs: 1 finished (skipped), 1 resumed, 2 new"
    assert rows[6].startswith("estimated wall time: ~") and "1 parallel worker (the basic launcher" in rows[6]
    assert snapshot(tmp_path) == before, "a dry run writes nothing"

    first = {name: (folders[0] / name).read_bytes() for name in ("summary.json", "metrics.jsonl", "config.yaml",
                                                                  "checkpoints/last.pt", ".hydra/overrides.yaml")}
    relaunch = run_cli("-m", *FAST, *TINY, *seeds, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert "regstory-run: 4 runs: 1 finished (skipped), 1 resumed, 2 new" in relaunch.stderr
    assert {name: (folders[0] / name).read_bytes() for name in first} == first, "the finished run is left alone"
    assert len(read_jsonl(folders[1] / "resumes.jsonl")) == 1 and not (folders[3] / "resumes.jsonl").exists()
    for seed, folder in enumerate(folders):
        full = run(make_cfg(*TINY, f"seed={seed}"), run_dir=tmp_path / "uninterrupted" / str(seed))
        assert strip_times(read_jsonl(folder / "metrics.jsonl")) == \
            strip_times(read_jsonl(tmp_path / "uninterrupted" / str(seed) / "metrics.jsonl"))
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["final_test_acc"] == full["final_test_acc"]
        assert summary["final_train_loss"] == full["final_train_loss"]


def test_a_sweep_folder_holding_another_experiment_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    sweep = tmp_path / "sweep"
    folders = job_folders(sweep, *TINY, "seed=0,1")
    run(make_cfg(*TINY, "seed=0", "trainer.lr=0.1"), run_dir=folders[0])  # the config changed under that name
    before = snapshot(tmp_path)
    proc = run_cli("-m", *FAST, *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"regstory-run: error: 1 of 2 folders of sweep {sweep} hold another experiment than the job that "
                    f"would run there (its config changed), nothing was run: {folders[0].name}: trainer.lr=0.05 (the "
                    f"run has 0.1). Relaunch with the overrides they were started with, or use another hydra.sweep.dir")
    assert snapshot(tmp_path) == before and not folders[1].exists()


@pytest.mark.parametrize("launcher", ["local_parallel", "submitit_local"])
def test_a_relaunch_runs_through_parallel_and_submitit_launchers_unchanged(tmp_path, monkeypatch, launcher):
    sweep = tmp_path / "sweep"
    folders = job_folders(sweep, *TINY, "seed=0,1")
    run(make_cfg(*TINY, "seed=0"), run_dir=folders[0])
    killed_at_epoch(monkeypatch, 1, [*TINY, "seed=1"], folders[1])
    finished = (folders[0] / "summary.json").read_bytes()
    extra = ["hydra.launcher.timeout_min=5"] if launcher == "submitit_local" else []
    proc = run_cli("-m", f"hydra/launcher={launcher}", *extra, *FAST, *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}",
                   cwd=tmp_path)
    assert "regstory-run: 2 runs: 1 finished (skipped), 1 resumed" in proc.stderr
    assert (folders[0] / "summary.json").read_bytes() == finished
    assert [r["epoch"] for r in read_jsonl(folders[1] / "metrics.jsonl")] == [0, 1]
    assert (folders[1] / "summary.json").exists() and len(read_jsonl(folders[1] / "resumes.jsonl")) == 1


def test_a_dry_run_of_a_new_sweep_counts_the_parallel_workers_and_creates_nothing(tmp_path):
    proc = run_cli("-m", "hydra/launcher=local_parallel", *FAST, *TINY, "seed=0,1,2", "dry_run=true", cwd=tmp_path)
    lines = proc.stdout.splitlines()
    assert len(lines) == 6 and all(" new  ~" in line for line in lines[1:4])
    assert lines[4] == "3 runs: 3 new"
    assert "with 2 parallel workers (joblib n_jobs=2)" in lines[5]
    assert list(tmp_path.iterdir()) == []


def test_parallel_workers_follow_the_launcher():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from regstory.planning import makespan, parallel_workers
    from regstory.train import conf_dir

    make_cfg()
    found = {}
    for launcher in ("basic", "local_parallel", "slurm"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
        found[launcher] = parallel_workers(cfg.hydra, 100)
    assert found == {"basic": (1, "the basic launcher: one run after another"),
                     "local_parallel": (2, "joblib n_jobs=2"), "slurm": (16, "SLURM array_parallelism=16")}
    assert makespan([3, 2, 2, 1], 2) == 4 and makespan([3, 2, 2, 1], 1) == 8


def test_a_relaunch_that_would_put_a_run_under_another_job_number_is_refused(tmp_path, capsys):
    """Hydra numbers the jobs in the order of the values: a value added to the last swept key renumbers the points
    after it. Their runs would be trained again in new folders: refused, nothing run."""
    from regstory.planning import plan_runs

    sweep = tmp_path / "sweep"
    first = job_folders(sweep, *TINY, "trainer.lr=0.05,0.1", "seed=0")
    for folder, lr in zip(first, ("0.05", "0.1")):
        run(make_cfg(*TINY, f"trainer.lr={lr}", "seed=0"), run_dir=folder)
    assert len(job_folders(sweep, *TINY, "trainer.lr=0.05,0.1,0.2", "seed=0")) == 3  # new values at the end: fine
    with pytest.raises(SystemExit) as stop:
        plan_runs([*FAST, *TINY, "trainer.lr=0.05,0.1", "seed=0,1"], [f"hydra.sweep.dir={sweep}"], "config",
                  multirun=True)
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("regstory-run: error: 1 of 4 sweep points have their run in another folder of sweep ")
    assert f"[trainer.lr=0.1 seed=0] is in {first[1].name}. Keep the first launch's order" in line
