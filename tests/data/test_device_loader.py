import torch

from regstory.data.base import TensorSplit
from regstory.data.device_loader import TensorLoader, random_crop, random_flip


def make_split(n=10):
    return TensorSplit(torch.arange(n * 4.0).view(n, 1, 2, 2), torch.arange(n), {"bias": torch.arange(n) % 2})


def test_batches_cover_the_split_once_and_carry_extras_and_index():
    loader = TensorLoader(make_split(), batch_size=3, shuffle=True, seed=1)
    batches = list(loader)
    index = torch.cat([b["index"] for b in batches])
    assert sorted(index.tolist()) == list(range(10)) and len(batches) == len(loader) == 4
    for b in batches:
        assert torch.equal(b["y"], b["index"]) and torch.equal(b["bias"], b["index"] % 2)


def test_same_epoch_same_order_next_epoch_differs():
    loader = TensorLoader(make_split(50), batch_size=50, shuffle=True, seed=1)
    loader.set_epoch(0, 3)
    a = next(iter(loader))["index"]
    b = next(iter(loader))["index"]
    loader.set_epoch(0, 4)
    c = next(iter(loader))["index"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    out = random_crop(x, 1, gen)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    windows = [padded[..., i : i + 4, j : j + 4] for i in range(3) for j in range(3)]
    assert any(torch.equal(out, w) for w in windows)


def test_flip_mirrors_about_half_the_images():
    x = torch.arange(2.0).view(1, 1, 1, 2).repeat(1000, 1, 1, 1)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == 1).float().mean()
    assert 0.45 < flipped < 0.55


def test_normalisation_and_shards():
    split = make_split(10)
    loader = TensorLoader(split, batch_size=10, mean=(1.0,), std=(2.0,))
    assert torch.allclose(next(iter(loader))["x"], (split.x - 1) / 2)
    shards = [torch.cat([b["index"] for b in TensorLoader(split, 4, shard=(r, 3))]) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # ceil(10 / 3) each, padded by wrapping
    assert set(torch.cat(shards).tolist()) == set(range(10))


def test_uint8_inputs_stay_uint8_on_the_device_and_batches_match_the_float_path():
    """CelebA stores uint8 images: the loader keeps them uint8 (a float copy is 4x the memory) and normalises each
    batch, giving the same augmented, channels-last batches as the same images given as floats."""
    from regstory.data.base import Augment

    images = torch.randint(0, 256, (12, 3, 6, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    options = dict(batch_size=5, shuffle=True, seed=3, augment=Augment(crop_padding=2, flip=True),
                   mean=(120.0, 110.0, 100.0), std=(60.0, 50.0, 40.0), channels_last=True)
    as_uint8 = TensorLoader(TensorSplit(images, torch.arange(12)), **options)
    as_float = TensorLoader(TensorSplit(images.float(), torch.arange(12)), **options)
    assert as_uint8.x.dtype == torch.uint8
    for a, b in zip(as_uint8, as_float):
        assert a["x"].dtype == torch.float32 and torch.equal(a["x"], b["x"]) and torch.equal(a["index"], b["index"])


def test_in_order_is_the_whole_split_in_storage_order_unaugmented_on_every_shard():
    from regstory.data.base import Augment

    loader = TensorLoader(make_split(), batch_size=4, shuffle=True, drop_last=True, seed=1,
                          augment=Augment(crop_padding=1, flip=True), shard=(1, 2))
    batches = list(loader.in_order())
    assert [len(b["y"]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(10))
    assert torch.equal(torch.cat([b["x"] for b in batches]), make_split().x)


def test_the_loader_keeps_only_the_stored_inputs_and_subsets_cut_from_them_are_normalised_once():
    """The raw float inputs were kept alive beside the normalised copy (2x a set's memory on a GPU)."""
    import gc
    import weakref

    raw = torch.arange(40.0).view(10, 1, 2, 2)
    raw_ref = weakref.ref(raw)
    loader = TensorLoader(TensorSplit(raw, torch.arange(10), {"bias": torch.arange(10) % 2}), batch_size=4,
                          shuffle=True, mean=(1.0,), std=(2.0,))
    expected = (raw - 1) / 2
    del raw
    gc.collect()
    assert raw_ref() is None and loader.split.x is loader.x
    sub = loader.subset(torch.tensor([7, 2, 5]), batch_size=2)
    batches = list(sub)
    assert [len(b["y"]) for b in batches] == [2, 1]
    assert torch.equal(torch.cat([b["x"] for b in batches]), expected[[7, 2, 5]])
    assert torch.equal(torch.cat([b["bias"] for b in batches]), torch.tensor([1, 0, 1]))


def test_subsets_of_integer_inputs_keep_the_per_batch_normalisation():
    raw = torch.arange(40, dtype=torch.uint8).view(10, 1, 2, 2)
    loader = TensorLoader(TensorSplit(raw, torch.arange(10)), batch_size=4, mean=(1.0,), std=(2.0,))
    (batch,) = list(loader.subset(torch.tensor([3, 4])))
    assert torch.equal(batch["x"], (raw[[3, 4]].float() - 1) / 2)
