"""The pruning core and its optional measurements: switched by the existing options, checkpoint state unchanged."""
import pytest

from regstory.pruning.magnitude import IMP
from regstory.pruning.measures import ActivationEntropy, BestValModel, Footprint, Memorization, SDDPhases, StopRule
from regstory.train import run
from tests.conftest import make_cfg, read_jsonl
from tests.pruning.test_imp import fake_ctx


def test_measurements_follow_their_options_in_record_order():
    kinds = [type(m) for m in IMP().measures]
    assert kinds == [ActivationEntropy, Memorization, SDDPhases, BestValModel, StopRule, Footprint]
    assert Footprint not in [type(m) for m in IMP(footprint="none").measures]
    assert Memorization not in [type(m) for m in IMP(measure_memorization=False).measures]


def test_checkpoint_state_keeps_its_keys():
    imp = IMP(rate=0.5, rounds=2)
    imp.setup(fake_ctx())
    state = imp.state_dict()
    assert set(state) == {"masks", "rewind_state", "stop", "best", "footprint_dense"}
    fresh = IMP(rate=0.5, rounds=2)
    fresh.setup(fake_ctx())
    fresh.load_state_dict(state)
    assert fresh.stop.state_dict() == imp.stop.state_dict() and fresh.rewind_state is state["rewind_state"]


def test_memorization_off_drops_its_keys_only(tmp_path):
    args = ("dataset=digits", "method=imp", "method.rounds=1", "method.rate=0.5", "trainer.epochs=1", "noise.rate=0.2")
    run(make_cfg(*args, "method.measure_memorization=false"), run_dir=tmp_path / "off")
    run(make_cfg(*args), run_dir=tmp_path / "on")
    off, on = (read_jsonl(tmp_path / d / "rounds.jsonl") for d in ("off", "on"))
    assert set(on[0]) - set(off[0]) == {"noisy_memorized", "noisy_true_label_acc"}
    assert [r["sparsity"] for r in off] == pytest.approx([r["sparsity"] for r in on])
