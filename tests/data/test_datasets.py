import pickle

import numpy as np
import pytest
import torch

from regstory.data import DATASETS, DatasetNotFoundError
from regstory.data.torchvision_sets import build_cifar10
from regstory.registry import UnknownNameError


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(UnknownNameError, match="unknown dataset 'cifar11'; choose one of: .*cifar10.*mnist1d"):
        DATASETS.get("cifar11")


def test_digits_split_is_fixed_stratified_and_in_unit_range():
    a, b = DATASETS.get("digits")(), DATASETS.get("digits")()
    assert torch.equal(a.train.y, b.train.y) and len(a.train) + len(a.test) == 1797
    assert a.train.x.shape[1:] == (1, 8, 8) and 0 <= a.train.x.min() and a.train.x.max() <= 1
    train_share = torch.bincount(a.train.y).float() / torch.bincount(torch.cat([a.train.y, a.test.y])).float()
    assert (train_share - 0.7).abs().max() < 0.02


def test_mnist1d_is_generated_offline_and_cached(tmp_path):
    bundle = DATASETS.get("mnist1d")(root=str(tmp_path), num_samples=600)
    assert bundle.train.x.shape == (480, 40) and len(bundle.test) == 120 and bundle.num_classes == 10
    assert len(list((tmp_path / "mnist1d").glob("*.pkl"))) == 1
    again = DATASETS.get("mnist1d")(root=str(tmp_path), num_samples=600)
    assert torch.equal(bundle.train.x, again.train.x)


def write_fake_cifar10(root, n_train_per_batch=4, n_test=6):
    """torchvision's on-disk CIFAR-10 format: pickled dicts of uint8 rows (3072 = 3x32x32, channel-major)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}

    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / name).write_bytes(pickle.dumps(batch(n_train_per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder


def test_cifar10_loader_reads_torchvision_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    folder = write_fake_cifar10(tmp_path)
    # fake files cannot match the official md5 sums: skip only that check, the real reader does the rest
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    bundle = build_cifar10(str(tmp_path), download=False)
    assert bundle.train.x.shape == (20, 3, 32, 32) and bundle.test.x.shape == (6, 3, 32, 32)
    raw = pickle.loads((folder / "data_batch_1").read_bytes())["data"][0].reshape(3, 32, 32)
    assert torch.allclose(bundle.train.x[0], torch.as_tensor(raw).float() / 255)
    assert bundle.augment.crop_padding == 4 and bundle.augment.flip and len(bundle.mean) == 3


def test_missing_cifar_without_download_names_folder_and_flag(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_cifar10(str(tmp_path / "nowhere"), download=False)
    message = str(err.value)
    assert "nowhere" in message and "data.download=true" in message and "data.root" in message


def test_failed_download_says_so_instead_of_asking_for_download(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    with pytest.raises(DatasetNotFoundError, match="downloading it failed .*network unreachable.*data.root"):
        build_cifar10(str(tmp_path), download=True)


def test_celeba_download_without_gdown_says_how_to_install_it(tmp_path, monkeypatch):
    import torchvision.datasets

    class NeedsGdown:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("To download files from GDrive, 'gdown' is required. You can install it with 'pip install gdown'.")

    monkeypatch.setattr(torchvision.datasets, "CelebA", NeedsGdown)
    with pytest.raises(DatasetNotFoundError, match=r"downloading it failed.*pip install gdown.*\.\[celeba\]"):
        DATASETS.get("celeba")(root=str(tmp_path), download=True)
