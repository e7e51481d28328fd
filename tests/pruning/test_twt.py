"""TWT threshold bisection (thesis Fig. 2.3) on toy losses."""
import math

import pytest
import torch

from regstory.config import ConfigError
from regstory.pruning.twt import find_threshold
from regstory.train import run
from tests.conftest import make_cfg

MAGS = [torch.linspace(0.01, 1.0, 100), torch.linspace(0.01, 2.0, 100)]  # T0 = (0.505 + 1.005) / 2 = 0.755


def test_fig_2_3_bisection_finds_the_largest_threshold_within_the_tolerated_worsening():
    loss = lambda t: 1.0 + t ** 2  # noqa: E731  (monotone in T; L(0) = 1)
    twt = 0.21  # bound 1.21 -> T* = sqrt(0.21) = 0.458 < T0: searched in [0, T0]
    t, evals = find_threshold(loss, MAGS, twt, eps=1e-4, loss_tol=1e-6)
    assert loss(t) <= 1.21 + 1e-12
    assert t == pytest.approx(math.sqrt(0.21), abs=2 * 1e-4 * 2.0)
    assert evals < 30


def test_bisection_searches_above_t0_when_t0_is_tolerated():
    loss = lambda t: 1.0 + 0.1 * t  # noqa: E731  bound 1.15 -> T* = 1.5 in [T0, max]
    t, _ = find_threshold(loss, MAGS, 0.15, eps=1e-4, loss_tol=1e-6)
    assert 1.5 - 1e-3 <= t <= 1.5


def test_whole_range_tolerated_returns_max_and_loss_interval_stops_early():
    assert find_threshold(lambda t: 1.0, MAGS, 0.05)[0] == pytest.approx(2.0)
    t, evals = find_threshold(lambda t: 1.0 + t ** 2, MAGS, 0.21, eps=1e-9, loss_tol=0.05)
    assert evals < 10 and 1.0 + t ** 2 <= 1.21


def test_twt_fails_clearly_without_a_validation_split(tmp_path):
    with pytest.raises(ConfigError, match="val_fraction"):
        run(make_cfg("dataset=digits", "method=twt", "trainer.epochs=1"), run_dir=tmp_path)


def test_twt_end_to_end_prunes_with_a_validation_split(tmp_path):
    run(make_cfg("dataset=digits", "method=twt", "method.rounds=1", "dataset.val_fraction=0.2",
                 "trainer.epochs=3", "method.twt=0.1"), run_dir=tmp_path)
    from tests.conftest import read_jsonl
    rounds = read_jsonl(tmp_path / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["twt_threshold"] > 0 and rounds[1]["sparsity"] > 0


def test_twt_fine_tunes_the_pruned_weights_by_default_and_can_still_rewind():
    """Fig. 2.2: the threshold is chosen on the trained weights, which are then fine-tuned (it rewound by default,
    throwing them away)."""
    from regstory.pruning.twt import TWT

    assert TWT().retrain == "finetune" and TWT(retrain="rewind").retrain == "rewind"
    cfg = make_cfg("method=twt")
    assert cfg.method.retrain == "finetune" and cfg.method.rounds == 10
    assert make_cfg("method=twt", "method.retrain=rewind").method.retrain == "rewind"


def test_the_cli_holds_out_a_validation_split_for_methods_that_need_one(tmp_path):
    """``regstory-run method=lobster`` as typed: 10% held out, said in one line; an explicit choice is kept, and a
    method that needs none gets none."""
    from tests.conftest import run_cli

    common = ["dataset=digits", "arch=lenet300", "trainer.epochs=1", "method.rounds=1", "logger.wandb.mode=disabled",
              "logger.progress=none"]
    proc = run_cli("method=lobster", *common, "hydra.run.dir=a", cwd=tmp_path)
    assert "method (Lobster) needs a validation split: 10% of the training set is held out" in proc.stderr
    assert "val_fraction: 0.1" in (tmp_path / "a" / "config.yaml").read_text()
    proc = run_cli("method=twt", *common, "dataset.val_fraction=0.3", "hydra.run.dir=b", cwd=tmp_path)
    assert "needs a validation split" not in proc.stderr
    assert "val_fraction: 0.3" in (tmp_path / "b" / "config.yaml").read_text()
    proc = run_cli("method=imp", *common, "hydra.run.dir=c", cwd=tmp_path)
    assert "needs a validation split" not in proc.stderr
    assert "val_fraction: 0.0" in (tmp_path / "c" / "config.yaml").read_text()
