"""Plugins compose by rule: every (method, debias, distill) triple of the shipped configs runs a few steps with the
engine's invariants checked after every hook; pairs that cannot work are refused at start-up in one line."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from regstory.loop import RunContext
from regstory.plugins import CompositionError, Plugin
from regstory.train import build_plugins, conf_dir, run
from tests.conftest import make_cfg, read_jsonl, run_cli

CONF = Path(conf_dir())
TINY = ["dataset=biased_digits", "dataset.test_colours=2", "dataset.val_colours=1", "arch=mlp", "arch.width=64",
        "arch.depth=1", "trainer.epochs=2", "trainer.batch_size=128"]
LOSS_HOOKS = ("sample_loss", "sample_weights", "extra_loss")
MIMI_ARCH = ["arch=vit_tiny", "arch.dim=16", "arch.depth=1", "arch.heads=2", "arch.mlp_dim=16"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


TRIPLES = [(m, d, k) for m in options("method") for d in options("debias") for k in options("distill")]


@functools.cache
def option_keys(group: str, name: str) -> frozenset[str]:
    """The keys of one option of a config group (composed once per option, not once per triple)."""
    return frozenset(make_cfg(f"{group}={name}")[group].keys())


def triple_overrides(method: str, debias: str, distill: str) -> list[str]:
    """A few steps of the triple: one pruning step (two rounds, as Voronoi mining needs), short probes and teacher;
    no footprint measurement (tests/pruning/test_footprint.py has it)."""
    keys = {"method": option_keys("method", method), "debias": option_keys("debias", debias),
            "distill": option_keys("distill", distill)}
    extra = [f"method={method}", f"debias={debias}", f"distill={distill}"]
    extra += ["method.rounds=1"] if "rounds" in keys["method"] else []
    extra += ["method.entropy_samples=100"] if "entropy_samples" in keys["method"] else []
    extra += ["method.footprint=none"] if "footprint" in keys["method"] else []
    extra += ["debias.probe_steps=5"] if "probe_steps" in keys["debias"] else []
    extra += ["distill.teacher_epochs=1"] if "teacher_epochs" in keys["distill"] else []
    if debias == "rebias":  # an MLP has no kernel size to shrink: ReBias's biased network is a narrow MLP of its own
        extra += ["debias.biased_arch={_target_:regstory.models.mlp.mlp,width:16,depth:1}"]
    if method == "mimi":  # adapters need a transformer: a one-block vit_tiny instead of the MLP
        return [*(o for o in TINY if not o.startswith("arch")), *MIMI_ARCH, "method.size=4", *extra]
    return [*TINY, *extra]


class InvariantChecker(Plugin):
    """Runs last; after every hook of the others, every pinned (pruned) weight must be exactly zero."""

    def __init__(self):
        self.checks = 0

    def check(self, ctx, where: str) -> None:
        for p in ctx.plugins:
            pinned = p.pinned_weights()
            if pinned is None:
                continue
            for name, param, mask in zip(pinned.names, pinned.params, pinned.masks):
                assert not param.detach()[mask == 0].any(), f"{where}: pruned weights of {name} are non-zero"
            self.checks += 1

    def start_round(self, ctx):
        self.check(ctx, f"start_round {ctx.round}")

    def after_step(self, ctx):
        self.check(ctx, "after_step")

    def end_epoch(self, ctx):
        self.check(ctx, f"end_epoch {ctx.round}/{ctx.epoch}")
        return {}

    def end_round(self, ctx):
        self.check(ctx, f"end_round {ctx.round}")
        return {}


def with_checker_and_counters(monkeypatch) -> tuple[list[Plugin], dict[str, int]]:
    """Make ``run`` build the configured plugins plus an InvariantChecker, and count each loss hook's calls."""
    built: list[Plugin] = []
    calls: dict[str, int] = {}

    def build(cfg):
        plugins = build_plugins(cfg)
        checker = InvariantChecker()
        checker.slot = "plugins.check"
        for p in plugins:
            for hook in LOSS_HOOKS:
                if getattr(type(p), hook) is not getattr(Plugin, hook):
                    key = f"{p.slot}.{hook}"
                    calls[key] = 0
                    setattr(p, hook, counted(getattr(p, hook), calls, key))
        built.extend([*plugins, checker])
        return built

    monkeypatch.setattr("regstory.train.build_plugins", build)
    return built, calls


