"""Hydra launchers: a parallel local sweep (joblib, ``hydra/launcher=local_parallel``) and submitit's local executor
(the same code path as ``hydra/launcher=slurm`` without a SLURM cluster)."""
from __future__ import annotations

import json

import pytest

from tests.cluster.common import TINY
from tests.conftest import make_cfg, read_jsonl, run_cli


def job_dirs(sweep_dir):
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.parametrize("module", [False, True], ids=["regstory-run", "python-m"])
def test_joblib_local_parallel_sweep_runs_two_jobs_with_one_thread_each(tmp_path, module):
    """Also through ``python -m regstory.train``, whose task function joblib could not pickle from ``__main__``."""
    sweep = tmp_path / "sweep"
    run_cli("-m", "hydra/launcher=local_parallel", *TINY, "trainer.epochs=1", "trainer.num_threads=0", "seed=0,1",
            f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={"OMP_NUM_THREADS": "2"}, module=module)
    dirs = job_dirs(sweep)
    assert [d.name.split("_")[0] for d in dirs] == ["0", "1"]
    provenance = [json.loads((d / "provenance.json").read_text()) for d in dirs]
    assert [p["seed"] for p in provenance] == [0, 1]
    assert [p["torch_num_threads"] for p in provenance] == [1, 1], "the preset gives each job one torch thread"
    assert all(len(read_jsonl(d / "metrics.jsonl")) == 1 and (d / "summary.json").exists() for d in dirs)


def test_submitit_local_executor_runs_a_sweep_job(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", *TINY, "trainer.epochs=1",
            "seed=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    (job,) = job_dirs(sweep)
    assert (job / "summary.json").exists() and len(read_jsonl(job / "metrics.jsonl")) == 1
    assert list((sweep / ".submitit").glob("*/*_result.pkl")), "the job ran through submitit"


def test_slurm_preset_composes_with_documented_fields():
    """The SLURM preset extends submitit_slurm (nothing is submitted: config only)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from regstory.train import conf_dir

    make_cfg()  # registers the schemas
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0 and launcher.array_parallelism > 0
