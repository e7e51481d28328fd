"""The biased data sets: correlation rho on train, bias-balanced test, val colours independent of the digit."""
import pytest
import torch

from regstory.data.biased import COLOURS, biased_colours, build_biased, build_biased_digits, colourise


def test_train_bias_target_agreement_equals_rho():
    for rho in (0.9, 0.98):
        b = build_biased_digits(rho=rho, colour_seed=1)
        agreement = (b.train.extras["bias"] == b.train.y).float().mean().item()
        # per-class rounding moves the rate by at most 0.5 sample per class
        assert agreement == pytest.approx(rho, abs=10 * 0.5 / len(b.train.y))
        conflicting = b.train.extras["bias"] != b.train.y
        assert conflicting.sum() > 0 and b.num_bias_classes == 10


def test_biased_colours_exact_per_class_and_other_colours_spread():
    y = torch.arange(10).repeat_interleave(100)
    bias = biased_colours(y, 0.91, 10, torch.Generator().manual_seed(0))
    for c in range(10):
        own = bias[y == c]
        assert (own == c).sum() == 91
        assert torch.bincount(own[own != c], minlength=10)[[k for k in range(10) if k != c]].tolist() == [1] * 9


def test_test_split_is_bias_balanced_with_enough_images_per_group():
    b = build_biased_digits(rho=0.98)
    groups = torch.bincount(b.test.y * 10 + b.test.extras["bias"], minlength=100).view(10, 10)
    assert groups.min() >= 20
    assert (groups == groups[:, :1]).all()  # every digit rendered in all ten colours: same count per colour


def test_validation_colours_are_independent_of_the_digit():
    b = build_biased_digits(rho=1.0, val_colours=1)
    agreement = (b.val.extras["bias"] == b.val.y).float().mean().item()
    assert agreement < 0.3  # ~0.1 expected: colour drawn independently of the class
    assert (b.train.extras["bias"] == b.train.y).all()


def test_colourise_white_stroke_on_coloured_background():
    gray = torch.tensor([[[[0.0, 1.0]]]])
    rgb = colourise(gray, torch.tensor([2]))
    assert torch.allclose(rgb[0, :, 0, 0], COLOURS[2]) and torch.allclose(rgb[0, :, 0, 1], torch.ones(3))


def test_biased_mnist_builder_on_fake_grey_digits():
    gen = torch.Generator().manual_seed(0)
    gray = (torch.rand(200, 1, 28, 28, generator=gen) > 0.7).float()
    y = torch.arange(10).repeat(20)
    b = build_biased("biased_mnist", gray, y, gray[:50], y[:50], rho=0.9, val_fraction=0.1, test_colours=1,
                     val_colours=1, seed=0, binarise=True)
    assert b.input_shape == (3, 28, 28) and len(b.val) == 20 and len(b.test) == 50
    assert (b.train.extras["bias"] == b.train.y).float().mean().item() == pytest.approx(0.9, abs=0.03)
    with pytest.raises(ValueError, match="rho"):
        build_biased("x", gray, y, gray, y, 1.5, 0.1, 1, 1, 0, True)