def counted(fn, calls, key):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls[key] += 1
        return fn(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("method,debias,distill", TRIPLES, ids=["-".join(t) for t in TRIPLES])
def test_every_triple_runs_with_the_invariants_held(method, debias, distill, tmp_path, monkeypatch):
    plugins, calls = with_checker_and_counters(monkeypatch)
    summary = run(make_cfg(*triple_overrides(method, debias, distill)), run_dir=tmp_path)
    checker = plugins[-1]
    assert all(n > 0 for n in calls.values()), calls  # every loss hook of every plugin took part
    slots = [p.slot for p in plugins[:-1]]
    assert set(summary["plugins"]) == set(slots) | {"plugins.check"}
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert set(ckpt["plugins"]) == set(summary["plugins"])  # states stored by slot
    if any(p.pinned_weights() is not None for p in plugins):
        assert checker.checks > 0
        assert "final_sparsity" in summary and summary["final_sparsity"] > 0
    assert len(read_jsonl(tmp_path / "rounds.jsonl")) == summary["num_rounds"]


def test_the_checker_sees_what_order_alone_did_to_imp_and_voronoi(tmp_path, monkeypatch):
    """Without the engine re-applying the masks, Voronoi's reset in round 1 (after IMP's masks) leaves pruned
    weights non-zero: the invariant check above is what catches it."""
    with_checker_and_counters(monkeypatch)
    monkeypatch.setattr(RunContext, "enforce_pins", lambda self, after=None: None)
    with pytest.raises(AssertionError, match="start_round 1: pruned weights"):
        run(make_cfg(*triple_overrides("imp", "voronoi", "none")), run_dir=tmp_path)


def test_groupdro_weights_the_distillation_loss(tmp_path, monkeypatch):
    """GroupDRO + KD: the distillation loss replaces the CE per sample and GroupDRO's weights apply to it (before,
    the first plugin's task loss won and distillation was silently dropped)."""
    plugins, calls = with_checker_and_counters(monkeypatch)
    run(make_cfg(*triple_overrides("none", "groupdro", "kd")), run_dir=tmp_path)
    assert calls["distill.sample_loss"] > 0 and calls["debias.sample_weights"] == calls["distill.sample_loss"]


def test_a_second_method_in_an_extra_slot_composes(tmp_path):
    cfg = make_cfg(*TINY, "method=imp", "method.rounds=1", "+method@plugins.second=random", "plugins.second.rounds=1",
                   "plugins.second.rate=0.5")
    summary = run(cfg, run_dir=tmp_path)
    assert set(summary["plugins"]) == {"method", "plugins.second"}
    assert "final_sparsity" not in summary  # both report one: it is only under each plugin's name
    assert summary["plugins"]["method"]["final_sparsity"] == pytest.approx(0.2, abs=1e-3)
    assert summary["plugins"]["plugins.second"]["final_sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("overrides,message", [
    (["distill=kd", "+distill@plugins.kd2=kd"],
     "distill (Distillation) and plugins.kd2 (Distillation) both need to own the sample loss"),
    (["debias=groupdro", "+debias@plugins.dro2=groupdro"],
     "debias (GroupDRO) and plugins.dro2 (GroupDRO) both need to own the train sampler"),
    (["method=imp", "method.rounds=3", "debias=voronoi"],
     "method (IMP) runs 4 rounds and debias (VoronoiMining) 2"),
])
def test_pairs_that_cannot_work_are_refused_naming_both(overrides, message):
    with pytest.raises(CompositionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_plugins(make_cfg(*TINY, *overrides))


def test_a_refused_pair_is_one_line_on_the_cli(tmp_path):
    proc = run_cli(*TINY, "method=imp", "method.rounds=3", "debias=voronoi", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run dir
    assert proc.stderr.strip().splitlines() == [
        "regstory-run: error: method (IMP) runs 4 rounds and debias (VoronoiMining) 2: they cannot run together "
        "unless the numbers of rounds agree"]


def test_states_are_restored_by_slot_not_position():
    cfg = make_cfg(*TINY, "method=imp")
    plugins = build_plugins(cfg)
    assert [p.slot for p in plugins] == ["method"]
    with open_dict(cfg):
        cfg.plugins = OmegaConf.create({"extra": {"_target_": "regstory.plugins.Plugin"}})
    assert [p.slot for p in build_plugins(cfg)] == ["method"]  # the no-op base class is not kept
    with open_dict(cfg):
        cfg.plugins = OmegaConf.create({"extra": {"_target_": "tests.test_composition.InvariantChecker"}})
    assert [p.slot for p in build_plugins(cfg)] == ["method", "plugins.extra"]
