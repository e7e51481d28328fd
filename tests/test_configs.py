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


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_selects_a_schema_and_repeats_none_of_its_defaults(group, option):
    """The schema is the one source of defaults: an option's YAML selects it and sets only values that differ."""
    import dataclasses

    import yaml
    from omegaconf import OmegaConf

    text = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
    assert text.get("defaults", [None])[0].endswith("_schema") and text["defaults"][-1] == "_self_"
    schema = OmegaConf.get_type(make_cfg(f"{group}={option}")[group])
    assert dataclasses.is_dataclass(schema)
    defaults = {f.name: f.default for f in dataclasses.fields(schema) if f.default is not dataclasses.MISSING}
    repeated = [k for k, v in text.items() if k != "defaults" and k in defaults and defaults[k] == v]
    assert repeated == []


def test_classes_take_their_defaults_from_the_same_schema_as_the_yaml():
    from hydra.utils import instantiate

    from regstory.pruning.twt import TWT

    for method in ("imp", "random", "snip", "twt"):
        cfg = make_cfg(f"method={method}")
        direct = get_object(cfg.method._target_)()
        assert direct.rounds == cfg.method.rounds == instantiate(cfg.method).rounds
    assert TWT().rounds == 10


def test_pruning_methods_inherit_the_shared_keys_from_one_base_schema():
    from omegaconf import OmegaConf

    from regstory.options import schema_of
    from regstory.pruning.base import PruningOptions
    from regstory.pruning.magnitude import IMP

    for method in ("imp", "random", "snip", "twt"):
        assert issubclass(OmegaConf.get_type(make_cfg(f"method={method}").method), PruningOptions)
    assert {"rate", "scope", "rounds", "stop", "remask_after_step"} <= set(
        f.name for f in __import__("dataclasses").fields(schema_of(IMP)))


def test_a_new_method_is_one_decorated_class():
    """A subclass declaring its own options with @option gets a registered schema with the inherited keys, and
    checked constructor arguments (register_configs imports regstory.pruning's modules and stores it)."""
    import dataclasses
    from typing import Annotated

    from regstory.config import ConfigError
    from regstory.options import OPTIONS, Range, option
    from regstory.pruning.base import PruningOptions, PruningSweep

    @option("method", "test_only_method")
    class Halve(PruningSweep):
        def __init__(self, factor: Annotated[float, Range(gt=0, le=1)] = 0.5, **common):
            super().__init__(**common)
            self.factor = factor

    try:
        schema = OPTIONS[("method", "test_only_method")]
        assert issubclass(schema, PruningOptions) and "factor" in {f.name for f in dataclasses.fields(schema)}
        assert Halve(rounds=3).factor == 0.5 and Halve(rounds=3).rounds == 3
        with pytest.raises(ConfigError, match=r"method.factor must be a number in \(0, 1\], got 2"):
            Halve(factor=2)
    finally:
        OPTIONS.pop(("method", "test_only_method"), None)


def test_constructors_check_types_and_ranges_by_key():
    from regstory.config import ConfigError
    from regstory.debias.irene import IRENE
    from regstory.models import create
    from regstory.pruning.magnitude import IMP

    with pytest.raises(ConfigError, match="method.rate must be a number in"):
        IMP(rate="abc")
    with pytest.raises(ConfigError, match="debias.head_steps must be an integer >= 1, got 0"):
        IRENE(head_steps=0)
    with pytest.raises(ConfigError, match="arch.width must be an integer >= 1, got 0"):
        create("mlp", (40,), 10, width=0)
