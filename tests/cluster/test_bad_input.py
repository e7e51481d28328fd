"""Bad input over the CLI (fuzz-style table) and faults in-process (disk full, NaN loss): each ends with a clear
message and no Python traceback, and never changes the bytes of an existing run's checkpoint or metrics."""
from __future__ import annotations

import errno
import shutil

import pytest
import torch

import regstory.checkpoint
from regstory.checkpoint import load_checkpoint
from regstory.train import run, run_or_exit
from tests.cluster.common import TINY, comparable
from tests.conftest import make_cfg, read_jsonl, run_cli

PROTECTED = ("checkpoints/last.pt", "metrics.jsonl", "rounds.jsonl", "summary.json")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch run whose files every bad invocation below must leave byte-for-byte alone."""
    run_dir = tmp_path_factory.mktemp("finished")
    run(make_cfg(*TINY, "trainer.epochs=2"), run_dir=run_dir)
    return run_dir


def snapshot(run_dir):
    return {name: (run_dir / name).read_bytes() for name in PROTECTED if (run_dir / name).exists()}


# (case id, extra CLI args, exit code, text the message must contain); {run} = the finished run, {empty} = an empty dir
CASES = [
    ("unknown-group-option", ["method=nope"], 2, "Could not find 'method/nope'; available options in 'method': imp, lobster, "),
    ("unknown-key", ["trainer.nope=1"], 2, "trainer.nope is not a key of trainer; allowed: epochs"),
    ("wrong-type", ["trainer.epochs=abc"], 2, "trainer.epochs must be an integer >= 1, got abc"),
    ("wrong-type-in-a-derived-schema", ["method=imp", "method.rate=abc"], 2, "method.rate must be a number in (0, 1), got abc"),
    ("negative-epochs", ["trainer.epochs=-3"], 2, "trainer.epochs must be an integer >= 1, got -3"),
    ("noise-rate-above-1", ["noise.rate=1.5"], 2, "noise.rate must be a number in [0, 1), got 1.5"),
    ("negative-width", ["arch.width=-3"], 2, "arch.width must be an integer >= 1, got -3"),
    ("unknown-compile-mode", ["trainer.compile_mode=fastest"], 2,
     "trainer.compile_mode must be one of default, reduce-overhead"),
    ("debias-without-bias-labels", ["dataset=digits", "debias=end", "hydra.run.dir={empty}/run"], 2,
     "debias plugins need a dataset with bias labels"),
    ("fp16-on-cpu", ["trainer.precision=fp16", "trainer.device=cpu"], 2, "trainer.precision=fp16 needs a CUDA device"),
    ("resume-with-another-config", ["dataset=cifar10", "data.download=false", "data.root={empty}", "resume=true"], 2,
     "resume=true continues the run in"),
    ("missing-data", ["dataset=cifar10", "data.download=false", "data.root={empty}", "hydra.run.dir={empty}/new"], 2,
     "dataset 'cifar10' not found"),
    ("fresh-run-into-existing-run", [], 2, "already holds a run"),
]


@pytest.mark.parametrize("args,code,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_cli_input_gives_clear_error_and_keeps_existing_run(tmp_path, finished_run, args, code, expected):
    before = snapshot(finished_run)
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(run=finished_run, empty=empty) for a in args]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={finished_run}")
    proc = run_cli(*TINY, "trainer.epochs=2", *args, cwd=tmp_path, check=False)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert expected in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], "exactly one line"
    assert proc.stderr.startswith("regstory-run: error: ")
    assert snapshot(finished_run) == before
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()



def test_corrupt_checkpoint_with_resume_is_one_line_error_and_file_untouched(tmp_path, finished_run):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    ckpt = run_dir / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated, as by a disk that filled up mid-copy
    before = snapshot(run_dir)
    proc = run_cli(*TINY, "trainer.epochs=2", "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"regstory-run: error: checkpoint '{ckpt}' is unreadable")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert snapshot(run_dir) == before


def test_disk_full_on_checkpoint_write_keeps_previous_checkpoint_and_resume_finishes(tmp_path, monkeypatch, capsys):
    """The 2nd checkpoint write fails with ENOSPC: one-line error, exit 2, the 1st checkpoint intact and loadable;
    once space is back, resume=true ends exactly like an uninterrupted run."""
    real_write = regstory.checkpoint.atomic_write_bytes
    written: list[bytes] = []

    def write_then_fill_disk(path, data):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)
        written.append(data)

    monkeypatch.setattr(regstory.checkpoint, "atomic_write_bytes", write_then_fill_disk)
    cfg = make_cfg(*TINY, "trainer.epochs=3")
    with pytest.raises(SystemExit) as exit_info:
        run_or_exit(cfg, run_dir=tmp_path)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("regstory-run: error: cannot write checkpoint") and "No space left on device" in err
    assert len(err.strip().splitlines()) == 1
    ckpt = tmp_path / "checkpoints" / "last.pt"
    assert ckpt.read_bytes() == written[0]
    assert load_checkpoint(ckpt)["position"]["epoch"] == 1
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.pt"], "no temporary file left behind"

    monkeypatch.setattr(regstory.checkpoint, "atomic_write_bytes", real_write)
    run(make_cfg(*TINY, "trainer.epochs=3", "resume=true"), run_dir=tmp_path)
    straight = tmp_path / "straight"
    run(cfg, run_dir=straight)
    assert comparable(read_jsonl(tmp_path / "metrics.jsonl")) == comparable(read_jsonl(straight / "metrics.jsonl"))


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path, capsys):
    """A NaN loss from epoch 2 on: the run stops in epoch 2 with one line; the checkpoint stays at the end of
    epoch 1 (finite weights) and metrics.jsonl holds only the two good epochs."""
    cfg = make_cfg(*TINY, "trainer.epochs=5", "method._target_=tests.cluster.helpers.NaNLossAt", "+method.at_epoch=2")
    with pytest.raises(SystemExit) as exit_info:
        run_or_exit(cfg, run_dir=tmp_path)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("regstory-run: error: training loss became nan in round 1, epoch 3/5")
    assert "last good checkpoint kept" in err and len(err.strip().splitlines()) == 1
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["position"]["epoch"] == 2 and not ckpt["position"]["finished"]
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1]
    assert not (tmp_path / "summary.json").exists()


def test_huge_learning_rate_diverges_to_a_clear_error(tmp_path, capsys):
    cfg = make_cfg(*TINY, "trainer.epochs=5", "trainer.lr=1e12")
    with pytest.raises(SystemExit):
        run_or_exit(cfg, run_dir=tmp_path)
    assert "training loss became" in capsys.readouterr().err
