"""A debiasing run interrupted mid-way and resumed ends exactly as an uninterrupted one (plugin state in checkpoints)."""
import pytest

from regstory.train import run
from tests.conftest import make_cfg, read_jsonl
from tests.debias.test_end_to_end import TINY


class Interrupt(Exception):
    pass


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
    original = cls.start_epoch

    def stop_once(self, ctx):
        if (ctx.round, ctx.epoch) == stop_at:
            raise Interrupt
        return original(self, ctx)

    monkeypatch.setattr(cls, "start_epoch", stop_once)
    with pytest.raises(Interrupt):
        run(make_cfg(*overrides), run_dir=tmp_path / "resumed")
    monkeypatch.setattr(cls, "start_epoch", original)
    resumed = run(make_cfg(*overrides, "resume=true"), run_dir=tmp_path / "resumed")
    for key in ("last_test_unbiased_acc", "last_test_conflicting_acc", "last_bias_probe_acc", "selected_epoch"):
        assert resumed[key] == straight[key], key
    assert len(read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == len(read_jsonl(tmp_path / "straight" / "metrics.jsonl"))
