import math

import pytest
import torch

from regstory.data.noise import (CIFAR10_MAP, AsymmetricNoise, PairflipNoise, SymmetricNoise, asymmetric_noise,
                                 pairflip_noise, symmetric_noise)
from regstory.data.prepare import prepare_data
from tests.conftest import make_cfg


def test_symmetric_noise_flips_exactly_floor_rate_n_labels_to_a_different_class():
    labels = torch.arange(1000) % 10
    noisy, flipped = symmetric_noise(labels, 10, 0.37, seed=3)
    assert len(flipped) == math.floor(0.37 * 1000)
    changed = torch.nonzero(noisy != labels).flatten()
    assert torch.equal(changed, flipped)  # every chosen label is wrong, no other label moved
    assert noisy.min() >= 0 and noisy.max() < 10


def test_noisy_labels_are_spread_over_the_other_classes():
    labels = torch.zeros(20000, dtype=torch.long)
    noisy, _ = symmetric_noise(labels, 5, 0.5, seed=0)
    counts = torch.bincount(noisy[noisy != 0], minlength=5)[1:].float()
    assert counts.min() / counts.max() > 0.9  # uniform over the 4 wrong classes


def test_same_seed_same_flipped_set_other_seed_differs():
    labels = torch.arange(500) % 10
    a, fa = symmetric_noise(labels, 10, 0.2, seed=7)
    b, fb = symmetric_noise(labels, 10, 0.2, seed=7)
    c, fc = symmetric_noise(labels, 10, 0.2, seed=8)
    assert torch.equal(a, b) and torch.equal(fa, fb)
    assert not torch.equal(fa, fc)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_rate_outside_unit_interval_is_rejected(rate):
    with pytest.raises(ValueError, match=r"noise.rate must be a number in \[0, 1\)"):
        SymmetricNoise(rate=rate)


def test_prepare_data_noises_train_only_and_records_flips(tmp_path):
    clean = prepare_data(make_cfg("dataset=digits"), None)
    noisy = prepare_data(make_cfg("dataset=digits", "noise.rate=0.3"), tmp_path)
    assert torch.equal(clean.test.y, noisy.test.y) and torch.equal(clean.test.x, noisy.test.x)
    assert torch.equal(noisy.train.extras["true_y"], clean.train.y)
    n_flipped = int(noisy.train.extras["is_noisy"].sum())
    assert n_flipped == math.floor(0.3 * len(clean.train))
    import pandas as pd

    table = pd.read_csv(tmp_path / "label_noise.csv")
    assert len(table) == n_flipped
    assert (table.true_label != table.noisy_label).all()


def test_validation_split_is_held_out_before_noise_and_stays_clean():
    bundle = prepare_data(make_cfg("dataset=digits", "dataset.val_fraction=0.2", "noise.rate=0.5"), None)
    full = prepare_data(make_cfg("dataset=digits"), None)
    assert len(bundle.val) + len(bundle.train) == len(full.train)
    assert "is_noisy" not in bundle.val.extras  # validation labels are the true ones
    assert abs(len(bundle.val) / len(full.train) - 0.2) < 0.01


def test_without_noise_the_train_split_carries_no_noise_extras_and_the_flip_table_is_empty(tmp_path):
    """rate=0 flips nothing: batches need not gather true_y/is_noisy every step; label_noise.csv is still written."""
    import pandas as pd

    bundle = prepare_data(make_cfg("dataset=digits"), tmp_path)
    assert "true_y" not in bundle.train.extras and "is_noisy" not in bundle.train.extras
    table = pd.read_csv(tmp_path / "label_noise.csv")
    assert list(table.columns) == ["index", "true_label", "noisy_label"] and len(table) == 0


# ---- pair-flip and asymmetric (class-dependent) noise --------------------------------------------------------------
def test_pairflip_moves_exactly_floor_rate_n_labels_to_the_next_class():
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    noisy, flipped = pairflip_noise(labels, 4, 0.45, seed=0)  # floor(4.5) = 4 labels
    assert len(flipped) == 4 and torch.equal(torch.nonzero(noisy != labels).flatten(), flipped)
    assert torch.equal(noisy[flipped], (labels[flipped] + 1) % 4)  # 0->1, 1->2, 2->3, 3->0: nothing else
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[flipped] = False
    assert torch.equal(noisy[untouched], labels[untouched])


