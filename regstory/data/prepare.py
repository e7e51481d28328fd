"""From a dataset config to device-ready loaders: build, hold out validation, add label noise, move, batch."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from regstory.config import DATASET_RUNNER_KEYS
from regstory.data.base import DataBundle, DatasetSplit, stratified_split
from regstory.data.dataset_loader import DatasetLoader
from regstory.data.device_loader import TensorLoader
from regstory.distributed import DistEnv, per_rank_batch_size

log = logging.getLogger("regstory")


def build_dataset(cfg: DictConfig) -> DataBundle:
    """Call the dataset's builder (``dataset._target_``) with the data root/download flags and its own options."""
    options = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()
               if k != "_target_" and k not in DATASET_RUNNER_KEYS}
    builder = get_method(cfg.dataset._target_)
    return builder(root=str(Path(cfg.data.root).expanduser()), download=bool(cfg.data.download), **options)


def hold_out_validation(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """Move a stratified, seeded ``fraction`` of the train split into ``bundle.val`` (before any label noise,
    so validation labels stay clean)."""
    if fraction <= 0:
        return bundle
    keep, held = stratified_split(bundle.train.y, fraction, seed)
    bundle.val = bundle.train.subset(held)
    bundle.train = bundle.train.subset(keep)
    return bundle


def add_label_noise(bundle: DataBundle, noise_cfg: DictConfig, seed: int, run_dir: Path | None) -> DataBundle:
    """Apply the ``noise`` group to the train split; write the flipped indices to ``label_noise.csv``."""
    noise = instantiate(noise_cfg)
    bundle.train, flipped = noise.apply(bundle.train, bundle.num_classes, seed)
    if run_dir is not None:
        import pandas as pd

        pd.DataFrame({
            "index": flipped.numpy(),
            "true_label": bundle.train.extras.get("true_y", bundle.train.y)[flipped].numpy(),
            "noisy_label": bundle.train.y[flipped].numpy(),
        }).to_csv(run_dir / "label_noise.csv", index=False)
    return bundle


def fingerprint(bundle: DataBundle) -> str:
    """A short hash of the train inputs and (noisy) labels: equal fingerprints, equal training data."""
    h = hashlib.sha1()
    tensors = [bundle.train.y, bundle.test.y]
    if hasattr(bundle.train, "x"):
        tensors.append(bundle.train.x)  # large (DatasetSplit) sets are fingerprinted by their labels only
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def prepare_data(cfg: DictConfig, run_dir: Path | None) -> DataBundle:
    bundle = build_dataset(cfg)
    bundle = hold_out_validation(bundle, float(cfg.dataset.get("val_fraction", 0.0)), int(cfg.seed))
    return add_label_noise(bundle, cfg.noise, int(cfg.seed), run_dir)


def make_loaders(bundle: DataBundle, cfg: DictConfig, device: torch.device, shard: tuple[int, int] = (0, 1)) -> dict:
    """Loaders on ``device``: shuffled (+ augmented) for train, plain for val/test. Tensor splits get the
    device-resident :class:`TensorLoader`; dataset splits (large sets) a DataLoader with workers. ``shard`` is
    (rank, world) of a data-parallel run: each rank's train loader takes its share of the global batch."""
    t = cfg.trainer

    def loader(split, batch_size: int, train: bool):
        if isinstance(split, DatasetSplit):
            return DatasetLoader(split, batch_size, device, shuffle=train, num_workers=int(t.num_workers),
                                 seed=int(cfg.seed), shard=shard if train else (0, 1))
        return TensorLoader(split.to(device), batch_size, shuffle=train, augment=bundle.augment if train else None,
                            mean=bundle.mean, std=bundle.std, seed=int(cfg.seed), shard=shard if train else (0, 1),
                            channels_last=bool(t.channels_last))

    train_batch = per_rank_batch_size(int(t.batch_size), DistEnv(rank=shard[0], world=shard[1]))
    loaders = {"train": loader(bundle.train, train_batch, True),
               "test": loader(bundle.test, int(t.eval_batch_size), False)}
    if bundle.val is not None:
        loaders["val"] = loader(bundle.val, int(t.eval_batch_size), False)
    return loaders
