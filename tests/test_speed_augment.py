"""Device-side batched augmentation and normalisation equal the per-sample torchvision recipe (issue 8)."""
from __future__ import annotations

import torch

from regstory.data.base import Augment, TensorSplit
from regstory.data.device_loader import TensorLoader, epoch_generator, random_crop, random_flip
from regstory.train import run
from tests.conftest import read_jsonl, run_cli, make_cfg


def per_sample_reference(x: torch.Tensor, dy, dx, flip, padding: int, mean, std) -> torch.Tensor:
    """What a per-sample pipeline does: pad with zeros, crop at (dy, dx), flip, then normalise, one image at a time."""
    out = []
    h, w = x.shape[-2:]
    for i in range(len(x)):
        img = torch.nn.functional.pad(x[i], (padding,) * 4)[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        if flip[i]:
            img = img.flip(-1)
        out.append((img - mean) / std)
    return torch.stack(out)


def test_random_crop_takes_the_window_at_the_drawn_offset():
    """A 2x2 image padded by 1 -> 4x4; offsets (dy, dx) in {0,1,2}^2 select the 2x2 window at that corner."""
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]).repeat(6, 1, 1, 1)
    gen = torch.Generator().manual_seed(3)
    dy = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(3))
    dx_gen = torch.Generator().manual_seed(3)
    torch.randint(0, 3, (6,), generator=dx_gen)
    dx = torch.randint(0, 3, (6,), generator=dx_gen)
    got = random_crop(x, 1, gen)
    padded = torch.zeros(4, 4)
    padded[1:3, 1:3] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    for i in range(6):
        assert torch.equal(got[i, 0], padded[dy[i]:dy[i] + 2, dx[i]:dx[i] + 2])


def test_random_flip_mirrors_exactly_the_drawn_images():
    x = torch.arange(8 * 3, dtype=torch.float32).view(8, 1, 1, 3)
    flip = torch.rand(8, generator=torch.Generator().manual_seed(5)) < 0.5
    got = random_flip(x, torch.Generator().manual_seed(5))
    assert 0 < int(flip.sum()) < 8
    for i in range(8):
        assert torch.equal(got[i], x[i].flip(-1) if flip[i] else x[i])


def cifar_like_split(n: int = 10) -> TensorSplit:
    g = torch.Generator().manual_seed(0)
    return TensorSplit(torch.rand(n, 3, 5, 5, generator=g), torch.arange(n) % 3, {"bias": torch.arange(n) * 10})


def test_loader_batches_equal_the_per_sample_pipeline_bit_for_bit():
    """Normalising once up front and padding with the normalised black value gives exactly crop -> flip -> normalise."""
    split = cifar_like_split()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    loader = TensorLoader(split, 4, shuffle=True, augment=Augment(crop_padding=2, flip=True), mean=mean, std=std,
                          seed=7)
    loader.set_epoch(1, 2)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    gen = epoch_generator(7, 1, 2)
    order = torch.randperm(10, generator=gen)
    batches = list(loader)
    assert [len(b["y"]) for b in batches] == [4, 4, 2]
    for k, batch in enumerate(batches):
        idx = order[4 * k:4 * k + 4]
        b = len(idx)
        dy = torch.randint(0, 5, (b,), generator=gen)
        dx = torch.randint(0, 5, (b,), generator=gen)
        flip = torch.rand(b, generator=gen) < 0.5
        expected = per_sample_reference(split.x[idx], dy, dx, flip, 2, m, s)
        assert torch.equal(batch["x"], expected)
        assert torch.equal(batch["index"], idx)
        assert torch.equal(batch["y"], split.y[idx]) and torch.equal(batch["bias"], split.extras["bias"][idx])


def test_channels_last_batches_hold_the_same_values():
    split = cifar_like_split()
    kwargs = dict(batch_size=4, shuffle=True, augment=Augment(crop_padding=1, flip=True), mean=(0.5,) * 3,
                  std=(0.5,) * 3, seed=1)
    plain, fast = TensorLoader(split, **kwargs), TensorLoader(split, channels_last=True, **kwargs)
    for a, b in zip(plain, fast):
        assert b["x"].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a["x"], b["x"])
    test_loader = TensorLoader(split, 4, channels_last=True)
    assert next(iter(test_loader))["x"].is_contiguous(memory_format=torch.channels_last)


def test_an_epoch_is_the_same_after_a_restart():
    """The shuffle/augmentation generator depends on (seed, round, epoch) only: a resumed run sees the same batches."""
    split = cifar_like_split()
    first = TensorLoader(split, 3, shuffle=True, augment=Augment(crop_padding=1, flip=True), seed=4)
    again = TensorLoader(split, 3, shuffle=True, augment=Augment(crop_padding=1, flip=True), seed=4)
    first.set_epoch(0, 5)
    again.set_epoch(0, 5)
    for a, b in zip(first, again):
        assert torch.equal(a["x"], b["x"])
    again.set_epoch(0, 6)
    assert not torch.equal(next(iter(first))["index"], next(iter(again))["index"])


def test_channels_last_training_matches_the_default_layout(tmp_path):
    """trainer.channels_last changes memory layout only: LeNet-5 on digits learns the same (up to float order)."""
    base = run(make_cfg("dataset=digits", "arch=lenet5", "trainer.epochs=1"), run_dir=tmp_path / "nchw")
    fast = run(make_cfg("dataset=digits", "arch=lenet5", "trainer.epochs=1", "trainer.channels_last=true"),
               run_dir=tmp_path / "cl")
    assert abs(base["final_train_loss"] - fast["final_train_loss"]) < 1e-3


def test_cli_runs_the_fast_path_end_to_end(tmp_path):
    run_cli("dataset=digits", "arch=lenet5", "trainer.epochs=2", "trainer.channels_last=true",
            "trainer.precision=bf16", "logger.wandb.mode=disabled", "logger.progress=none", "trainer.num_threads=1",
            "hydra.run.dir=run", cwd=tmp_path)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["train_loss"] < records[0]["train_loss"]
