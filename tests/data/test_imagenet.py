"""The DataLoader path on a tiny ImageNet-style folder the test writes (PNG files in class folders)."""
import numpy as np
import pytest
from PIL import Image

from regstory.data import DATASETS, DatasetNotFoundError
from regstory.train import run
from tests.conftest import make_cfg, read_jsonl


def write_image_folder(root, classes=3, per_class=4, size=20):
    rng = np.random.default_rng(0)
    for part in ("train", "val"):
        for c in range(classes):
            folder = root / "imagenet" / part / f"n0{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_image_folder_split_serves_dict_items_with_labels(tmp_path):
    write_image_folder(tmp_path)
    bundle = DATASETS.get("imagenet")(root=str(tmp_path), image_size=16, resize=18)
    assert bundle.num_classes == 3 and len(bundle.train) == 12 and bundle.input_shape == (3, 16, 16)
    item = bundle.train[5]
    assert item["x"].shape == (3, 16, 16) and item["y"] == 1 and item["index"] == 5


def test_missing_image_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="downloaded by hand"):
        DATASETS.get("imagenet")(root=str(tmp_path))


def test_training_through_the_dataloader_path_with_label_noise(tmp_path):
    write_image_folder(tmp_path / "data")
    cfg = make_cfg("dataset=imagenet", "dataset.image_size=16", "dataset.resize=18", "arch=resnet20",
                   "trainer.epochs=2", "trainer.batch_size=4", "trainer.num_workers=0", "noise.rate=0.25",
                   "dataset.val_fraction=0.25", f"data.root={tmp_path / 'data'}")
    run(cfg, run_dir=tmp_path / "run")
    records = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert len(records) == 2 and records[-1]["val_acc"] is not None
    flipped = (tmp_path / "run/label_noise.csv").read_text().strip().splitlines()
    assert len(flipped) == 1 + 2  # header + floor(0.25 * 9 train images)


def test_data_parallel_train_loader_takes_its_share_of_the_global_batch(tmp_path):
    """make_loaders(shard=(rank, world)): each rank's DataLoader batch is trainer.batch_size / world (it was the
    whole global batch for dataset-backed sets, which only the tensor loader had adjusted)."""
    import torch

    from regstory.data.prepare import make_loaders, prepare_data

    write_image_folder(tmp_path)
    cfg = make_cfg("dataset=imagenet", f"data.root={tmp_path}", "dataset.image_size=16", "dataset.resize=18",
                   "trainer.batch_size=4", "trainer.num_workers=0")
    loaders = make_loaders(prepare_data(cfg, None), cfg, torch.device("cpu"), shard=(0, 2))
    assert loaders["train"].loader.batch_size == 2
    assert len(next(iter(loaders["train"]))["y"]) == 2
    assert loaders["test"].loader.batch_size == int(cfg.trainer.eval_batch_size)
