import pytest
import torch
from omegaconf import OmegaConf

from regstory.loop import NonFiniteLossError, build_optimizer, build_scheduler
from regstory.plugins import Plugin, StepOutput
from regstory.train import run
from tests.conftest import make_cfg, read_jsonl


def test_loss_goes_down_on_digits(tmp_path):
    run(make_cfg("dataset=digits", "arch=mlp", "arch.width=64", "trainer.epochs=8", "trainer.lr=0.1"), run_dir=tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in records] == list(range(8))
    assert records[-1]["train_loss"] < 0.5 * records[0]["train_loss"]
    assert records[-1]["test_acc"] > 0.8


def strip_times(records):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def test_same_config_gives_identical_metrics_twice(tmp_path):
    overrides = ["dataset=mnist1d", "dataset.num_samples=1000", "arch=mlp", "arch.width=32", "trainer.epochs=3",
                 "noise.rate=0.2", "seed=5"]
    run(make_cfg(*overrides), run_dir=tmp_path / "a")
    run(make_cfg(*overrides), run_dir=tmp_path / "b")
    a, b = read_jsonl(tmp_path / "a/metrics.jsonl"), read_jsonl(tmp_path / "b/metrics.jsonl")
    assert strip_times(a) == strip_times(b)
    run(make_cfg(*overrides[:-1], "seed=6"), run_dir=tmp_path / "c")
    assert strip_times(read_jsonl(tmp_path / "c/metrics.jsonl")) != strip_times(a)


class ExtraTerm(Plugin):
    """A test plugin: adds a named L2 term and counts hook calls."""

    def __init__(self, weight: float = 0.0):
        self.weight = weight
        self.calls = {"after_backward": 0, "after_step": 0}

    def extra_loss(self, ctx, batch, out: StepOutput):
        return {"l2": self.weight * sum((p ** 2).sum() for p in ctx.model.parameters())}

    def after_backward(self, ctx):
        self.calls["after_backward"] += 1

    def after_step(self, ctx):
        self.calls["after_step"] += 1

    def end_epoch(self, ctx):
        return {"hook_calls": dict(self.calls)["after_step"]}


def test_plugin_terms_are_logged_and_hooks_called_every_step(tmp_path):
    cfg = make_cfg("dataset=digits", "arch=mlp", "arch.width=16", "trainer.epochs=2", "trainer.batch_size=100")
    cfg.method = OmegaConf.create({"_target_": "tests.test_loop.ExtraTerm", "weight": 1e-3})
    run(cfg, run_dir=tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    steps_per_epoch = -(-1257 // 100)
    assert [r["hook_calls"] for r in records] == [steps_per_epoch, 2 * steps_per_epoch]
    assert records[0]["loss/l2"] > 0


def test_unknown_plugin_option_fails_fast(tmp_path):
    import pytest

    from regstory.config import ConfigError

    cfg = make_cfg("dataset=digits")
    cfg.method = OmegaConf.create({"_target_": "tests.test_loop.ExtraTerm", "wieght": 1.0})
    with pytest.raises(ConfigError, match="method: unknown option.*wieght.*allowed: weight"):
        run(cfg, run_dir=tmp_path)


def test_nonfinite_loss_stops_with_clear_message(tmp_path):
    import pytest

    cfg = make_cfg("dataset=digits", "arch=mlp", "trainer.epochs=3", "trainer.lr=1e30", "trainer.momentum=0")
    with pytest.raises(NonFiniteLossError, match="training loss became"):
        run(cfg, run_dir=tmp_path)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # the schedule alone, no training steps
def test_schedules_follow_the_config():
    cfg = make_cfg("trainer.schedule=multistep", "trainer.milestones=[2,4]", "trainer.lr=1.0", "trainer.epochs=6")
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg.trainer)
    sched = build_scheduler(opt, cfg.trainer)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == [1.0, 1.0, 0.1, 0.1, 0.010000000000000002, 0.010000000000000002]
    cfg = make_cfg("trainer.optimizer=adamw", "trainer.schedule=cosine", "trainer.epochs=4")
    assert isinstance(build_optimizer(model, cfg.trainer), torch.optim.AdamW)


def _saved_positions(monkeypatch, clock_step_s: float) -> list:
    """Positions of the checkpoints a run writes, with the loop's clock advancing ``clock_step_s`` per reading."""
    import time
    from types import SimpleNamespace

    import regstory.loop as loop

    saved, now = [], [0.0]

    def fake_monotonic():
        now[0] += clock_step_s
        return now[0]

    real_save = loop.save
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=fake_monotonic, perf_counter=time.perf_counter))
    monkeypatch.setattr(loop, "save", lambda ctx, r, e, round_started, finished=False: (
        saved.append((r, e, round_started)), real_save(ctx, r, e, round_started, finished)))
    return saved


def test_mid_round_checkpoints_are_at_least_checkpoint_interval_s_apart(tmp_path, monkeypatch):
    """Each clock reading advances 20 s: with a 30 s interval a checkpoint is due every second epoch; a round's last
    epoch and its end always write one."""
    saved = _saved_positions(monkeypatch, 20.0)
    run(make_cfg("dataset=digits", "trainer.epochs=6", "trainer.checkpoint_interval_s=30"), run_dir=tmp_path)
    assert saved == [(0, 2, True), (0, 4, True), (0, 6, True), (1, 0, False)]


def test_a_fast_run_checkpoints_only_at_round_ends_by_default(tmp_path, monkeypatch):
    """The 30 s default: a small model's epoch takes ~0.1 s, and a checkpoint after each cost ~5% of the run."""
    saved = _saved_positions(monkeypatch, 0.001)
    cfg = make_cfg("logger.wandb.mode=disabled", "logger.progress=none", "trainer.num_threads=1", "dataset=digits",
                   "trainer.epochs=4", "method=imp", "method.rounds=1", fast=False)
    assert cfg.trainer.checkpoint_interval_s == 30
    run(cfg, run_dir=tmp_path)
    assert saved == [(0, 4, True), (1, 0, False), (1, 4, True), (2, 0, False)]


def test_checkpoint_interval_zero_checkpoints_every_epoch(tmp_path, monkeypatch):
    saved = _saved_positions(monkeypatch, 0.001)
    run(make_cfg("dataset=digits", "trainer.epochs=3", "trainer.checkpoint_interval_s=0"), run_dir=tmp_path)
    assert saved == [(0, 1, True), (0, 2, True), (0, 3, True), (1, 0, False)]