def test_pairflip_wraps_the_last_class_and_is_seeded():
    labels = torch.full((6,), 2)
    noisy, flipped = pairflip_noise(labels, 3, 0.99, seed=5)  # floor(5.94) = 5 of the six 2s -> 0
    assert torch.equal(torch.bincount(noisy, minlength=3), torch.tensor([5, 0, 1]))
    again, flipped_again = pairflip_noise(labels, 3, 0.99, seed=5)
    assert torch.equal(noisy, again) and torch.equal(flipped, flipped_again)
    _, other = pairflip_noise(torch.arange(100) % 3, 3, 0.3, seed=6)
    _, same = pairflip_noise(torch.arange(100) % 3, 3, 0.3, seed=5)
    assert not torch.equal(other, same)


def test_asymmetric_noise_follows_the_map_with_floor_rate_n_c_per_mapped_class():
    # class 0: 4 samples, class 1: 3 (unmapped), class 2: 5; map 0 -> 2, 2 -> 0
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    noisy, flipped = asymmetric_noise(labels, 3, 0.5, seed=1, mapping={0: 2, 2: 0})
    assert torch.equal(torch.nonzero(noisy != labels).flatten(), flipped)
    assert int((labels[flipped] == 0).sum()) == 2 and int((labels[flipped] == 2).sum()) == 2  # floor(.5*4), floor(.5*5)
    assert torch.equal(noisy[flipped], torch.where(labels[flipped] == 0, 2, 0))
    assert torch.equal(noisy[4:7], labels[4:7])  # the unmapped class keeps every label


def test_asymmetric_default_is_the_cifar10_map():
    assert CIFAR10_MAP == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # truck->automobile, bird->airplane, deer->horse, cat<->dog
    labels = torch.arange(10).repeat_interleave(10)
    noisy, flipped = AsymmetricNoise(rate=0.4).flip(labels, 10, seed=0)
    moved = {(int(a), int(b)) for a, b in zip(labels[flipped], noisy[flipped])}
    assert moved == {(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)} and len(flipped) == 5 * 4
    with pytest.raises(ValueError, match="noise.map"):
        AsymmetricNoise(rate=0.4).flip(torch.arange(5), 5, seed=0)  # CIFAR-10's map on a 5-class set
    with pytest.raises(ValueError, match="noise.map"):
        AsymmetricNoise(rate=0.4, map={1: 1})
    with pytest.raises(ValueError, match="noise.map"):
        AsymmetricNoise(rate=0.4, map={1: 7}).flip(torch.arange(5), 5, seed=0)


@pytest.mark.parametrize("kind", [PairflipNoise, AsymmetricNoise])
@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_every_kind_checks_its_rate(kind, rate):
    with pytest.raises(ValueError, match=r"noise.rate must be a number in \[0, 1\)"):
        kind(rate=rate)


@pytest.mark.parametrize("kind, extra", [("pairflip", []), ("asymmetric", ["noise.map={0: 1, 1: 0, 7: 9}"])])
def test_prepare_data_with_each_kind_keeps_val_and_test_clean_and_records_flips(kind, extra, tmp_path):
    import pandas as pd

    full = prepare_data(make_cfg("dataset=digits", "dataset.val_fraction=0.2"), None)
    noisy = prepare_data(make_cfg("dataset=digits", "dataset.val_fraction=0.2", f"noise={kind}", "noise.rate=0.3",
                                  *extra), tmp_path)
    assert torch.equal(full.test.y, noisy.test.y) and torch.equal(full.val.y, noisy.val.y)
    assert "is_noisy" not in noisy.val.extras
    true = noisy.train.extras["true_y"]
    assert torch.equal(true, full.train.y)
    table = pd.read_csv(tmp_path / "label_noise.csv")
    assert torch.equal(torch.tensor(table["index"].values), torch.nonzero(noisy.train.y != true).flatten())
    if kind == "pairflip":
        assert len(table) == math.floor(0.3 * len(true))
        assert ((table.true_label + 1) % 10 == table.noisy_label).all()
    else:
        counts = torch.bincount(true, minlength=10)
        assert len(table) == sum(math.floor(0.3 * int(counts[c])) for c in (0, 1, 7))
        assert set(zip(table.true_label, table.noisy_label)) == {(0, 1), (1, 0), (7, 9)}
    again = prepare_data(make_cfg("dataset=digits", "dataset.val_fraction=0.2", f"noise={kind}", "noise.rate=0.3",
                                  *extra), None)
    assert torch.equal(again.train.y, noisy.train.y)  # seeded
