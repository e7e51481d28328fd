"""Resume after a kill: the resumed run ends exactly where an uninterrupted run ends."""
import pytest
from omegaconf import OmegaConf

from regstory.plugins import Plugin
from regstory.train import run
from tests.conftest import make_cfg, read_jsonl
from tests.test_loop import strip_times


class Killed(Exception):
    pass


class CrashAtEpoch(Plugin):
    """Simulates a kill: raises at the start of a given epoch (after the previous epoch's checkpoint) while
    ``armed``; the resumed run keeps the same config (a resume continues with the run's own config) disarmed."""

    armed = True

    def __init__(self, epoch: int):
        self.epoch = epoch

    def start_epoch(self, ctx):
        if CrashAtEpoch.armed and ctx.epoch == self.epoch:
            raise Killed


def crash_then_resume(overrides: list[str], epoch: int, run_dir, monkeypatch) -> dict:
    """Run ``overrides`` with a CrashAtEpoch plugin that kills the run at ``epoch``, then resume it (same config)."""
    crashing = [*overrides, "+plugins.crash._target_=tests.test_resume.CrashAtEpoch", f"+plugins.crash.epoch={epoch}"]
    monkeypatch.setattr(CrashAtEpoch, "armed", True)
    with pytest.raises(Killed):
        run(make_cfg(*crashing), run_dir=run_dir)
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == epoch
    monkeypatch.setattr(CrashAtEpoch, "armed", False)
    return run(make_cfg(*crashing, "resume=true"), run_dir=run_dir)


OVERRIDES = ["dataset=mnist1d", "dataset.num_samples=1000", "arch=mlp", "arch.width=32", "arch.depth=1",
             "trainer.epochs=5", "noise.rate=0.2", "trainer.schedule=multistep", "trainer.milestones=[2]",
             "arch.activation=relu"]


@pytest.mark.parametrize("crash_epoch", [1, 3])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, crash_epoch, monkeypatch):
    full = run(make_cfg(*OVERRIDES), run_dir=tmp_path / "full")
    resumed = crash_then_resume(OVERRIDES, crash_epoch, tmp_path / "killed", monkeypatch)
    assert strip_times(read_jsonl(tmp_path / "killed/metrics.jsonl")) == strip_times(read_jsonl(tmp_path / "full/metrics.jsonl"))
    assert resumed["final_test_acc"] == full["final_test_acc"] and resumed["final_train_loss"] == full["final_train_loss"]


def test_metrics_written_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    run(make_cfg(*OVERRIDES[:-1], "trainer.epochs=2"), run_dir=tmp_path)
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"round": 0, "epoch": 99}\n')  # a record the checkpoint never saw
    run(make_cfg(*OVERRIDES[:-1], "trainer.epochs=2", "resume=true"), run_dir=tmp_path)
    assert [r["epoch"] for r in read_jsonl(path)] == [0, 1]


def test_resume_without_checkpoint_says_what_to_do(tmp_path):
    from regstory.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="hydra.run.dir=<run dir> resume=true"):
        run(make_cfg("dataset=digits", "resume=true"), run_dir=tmp_path)


@pytest.mark.parametrize("how", ["resume=true", "requeued"])
def test_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, monkeypatch, how):
    """With the 30 s checkpoint interval a fast run can write epochs before any checkpoint. Resuming it (or a SLURM
    requeue, which passes resume=false) starts it over instead of refusing: 'no checkpoint' / 'dir already taken'."""
    slow = ["trainer.checkpoint_interval_s=3600", "trainer.epochs=3"]
    full = run(make_cfg(*OVERRIDES, *slow), run_dir=tmp_path / "full")
    crashing = make_cfg(*OVERRIDES, *slow)
    crashing.method = OmegaConf.create({"_target_": "tests.test_resume.CrashAtEpoch", "epoch": 2})
    with pytest.raises(Killed):
        run(crashing, run_dir=tmp_path / "killed")
    assert len(read_jsonl(tmp_path / "killed/metrics.jsonl")) == 2
    assert not (tmp_path / "killed/checkpoints/last.pt").exists()
    if how == "requeued":
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    resumed = run(make_cfg(*OVERRIDES, *slow, "resume=true" if how == "resume=true" else "resume=false"),
                  run_dir=tmp_path / "killed")
    assert strip_times(read_jsonl(tmp_path / "killed/metrics.jsonl")) == strip_times(read_jsonl(tmp_path / "full/metrics.jsonl"))
    assert resumed["final_test_acc"] == full["final_test_acc"]


