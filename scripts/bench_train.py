#!/usr/bin/env python
"""Throughput of regstory's training loop against a plain PyTorch loop, in one process (issue 8).

(a) **baseline**: the loop as it is usually written -- a torchvision-style ``Dataset`` (``__getitem__`` returns one
    sample, per-sample transforms), ``DataLoader`` collation, ``.to(device)`` per batch, ``torch.optim.SGD`` with its
    default implementation, and ``loss.item()`` / accuracy ``.item()`` every step;
(b) **regstory**: the RunContext built through regstory's own code (``prepare_data``, ``regstory.train.build_context``,
    ``instantiate(cfg.arch)``, ``build_plugins``, ``RunContext.rebuild_optimizer``) and timed through
    :func:`regstory.loop.run_epoch`, i.e. exactly what ``regstory-run`` executes per epoch (no evaluation, which both
    loops would pay equally).

Both start from the same weights, use the same batch size, optimizer settings and data. Measurements are interleaved
(one epoch of each variant in turn, the order rotated every repeat) and the median is reported, because the machine's
cores are shared. The run also times regstory's loop with a pruning method active (masks in place) and one entropy
measurement, and reports each as an extra fraction of the plain epoch (``--no-masks`` skips both).

    python scripts/bench_train.py --arch mlp --dataset mnist1d
    python scripts/bench_train.py --arch lenet5 --dataset synthetic28
    python scripts/bench_train.py --arch resnet18 --dataset synthetic32 --device cuda --precision bf16 --channels-last
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from regstory.config import register_configs  # noqa: E402
from regstory.data.base import Augment, DataBundle, TensorSplit  # noqa: E402
from regstory.data.prepare import prepare_data  # noqa: E402
from regstory.loop import HookCaller, RunContext, run_epoch, save  # noqa: E402
from regstory.pruning.base import reinitialise  # noqa: E402
from regstory.tracking import RunLogger  # noqa: E402
from regstory.train import build_context, check_precision, conf_dir, configure_torch, resolve_device  # noqa: E402

#: synthetic sets: (input shape, augment, mean/std); labels are random, the content does not matter for speed
SYNTHETIC = {
    "synthetic28": ((1, 28, 28), Augment(), ((0.5,), (0.25,))),
    "synthetic32": ((3, 32, 32), Augment(crop_padding=4, flip=True), ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))),
}


# ----------------------------------------------------------------------------------------------- configuration
def compose_cfg(args: argparse.Namespace, extra: list[str] = ()):
    """The config exactly as ``regstory-run`` composes it; evaluation and checkpoints pushed out of the timed epochs."""
    register_configs()
    GlobalHydra.instance().clear()
    dataset = "digits" if args.dataset in SYNTHETIC else args.dataset  # synthetic sets replace the bundle below
    overrides = [
        f"arch={args.arch}", f"dataset={dataset}", "logger.wandb.mode=disabled", "logger.progress=none",
        f"trainer.batch_size={args.batch_size}", f"trainer.lr={args.lr}", f"trainer.momentum={args.momentum}",
        "trainer.epochs=1000000", "trainer.eval_every=1000000", f"trainer.device={args.device}",
        f"trainer.precision={args.precision}", f"trainer.channels_last={str(args.channels_last).lower()}",
        f"trainer.compile={str(args.compile).lower()}", f"trainer.compile_mode={args.compile_mode}", f"trainer.num_threads={args.threads}",
        *args.override, *extra,
    ]
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=overrides)


def synthetic_bundle(name: str, num_train: int, seed: int = 0) -> DataBundle:
    shape, augment, (mean, std) = SYNTHETIC[name]
    gen = torch.Generator().manual_seed(seed)
    make = lambda n: TensorSplit(torch.rand(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    return DataBundle(name, make(num_train), make(256), 10, augment=augment, mean=mean, std=std)


def load_bundle(args: argparse.Namespace, cfg) -> DataBundle:
    if args.dataset in SYNTHETIC:
        return synthetic_bundle(args.dataset, args.num_train)
    return prepare_data(cfg, None)


def build_regstory_context(cfg, bundle: DataBundle, model: nn.Module, run_dir: Path) -> RunContext:
    """What :func:`regstory.train.run` builds before ``fit``: loaders, plugins, logger, compile/precision options."""
    device = resolve_device(str(cfg.trainer.device))
    ctx = build_context(cfg, bundle, model, device, run_dir, RunLogger(run_dir, cfg.logger, {}, None, None))
    for p in ctx.plugins:
        p.setup(ctx)
    ctx.rebuild_optimizer()
    for p in ctx.plugins:
        p.start_round(ctx)
    return ctx


def regstory_epoch(ctx: RunContext) -> Callable[[], None]:
    hooks = HookCaller(ctx.plugins)

    def epoch() -> None:
        run_epoch(ctx, hooks)
        ctx.epoch += 1

    return epoch


# ------------------------------------------------------------------------------------------------ the baseline
class SampleDataset(Dataset):
    """A torchvision-style dataset: one (image, label) per ``__getitem__``, per-sample ``transform``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform=None):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.y[i])


