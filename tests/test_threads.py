"""The automatic thread count: one thread for a small step on the CPU, unless the user or the launcher says."""
import pytest
import torch

from regstory.config import ConfigError
from regstory.pairing import probe
from regstory.threads import SMALL_STEP_FLOPS, configure_threads
from tests.conftest import make_cfg


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def test_probe_counts_linear_and_conv_flops_by_hand():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 2 * 2, 5))
    # conv: 2 out channels x 2x2 positions, each 1x3x3 multiply-adds; linear: 8 x 5
    assert probe(model, (1, 4, 4), "toy", make_cfg().arch) == 2 * (8 * 9) + 2 * (8 * 5)


def test_probe_names_the_data_set_an_architecture_is_made_for():
    cfg = make_cfg("arch=resnet20")
    from hydra.utils import instantiate

    model = instantiate(cfg.arch, input_shape=[40], num_classes=10)
    with pytest.raises(ConfigError, match=r"arch resnet20 cannot take dataset=mnist1d's inputs of shape \(40,\) .*"
                                          r"it is made for dataset=cifar10"):
        probe(model, (40,), "mnist1d", cfg.arch)


def test_a_small_step_runs_on_one_thread_and_a_large_one_keeps_torchs_default():
    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    assert configure_threads(0, SMALL_STEP_FLOPS / 3 / 128 / 2, 128, cpu) == 1
    torch.set_num_threads(2)
    assert configure_threads(0, SMALL_STEP_FLOPS, 128, cpu) == 2


def test_the_user_and_the_launcher_choose_over_auto(monkeypatch):
    cpu = torch.device("cpu")
    assert configure_threads(2, 1.0, 1, cpu) == 2  # trainer.num_threads
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert configure_threads(0, 1.0, 1, cpu) == 2  # a launcher's env_set / SLURM's cpus-per-task
