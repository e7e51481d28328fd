"""Whether a method reads bias labels is a property of its plug-in (``uses_bias_labels``; Table 3.2's "bias-agnostic"
column, in summary.json as ``bias_agnostic``), and it is enforced: a bias-agnostic plug-in's loss hooks receive the
training batches without ``batch["bias"]``."""
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from regstory.debias.lff import LfF
from regstory.loop import HookCaller, compute_loss
from regstory.plugins import Plugin, StepOutput
from regstory.train import run
from tests.conftest import make_cfg
from tests.debias.test_end_to_end import TINY

SEEN: dict[str, list[set[str]]] = {}


class Spy(Plugin):
    """Records the keys of the batches its loss hooks receive (and reads the bias when it can)."""

    name = "spy"

    def sample_weights(self, ctx, batch, out):
        SEEN.setdefault(self.name, []).append(set(batch))
        return None

    def extra_loss(self, ctx, batch, out):
        SEEN.setdefault(self.name, []).append(set(batch))
        return {}


class BlindSpy(Spy):
    name = "blind"
    uses_bias_labels = False


class SeeingSpy(Spy):
    name = "seeing"


def test_a_bias_agnostic_plugin_gets_its_batches_without_bias_labels_and_the_others_whole():
    SEEN.clear()
    blind, seeing = BlindSpy(), SeeingSpy()
    hooks = HookCaller([blind, seeing])
    batch = {"x": torch.zeros(2, 3), "y": torch.tensor([0, 1]), "index": torch.tensor([4, 5]),
             "bias": torch.tensor([1, 1])}
    out = StepOutput(logits=torch.zeros(2, 2), per_sample_loss=torch.ones(2))
    compute_loss(None, hooks, batch, out)
    assert SEEN["blind"] == [{"x", "y", "index"}] * 2
    assert SEEN["seeing"] == [{"x", "y", "index", "bias"}] * 2
    assert "bias" in batch  # the loop's own batch is untouched


def test_in_a_run_the_blind_plugin_never_sees_a_bias_label(tmp_path):
    SEEN.clear()
    cfg = make_cfg(*TINY, "debias=vanilla", "trainer.epochs=1")
    with open_dict(cfg):
        cfg.plugins = OmegaConf.create({"blind": {"_target_": "tests.debias.test_bias_agnostic.BlindSpy"},
                                        "seeing": {"_target_": "tests.debias.test_bias_agnostic.SeeingSpy"}})
    run(cfg, run_dir=tmp_path)
    assert SEEN["blind"] and all("bias" not in keys for keys in SEEN["blind"])
    assert SEEN["seeing"] and all("bias" in keys for keys in SEEN["seeing"])


def test_lff_trains_without_bias_labels_and_says_so_in_the_summary(tmp_path, monkeypatch):
    seen: list[set[str]] = []
    original = LfF.sample_weights

    def recording(self, ctx, batch, out):
        seen.append(set(batch))
        return original(self, ctx, batch, out)

    monkeypatch.setattr(LfF, "sample_weights", recording)
    summary = run(make_cfg(*TINY, "debias=lff", "trainer.epochs=1"), run_dir=tmp_path)
    assert seen and all("bias" not in keys and {"x", "y", "index"} <= keys for keys in seen)
    assert summary["bias_agnostic"] is True and summary["plugins"]["debias"]["bias_agnostic"] is True
    assert 0 <= summary["last_test_conflicting_acc"] <= 1  # evaluation still measures the groups


# Table 3.2's column for every shipped method, and why (each module's docstring says more)
BIAS_AGNOSTIC = {
    "vanilla": True,  # plain CE
    "lff": True,  # a GCE-trained biased twin finds the hard samples
    "voronoi": True,  # mines pseudo-bias labels from a vanilla model's Voronoi cells
    "groupdro": False,  # (target, bias) groups; groups=target below is the bias-agnostic variant
    "end": False,  # its regulariser pairs samples by bias label
    "irene": False,  # its head H is trained to predict the bias label
    "rubi": False,  # its bias-only branch reads the bias label
    "learned_mixin": False,  # its bias expert is p(y | b) of the bias labels
    "di": False,  # each sample is trained on the head of its bias value
    "rebias": True,  # the bias is defined by its biased networks' architecture (small receptive field), trained on y
    "lnl": False,  # its predictor h is trained on the bias label
    "biascon": False,  # positives (same target, different bias) and BiasBal's prior need bias labels
}


@pytest.mark.parametrize("method", sorted(BIAS_AGNOSTIC))
def test_each_method_declares_whether_it_reads_bias_labels(method):
    plugin = instantiate(make_cfg(*TINY, f"debias={method}").debias, _convert_="all")
    assert plugin.uses_bias_labels is not BIAS_AGNOSTIC[method]


def test_groupdro_over_target_classes_is_bias_agnostic():
    plugin = instantiate(make_cfg(*TINY, "debias=groupdro", "debias.groups=target").debias, _convert_="all")
    assert plugin.uses_bias_labels is False


def test_every_debias_option_is_in_the_table():
    from pathlib import Path

    from regstory.train import conf_dir

    options = {p.stem for p in (Path(conf_dir()) / "debias").glob("*.yaml")} - {"none"}
    assert options == set(BIAS_AGNOSTIC)