def test_fp16_run_checkpoints_its_grad_scaler_and_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """The fp16 path (autocast, GradScaler, foreach SGD) needs CUDA in real runs; here it runs on CPU, where
    ``check_precision`` would refuse it for speed alone."""
    from regstory.checkpoint import LAST, load_checkpoint

    monkeypatch.setattr("regstory.train.check_precision", lambda precision, device: None)
    fp16 = [*OVERRIDES, "trainer.precision=fp16"]
    full = run(make_cfg(*fp16), run_dir=tmp_path / "full")
    resumed = crash_then_resume(fp16, 3, tmp_path / "killed", monkeypatch)
    scaler = load_checkpoint(tmp_path / "killed" / "checkpoints" / LAST)["scaler"]
    assert scaler is not None and scaler["scale"] > 0
    assert strip_times(read_jsonl(tmp_path / "killed/metrics.jsonl")) == strip_times(read_jsonl(tmp_path / "full/metrics.jsonl"))
    assert resumed["final_train_loss"] == full["final_train_loss"]


def test_resume_continues_with_the_runs_own_config_and_refuses_changes(tmp_path, monkeypatch):
    """The resumed run's config is the saved one: what the command line changes is refused in one line (naming
    every key), except safe keys and more epochs, which are recorded in resumes.jsonl; config.yaml is never
    rewritten."""
    from regstory.config import ConfigError
    from regstory.resume import config_for_resume

    monkeypatch.setattr(CrashAtEpoch, "armed", True)
    crashing = [*OVERRIDES, "+plugins.crash._target_=tests.test_resume.CrashAtEpoch", "+plugins.crash.epoch=2"]
    with pytest.raises(Killed):
        run(make_cfg(*crashing), run_dir=tmp_path)
    saved = (tmp_path / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"arch.width=64 \(the run has 32\), trainer.lr=0.5 \(the run has 0.05\)\. Drop"):
        config_for_resume(make_cfg(*crashing, "trainer.lr=0.5", "arch.width=64", "resume=true"), tmp_path,
                          explicit=["trainer.lr", "arch.width"])
    with pytest.raises(ConfigError, match="trainer.epochs=4"):  # fewer epochs
        config_for_resume(make_cfg(*crashing, "trainer.epochs=4", "resume=true"), tmp_path)
    # only the keys the command line names count: defaults that differ (no dataset= given) are taken from the run
    cfg, changes = config_for_resume(make_cfg("trainer.epochs=7", "trainer.num_threads=1", "resume=true"), tmp_path,
                                     explicit=["trainer.epochs", "trainer.num_threads", "resume"])
    assert cfg.dataset.num_samples == 1000 and cfg.arch.width == 32 and cfg.trainer.epochs == 7
    assert changes == {"trainer.epochs": [5, 7]}  # num_threads=1 is the run's value too (the tests' default)
    monkeypatch.setattr(CrashAtEpoch, "armed", False)
    run(make_cfg(*crashing, "trainer.epochs=7", "resume=true"), run_dir=tmp_path)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(7))
    assert (tmp_path / "config.yaml").read_bytes() == saved
    assert read_jsonl(tmp_path / "resumes.jsonl")[-1]["changed"] == {"trainer.epochs": [5, 7]}
