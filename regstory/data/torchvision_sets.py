"""CIFAR-10/100 and MNIST through torchvision's real loaders, then held as tensors (images in [0, 1])."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from regstory.data.base import Augment, DataBundle, DatasetNotFoundError, TensorSplit, missing_dataset_message
from regstory.data.registry import dataset_option

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def open_torchvision(cls, name: str, root: str, download: bool, **kwargs):
    """Instantiate a torchvision dataset; turn 'not found' and network failures into one clear error."""
    root = str(Path(root).expanduser())
    try:
        return cls(root=root, download=download, **kwargs)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DatasetNotFoundError(missing_dataset_message(name, root, str(err).split(".")[0], download)) from None
    except OSError as err:  # no network while downloading
        raise DatasetNotFoundError(missing_dataset_message(name, root, str(err), download)) from None


def _hwc_uint8_to_tensor(data) -> torch.Tensor:
    arr = np.asarray(data)
    t = torch.from_numpy(arr).float().div_(255.0)
    return t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t.unsqueeze(1)


def _cifar(cls, name: str, root: str, download: bool, num_classes: int, mean, std, augment: bool) -> DataBundle:
    train = open_torchvision(cls, name, root, download, train=True)
    test = open_torchvision(cls, name, root, download, train=False)
    as_split = lambda ds: TensorSplit(_hwc_uint8_to_tensor(ds.data), torch.as_tensor(ds.targets, dtype=torch.long))
    aug = Augment(crop_padding=4, flip=True) if augment else Augment()
    return DataBundle(name, as_split(train), as_split(test), num_classes, augment=aug, mean=mean, std=std)


@dataset_option("cifar10")
def build_cifar10(root: str, download: bool = True, augment: bool = True) -> DataBundle:
    """CIFAR-10; standard augmentation (random crop, 4 px zero padding, horizontal flip), per-channel normalisation."""
    from torchvision.datasets import CIFAR10

    return _cifar(CIFAR10, "cifar10", root, download, 10, CIFAR10_MEAN, CIFAR10_STD, augment)


@dataset_option("cifar100")
def build_cifar100(root: str, download: bool = True, augment: bool = True) -> DataBundle:
    """CIFAR-100; same augmentation and normalisation scheme as CIFAR-10."""
    from torchvision.datasets import CIFAR100

    return _cifar(CIFAR100, "cifar100", root, download, 100, CIFAR100_MEAN, CIFAR100_STD, augment)


@dataset_option("mnist")
def build_mnist(root: str, download: bool = True) -> DataBundle:
    """MNIST 28x28, no augmentation, normalised with the usual mean/std."""
    from torchvision.datasets import MNIST

    train = open_torchvision(MNIST, "mnist", root, download, train=True)
    test = open_torchvision(MNIST, "mnist", root, download, train=False)
    as_split = lambda ds: TensorSplit(ds.data.float().div(255.0).unsqueeze(1), ds.targets.long())
    return DataBundle("mnist", as_split(train), as_split(test), 10, mean=MNIST_MEAN, std=MNIST_STD)
