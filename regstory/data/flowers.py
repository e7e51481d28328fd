"""Oxford 102 Flowers ("VGG-Flowers", thesis Fig. 2.10) through torchvision's ``Flowers102``, held as uint8 tensors.

torchvision's layout under ``<data.root>/flowers-102`` (``jpg/``, ``imagelabels.mat``, ``setid.mat``), downloaded
there when ``data.download=true``; missing offline, one line says where to put it. Splits: the official train and
val (1020 images each) and test (6149); ``trainval`` (default) trains on train + val, as the adapter papers do, else
on train alone (then val is the run's validation split). Images are resized (squashed, no crop) to ``image_size``
x ``image_size`` and kept as uint8 tensors (8189 x 3 x 224 x 224 = 1.2 GB), cached under
``<root>/flowers-102/regstory_cache_<split>_<size>.pt``; the loader normalises them with ImageNet's mean/std (scaled
by 255, as for CelebA), the statistics of torchvision's ImageNet weights. Random horizontal flips for training when
``augment``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
from torch import Tensor

from regstory.data.base import Augment, DataBundle, TensorSplit
from regstory.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from regstory.data.registry import dataset_option
from regstory.data.torchvision_sets import open_torchvision
from regstory.options import Range


def load_images(files: list[Path], image_size: int, cache: Path) -> Tensor:
    """The images ``files`` as uint8 (N, 3, size, size), read once and cached at ``cache``."""
    if cache.exists():
        return torch.load(cache)
    import numpy as np
    from PIL import Image

    out = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    for i, name in enumerate(files):
        with Image.open(name) as img:
            arr = np.asarray(img.convert("RGB").resize((image_size, image_size), Image.BILINEAR))
        out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    tmp = cache.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(cache)
    return out


@dataset_option("flowers102")
def build_flowers102(root: str, download: bool = True, image_size: Annotated[int, Range(ge=1)] = 224,
                     trainval: bool = True, augment: bool = True) -> DataBundle:
    """Oxford 102 Flowers (102 classes); see the module docstring."""
    from torchvision.datasets import Flowers102

    def split(name: str) -> TensorSplit:
        ds = open_torchvision(Flowers102, "flowers102", root, download, split=name)
        cache = Path(ds.root) / "flowers-102" / f"regstory_cache_{name}_{image_size}.pt"
        return TensorSplit(load_images(list(ds._image_files), image_size, cache),
                           torch.as_tensor(ds._labels, dtype=torch.long))

    train, val, test = split("train"), split("val"), split("test")
    if trainval:
        train, val = TensorSplit(torch.cat([train.x, val.x]), torch.cat([train.y, val.y])), None
    return DataBundle("flowers102", train, test, num_classes=102, val=val, augment=Augment(flip=augment),
                      mean=tuple(255 * m for m in IMAGENET_MEAN), std=tuple(255 * s for s in IMAGENET_STD))