def baseline_transform(bundle: DataBundle):
    """torchvision transforms as a usual script would chain them (crop, flip, normalise), or None."""
    from torchvision import transforms as T

    steps = []
    if bundle.augment.crop_padding:
        steps.append(T.RandomCrop(bundle.input_shape[-1], padding=bundle.augment.crop_padding))
    if bundle.augment.flip:
        steps.append(T.RandomHorizontalFlip())
    if bundle.mean is not None:
        steps.append(T.Normalize(bundle.mean, bundle.std))
    return T.Compose(steps) if steps else None


def baseline_epoch(model: nn.Module, bundle: DataBundle, args: argparse.Namespace, device: torch.device,
                   amp_dtype: torch.dtype | None) -> Callable[[], None]:
    """The usual loop: DataLoader, ``.to(device)``, zero_grad/backward/step, ``.item()`` every step."""
    dataset = SampleDataset(bundle.train.x, bundle.train.y, baseline_transform(bundle))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    channels_last = args.baseline_channels_last and bundle.train.x.ndim == 4

    def epoch() -> None:
        model.train()
        total_loss, correct, seen = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)

    return epoch


def floor_epoch(model: nn.Module, bundle: DataBundle, args: argparse.Namespace, device: torch.device,
                amp_dtype: torch.dtype | None, update: bool = False) -> Callable[[], None]:
    """A lower bound, not a training loop: forward + loss + backward on contiguous slices of one input tensor
    (no shuffle, no augmentation, no metrics). What autograd alone costs for this model. The gradients are dropped
    after each backward (as every loop's ``zero_grad`` does), so no step pays for accumulating into old ones.

    ``update=True`` adds the one thing every training loop must also do: the SGD-with-momentum update, as torch's
    fused kernel called directly (no optimizer object around it). That is the floor of *training* this model."""
    x = bundle.train.x.to(device)
    if args.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    y = bundle.train.y.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    apply_update = sgd_update(params, args) if update else None
    model.train()

    def epoch() -> None:
        for start in range(0, len(y), args.batch_size):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(x[start:start + args.batch_size]), y[start:start + args.batch_size])
            loss.backward()
            if apply_update is not None:
                apply_update()
            for p in params:
                p.grad = None

    return epoch


def sgd_update(params: list[torch.Tensor], args: argparse.Namespace) -> Callable[[], None]:
    """v <- m v + g, w <- w - lr v on every parameter at once (torch's fused kernel, else its foreach ops)."""
    bufs = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def update() -> None:
        grads = [p.grad for p in params]
        if hasattr(torch, "_fused_sgd_"):
            torch._fused_sgd_(params, grads, bufs, weight_decay=0.0, momentum=args.momentum, lr=args.lr,
                              dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
        else:
            torch._foreach_mul_(bufs, args.momentum)
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-args.lr)

    return update


