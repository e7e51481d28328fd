"""ImageNet (or any ImageNet-style folder) through torchvision's ImageFolder, read by DataLoader workers.

Layout: ``<data.root>/<folder>/train/<class>/*.JPEG`` and ``<data.root>/<folder>/val/<class>/*.JPEG`` (the
validation images sorted into class folders, as most ImageNet copies are). ImageNet cannot be downloaded
automatically (its licence requires a manual download), so ``data.download`` has no effect here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch

from regstory.data.base import DataBundle, DatasetNotFoundError, DatasetSplit
from regstory.data.registry import dataset_option
from regstory.options import Range

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _transforms(image_size: int, resize: int):
    from torchvision import transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    test = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), normalize])
    return train, test


@dataset_option("imagenet")
def build_imagenet(root: str, download: bool = False, folder: str = "imagenet",
                   image_size: Annotated[int, Range(ge=1)] = 224, resize: Annotated[int, Range(ge=1)] = 256) -> DataBundle:
    """Standard ImageNet pipeline: RandomResizedCrop + flip for training, resize + center crop for evaluation."""
    from torchvision.datasets import ImageFolder

    base = Path(root).expanduser() / folder
    for part in ("train", "val"):
        if not (base / part).is_dir():
            raise DatasetNotFoundError(
                f"dataset 'imagenet' not found: no folder '{base / part}' (ImageNet must be downloaded by hand; "
                f"put train/ and val/ class folders under '{base}', or point data.root=<folder> at a copy)")
    train_tf, test_tf = _transforms(image_size, resize)
    train, val = ImageFolder(str(base / "train"), train_tf), ImageFolder(str(base / "val"), test_tf)
    shape = (3, image_size, image_size)
    as_split = lambda ds: DatasetSplit(ds, torch.as_tensor(ds.targets, dtype=torch.long), sample_shape=shape)
    return DataBundle("imagenet", as_split(train), as_split(val), num_classes=len(train.classes))
