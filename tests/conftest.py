"""Shared test helpers: compose a config the way ``regstory-run`` does, and run the CLI in a subprocess."""
from __future__ import annotations

import atexit
import copy
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Before anything imports wandb (or matplotlib): what runs would write under the home folder (W&B's dirs, the data
# root, matplotlib's cache) goes to one temporary folder per test session, removed at exit; subprocesses inherit it.
# The masked-SGD kernel build cache goes to build/torch_extensions of the checkout (kept: a build takes ~20 s).
SESSION_DIR = Path(tempfile.mkdtemp(prefix="regstory-tests-"))
HOME_DIRS = {"WANDB_DIR": "wandb", "WANDB_CACHE_DIR": "wandb-cache", "WANDB_CONFIG_DIR": "wandb-config",
             "WANDB_DATA_DIR": "wandb-data", "REGSTORY_DATA": "data", "MPLCONFIGDIR": "matplotlib"}
for _var, _name in HOME_DIRS.items():
    os.environ[_var] = str(SESSION_DIR / _name)
    (SESSION_DIR / _name).mkdir()
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / "build" / "torch_extensions"))
atexit.register(shutil.rmtree, SESSION_DIR, True)

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from regstory.config import register_configs
from regstory.tracking import read_jsonl  # noqa: F401  (re-exported for the tests)
from regstory.train import conf_dir

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)

# Fast defaults for tests: no W&B, no progress output, one thread; a checkpoint at every epoch boundary (what the
# kill/resume tests assume; the default's 30 s minimum interval is tested on its own).
FAST = ["logger.wandb.mode=disabled", "logger.progress=none", "trainer.num_threads=1", "trainer.checkpoint_interval_s=0"]


@pytest.fixture(autouse=True, scope="session")
def _data_root(tmp_path_factory):
    """A per-session data root, so tests never touch the user's cache (MNIST-1D is generated there once)."""
    os.environ.setdefault("REGSTORY_DATA", str(tmp_path_factory.mktemp("data")))


def make_cfg(*overrides: str, fast: bool = True):
    """Compose ``conf/config.yaml`` with overrides, exactly as the CLI would (without Hydra's run dir). Each distinct
    composition is made once per session; every call returns its own copy (a test may change it)."""
    return copy.deepcopy(_composed(conf_dir(), tuple(FAST if fast else ()) + tuple(overrides)))


@functools.lru_cache(maxsize=None)
def _composed(config_dir: str, overrides: tuple[str, ...]):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose("config", overrides=list(overrides))


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300, check: bool = True,
            module: bool = False) -> subprocess.CompletedProcess:
    """Run ``regstory-run ARGS`` (or ``python -m regstory.train``) in a subprocess, one torch thread."""
    exe = [sys.executable, "-m", "regstory.train"] if module else [str(Path(sys.executable).parent / "regstory-run")]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run([*exe, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"regstory-run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc



def cli_refusal(tmp_path: Path, *args: str) -> str:
    """Run ``regstory-run ARGS`` in an empty ``tmp_path`` expecting a refusal before anything runs: exit 2, one
    stderr line, no traceback, nothing created. Returns that line."""
    proc = run_cli(*args, "logger.wandb.mode=disabled", "hydra.run.dir=run", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []
    return proc.stderr.strip()


class Interrupted(Exception):
    """Raised by :func:`interrupt_then_resume` to simulate a kill."""


def interrupt_then_resume(monkeypatch, cls, hook: str, at: tuple[int, int], overrides, run_dir: Path) -> dict:
    """Run ``overrides`` with ``cls.<hook>`` raising at (round, epoch) == ``at`` (a simulated kill), then resume the
    same run dir with ``resume=true``; returns the resumed run's summary."""
    import pytest

    from regstory.train import run

    original = getattr(cls, hook)

    def interrupt(self, ctx, *args, **kwargs):
        if (ctx.round, ctx.epoch) == at:
            raise Interrupted
        return original(self, ctx, *args, **kwargs)

    monkeypatch.setattr(cls, hook, interrupt)
    with pytest.raises(Interrupted):
        run(make_cfg(*overrides), run_dir=run_dir)
    monkeypatch.setattr(cls, hook, original)
    return run(make_cfg(*overrides, "resume=true"), run_dir=run_dir)


def owned_linear(weight, bias):
    """A plugin-owned Linear (:class:`regstory.debias.rubi.OwnedModule`, the default trainer's optimizer) whose
    weight and bias are set by hand: a head, branch or gate of a unit test."""
    from torch import nn

    from regstory.debias.rubi import OwnedModule

    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(torch.as_tensor(bias, dtype=linear.bias.dtype).expand_as(linear.bias))
    return OwnedModule(linear, make_cfg().trainer)
