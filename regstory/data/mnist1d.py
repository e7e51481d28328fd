"""MNIST-1D (Greydanus 2020), generated offline with the ``mnist1d`` package and cached under the data root."""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

from typing import Annotated

import numpy as np
import torch

from regstory.data.base import DataBundle, TensorSplit
from regstory.data.registry import dataset_option
from regstory.options import Range
from regstory.utils import atomic_write_bytes


def _generate(num_samples: int, train_split: float, seed: int) -> dict:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG
    try:
        return make_dataset(args)
    finally:
        np.random.set_state(state)


@dataset_option("mnist1d")
def build_mnist1d(
    root: str, download: bool = True, num_samples: Annotated[int, Range(ge=20)] = 5000,
    train_split: Annotated[float, Range(gt=0, lt=1)] = 0.8, seed: int = 42,
    channels: bool = False,
) -> DataBundle:
    """MNIST-1D: 40-sample 1-D signals, 10 classes; 5000 samples split 4000/1000 by default.

    ``channels=true`` gives inputs of shape (1, 40) for 1-D conv nets; default (40,) for MLPs.
    ``download`` is unused: the set is generated locally, then cached.
    """
    key = json.dumps({"n": num_samples, "split": train_split, "seed": seed}, sort_keys=True)
    cache = Path(root).expanduser() / "mnist1d" / f"mnist1d_{hashlib.sha1(key.encode()).hexdigest()[:10]}.pkl"
    if cache.exists():
        data = pickle.loads(cache.read_bytes())
    else:
        data = _generate(num_samples, train_split, seed)
        data = {k: data[k] for k in ("x", "y", "x_test", "y_test")}
        atomic_write_bytes(cache, pickle.dumps(data))

    def split(x, y) -> TensorSplit:
        xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        return TensorSplit(xt.unsqueeze(1) if channels else xt, torch.as_tensor(np.asarray(y), dtype=torch.long))

    return DataBundle("mnist1d", split(data["x"], data["y"]), split(data["x_test"], data["y_test"]), num_classes=10)
