"""Level 1: every option of every config group composes, and its target accepts its keys."""
from pathlib import Path

import pytest
from hydra.utils import get_object

from regstory.config import check_targets, check_values
from regstory.train import conf_dir
from tests.conftest import make_cfg

CONF = Path(conf_dir())
GROUPS = ["dataset", "arch", "noise", "method", "debias", "distill", "trainer", "logger"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_its_target_accepts_its_keys(group, option):
    cfg = make_cfg(f"{group}={option}")
    check_values(cfg)
    check_targets(cfg)
    node = cfg[group]
    if "_target_" in node:
        assert callable(get_object(node._target_))


def test_typo_in_an_override_fails_fast():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigKeyError

    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        make_cfg("trainer.epoch=3")
    with pytest.raises(Exception, match="optimizer"):
        make_cfg("trainer.optimizer=sgdd")


def test_unknown_option_lists_available_ones():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="resnet32"):
        make_cfg("arch=resnet33")


@pytest.mark.parametrize("override, key", [("trainer.epochs=-1", "trainer.epochs"), ("noise.rate=1.5", "noise.rate"),
                                           ("trainer.lr=0", "trainer.lr"), ("dataset.val_fraction=1.2", "val_fraction"),
                                           ("trainer.checkpoint_interval_s=-1", "trainer.checkpoint_interval_s")])
def test_out_of_range_values_name_the_key(override, key):
    from regstory.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        check_values(make_cfg(override))