def vmapped_seeds_epoch(init_model: nn.Module, bundle: DataBundle, args: argparse.Namespace,
                        device: torch.device) -> Callable[[], None]:
    """``--parallel-seeds k``: k independently initialised copies of the model trained at once with
    ``torch.func.vmap`` over stacked parameters (one batched matmul per layer), fused SGD on the stacks. All copies see
    the same batches here: this measures the throughput of the batched step, not a full multi-seed runner."""
    from torch.func import functional_call, stack_module_state

    models = []
    for seed in range(args.parallel_seeds):
        model = copy.deepcopy(init_model)
        reinitialise(model, seed)
        models.append(model.to(device))
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    optimizer = torch.optim.SGD(list(params.values()), lr=args.lr, momentum=args.momentum, fused=True)
    x_all, y_all = bundle.train.x.to(device), bundle.train.y.to(device)

    def one_loss(p, b, x, y):
        return F.cross_entropy(functional_call(skeleton, (p, b), (x,)), y)

    batched_loss = torch.func.vmap(one_loss, in_dims=(0, 0, None, None))

    def epoch() -> None:
        order = torch.randperm(len(y_all), device=device)
        for start in range(0, len(order), args.batch_size):
            idx = order[start:start + args.batch_size]
            losses = batched_loss(params, buffers, x_all[idx], y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()  # each copy's gradient is that of its own loss
            optimizer.step()

    return epoch


# ------------------------------------------------------------------------------------------------- measurement
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(variants: dict[str, Callable[[], None]], repeats: int, warmup: int,
                        device: torch.device) -> dict[str, float]:
    """Seconds per epoch of each variant: median over ``repeats`` rounds, variants in turn (order rotated)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def train_step_flops(model: nn.Module, bundle: DataBundle, batch_size: int, device: torch.device) -> float:
    """FLOPs of one forward + backward on a full batch (torch's flop counter; the optimizer is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model).to(device)
    x = bundle.train.x[:batch_size].to(device)
    y = bundle.train.y[:batch_size].to(device)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(probe(x), y).backward()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------- pruning extras
def pruned_context(args: argparse.Namespace, bundle: DataBundle, init_model: nn.Module, run_dir: Path) -> RunContext:
    """regstory with ``method=--mask-method``, after one trained epoch and one ``end_round``: masks are live."""
    cfg = compose_cfg(args, [f"method={args.mask_method}", *args.mask_override])
    ctx = build_regstory_context(cfg, bundle, copy.deepcopy(init_model), run_dir)
    ctx.history.append(run_epoch(ctx, HookCaller(ctx.plugins)))  # what fit has done before a round ends
    for p in ctx.plugins:
        p.end_round(ctx)  # prune once
    ctx.round, ctx.epoch, ctx.history = 1, 0, []
    ctx.rebuild_optimizer()
    for p in ctx.plugins:
        p.start_round(ctx)
    return ctx


def pruning_variants(args: argparse.Namespace, bundle: DataBundle, init_model: nn.Module,
                     tmp: Path) -> tuple[dict[str, Callable[[], None]], str]:
    """regstory's loop with a pruning method's masks active, one checkpoint write of that run (model, optimizer,
    masks, rewind point), and one activation-entropy measurement (eq. 2.16-2.17) when the method has
    ``measure_entropy(ctx)`` (regstory.pruning measures it once per round)."""
    if args.no_masks:
        return {}, "masks: not timed (--no-masks)"
    try:
        ctx = pruned_context(args, bundle, init_model, tmp / "masks")
    except Exception as err:  # an API this bench cannot drive: say so, time the rest
        return {}, f"masks: n/a ({type(err).__name__}: {err})"
    masked_epoch = regstory_epoch(ctx)
    masked_epoch()  # one masked epoch shows which path the masks take
    in_step = getattr(ctx.optimizer, "takes_gradient_masks", False)
    notes = ["masks inside the SGD step (regstory.kernels)" if in_step else "masks in a separate gradient pass"]
    variants: dict[str, Callable[[], None]] = {"regstory+masks": masked_epoch,
                                               "checkpoint (1 write)": lambda: save(ctx, 1, 0, round_started=True)}
    measure = next((p.measure_entropy for p in ctx.plugins if hasattr(p, "measure_entropy")), None)
    if measure is None:
        notes.append(f"entropy: n/a (method={args.mask_method} has no measure_entropy)")
    else:
        variants["entropy (1 call)"] = lambda: measure(ctx)
    return variants, "; ".join(notes)


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="mlp", help="a conf/arch option (mlp, lenet5, resnet18, ...)")
    p.add_argument("--dataset", default="mnist1d", help="a conf/dataset option, or synthetic28 / synthetic32")
    p.add_argument("--num-train", type=int, default=4000, help="training samples of a synthetic set")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype of every loop (bf16 on CUDA or CPU, fp16 on CUDA only)")
    p.add_argument("--baseline-precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="the baseline's autocast dtype when it should differ from --precision (e.g. fp32, as the "
                        "usual loop is written)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="trainer.channels_last for regstory (and the floor); on by default, as in regstory's trainer "
                        "config; the baseline stays NCHW as usually written unless --baseline-channels-last")
    p.add_argument("--baseline-channels-last", action="store_true", help="the baseline in channels-last too")
    p.add_argument("--no-floor", action="store_true", help="skip the fwd+bwd-only lower bound")
    p.add_argument("--compile", action="store_true", help="trainer.compile=true for regstory (no gain on CPU)")
    p.add_argument("--compile-mode", default="default", help="trainer.compile_mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the cores are shared)")
    p.add_argument("--workers", type=int, default=0, help="baseline DataLoader workers")
    p.add_argument("--repeats", type=int, default=9, help="timed epochs per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs per variant first")
    p.add_argument("--peak-flops", type=float, default=989e12,
                   help="peak bf16 FLOP/s for the utilisation line on CUDA (default: H100 SXM dense bf16)")
    p.add_argument("--mask-method", default="imp", help="conf/method option whose masks are timed")
    p.add_argument("--mask-override", action="append", default=[], help="extra override for the masks variant")
    p.add_argument("--round-epochs", type=int, default=60,
                   help="epochs per pruning round, to express the per-round entropy measurement (MNIST-1D: 60)")
    p.add_argument("--override", action="append", default=[], help="any further Hydra override for regstory")
    p.add_argument("--no-masks", action="store_true", help="skip the pruning-mask and entropy variants")
    p.add_argument("--no-baseline", action="store_true", help="time regstory only")
    p.add_argument("--parallel-seeds", type=int, default=0,
                   help="also time k model copies trained at once with torch.func.vmap (0: skip)")
    return p.parse_args(argv)


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_variants(args: argparse.Namespace, cfg, bundle: DataBundle, init_model: nn.Module, device: torch.device,
                   tmp: Path) -> tuple[dict[str, Callable[[], None]], str]:
    """The epoch functions to time, each on its own copy of the same initial weights."""
    amp_dtype = AUTOCAST_DTYPES[args.precision]
    variants: dict[str, Callable[[], None]] = {}
    if not args.no_baseline:
        base_model = copy.deepcopy(init_model).to(device)
        if args.baseline_channels_last:
            base_model = base_model.to(memory_format=torch.channels_last)
        variants["baseline"] = baseline_epoch(base_model, bundle, args, device,
                                              AUTOCAST_DTYPES[args.baseline_precision or args.precision])
    if not args.no_floor:
        floor_model = copy.deepcopy(init_model).to(device)
        if args.channels_last:
            floor_model = floor_model.to(memory_format=torch.channels_last)
        variants["floor (fwd+bwd)"] = floor_epoch(floor_model, bundle, args, device, amp_dtype)
        variants["floor+update"] = floor_epoch(copy.deepcopy(floor_model), bundle, args, device, amp_dtype,
                                               update=True)
    ctx = build_regstory_context(cfg, bundle, copy.deepcopy(init_model).to(device), tmp / "plain")
    variants["regstory"] = regstory_epoch(ctx)
    if args.parallel_seeds:
        variants[f"vmap x{args.parallel_seeds}"] = vmapped_seeds_epoch(init_model, bundle, args, device)
    extra, note = pruning_variants(args, bundle, copy.deepcopy(init_model).to(device), tmp)
    variants.update(extra)
    return variants, note


def report(args: argparse.Namespace, medians: dict[str, float], note: str, n: int, step_flops: float,
           device: torch.device) -> dict[str, float]:
    """Print images/s per variant, the ratios, the pruning extras and the FLOP rate; return them as a dict."""
    print(f"# bench_train: arch={args.arch} dataset={args.dataset} n_train={n} batch={args.batch_size} "
          f"device={device} precision={args.precision} baseline_precision={args.baseline_precision or args.precision} "
          f"channels_last={args.channels_last} "
          f"baseline_channels_last={args.baseline_channels_last} compile={args.compile}/{args.compile_mode} "
          f"workers={args.workers} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} torch={torch.__version__}")
    for name, sec in medians.items():
        if name.startswith(("entropy", "checkpoint")):
            print(f"{name:>18s}: {sec * 1e3:9.1f} ms")
        else:
            print(f"{name:>18s}: {sec * 1e3:9.1f} ms/epoch  {n / sec:11.0f} images/s")
    result = {f"{k}_s": v for k, v in medians.items()}
    reg = medians["regstory"]
    if "baseline" in medians:
        result["speedup"] = medians["baseline"] / reg
        print(f"{'speedup':>18s}: {result['speedup']:.2f}x  (regstory images/s / baseline images/s)")
        if "floor (fwd+bwd)" in medians:
            bound = medians["baseline"] / medians["floor (fwd+bwd)"]
            print(f"{'bound':>18s}: {bound:.2f}x  (a loop with no cost besides forward+backward)")
            result["bound"] = bound
        if "floor+update" in medians:
            result["train_bound"] = medians["baseline"] / medians["floor+update"]
            print(f"{'training bound':>18s}: {result['train_bound']:.2f}x  (forward+backward+SGD update, nothing else: "
                  f"the most any training loop can reach)")
    if "floor+update" in medians:
        result["over_train_floor"] = reg / medians["floor+update"]
        print(f"{'regstory/floor':>18s}: {result['over_train_floor']:.2f}x  (regstory epoch / floor+update epoch)")
    if args.parallel_seeds:
        k = args.parallel_seeds
        per_model = medians[f"vmap x{k}"] / k
        result["parallel_seeds_gain"] = reg / per_model
        print(f"{'vmap seeds':>18s}: {k} models in {medians[f'vmap x{k}'] * 1e3:.1f} ms/epoch = {n / per_model:.0f} "
              f"model-images/s, {reg / per_model:.2f}x one-at-a-time regstory")
    if "regstory+masks" in medians:
        result["masks_cost"] = medians["regstory+masks"] / reg - 1.0
        print(f"{'masks cost':>18s}: {result['masks_cost'] * 100:+.1f}% of a regstory step "
              f"(method={args.mask_method}, after one pruning round)")
    if "checkpoint (1 write)" in medians:
        result["checkpoint_epoch_cost"] = medians["checkpoint (1 write)"] / medians["regstory+masks"]
        print(f"{'checkpoint cost':>18s}: {result['checkpoint_epoch_cost'] * 100:.1f}% of a masked epoch per write "
              f"(what a write after every epoch costs; regstory writes at most every trainer.checkpoint_interval_s)")
    if "entropy (1 call)" in medians:
        step = reg / -(-n // args.batch_size)
        per_round = medians["entropy (1 call)"] / (reg * args.round_epochs)
        result["entropy_steps"], result["entropy_round_cost"] = medians["entropy (1 call)"] / step, per_round
        print(f"{'entropy cost':>18s}: {result['entropy_steps']:.1f} steps per measurement; once per round = "
              f"{per_round * 100:.2f}% of a {args.round_epochs}-epoch round")
    if note:
        print(f"{'pruning extras':>18s}: {note}")
    achieved = step_flops * (n / args.batch_size) / reg
    line = f"{'regstory FLOP/s':>18s}: {achieved / 1e9:.1f} GFLOP/s (fwd+bwd, {step_flops / 1e9:.3f} GFLOP per step)"
    if device.type == "cuda":
        result["peak_fraction"] = achieved / args.peak_flops
        line += f", {result['peak_fraction'] * 100:.2f}% of peak {args.peak_flops:.3g} FLOP/s"
    print(line)
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = compose_cfg(args)
    configure_torch(cfg)
    device = resolve_device(str(cfg.trainer.device))
    for precision in {args.precision, args.baseline_precision or args.precision}:
        check_precision(precision, device)
    torch.manual_seed(0)
    bundle = load_bundle(args, cfg)
    init_model = instantiate(cfg.arch, input_shape=list(bundle.input_shape), num_classes=bundle.num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        variants, note = build_variants(args, cfg, bundle, init_model, device, Path(tmp))
        medians = interleaved_medians(variants, args.repeats, args.warmup, device)
    step_flops = train_step_flops(init_model, bundle, args.batch_size, device)
    return report(args, medians, note, len(bundle.train), step_flops, device)


if __name__ == "__main__":
    main()
