"""Fixtures of the debiasing tests."""
import pytest
import torch

NAMES = ["Blond_Hair", "Heavy_Makeup", "Male"]


@pytest.fixture
def fake_celeba(tmp_path, monkeypatch):
    """torchvision's on-disk layout (<root>/celeba/img_align_celeba/*.jpg) with a stand-in for the CelebA class
    (the real one checks the md5 of the full annotation files)."""
    from PIL import Image

    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    splits = {}
    for s, n in (("train", 60), ("valid", 24), ("test", 12)):
        blond = torch.tensor([1, 1, 0, 0] * (n // 4))
        male = torch.tensor([1, 0, 1, 0] * (n // 4))
        if s == "train":  # biased: blond mostly female
            male = torch.where(torch.arange(n) % 8 == 0, torch.ones(n, dtype=torch.long), male * (1 - blond))
        names = [f"{s}_{i:03d}.jpg" for i in range(n)]
        for i, name in enumerate(names):
            Image.new("RGB", (18, 22), color=(10 * i % 255, 100, 200)).save(folder / name)
        splits[s] = (names, torch.stack([blond, torch.randint(0, 2, (n,), generator=gen), male], 1))

    class FakeCelebA:
        base_folder = "celeba"

        def __init__(self, root, download, split, target_type):
            self.root = root
            self.filename, self.attr = splits[split]
            self.attr_names = NAMES

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CelebA", FakeCelebA)
    return tmp_path
