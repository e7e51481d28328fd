"""Level 3: the CLI as a user types it, in a subprocess."""
import json

from tests.conftest import read_jsonl, run_cli

QUIET = ["logger.wandb.mode=disabled", "trainer.num_threads=1"]


def run_dirs(root):
    return sorted(p.parent for p in root.glob("outputs/**/summary.json"))


def test_regstory_run_mnist1d_from_any_directory(tmp_path):
    proc = run_cli("dataset=mnist1d", "arch=mlp", "trainer.epochs=2", "dataset.num_samples=1000", *QUIET, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    assert {"epoch", "round", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "time_s"} <= set(records[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_test_acc"] == records[-1]["test_acc"]
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "checkpoints" / "last.pt").exists()
    assert "epoch 2/2: " in proc.stdout + proc.stderr  # one plain line per epoch when not on a terminal


def test_multirun_sweeps_noise_and_seed(tmp_path):
    run_cli("-m", "dataset=digits", "arch=mlp", "arch.width=16", "trainer.epochs=1", "noise.rate=0.0,0.5",
            "seed=0,1", *QUIET, cwd=tmp_path)
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 4
    rates = sorted(json.loads((d / "provenance.json").read_text())["seed"] for d in dirs)
    assert rates == [0, 0, 1, 1]


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_unknown_method_lists_the_choices(tmp_path):
    proc = run_cli("method=nope", *QUIET, cwd=tmp_path, check=False)
    assert_one_line_error(proc, "method", "none")


def test_missing_dataset_names_folder_and_flag(tmp_path):
    proc = run_cli("dataset=cifar10", f"data.root={tmp_path / 'empty'}", "data.download=false", *QUIET,
                   cwd=tmp_path, check=False)
    assert_one_line_error(proc, "regstory-run: error: dataset 'cifar10' not found", "data.download=true")
    assert proc.returncode == 2


def test_a_multirun_sweep_is_one_wandb_group(tmp_path):
    run_cli("-m", "dataset=digits", "arch=mlp", "arch.width=8", "trainer.epochs=1", "seed=0,1",
            "logger.wandb.mode=offline", "trainer.num_threads=1", cwd=tmp_path, env={"WANDB_MODE": "offline"})
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    group = f"{sweep.parent.name}_{sweep.name}".encode()
    runs = sorted(sweep.glob("*/wandb/offline-run-*/*.wandb"))
    assert len(runs) == 2
    assert all(group in path.read_bytes() for path in runs)  # the group is stored in each run's record
