"""Pruning measurements on a DataLoader-backed set (ImageFolder through :class:`DatasetLoader`), thesis sec. 2.4."""
import torch

from regstory.data import DATASETS
from regstory.data.dataset_loader import DatasetLoader
from regstory.train import run
from tests.conftest import make_cfg, read_jsonl
from tests.data.test_imagenet import write_image_folder


def test_dataset_loader_subset_keeps_labels_and_extras_and_draws_the_same_transforms_each_pass(tmp_path):
    write_image_folder(tmp_path)
    bundle = DATASETS.get("imagenet")(root=str(tmp_path), image_size=16, resize=18)
    split = bundle.train.with_labels(bundle.train.y, {"is_noisy": torch.arange(12) % 5 == 0})
    loader = DatasetLoader(split, 4, torch.device("cpu"), shuffle=True, seed=3)
    part = loader.subset(torch.tensor([1, 5, 10]), batch_size=2)
    assert len(part.split) == 3 and part.split.y.tolist() == [0, 1, 2]
    torch.manual_seed(0)
    outer = torch.get_rng_state()
    first, second = list(part), list(part)
    assert torch.equal(torch.get_rng_state(), outer)  # the random crops do not consume the run's global RNG
    assert [len(b["y"]) for b in first] == [2, 1] and first[0]["is_noisy"].tolist() == [False, True]
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(first, second))  # same RandomResizedCrop/flip draws


def test_imp_two_rounds_on_an_image_folder_measures_entropy_and_memorization(tmp_path):
    """The measurements read ``train.split`` / ``train.subset``, which the DataLoader path lacked (AttributeError
    after round 0)."""
    write_image_folder(tmp_path / "data")
    cfg = make_cfg("dataset=imagenet", "dataset.image_size=16", "dataset.resize=18", "arch=resnet20",
                   "trainer.epochs=1", "trainer.batch_size=4", "trainer.num_workers=0", "noise.rate=0.25",
                   "method=imp", "method.rounds=1", "method.entropy_samples=6", f"data.root={tmp_path / 'data'}")
    summary = run(cfg, run_dir=tmp_path / "run")
    rounds = read_jsonl(tmp_path / "run/rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["sparsity"] > 0.19
    for r in rounds:
        assert 0 <= r["entropy_mean"] <= 1 and 0 <= r["entropy_mean_nonconstant"] <= 1
        assert 0 <= r["noisy_memorized"] <= 1 and 0 <= r["noisy_true_label_acc"] <= 1
    assert summary["final_sparsity"] == rounds[1]["sparsity"]
