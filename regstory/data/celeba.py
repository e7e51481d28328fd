"""CelebA with a target attribute and a bias attribute (thesis Tables 3.1 and 3.2; methods-debias.md sec. 7).

Labels: attributes in {0, 1}; the bias (``Male``) is flipped by default (b = 1 means female), as in the EIDOSLAB
code, so that b == y is the bias-*aligned* case for Blond_Hair and Heavy_Makeup (both female-majority) and the
group metrics' "conflicting" groups are Blond-Male and non-Blond-Female.

Splits (official ``list_eval_partition``):
* train: the official train split minus the validation images;
* val: ``val_group_fraction`` x (smallest group size) images of every (target, bias) group taken out of the train
  split (EIDOSLAB's EnD replication): bias-balanced, for model selection and for fitting the bias probe;
* test: the official ``test_split`` ("valid" in the EnD/Voronoi protocol); with ``balanced_test`` it is subsampled
  to the smallest group's size in every group (seeded by ``balance_seed`` = 42, as in the authors' code), i.e. the
  "unbiased" test set; without, the whole split (Table 3.1 reports accuracy on the natural distribution).

Images: resized (squashed, no crop) to ``image_size`` x ``image_size`` and kept as **uint8** tensors to fit in
memory (162k x 3 x 224 x 224 = 24 GB); the mean/std given to the loader are scaled by 255 so normalisation yields
the usual ImageNet-normalised floats. Random horizontal flips for training when ``augment``. The resized tensors
are cached under ``<root>/celeba/regstory_cache_<split>_<size>.pt``.
"""
from __future__ import annotations

from pathlib import Path

from typing import Annotated

import torch
from torch import Tensor

from regstory.data.base import Augment, DataBundle, TensorSplit
from regstory.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from regstory.data.registry import dataset_option
from regstory.options import OneOf, Range
from regstory.data.torchvision_sets import open_torchvision



def load_split_images(ds, image_size: int, cache: Path) -> Tensor:
    """All images of a torchvision CelebA split as uint8 (N, 3, size, size), read once and cached."""
    if cache.exists():
        return torch.load(cache)
    import numpy as np
    from PIL import Image

    folder = Path(ds.root) / ds.base_folder / "img_align_celeba"
    out = torch.empty(len(ds.filename), 3, image_size, image_size, dtype=torch.uint8)
    for i, name in enumerate(ds.filename):
        with Image.open(folder / name) as img:
            arr = np.asarray(img.convert("RGB").resize((image_size, image_size), Image.BILINEAR))
        out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    torch.save(out, cache)
    return out


def attribute_index(names: list[str], name: str) -> int:
    """Column of attribute ``name``, case-insensitive (``heavy_makeup`` finds ``Heavy_Makeup``)."""
    lowered = [n.lower() for n in names]
    if name.lower() not in lowered:
        raise ValueError(f"CelebA has no attribute '{name}'; choose from: {', '.join(n for n in names if n)}")
    return lowered.index(name.lower())


def attribute_labels(ds, target: str, bias: str, flip_bias: bool) -> tuple[Tensor, Tensor]:
    names = list(ds.attr_names)
    y = ds.attr[:, attribute_index(names, target)].long()
    b = ds.attr[:, attribute_index(names, bias)].long()
    return y, (1 - b) if flip_bias else b


def per_group_sample(y: Tensor, b: Tensor, per_group: int, gen: torch.Generator) -> Tensor:
    """``per_group`` random indices of every (y, b) group in {0,1}^2, sorted."""
    picks = []
    for g in range(4):
        idx = torch.nonzero(y * 2 + b == g).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:per_group]])
    return torch.cat(picks).sort().values


def smallest_group(y: Tensor, b: Tensor) -> int:
    return int(torch.bincount(y * 2 + b, minlength=4).min())


@dataset_option("celeba")
def build_celeba(root: str, download: bool = False, target: str = "Blond_Hair", bias: str = "Male",
                 flip_bias: bool = True, image_size: Annotated[int, Range(ge=1)] = 224,
                 test_split: Annotated[str, OneOf("valid", "test")] = "valid", balanced_test: bool = True,
                 val_group_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.2, balance_seed: int = 42,
                 augment: bool = True) -> DataBundle:
    """CelebA (torchvision's on-disk layout under ``<root>/celeba``) with ``bias`` labels; see the module docstring."""
    from torchvision.datasets import CelebA

    def split(name: str):
        ds = open_torchvision(CelebA, "celeba", root, download, split=name, target_type="attr")
        x = load_split_images(ds, image_size, Path(ds.root) / ds.base_folder / f"regstory_cache_{name}_{image_size}.pt")
        return x, *attribute_labels(ds, target, bias, flip_bias)

    gen = torch.Generator().manual_seed(balance_seed)
    x, y, b = split("train")
    held = per_group_sample(y, b, int(val_group_fraction * smallest_group(y, b)), gen)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[held] = False
    tx, ty, tb = split(test_split)
    test_index = per_group_sample(ty, tb, smallest_group(ty, tb), gen) if balanced_test else torch.arange(len(ty))
    as_split = lambda xs, ys, bs, i: TensorSplit(xs[i], ys[i], {"bias": bs[i]})
    return DataBundle(
        "celeba", as_split(x, y, b, keep), as_split(tx, ty, tb, test_index), num_classes=2,
        val=as_split(x, y, b, held), augment=Augment(flip=augment),
        mean=tuple(255 * m for m in IMAGENET_MEAN), std=tuple(255 * s for s in IMAGENET_STD), num_bias_classes=2)
