"""Model surgery as a service of the loop: slicing units, carrying optimizer state, masks following, and a run
that shrinks its model mid-round, is killed, and resumes to the same final metrics."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from regstory.checkpoint import load_checkpoint
from regstory.loop import carry_optimizer_state
from regstory.plugins import Plugin
from regstory.surgery import ModelChange, rebuild, remove_units, select, structure_of
from regstory.train import run
from tests.conftest import interrupt_then_resume, make_cfg, read_jsonl

TINY = ["dataset=digits", "arch=mlp", "arch.width=32", "trainer.batch_size=128", "trainer.epochs=4"]
SHRINK = "+plugins.shrink._target_=tests.test_surgery.ShrinkHidden"


class ShrinkHidden(Plugin):
    """Test plugin: after epoch ``at`` (round, epoch), keeps the half of the first hidden layer's units with the
    largest incoming weight norm (a stand-in for simplification)."""

    at = (0, 1)

    def end_epoch(self, ctx):
        if (ctx.round, ctx.epoch) != self.at:
            return {}
        layer = ctx.model.layers[0]
        keep = layer.weight.norm(dim=1).topk(layer.out_features // 2).indices
        new_model, change = remove_units(ctx.model, "layers.0", keep, consumers=["layers.1"])
        ctx.replace_model(new_model, change)
        return {"hidden_units": len(keep)}


class ShrinkHiddenInRound1(ShrinkHidden):
    at = (1, 1)


def mlp(widths=(6, 5), classes=3):
    torch.manual_seed(0)
    layers, dims = [], (4, *widths)
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(dims[-1], classes))


def test_remove_units_computes_the_same_function_when_the_removed_units_are_dead():
    model = mlp()
    with torch.no_grad():
        model[0].weight[[1, 4]] = 0
        model[0].bias[[1, 4]] = -1.0  # ReLU(-1) = 0: units 1 and 4 never fire
    keep = torch.tensor([0, 2, 3, 5])
    new, change = remove_units(model, "0", keep, consumers=["2"])
    x = torch.randn(7, 4)
    assert new[0].weight.shape == (4, 4) and new[2].weight.shape == (5, 4)
    assert torch.allclose(new(x), model(x), atol=1e-6)
    assert model[0].weight.shape == (6, 4)  # the original model is untouched
    assert change.sources["0.weight"][0] == "0.weight" and torch.equal(change.sources["0.weight"][1][0], keep)
    assert change.sources["4.weight"] == ("4.weight", ())  # untouched layers map to themselves


def test_remove_units_slices_a_conv_its_batchnorm_and_the_next_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    model[1].running_mean.uniform_()
    keep = torch.tensor([0, 3, 5])
    new, change = remove_units(model, "0", keep, consumers=["3"], norm="1")
    assert new[0].weight.shape == (3, 3, 3, 3) and new[1].num_features == 3 and new[3].weight.shape == (4, 3, 3, 3)
    assert torch.equal(new[1].running_mean, model[1].running_mean[keep])
    assert torch.equal(new[3].weight, model[3].weight[:, keep])
    assert torch.equal(change.carry("3.weight", model[3].weight), new[3].weight)


def test_select_and_carry_dict_by_hand():
    t = torch.arange(12.0).view(3, 4)
    assert torch.equal(select(t, (torch.tensor([0, 2]), None)), torch.tensor([[0.0, 1, 2, 3], [8, 9, 10, 11]]))
    assert torch.equal(select(t, (None, torch.tensor([1]))), torch.tensor([[1.0], [5], [9]]))
    change = ModelChange({"a": ("a", (torch.tensor([1]),)), "new": ("gone", ())})
    out = change.carry_dict({"a": torch.tensor([5.0, 6.0]), "b": torch.ones(1)}, fill={"new": torch.zeros(2)})
    assert set(out) == {"a", "new"} and torch.equal(out["a"], torch.tensor([6.0]))


def test_optimizer_state_follows_the_kept_units():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    keep = torch.tensor([1, 2, 5])
    new, change = remove_units(model, "0", keep, consumers=["2"])
    new_opt = torch.optim.SGD(new.parameters(), lr=0.5, momentum=0.9)
    carry_optimizer_state(opt, model, new_opt, new, change)
    old_buf = opt.state[model[0].weight]["momentum_buffer"]
    assert torch.equal(new_opt.state[new[0].weight]["momentum_buffer"], old_buf[keep])
    assert torch.equal(new_opt.state[new[2].weight]["momentum_buffer"],
                       opt.state[model[2].weight]["momentum_buffer"][:, keep])
    assert torch.equal(new_opt.state[new[4].bias]["momentum_buffer"], opt.state[model[4].bias]["momentum_buffer"])
    assert new_opt.param_groups[0]["lr"] == 0.1  # the schedule's current lr, not the new optimizer's


def test_structure_round_trips_without_weights():
    model = mlp()
    new, _ = remove_units(model, "0", torch.tensor([0, 1]), consumers=["2"])
    structure = structure_of(new)
    assert all(p.device.type == "meta" for p in structure.parameters())
    rebuilt = rebuild(structure, new.state_dict())
    x = torch.randn(3, 4)
    assert torch.equal(rebuilt(x), new(x))


def test_shrink_mid_round_continues_training_with_the_schedule_in_place(tmp_path):
    summary = run(make_cfg(*TINY, SHRINK, "trainer.schedule=cosine"), run_dir=tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r.get("hidden_units") for r in records] == [None, 16, None, None]
    lrs = [r["lr"] for r in records]
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == 4  # cosine went on, not restarted
    assert summary["num_params"] < run(make_cfg(*TINY), run_dir=tmp_path / "dense")["num_params"]
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["architecture"].layers[0].out_features == 16


def test_shrink_kill_resume_gives_the_same_final_metrics(tmp_path, monkeypatch):
    """Shrunk after epoch 2, killed in epoch 4 (the last checkpoint holds the shrunk model), resumed: the run ends
    exactly as an uninterrupted one."""
    overrides = [*TINY, SHRINK]
    straight = run(make_cfg(*overrides), run_dir=tmp_path / "straight")
    resumed = interrupt_then_resume(monkeypatch, ShrinkHidden, "end_epoch", (0, 3), overrides, tmp_path / "killed")
    for key in ("final_train_loss", "final_test_acc", "final_test_loss", "num_params"):
        assert resumed[key] == straight[key], key
    assert read_jsonl(tmp_path / "killed" / "metrics.jsonl") == [
        {**r, "time_s": r2["time_s"]} for r, r2 in zip(read_jsonl(tmp_path / "straight" / "metrics.jsonl"),
                                                      read_jsonl(tmp_path / "killed" / "metrics.jsonl"))]


def test_masks_follow_a_shrink_and_pruned_weights_stay_zero(tmp_path):
    """IMP prunes after round 0; the shrink in round 1 carries its masks; the pruned weights stay zero and the
    final sparsity counts the kept tensors."""
    overrides = [*TINY, "method=imp", "method.rounds=1", "method.rate=0.5", "+plugins.shrink._target_="
                 "tests.test_surgery.ShrinkHiddenInRound1"]
    summary = run(make_cfg(*overrides), run_dir=tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    masks = ckpt["plugins"]["method"]["masks"]
    assert masks["layers.0.weight"].shape == ckpt["model"]["layers.0.weight"].shape == (16, 64)
    for name, mask in masks.items():
        assert not ckpt["model"][name][~mask].any(), name
    assert 0.3 < summary["final_sparsity"] < 0.7

