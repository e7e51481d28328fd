"""MiMi (thesis sec. 2.5, eq. 2.15): the adapter score by hand, the surgery that removes units and adapters, the
frozen backbone, the pre-training preset cached by its config, and the CLI (end to end, bad input)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from regstory.checkpoint import load_checkpoint
from regstory.models.vit import adapter_sites, vit_tiny
from regstory.options import ConfigError
from regstory.pruning.mimi import (Adapter, MiMi, freeze_backbone, load_backbone, shrink_adapters, site_labels,
                                   units_to_keep, with_adapters)
from regstory.surgery import rebuild
from regstory.train import run
from tests.conftest import cli_refusal, interrupt_then_resume, make_cfg, read_jsonl, run_cli

ARCH = ["arch=vit_tiny", "arch.dim=16", "arch.depth=2", "arch.heads=2", "arch.mlp_dim=32"]
TINY = ["dataset=digit_tasks", "dataset.classes=[5,6,7,8,9]", *ARCH, "method=mimi", "method.size=4",
        "method.rounds=2", "trainer.epochs=2", "trainer.batch_size=128", "trainer.optimizer=adamw", "trainer.lr=0.01"]


def small_vit(classes: int = 5):
    torch.manual_seed(0)
    return vit_tiny((1, 8, 8), classes, dim=16, depth=2, heads=2, mlp_dim=32).eval()


def saved_backbone(tmp_path: Path, classes: int = 5) -> tuple[Path, dict]:
    """A vit_tiny state dict (head for ``classes``) saved as a plain state dict."""
    state = {k: v.clone() for k, v in small_vit(classes).state_dict().items()}
    path = tmp_path / "backbone.pt"
    torch.save(state, path)
    return path, state


# -- eq. 2.15 and the surgery ----------------------------------------------------------------------------------------
def test_eq_2_15_score_of_each_hidden_unit_by_hand():
    adapter = Adapter(width=3, hidden=2)
    with torch.no_grad():
        adapter.down.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.25, -0.25]]))  # (N=2, M=3)
        adapter.up.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 2.0], [0.5, -0.5]]))  # (M=3, N=2)
    # unit 0: (1 + 2 + 0.5) + (1 + 1 + 0.5) = 6 over N + M = 5; unit 1: (0 + .25 + .25) + (0 + 2 + .5) = 3 over 5
    assert torch.allclose(adapter.importance(), torch.tensor([6.0 / 5, 3.0 / 5]))
    assert torch.allclose(adapter.importance("code"), torch.tensor([6.0 / 6, 3.0 / 6]))  # over 2M, the authors' code


def test_global_allocation_compares_units_across_adapters_proportional_within_each():
    scores = {"a": torch.tensor([0.9, 0.1, 0.8, 0.2]), "b": torch.tensor([0.3, 0.7, 0.05, 0.6])}
    keep = units_to_keep(scores, rate=0.5, allocation="global")  # the 4 lowest of 8 go: 0.05, 0.1, 0.2, 0.3
    assert keep["a"].tolist() == [0, 2] and keep["b"].tolist() == [1, 3]
    scores = {"a": torch.tensor([0.9, 0.8, 0.85, 0.7]), "b": torch.tensor([0.3, 0.1, 0.05, 0.2])}
    assert [v.tolist() for v in units_to_keep(scores, 0.5, "global").values()] == [[0, 1, 2, 3], []]
    assert [v.tolist() for v in units_to_keep(scores, 0.5, "proportional").values()] == [[0, 2], [0, 3]]


def test_removing_a_unit_removes_exactly_its_row_of_w_down_and_column_of_w_up():
    model, _ = with_adapters(small_vit(), hidden=4)
    freeze_backbone(model)
    site = "blocks.1.adapter_attn"
    old = model.get_submodule(site)
    keep = {site: torch.tensor([0, 2, 3])}
    new, change = shrink_adapters(model, keep)
    shrunk = new.get_submodule(site)
    assert shrunk.down.weight.shape == (3, 16) and shrunk.up.weight.shape == (16, 3)
    assert torch.equal(shrunk.down.weight, old.down.weight[[0, 2, 3]])
    assert torch.equal(shrunk.up.weight, old.up.weight[:, [0, 2, 3]])
    assert torch.equal(change.carry(f"{site}.down.weight", old.down.weight), shrunk.down.weight)
    assert torch.equal(change.carry(f"{site}.up.weight", old.up.weight), shrunk.up.weight)
    other = "blocks.0.adapter_mlp"
    assert torch.equal(new.get_submodule(other).down.weight, model.get_submodule(other).down.weight)
    assert change.sources[f"{other}.down.weight"] == (f"{other}.down.weight", ())
    assert new.blocks[0].attn.in_proj_weight is model.blocks[0].attn.in_proj_weight  # frozen tensors are shared
    # a unit whose row of W_down is zero contributes GELU(0) = 0: removing it leaves the function unchanged
    with torch.no_grad():
        old.down.weight[1] = 0
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(shrink_adapters(model, keep)[0](x), model(x), atol=1e-6)


def test_a_removed_adapter_is_the_identity():
    backbone = small_vit()
    x = torch.rand(4, 1, 8, 8)
    reference = backbone(x)
    adapted, _ = with_adapters(backbone, hidden=4)
    assert not torch.allclose(adapted(x), reference)
    sites = list(adapter_sites(adapted))
    gone, change = shrink_adapters(adapted, {s: torch.tensor([], dtype=torch.long) for s in sites})
    assert all(isinstance(gone.get_submodule(s), nn.Identity) for s in sites)
    assert torch.equal(gone(x), reference)
    assert not any("adapter" in name for name in change.sources)
    one, _ = shrink_adapters(adapted, {sites[0]: torch.tensor([], dtype=torch.long)})
    with torch.no_grad():  # the same model with that adapter's output zeroed instead of removed
        adapted.get_submodule(sites[0]).up.weight.zero_()
    assert torch.allclose(one(x), adapted(x), atol=1e-6)
    assert site_labels(sites) == ["0.attn", "0.mlp", "1.attn", "1.mlp"]


def test_a_backbone_that_does_not_fit_is_one_line():
    state = vit_tiny((1, 8, 8), 5, depth=2, heads=2, mlp_dim=32).state_dict()  # dim 64, the arch below 16
    expected = (r"^the backbone from ckpt does not fit this arch: it has blocks.0.attn.in_proj_bias of shape "
                r"\(192,\), the arch \(48,\) \(28 tensor\(s\) differ\)$")
    with pytest.raises(ConfigError, match=expected):
        load_backbone(small_vit(), state, "ckpt")
    with pytest.raises(ConfigError, match="method.backbone and method.pretrain"):
        MiMi(backbone="x.pt", pretrain="mimi_pretrain_digits")
    with pytest.raises(ConfigError, match="method.pretrain=nope: no such experiment preset"):
        MiMi(pretrain="nope")


# -- runs ----------------------------------------------------------------------------------------------------------
def test_backbone_stays_frozen_while_adapters_and_head_train_and_shrink(tmp_path):
    path, backbone = saved_backbone(tmp_path)
    summary = run(make_cfg(*TINY, f"method.backbone={path}"), run_dir=tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    model = rebuild(ckpt["architecture"], ckpt["model"])
    params = dict(model.named_parameters())
    for name, tensor in backbone.items():
        if not name.startswith("head."):
            assert torch.equal(ckpt["model"][name], tensor), name  # bit-identical after 3 rounds of training
            assert not params[name].requires_grad, name
    assert not torch.equal(ckpt["model"]["head.weight"], backbone["head.weight"])
    rounds = read_jsonl(tmp_path / "run" / "rounds.jsonl")
    assert [r["adapter_units"] for r in rounds] == [16, 8, 4]  # 4 adapters of 4 units, rate 0.5 twice
    sizes = [[v for k, v in r.items() if k.startswith("adapter_units/")] for r in rounds]
    assert sizes[0] == [4, 4, 4, 4] and all(len(s) == 4 for s in sizes)
    head = 16 * 5 + 5
    assert [r["trainable_params"] for r in rounds] == [head + 2 * 16 * n for n in (16, 8, 4)]
    assert summary["trainable_params"] == rounds[-1]["trainable_params"] and "test_acc" in rounds[-1]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") or ".adapter_" in n for n in trainable)


def test_proportional_allocation_keeps_every_adapter_the_same_size(tmp_path):
    path, _ = saved_backbone(tmp_path)
    run(make_cfg(*TINY, f"method.backbone={path}", "method.allocation=proportional", "method.rate=0.25"),
        run_dir=tmp_path / "run")
    sizes = [sorted({v for k, v in r.items() if k.startswith("adapter_units/")})
             for r in read_jsonl(tmp_path / "run" / "rounds.jsonl")]
    assert sizes == [[4], [3], [2]]


def test_kill_after_a_surgery_and_resume_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    path, _ = saved_backbone(tmp_path)
    overrides = [*TINY, f"method.backbone={path}", "method.rounds=1"]
    straight = run(make_cfg(*overrides), run_dir=tmp_path / "straight")
    resumed = interrupt_then_resume(monkeypatch, MiMi, "start_epoch", (1, 1), overrides, tmp_path / "killed")
    for key in ("final_test_acc", "final_train_loss", "trainable_params", "adapter_sizes"):
        assert resumed[key] == straight[key], key


def test_end_to_end_cli_pretrains_once_then_reuses_the_cached_backbone(tmp_path):
    """The preset on a smaller vit_tiny: the pre-training preset runs first (with this run's arch), is cached under
    data.root/mimi_backbones, and a second run with the same pre-training config (here in-process) reuses it."""
    data = tmp_path / "data"
    args = ["experiment=mimi_digits", *ARCH, "method.size=4", "method.rounds=1", "trainer.epochs=2",
            'method.pretrain_overrides=["trainer.epochs=3"]', f"data.root={data}"]
    proc = run_cli(*args, "logger.wandb.mode=disabled", "logger.progress=none", "trainer.num_threads=1",
                   "hydra.run.dir=run", cwd=tmp_path)
    assert "pre-training the backbone (experiment=mimi_pretrain_digits, seed 0)" in proc.stdout + proc.stderr
    cached = list((data / "mimi_backbones").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("mimi_pretrain_digits-seed0-")
    assert [r["epoch"] for r in read_jsonl(cached[0] / "metrics.jsonl")] == [0, 1, 2]
    pre_cfg = (cached[0] / "config.yaml").read_text()
    assert "dim: 16" in pre_cfg and "classes: null" in pre_cfg  # this run's arch, the preset's source task
    rounds = read_jsonl(tmp_path / "run" / "rounds.jsonl")
    assert [r["adapter_units"] for r in rounds] == [16, 8]
    again = run(make_cfg(*args, "method.rounds=0"), run_dir=tmp_path / "again")
    assert list((data / "mimi_backbones").iterdir()) == cached  # reused, not trained again
    assert again["num_rounds"] == 1
    ckpt = load_checkpoint(tmp_path / "again" / "checkpoints" / "last.pt")
    backbone = load_checkpoint(cached[0] / "checkpoints" / "last.pt")["model"]
    assert torch.equal(ckpt["model"]["blocks.0.mlp.0.weight"], backbone["blocks.0.mlp.0.weight"])


@pytest.mark.parametrize("bad, expected", [
    ("method.allocation=layerwise", "method.allocation must be one of global, proportional"),
    ("method.rate=1.0", "method.rate must be a number in (0, 1)"),
    ("arch=mlp", "arch mlp has no adapter sites"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, bad, expected):
    assert expected in cli_refusal(tmp_path, "dataset=digits", "method=mimi", bad)


# -- the data sets -------------------------------------------------------------------------------------------------
def test_digit_tasks_keep_relabel_and_shift():
    from regstory.data.digit_tasks import build_digit_tasks
    from regstory.data.digits import build_digits

    full = build_digits()
    task = build_digit_tasks(classes=[7, 5], transform="invert")
    assert task.num_classes == 2 and set(task.train.y.tolist()) == {0, 1}
    sevens = full.train.x[full.train.y == 7]
    assert torch.equal(task.train.x[task.train.y == 0], 1 - sevens)
    assert len(task.test) == int(((full.test.y == 7) | (full.test.y == 5)).sum())
    with pytest.raises(ValueError, match="distinct"):
        build_digit_tasks(classes=[3, 3])


def test_flowers102_missing_offline_is_one_line(tmp_path):
    from regstory.data import DatasetNotFoundError
    from regstory.data.flowers import build_flowers102

    with pytest.raises(DatasetNotFoundError) as err:
        build_flowers102(str(tmp_path / "nowhere"), download=False)
    message = str(err.value)
    assert "\n" not in message and "flowers102" in message and "data.download=true" in message


def test_flowers102_reads_torchvisions_layout(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image
    from scipy.io import savemat
    from torchvision.datasets import Flowers102

    from regstory.data.flowers import build_flowers102

    folder = tmp_path / "flowers-102"
    (folder / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 9):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / "jpg" / f"image_{i:05d}.jpg")
    savemat(folder / "imagelabels.mat", {"labels": np.array([1, 2, 3, 1, 2, 3, 102, 1])})
    savemat(folder / "setid.mat", {"trnid": np.array([1, 2]), "valid": np.array([3, 4]),
                                   "tstid": np.array([5, 6, 7, 8])})
    monkeypatch.setattr(Flowers102, "_check_integrity", lambda self: True)  # fake files, real reader
    bundle = build_flowers102(str(tmp_path), download=False, image_size=16)
    assert bundle.train.x.shape == (4, 3, 16, 16) and bundle.train.x.dtype == torch.uint8
    assert bundle.train.y.tolist() == [0, 1, 2, 0] and bundle.test.y.tolist() == [1, 2, 101, 0]
    assert bundle.num_classes == 102 and bundle.val is None and bundle.augment.flip
    assert (folder / "regstory_cache_train_16.pt").exists()
    split = build_flowers102(str(tmp_path), download=False, image_size=16, trainval=False)
    assert len(split.train) == 2 and len(split.val) == 2
