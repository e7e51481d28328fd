"""The Table 2.1 measures of finished runs, from their final checkpoints: with another codec (e.g. nncodec installed
in an environment of its own: it pins numpy 1.26), or the latencies again on a quiet machine.

    python scripts/footprint_of_runs.py RUN_DIR [RUN_DIR ...] [--codec nncodec] [--repeats 50] [--threads 1]
        [--out footprint.csv]

Per run: the final model (``checkpoints/last.pt``), its simplified form (BN folded), the measures of
:func:`regstory.pruning.footprint.model_measures` with ``--codec`` and the decoded model's test accuracy, and the dense
architecture's (freshly built: its size, MACs and latency do not depend on the weights' values). One row per run,
printed as a table (and written to ``--out``, .csv or .md).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from regstory.checkpoint import load_checkpoint
from regstory.data.prepare import make_loaders, prepare_data
from regstory.loop import evaluate
from regstory.pruning.footprint import dense_measures, model_measures
from regstory.pruning.simplify import fold_batchnorm, simplify
from regstory.surgery import rebuild


def measure_run(run_dir: Path, codec: str, repeats: int, threads: int) -> dict:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    bundle = prepare_data(cfg, None)
    shape = tuple(bundle.input_shape)
    dense = instantiate(cfg.arch, input_shape=list(shape), num_classes=bundle.num_classes)
    if ckpt.get("architecture") is not None:
        model = rebuild(ckpt["architecture"], ckpt["model"])
    else:
        model = copy.deepcopy(dense)
        model.load_state_dict(ckpt["model"])
    test = make_loaders(bundle, cfg, torch.device("cpu"))["test"]
    small = fold_batchnorm(simplify(model, shape)[0], shape)
    row, packed = model_measures(model, small, shape, codec, repeats, threads)
    decoded = copy.deepcopy(model)
    decoded.load_state_dict(packed.decoded)
    return {"run": run_dir.name, **dense_measures(dense, shape, repeats, threads), **row,
            "test_acc": evaluate(model, test)["acc"], "decoded_test_acc": evaluate(decoded, test)["acc"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--codec", default="auto", choices=("auto", "lzma", "nncodec"))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "checkpoints" / "last.pt").exists()]
    if missing:
        sys.exit(f"footprint_of_runs: no checkpoints/last.pt in {', '.join(missing)}")
    table = pd.DataFrame([measure_run(r, args.codec, args.repeats, args.threads) for r in args.runs])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.out is not None:
        table.to_markdown(args.out, index=False) if args.out.suffix == ".md" else table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
