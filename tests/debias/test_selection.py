"""Model selection of the debiasing plugins (methods-debias.md, common protocol): the direction of the metric, no
test-split keys (refused at construction, so the CLI's preflight stops them before any folder exists), the last round
only, and each method's authors' rule (GroupDRO: worst-group validation accuracy)."""
from types import SimpleNamespace

import pytest

from regstory.config import ConfigError
from regstory.debias.base import SELECTIONS, Vanilla
from regstory.debias.groupdro import GroupDRO
from tests.conftest import make_cfg, run_cli


def record(epoch, val_loss, val_unbiased_acc, round_=0, **extra):
    return {"round": round_, "epoch": epoch, "val_loss": val_loss, "val_unbiased_acc": val_unbiased_acc,
            "val_worst_group_acc": extra.pop("worst", 0.0), "test_unbiased_acc": 0.1 * (epoch + 1), **extra}


HISTORY = [record(0, 2.0, 0.30), record(1, 0.5, 0.20), record(2, 1.0, 0.40), record(3, 0.7, 0.40)]


def select(selection, history=HISTORY):
    return Vanilla(selection=selection).finalize(SimpleNamespace(history=history))


def test_a_loss_is_minimised_and_an_accuracy_maximised():
    by_loss = select("val_loss")
    assert by_loss["selected_epoch"] == 1 and by_loss["selected_score"] == 0.5  # not the worst epoch (0)
    assert by_loss["selected_test_unbiased_acc"] == pytest.approx(0.2)
    by_acc = select("val_unbiased_acc")
    assert by_acc["selected_epoch"] == 2  # the first of the two best epochs
    assert select("last")["last_test_unbiased_acc"] == pytest.approx(0.4) and "selected_epoch" not in select("last")


def test_selection_reads_the_last_round_only_and_skips_nan():
    """Voronoi's round 0 is the vanilla bias-inference model: never the reported one."""
    history = [record(0, 0.1, 0.9), record(0, 0.9, 0.2, round_=1), record(1, 0.8, float("nan"), round_=1),
               record(2, 0.7, 0.3, round_=1)]
    summary = select("val_unbiased_acc", history)
    assert (summary["selected_round"], summary["selected_epoch"]) == (1, 2)


@pytest.mark.parametrize("key", ["test_unbiased_acc", "test_acc", "bias_probe_acc", "irene_head_bias_acc", "val_nope"])
def test_a_selection_that_is_not_a_validation_metric_is_refused_at_construction(key):
    with pytest.raises(ConfigError, match=f"debias.selection.*{key}") as err:
        Vanilla(selection=key)
    assert "\n" not in str(err.value)


def test_every_allowed_selection_is_last_or_a_validation_metric():
    assert all(s == "last" or s.startswith("val_") for s in SELECTIONS)


def test_the_cli_refuses_a_test_selection_before_creating_any_folder(tmp_path):
    proc = run_cli("experiment=debias_digits", "debias.selection=test_unbiased_acc", "hydra.run.dir=run",
                   "logger.wandb.mode=disabled", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "debias.selection" in errors[0] and "test_unbiased_acc" in errors[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def test_groupdro_selects_on_worst_group_validation_accuracy_as_its_authors():
    assert GroupDRO().selection == "val_worst_group_acc"
    for overrides in (["debias=groupdro"], ["experiment=table3_2", "debias=groupdro"]):
        assert make_cfg(*overrides).debias.selection == "val_worst_group_acc", overrides
    # the offline digits' val has ~5 images per group and a worst group at 0 in every epoch: its preset says so
    assert make_cfg("experiment=debias_digits_groupdro").debias.selection == "val_unbiased_acc"
    history = [record(0, 1.0, 0.5, worst=0.1), record(1, 1.0, 0.4, worst=0.3)]
    summary = GroupDRO().finalize(SimpleNamespace(history=history))
    assert summary["selected_epoch"] == 1 and summary["selection"] == "val_worst_group_acc"
