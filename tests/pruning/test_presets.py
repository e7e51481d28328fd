"""Every SDD preset composes, passes the option check and builds its plugins (CIFAR presets are not trained here)."""
import pytest
from hydra.utils import instantiate

from regstory.config import check_targets, check_values
from regstory.distill import Distillation
from regstory.pruning.magnitude import IMP
from tests.conftest import make_cfg

PRESETS = ["sdd_mnist1d", "sdd_resnet18_cifar10", "sdd_resnet18_cifar100", "sdd_distill_cifar10"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_instantiates(preset):
    cfg = make_cfg(f"experiment={preset}")
    check_values(cfg)
    check_targets(cfg)
    assert isinstance(instantiate(cfg.method, _convert_="all"), IMP)
    assert cfg.method.rate == 0.2
    if preset == "sdd_distill_cifar10":
        assert cfg.arch._target_.endswith("vgg_small")
        assert isinstance(instantiate(cfg.distill, _convert_="all"), Distillation)
    if preset.startswith("sdd_resnet18"):
        assert list(cfg.trainer.milestones) == [80, 120] and cfg.trainer.epochs == 160 and cfg.method.rounds == 34


def test_every_method_option_composes():
    for method in ("imp", "twt", "random", "snip"):
        cfg = make_cfg(f"method={method}")
        check_targets(cfg)
        instantiate(cfg.method, _convert_="all")


def test_mnist1d_preset_runs_two_tiny_rounds(tmp_path):
    from regstory.train import run
    summary = run(make_cfg("experiment=sdd_mnist1d", "method.rounds=1", "trainer.epochs=1"), run_dir=tmp_path)
    assert summary["num_rounds"] == 2 and summary["final_sparsity"] == pytest.approx(0.2, abs=1e-4)


def test_unknown_method_option_fails_fast_naming_the_allowed_ones():
    from regstory.config import ConfigError
    cfg = make_cfg("method=imp", "+method.rat=0.2")
    with pytest.raises(ConfigError, match="rat.*allowed: .*rate"):
        check_targets(cfg)
