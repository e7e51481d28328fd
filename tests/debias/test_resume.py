"""A debiasing run interrupted mid-way and resumed ends exactly as an uninterrupted one (plugin state in checkpoints)."""
import pytest

from regstory.train import run
from tests.conftest import interrupt_then_resume, make_cfg, read_jsonl
from tests.debias.test_end_to_end import TINY


@pytest.mark.parametrize("method,cls_path,stop_at", [
    ("voronoi", "regstory.debias.voronoi.VoronoiMining", (1, 1)),  # in the debiasing round
    ("lff", "regstory.debias.lff.LfF", (0, 1)),
])
def test_interrupted_and_resumed_run_matches_straight_run(method, cls_path, stop_at, tmp_path, monkeypatch):
    import importlib

    overrides = [*TINY, f"debias={method}", "trainer.epochs=2"]
    straight = run(make_cfg(*overrides), run_dir=tmp_path / "straight")

    module_name, cls_name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    resumed = interrupt_then_resume(monkeypatch, cls, "start_epoch", stop_at, overrides, tmp_path / "resumed")
    for key in ("last_test_unbiased_acc", "last_test_conflicting_acc", "last_bias_probe_acc", "selected_epoch"):
        assert resumed[key] == straight[key], key
    assert len(read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == len(read_jsonl(tmp_path / "straight" / "metrics.jsonl"))
