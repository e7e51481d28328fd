"""Every Table 2.1 row (experiment=table2_1 row=...) and the CPU presets of LOBSTER / SeReNe compose, pass the
option check and build their method; the rows' own values win over the experiment's."""
from pathlib import Path

import pytest
from hydra.utils import instantiate

from regstory.config import check_targets, check_values
from regstory.pruning.lobster import Lobster, SensitivityPruning, TwtLoop
from regstory.pruning.serene import Serene
from tests.conftest import make_cfg

ROWS = sorted(p.stem for p in (Path(__file__).parents[2] / "conf" / "row").glob("*.yaml"))
DATA = {"vgg16": "cifar10", "resnet32": "cifar10", "alexnet": "cifar100", "resnet101": "imagenet"}


def test_every_table_row_is_there():
    assert ROWS == sorted(f"{a}_{m}" for a in DATA for m in ("lobster", "serene"))


@pytest.mark.parametrize("row", ROWS)
def test_row_composes_and_instantiates(row):
    arch, method = row.rsplit("_", 1)
    cfg = make_cfg("experiment=table2_1", f"row={row}", fast=False)
    check_values(cfg)
    check_targets(cfg)
    plugin = instantiate(cfg.method, _convert_="all")
    assert isinstance(plugin, {"lobster": Lobster, "serene": Serene}[method])
    assert cfg.arch._target_.endswith(f".{arch}") and cfg.dataset.name == DATA[arch]
    assert cfg.trainer.batch_size == (64 if arch == "resnet101" else 100)
    assert plugin.patience == (3 if arch == "resnet101" else 20) and plugin.pinned == "weights"
    if arch == "resnet101":
        assert cfg.arch.pretrained and cfg.trainer.lr == 1e-3 and plugin.lmbda == 1e-6


@pytest.mark.parametrize("preset, cls", [("twt_loop_digits", TwtLoop), ("lobster_digits", Lobster),
                                         ("serene_digits", Serene)])
def test_cpu_presets_share_one_loop(preset, cls):
    cfg = make_cfg(f"experiment={preset}", fast=False)
    check_values(cfg)
    plugin = instantiate(cfg.method, _convert_="all")
    assert type(plugin) is cls and isinstance(plugin, SensitivityPruning)
    assert (plugin.twt, plugin.patience, plugin.rounds, cfg.dataset.val_fraction) == (0.05, 10, 100, 0.2)
    assert cfg.arch._target_.endswith("lenet300") and cfg.dataset.name == "digits"
