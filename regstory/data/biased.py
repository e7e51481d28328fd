"""Colour-biased digit sets: the background colour is a spurious feature correlated with the class at rate rho.

* ``biased_mnist``: Biased-MNIST as in ReBias / EnD (Bahng et al. 2020, `datasets/colour_mnist.py`; thesis sec. 3.4):
  the digit's pixels stay white, the background takes one of ten colours.
* ``biased_digits``: the same construction on scikit-learn's bundled 8x8 digits, offline and CPU-sized.

Every split carries the extra ``bias`` (the colour index), so batches have ``batch["bias"]``. Colour k is the
*aligned* colour of class k, so a sample is bias-aligned when ``bias == y``.

Splits: train is coloured at rate ``rho``; the test split is bias-balanced (every test image is rendered in
``test_colours`` colours, all ten by default, so every (target, bias) group has the same size); the validation split
holds out training digits and colours them independently of the class (bias-balanced as well). It is used for model
selection and to fit the bias probe, never the test split.
"""
from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from regstory.data.base import DataBundle, TensorSplit, stratified_split
from regstory.data.registry import dataset_option
from regstory.options import Range

Rho = Annotated[float, Range(ge=0, le=1)]
Colours = Annotated[int, Range(ge=1, le=10)]

#: ReBias's ten background colours (RGB, 0-255); note 225 (not 255) for indices 3 and 4, as in the original.
COLOURS = torch.tensor([
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (225, 225, 0), (225, 0, 225),
    (0, 255, 255), (255, 128, 0), (255, 0, 128), (128, 0, 255), (128, 128, 128),
], dtype=torch.float32) / 255.0

BIASED_MEAN, BIASED_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # ReBias: Normalize(0.5, 0.5)


def colourise(gray: Tensor, colour_index: Tensor, binarise: bool = False) -> Tensor:
    """Render grey digits (N, 1, H, W) in [0, 1] as RGB (N, 3, H, W): stroke white, background ``COLOURS[index]``.

    ``binarise`` follows ReBias (every non-zero pixel is white); otherwise the stroke intensity blends the white
    stroke over the colour, which keeps the anti-aliased 8x8 digits readable.
    """
    ink = (gray > 0).float() if binarise else gray.clamp(0, 1)
    colour = COLOURS[colour_index].view(-1, 3, 1, 1)
    return ink + (1 - ink) * colour


def biased_colours(y: Tensor, rho: float, num_classes: int, gen: torch.Generator) -> Tensor:
    """The colour of each training sample (ReBias's assignment): per class c with n_c samples, round(rho * n_c)
    random ones get colour c; the rest are dealt to the other colours in turn (in a random order), so the
    bias-target agreement is rho up to rounding."""
    bias = torch.empty_like(y)
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_aligned = int(round(rho * len(idx)))
        bias[idx[:n_aligned]] = c
        others = (c + 1 + torch.randperm(num_classes - 1, generator=gen)) % num_classes
        rest = idx[n_aligned:]
        bias[rest] = others[torch.arange(len(rest)) % (num_classes - 1)]
    return bias


def all_colours(gray: Tensor, y: Tensor, num_colours: int, num_classes: int, gen: torch.Generator,
                binarise: bool) -> TensorSplit:
    """Each image rendered in ``num_colours`` distinct colours (all of them when ``num_colours == num_classes``):
    a bias-balanced split in which every (target, bias) group has the same size when all colours are used."""
    n = len(y)
    if num_colours >= num_classes:
        colours = torch.arange(num_classes).repeat(n, 1)
    else:
        colours = torch.stack([torch.randperm(num_classes, generator=gen)[:num_colours] for _ in range(n)])
    colours = colours.flatten()
    rep = torch.arange(n).repeat_interleave(colours.numel() // n)
    return TensorSplit(colourise(gray[rep], colours, binarise), y[rep], {"bias": colours})


def build_biased(name: str, gray_train: Tensor, y_train: Tensor, gray_test: Tensor, y_test: Tensor, rho: float,
                 val_fraction: float, test_colours: int, val_colours: int, seed: int, binarise: bool,
                 num_classes: int = 10) -> DataBundle:
    """Colour a grey train/test pair into a biased train split, a bias-balanced val split and test split."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"dataset.rho={rho} is invalid: must be in [0, 1]")
    gen = torch.Generator().manual_seed(seed)
    keep, held = stratified_split(y_train, val_fraction, seed) if val_fraction > 0 else (torch.arange(len(y_train)), None)
    bias = biased_colours(y_train[keep], rho, num_classes, gen)
    train = TensorSplit(colourise(gray_train[keep], bias, binarise), y_train[keep], {"bias": bias})
    val = all_colours(gray_train[held], y_train[held], val_colours, num_classes, gen, binarise) if held is not None else None
    test = all_colours(gray_test, y_test, test_colours, num_classes, gen, binarise)
    return DataBundle(name, train, test, num_classes, val=val, mean=BIASED_MEAN, std=BIASED_STD,
                      num_bias_classes=num_classes)


@dataset_option("biased_digits")
def build_biased_digits(root: str = "", download: bool = True, rho: Rho = 0.98,
                        test_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.3,
                        holdout_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.15, test_colours: Colours = 10,
                        val_colours: Colours = 10, split_seed: int = 0, colour_seed: int = 0) -> DataBundle:
    """Coloured-background 8x8 digits (offline Biased-MNIST analogue): 3x8x8 inputs, bias = background colour.

    ``test_fraction`` of the 1797 digits form the test split (each rendered in ``test_colours`` colours:
    ~54 images per (target, bias) group with all ten); ``holdout_fraction`` of the rest form the validation split.
    """
    from regstory.data.digits import load_digits_tensors

    x, y = load_digits_tensors()
    tr, te = stratified_split(y, test_fraction, split_seed)
    return build_biased("biased_digits", x[tr], y[tr], x[te], y[te], rho, holdout_fraction, test_colours,
                        val_colours, colour_seed, binarise=False)


def load_mnist_gray(root: str, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST as (N, 1, 28, 28) floats in [0, 1] through torchvision (clear error when missing)."""
    from torchvision.datasets import MNIST

    from regstory.data.torchvision_sets import open_torchvision

    train = open_torchvision(MNIST, "biased_mnist", root, download, train=True)
    test = open_torchvision(MNIST, "biased_mnist", root, download, train=False)
    as_x = lambda ds: ds.data.float().div(255.0).unsqueeze(1)
    return as_x(train), train.targets.long(), as_x(test), test.targets.long()


@dataset_option("biased_mnist")
def build_biased_mnist(root: str, download: bool = True, rho: Rho = 0.99,
                       holdout_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.1, test_colours: Colours = 1,
                       val_colours: Colours = 1, colour_seed: int = 0) -> DataBundle:
    """Biased-MNIST (ReBias/EnD): binarised white digits on a coloured background, train colour = class colour
    with probability ``rho``. The unbiased test split gives each test digit ``test_colours`` random distinct colours
    (1 by default: uniform colours, ~100 images per group, close to ReBias's rho=0.1 test; 10 makes it exactly
    balanced, at 100k images). Deviation from EnD: validation is a held-out ``holdout_fraction`` of the training digits in random colours (EnD's "valid" re-uses
    training images)."""
    gx, gy, tx, ty = load_mnist_gray(root, download)
    return build_biased("biased_mnist", gx, gy, tx, ty, rho, holdout_fraction, test_colours, val_colours,
                        colour_seed, binarise=True)
