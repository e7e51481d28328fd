"""Every debiasing method end to end on the offline biased digits (tiny: 2 epochs), plus the CLI and the presets."""
import json
import math

import pytest
import torch

from regstory.train import run
from tests.conftest import make_cfg, read_jsonl, run_cli

TINY = ["dataset=biased_digits", "arch=simple_convnet_small", "arch.channels=[8,16,16]", "dataset.test_colours=2",
        "dataset.val_colours=1", "trainer.epochs=2", "trainer.optimizer=adam", "trainer.lr=0.001", "debias.probe_steps=20"]
METHODS = ["vanilla", "end", "irene", "voronoi", "lff", "groupdro"]


def run_preset_cli(cwd, preset: str, *overrides: str, epochs: int = 1):
    """``regstory-run experiment=<preset>`` as a user types it, on a tiny network and tiny splits (W&B off, one
    thread), in ``cwd/run``; returns that folder and its summary."""
    run_cli(f"experiment={preset}", f"trainer.epochs={epochs}", "dataset.test_colours=1", "dataset.val_colours=1",
            "arch.channels=[8,16,16]", "debias.probe_steps=10", "logger.wandb.mode=disabled", "logger.progress=none",
            "trainer.num_threads=1", *overrides, "hydra.run.dir=run", cwd=cwd)
    return cwd / "run", json.loads((cwd / "run" / "summary.json").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_logs_debias_metrics(method, tmp_path):
    summary = run(make_cfg(*TINY, f"debias={method}"), run_dir=tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    for key in ("test_unbiased_acc", "test_conflicting_acc", "test_worst_group_acc", "bias_probe_acc", "val_unbiased_acc"):
        assert all(0.0 <= r[key] <= 1.0 for r in records), key
    selection = "val_worst_group_acc" if method == "groupdro" else "val_unbiased_acc"  # each authors' rule
    assert summary["selection"] == selection
    assert summary["selected_epoch"] in (0, 1)
    assert summary["last_test_unbiased_acc"] == records[-1]["test_unbiased_acc"]
    last_round = [r for r in records if r["round"] == records[-1]["round"]]
    best = max(last_round, key=lambda r: r[selection])
    assert summary["selected_round"] == records[-1]["round"]
    assert summary["selected_test_unbiased_acc"] == best["test_unbiased_acc"]  # chosen by val, not by test
    if method == "voronoi":
        rounds = read_jsonl(tmp_path / "rounds.jsonl")
        assert len(rounds) == 2 and rounds[0]["voronoi_e_star"] == 1 and summary["selected_round"] == 1
    if method == "irene":
        assert 0.0 <= summary["last_irene_head_bias_acc"] <= 1.0
    if method in ("end", "irene", "voronoi"):
        assert any(k.startswith("loss/") for k in records[-1])


def test_debias_plugin_evaluates_every_epoch_and_the_loop_does_not_evaluate_again(tmp_path, monkeypatch):
    """The plugin's own pass reports loss and accuracy of val and test every epoch (model selection needs them);
    the loop's evaluation pass, which used to run again at the last epoch, is skipped."""
    def no_second_pass(*args, **kwargs):
        raise AssertionError("the loop evaluated although a debias plugin evaluates the splits itself")

    monkeypatch.setattr("regstory.loop.evaluate", no_second_pass)
    run(make_cfg(*TINY, "debias=vanilla", "trainer.eval_every=1"), run_dir=tmp_path)
    for record in read_jsonl(tmp_path / "metrics.jsonl"):
        for split in ("val", "test"):
            assert record[f"{split}_loss"] > 0 and 0 <= record[f"{split}_acc"] <= 1


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # fp16: the scaler skipped every step
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_under_autocast_as_it_does_in_fp32(method, precision, tmp_path, monkeypatch):
    """Autocast hands half-precision features to plugins that step fp32 heads after backward, outside autocast
    (IRENE's and Voronoi's H crashed on them), and runs their loss terms in half precision (the MI proxy's 1e-15
    clamp is 0 in fp16: Voronoi's round 1 went NaN). A half-precision run must follow the fp32 run of the same
    seed: the same training losses epoch by epoch (to 5%), finite throughout, and a test accuracy within 5 points.
    fp16 needs CUDA in real runs; on CPU only its speed is wrong."""
    monkeypatch.setattr("regstory.train.check_precision", lambda precision, device: None)
    common = [*TINY, f"debias={method}", "trainer.optimizer=sgd", "trainer.lr=0.05"]
    reference = run(make_cfg(*common, "trainer.precision=fp32"), run_dir=tmp_path / "fp32")
    summary = run(make_cfg(*common, f"trainer.precision={precision}"), run_dir=tmp_path / precision)
    ref, half = (read_jsonl(tmp_path / p / "metrics.jsonl") for p in ("fp32", precision))
    assert len(half) == len(ref) and all(math.isfinite(r["train_loss"]) for r in half)
    # Voronoi's round 1 re-weights by 1 / rho^ from 2 epochs of inference: losses of 1e6, where rounding moves them
    compared = [(a, b) for a, b in zip(ref, half) if a["round"] == 0]
    for a, b in compared:
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05), (a["epoch"], a["train_loss"], b["train_loss"])
    assert abs(summary["last_test_acc"] - reference["last_test_acc"]) <= 0.05
    assert abs(summary["last_test_unbiased_acc"] - reference["last_test_unbiased_acc"]) <= 0.05


def test_debias_plugin_refuses_a_dataset_without_bias_labels(tmp_path):
    with pytest.raises(ValueError, match="bias labels"):
        run(make_cfg("dataset=digits", "arch=mlp", "trainer.epochs=1", "debias=vanilla"), run_dir=tmp_path)


def test_unknown_debias_option_fails_fast(tmp_path):
    from regstory.config import ConfigError

    with pytest.raises(ConfigError, match="alpah"):
        run(make_cfg(*TINY, "debias=end", "+debias.alpah=1"), run_dir=tmp_path)


@pytest.mark.parametrize("method", METHODS[1:])
def test_each_method_takes_its_own_and_the_shared_metric_options_by_name(method):
    """Subclasses inherit selection/probe_every/probe_steps (the DebiasOptions schema): the checked signature lists
    them, and they reach the base class."""
    import inspect

    from hydra.utils import get_class

    from regstory.debias.base import DebiasPlugin

    cfg = make_cfg(*TINY, f"debias={method}")
    cls = get_class(cfg.debias._target_)
    params = inspect.signature(cls).parameters
    assert {"selection", "probe_every", "probe_steps"} <= set(params) and not any(
        p.kind is p.VAR_KEYWORD for p in params.values())
    assert set(params) - {"selection", "probe_every", "probe_steps"} <= set(inspect.signature(cls.__init__).parameters)
    plugin = cls(selection="last", probe_every=3, probe_steps=7)
    assert isinstance(plugin, DebiasPlugin) and (plugin.selection, plugin.probe_every, plugin.probe_steps) == ("last", 3, 7)


def test_cli_end_with_digits_preset(tmp_path):
    run_cli("experiment=debias_digits_end", "trainer.epochs=1", "dataset.test_colours=1", "dataset.val_colours=1",
            "debias.probe_steps=10", "logger.wandb.mode=disabled", "logger.progress=none", "trainer.num_threads=1",
            "hydra.run.dir=run", cwd=tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["selection"] == "val_unbiased_acc" and "selected_test_conflicting_acc" in summary


@pytest.mark.parametrize("preset", ["debias_digits", "debias_digits_end", "debias_digits_irene", "debias_digits_voronoi",
                                    "debias_digits_lff", "debias_digits_groupdro", "table3_1", "table3_2"])
def test_presets_compose_and_instantiate_their_method(preset):
    from hydra.utils import instantiate

    from regstory.config import check_targets

    cfg = make_cfg(f"experiment={preset}")
    check_targets(cfg)
    plugin = instantiate(cfg.debias)
    assert plugin.selection.startswith("val_")
    if preset == "debias_digits_end":
        assert (cfg.debias.alpha, cfg.debias.beta) == (5.0, 10.0)


def test_irene_digits_preset_uses_the_authors_schedule_scaled_to_its_epochs():
    """IRENE's train.py optimiser (SGD 0.1, momentum 0.9, wd 1e-4; H at lr 0.1) and its MultiStepLR [40, 60] of 100
    epochs scaled to the preset's 150."""
    cfg = make_cfg("experiment=debias_digits_irene")
    t = cfg.trainer
    assert (str(t.optimizer), t.lr, t.momentum, t.weight_decay, str(t.schedule)) == ("sgd", 0.1, 0.9, 1e-4, "multistep")
    assert cfg.debias.head_lr == 0.1 and t.gamma == 0.1 and t.epochs == 150
    assert list(t.milestones) == [round(40 * t.epochs / 100), round(60 * t.epochs / 100)]


def test_simple_convnet_bottleneck_is_tanh_bounded():
    from regstory.models.simple_convnet import simple_convnet

    model = simple_convnet((3, 28, 28), 10)
    logits, z = model(torch.randn(2, 3, 28, 28), return_features=True)
    assert logits.shape == (2, 10) and z.shape == (2, 128) and z.abs().max() <= 1
    assert sum(p.numel() for p in model.parameters()) > 500_000  # 4 x Conv7 3-16-32-64-128 (ReBias)
