"""Bad input generated from the option schemas: for every key of every option of every group, a value of the wrong
type and (where the schema has a range or choices) an out-of-range value each fail with one ConfigError naming the
key. In-process (compose + check only); a few CLI cases check exit status 2, one stderr line and no run directory."""
from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from regstory.config import RegstoryConfig, compose_checked, register_configs
from regstory.options import ConfigError, Mapping, OneOf, Range, _split, hints
from regstory.train import conf_dir
from tests.conftest import FAST, run_cli

GROUPS = ["dataset", "arch", "noise", "method", "debias", "distill", "trainer", "logger"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((Path(conf_dir()) / g).glob("*.yaml"))]


def wrong_type(annotation: Any) -> str | None:
    """A command-line value that no field of this type accepts (None: the field takes anything)."""
    tp, _, marks = _split(annotation)
    if any(isinstance(m, Mapping) for m in marks):
        return "5"
    origin = get_origin(tp) or tp
    if origin in (list, tuple):
        return "abc"
    if tp in (bool, int, float):
        return "abc"
    if tp is str or (isinstance(tp, type) and issubclass(tp, Enum)):
        return "[1,2]"
    return None


def out_of_range(annotation: Any) -> str | None:
    """A value of the right type outside the field's Range or choices (None: the field has neither)."""
    tp, _, marks = _split(annotation)
    is_list = (get_origin(tp) or tp) in (list, tuple)
    item = _split(get_args(tp)[0])[0] if is_list else tp
    if isinstance(tp, type) and issubclass(tp, Enum) or any(isinstance(m, OneOf) for m in marks):
        return "not_an_option"
    rule = next((m for m in marks if isinstance(m, Range)), None)
    if rule is None:
        return None
    if rule.ge is not None:
        bad = rule.ge - 1
    elif rule.gt is not None:
        bad = rule.gt
    elif rule.le is not None:
        bad = rule.le + 1
    else:
        bad = rule.lt
    bad = int(bad) if item is int else float(bad)
    return f"[{bad}]" if is_list else str(bad)


def keys_of(schema: type, prefix: str):
    """(dotted key, annotation) of every key of a schema, nested schemas included, ``_`` keys left out."""
    for name, annotation in hints(schema).items():
        if name.startswith("_"):
            continue
        if dataclasses.is_dataclass(_split(annotation)[0]):
            yield from keys_of(_split(annotation)[0], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", annotation


def cases():
    register_configs()
    GlobalHydra.instance().clear()
    out = []
    seen = set()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        for group, option in OPTIONS:
            schema = OmegaConf.get_type(compose_checked([f"{group}={option}"])[group])
            for key, annotation in keys_of(schema, f"{group}."):
                for kind, value in (("type", wrong_type(annotation)), ("range", out_of_range(annotation))):
                    if value is not None and (schema, key, kind) not in seen:
                        seen.add((schema, key, kind))
                        out.append(pytest.param([f"{group}={option}", f"{key}={value}"], key,
                                                id=f"{group}={option}-{key}-{kind}"))
    for key, annotation in keys_of(RegstoryConfig, ""):
        if key.split(".")[0] not in GROUPS + ["plugins"]:
            out += [pytest.param([f"{key}={v}"], key, id=f"root-{key}-{kind}") for kind, v in
                    (("type", wrong_type(annotation)), ("range", out_of_range(annotation))) if v is not None]
    GlobalHydra.instance().clear()
    return out


CASES = cases()


@pytest.fixture(scope="module")
def hydra_ready():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        yield
    GlobalHydra.instance().clear()


def test_the_fuzz_covers_every_group_and_the_shared_pruning_keys():
    ids = {p.id for p in CASES}
    assert {i.split("=")[0] for i in ids} >= set(GROUPS) and len(CASES) > 200
    for option in ("imp", "random", "snip", "twt"):  # inherited keys are checked in each method's schema
        assert f"method={option}-method.retrain-range" in ids and f"method={option}-method.rounds-type" in ids


@pytest.mark.parametrize("overrides, key", CASES)
def test_bad_value_is_one_config_error_naming_the_key(hydra_ready, overrides, key):
    with pytest.raises(ConfigError) as info:
        compose_checked([*FAST, *overrides])
    message = str(info.value)
    assert message.startswith(f"{key} ") and "\n" not in message and "must be" in message


@pytest.mark.parametrize("slot_overrides, key", [
    (["+method@plugins.second=imp", "plugins.second.rate=abc"], "plugins.second.rate"),
    (["+method@plugins.second=imp", "plugins.second.rate=1.5"], "plugins.second.rate"),
    (["+debias@plugins.x=end", "plugins.x.alpha=-1"], "plugins.x.alpha"),
    (["+method@plugins.second=snip", "plugins.second.retrain=sometimes"], "plugins.second.retrain"),
])
def test_an_option_in_a_plugin_slot_is_checked_against_its_own_schema(hydra_ready, slot_overrides, key):
    cfg = compose_checked([*FAST, slot_overrides[0]])
    assert OmegaConf.get_type(cfg.plugins[key.split(".")[1]]).__name__ in ("IMPOptions", "EnDOptions", "SNIPOptions")
    with pytest.raises(ConfigError, match=rf"^{key} must be"):
        compose_checked([*FAST, *slot_overrides])


def test_a_good_config_passes_and_keeps_its_defaults(hydra_ready):
    cfg = compose_checked([*FAST, "method=twt"])
    assert cfg.method.rounds == 10 and cfg.method.twt == 0.05
    assert compose_checked([*FAST, "method=imp"]).method.rounds == 30


@pytest.mark.parametrize("args", [["trainer.epochs=abc"], ["noise.rate=2"], ["dataset.rho=abc"],
                                  ["-m", "seed=0,1", "trainer.lr=0.1,-1"]], ids=["type", "range", "key", "sweep"])
def test_cli_bad_value_exits_2_with_one_line_and_creates_no_run_directory(tmp_path, args):
    proc = run_cli(*args, "dataset=digits", "logger.wandb.mode=disabled", "hydra.run.dir=run",
                   "hydra.sweep.dir=sweep", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("regstory-run: error: ")
    assert args[-1].split("=")[0] in proc.stderr
    assert list(tmp_path.iterdir()) == []
