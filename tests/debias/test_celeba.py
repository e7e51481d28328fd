"""CelebA builder: clear error when missing; labels, bias flip, group-balanced val/test on a tiny fake CelebA."""
import pytest
import torch

from regstory.data.base import DatasetNotFoundError
from regstory.data.celeba import build_celeba

def test_missing_celeba_gives_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="celeba.*data.root"):
        build_celeba(root=str(tmp_path), download=False)


def test_celeba_labels_groups_and_uint8_images(fake_celeba):
    b = build_celeba(root=str(fake_celeba), image_size=16)
    assert b.input_shape == (3, 16, 16) and b.train.x.dtype == torch.uint8 and b.num_bias_classes == 2
    # Male flipped: bias 1 = female, so blond (y=1) & female (b=1) is bias-aligned
    y, bias = b.test.y, b.test.extras["bias"]
    counts = torch.bincount(y * 2 + bias, minlength=4)
    assert (counts == counts[0]).all() and counts[0] == 6  # valid split, group-balanced (6 per group)
    val_counts = torch.bincount(b.val.y * 2 + b.val.extras["bias"], minlength=4)
    assert (val_counts == val_counts[0]).all()
    assert len(b.train) + len(b.val) == 60
    # normalisation constants are scaled for uint8 inputs
    assert b.mean[0] == pytest.approx(0.485 * 255)
    assert (fake_celeba / "celeba" / "regstory_cache_train_16.pt").exists()


def test_celeba_natural_test_split_and_unknown_attribute(fake_celeba):
    b = build_celeba(root=str(fake_celeba), image_size=8, test_split="test", balanced_test=False, flip_bias=False)
    assert len(b.test) == 12 and torch.equal(b.test.extras["bias"], torch.tensor([1, 0, 1, 0] * 3))
    with pytest.raises(ValueError, match="no attribute 'Smiling'"):
        build_celeba(root=str(fake_celeba), image_size=8, target="Smiling")


def test_celeba_trains_through_the_loop_with_uint8_inputs(fake_celeba, tmp_path):
    from regstory.train import run
    from tests.conftest import make_cfg

    cfg = make_cfg(f"data.root={fake_celeba}", "data.download=false", "dataset=celeba", "dataset.image_size=16",
                   "arch=simple_convnet_small", "arch.channels=[4,8,8]", "debias=groupdro", "debias.probe_steps=5",
                   "trainer.epochs=1", "trainer.batch_size=16")
    summary = run(cfg, run_dir=tmp_path / "run")
    assert 0.0 <= summary["last_test_unbiased_acc"] <= 1.0 and summary["last_test_worst_group_acc"] is not None


def test_attribute_names_are_case_insensitive():
    import pytest

    from regstory.data.celeba import attribute_index

    names = ["5_o_Clock_Shadow", "Blond_Hair", "Heavy_Makeup", "Male", ""]
    assert attribute_index(names, "heavy_makeup") == 2 and attribute_index(names, "Blond_Hair") == 1
    with pytest.raises(ValueError, match="no attribute 'Bald'; choose from: 5_o_Clock_Shadow, Blond_Hair"):
        attribute_index(names, "Bald")
