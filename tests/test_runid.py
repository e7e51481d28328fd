"""Run identity: the same experiment has the same id whatever says where and how it is shown, stored or computed."""
import json

import pytest
from omegaconf import OmegaConf

from regstory.runid import (FINISHED, NEW, NOT_IDENTITY, RESUMABLE, RunIdMismatch, inspect_folder, run_id,
                            stored_run_id)
from regstory.train import run
from tests.conftest import make_cfg

TINY = ["dataset=digits", "arch=mlp", "arch.width=16", "trainer.epochs=2"]


def test_the_same_config_has_the_same_id_also_read_back_from_its_yaml(tmp_path):
    cfg = make_cfg(*TINY, "trainer.lr=1e-2", "noise.rate=0.2")
    assert run_id(cfg) == run_id(make_cfg(*TINY, "noise.rate=0.2", "trainer.lr=0.01"))  # override order, spelling
    OmegaConf.save(cfg, tmp_path / "config.yaml", resolve=True)  # what a run writes
    assert run_id(OmegaConf.load(tmp_path / "config.yaml")) == run_id(cfg)
    assert len(run_id(cfg)) == 12


@pytest.mark.parametrize("change", ["trainer.lr=0.1", "seed=1", "arch.width=32", "noise.rate=0.2", "trainer.epochs=3",
                                    "dataset.val_fraction=0.1", "method=imp", "trainer.schedule=cosine"])
def test_a_changed_hyperparameter_is_another_run(change):
    assert run_id(make_cfg(*TINY, change)) != run_id(make_cfg(*TINY))


@pytest.mark.parametrize("change", ["logger.wandb.mode=offline", "logger.progress=bar", "logger.wandb.tags=[a]",
                                    "trainer.num_threads=3", "trainer.num_workers=0", "trainer.device=cpu",
                                    "trainer.checkpoint_interval_s=5", "trainer.checkpoint_every=2",
                                    "trainer.eval_batch_size=10", "data.root=/elsewhere", "data.download=false",
                                    "resume=true"])
def test_where_and_how_a_run_is_shown_stored_or_computed_is_the_same_run(change):
    assert run_id(make_cfg(*TINY, change)) == run_id(make_cfg(*TINY))


def test_a_run_stores_its_id_and_its_folder_says_where_it_stands(tmp_path):
    cfg = make_cfg(*TINY)
    run(cfg, run_dir=tmp_path)
    provenance = json.loads((tmp_path / "provenance.json").read_text())
    assert provenance["run_id"] == run_id(cfg) == stored_run_id(tmp_path)
    assert inspect_folder(tmp_path, make_cfg(*TINY, "trainer.num_threads=2")).state == FINISHED
    (tmp_path / "summary.json").unlink()
    assert inspect_folder(tmp_path, cfg).state == RESUMABLE
    with pytest.raises(RunIdMismatch, match=r"holds another experiment .*: trainer.lr=0.1 \(the run has 0.05\)\. "):
        inspect_folder(tmp_path, make_cfg(*TINY, "trainer.lr=0.1"))
    del provenance["run_id"]  # a run made before run ids: its config.yaml says which it is
    (tmp_path / "provenance.json").write_text(json.dumps(provenance))
    assert stored_run_id(tmp_path) == run_id(cfg)
    assert inspect_folder(tmp_path / "nothing", cfg).state == NEW


def test_the_folder_name_of_a_sweep_point_leaves_out_what_is_not_the_experiment():
    """Hydra's override_dirname (the sweep folder's subdir) drops the keys the run id drops, so a relaunch that
    changes them finds the same folders."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from regstory.resume import _covered, flatten
    from regstory.train import conf_dir

    make_cfg()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose("config", return_hydra_config=True)
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    task = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
    leaves = {k for k in flatten(task) if _covered(k, NOT_IDENTITY)}
    assert leaves <= excluded, sorted(leaves - excluded)
    assert all(_covered(k, NOT_IDENTITY) for k in excluded)
