import math

import pytest
import torch

from regstory.data.noise import SymmetricNoise, symmetric_noise
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
