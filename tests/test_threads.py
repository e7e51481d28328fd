"""The automatic thread count: one thread for a small step on the CPU, unless the user or the launcher says."""
import pytest
import torch

from regstory.config import ConfigError
from regstory.pairing import probe
from regstory.threads import configure_threads
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


class FakeMachine:
    """A machine clock: wall time, all processes' busy CPU seconds, this process's CPU seconds."""

    def __init__(self):
        self.wall, self.busy, self.own = 100.0, 50.0, 5.0

    def advance(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.wall += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + other_cores) * seconds


def test_the_governor_uses_the_cores_other_processes_leave_idle(monkeypatch):
    import regstory.threads as threads

    machine = FakeMachine()
    monkeypatch.setattr(threads, "_machine_busy_s", lambda: machine.busy)
    monkeypatch.setattr(threads, "_own_cpu_s", lambda: machine.own)
    monkeypatch.setattr(threads.time, "monotonic", lambda: machine.wall)
    torch.set_num_threads(2)
    governor = threads.ThreadGovernor(max_threads=2, cores=2)
    machine.advance(10, own_cores=2.0, other_cores=0.0)  # alone: both cores
    assert governor.update() == 2
    machine.advance(10, own_cores=1.0, other_cores=1.0)  # another job on one core
    assert governor.update() == 1 and torch.get_num_threads() == 1
    machine.advance(10, own_cores=1.0, other_cores=2.0)  # it takes both: still one thread, never zero
    assert governor.update() == 1
    machine.advance(10, own_cores=1.0, other_cores=0.5)  # it ended (what is left is noise: below BUSY_FROM)
    assert governor.update() == 2 and torch.get_num_threads() == 2


def test_the_user_and_the_launcher_choose_over_auto(monkeypatch):
    cpu = torch.device("cpu")
    assert configure_threads(2, cpu) is None and torch.get_num_threads() == 2  # trainer.num_threads
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert configure_threads(0, cpu) is None and torch.get_num_threads() == 2  # a launcher's env_set / SLURM
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert configure_threads(0, torch.device("cuda")) is None  # the CPU only feeds the device
