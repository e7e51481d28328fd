"""``regstory-run``: the Hydra entry point (``main``) and the pure core (``run``) that tests call directly."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from regstory.checkpoint import LAST, CheckpointError, load_checkpoint
from regstory.config import ConfigError, check_targets, check_values, flat_config, register_configs
from regstory.data.base import DatasetNotFoundError
from regstory.data.prepare import fingerprint, make_loaders, prepare_data
from regstory import distributed
from regstory.loop import NonFiniteLossError, RunContext, fit, place_model, uses_grad_scaler
from regstory.models.base import count_parameters
from regstory.freezing import NeuronFreezer
from regstory.plugins import CompositionError, Plugin, activation_recorder, check_composition
from regstory.surgery import rebuild
from regstory.threads import configure_threads
from regstory.preemption import (INTERRUPTED_EXIT_CODE, Preempted, PreemptionGuard, auto_resume, exit_after_preemption,
                                 in_requeued_job)
from regstory.pairing import probe
from regstory.registry import UnknownNameError
from regstory.resume import config_for_resume, continue_sweep_job, explicit_override_keys, in_sweep_job, record_resume
from regstory.runid import run_id
from regstory.tracking import METRICS_FILE, ROUNDS_FILE, RunLogger, read_jsonl
from regstory.utils import atomic_write_json, seed_everything, set_rng_states

log = logging.getLogger("regstory")

#: errors a user can fix from the message alone: shown as one line, no traceback
USER_ERRORS = (ConfigError, DatasetNotFoundError, CheckpointError, NonFiniteLossError, UnknownNameError,
               CompositionError)


def conf_dir() -> str:
    """The config root: ``conf/`` beside the package in a source checkout (editable install), else the copy
    shipped inside the installed package (``regstory/conf``)."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "conf"
    return str(checkout if (checkout / "config.yaml").exists() else package / "conf")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_precision(precision: str, device: torch.device) -> None:
    """``trainer.precision`` autocasts on CUDA and CPU alike, except fp16 on CPU: PyTorch's CPU fp16 kernels run a
    LeNet-5 step ~70x slower than fp32, so that combination is refused. bf16 on a CPU without native bf16 (no
    AVX512-BF16/AMX) still runs, emulated, with a warning that it is likely slower than fp32."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"trainer.precision=fp16 needs a CUDA device (this run is on {device.type}); "
                          "use trainer.precision=bf16 (fast on CPUs with AVX512-BF16/AMX) or fp32")
    if precision == "bf16" and device.type == "cpu" and not _cpu_has_native_bf16():
        log.warning("trainer.precision=bf16: this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 is emulated and "
                    "likely slower than trainer.precision=fp32")


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def configure_torch(cfg: DictConfig) -> None:
    """Determinism and cuDNN autotuning as ``trainer`` says (threads: :func:`regstory.threads.configure_threads`)."""
    t = cfg.trainer
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not t.deterministic


#: the usual plugin slots, in the order their hooks are called; entries of ``plugins`` follow
PLUGIN_SLOTS = ("method", "debias", "distill")


def plugin_nodes(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(slot, config node) of every plugin the config selects: ``method``, ``debias``, ``distill``, then each entry
    of ``plugins`` (e.g. ``+method@plugins.second=imp``) in the order given."""
    nodes = [(slot, cfg.get(slot)) for slot in PLUGIN_SLOTS]
    nodes += [(f"plugins.{key}", node) for key, node in (cfg.get("plugins") or {}).items()]
    return [(slot, node) for slot, node in nodes if node is not None and "_target_" in node]


def build_plugins(cfg: DictConfig) -> list[Plugin]:
    """Instantiate every plugin (:func:`plugin_nodes`) but the no-op base class, name each by its slot, and check
    that they compose."""
    plugins = []
    for slot, node in plugin_nodes(cfg):
        plugin = instantiate(node, _convert_="all")
        if not isinstance(plugin, Plugin):
            raise ConfigError(f"{slot}._target_ {node._target_} is not a regstory.plugins.Plugin")
        if type(plugin) is Plugin:  # method=none, debias=none: the no-op base class takes no part
            continue
        plugin.slot = slot
        plugins.append(plugin)
    check_composition(plugins)
    return plugins


def provenance(cfg: DictConfig, data_fingerprint: str) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "git_commit": commit,
        "seed": int(cfg.seed),
        "run_id": run_id(cfg),  # regstory.runid: the experiment this folder holds (a relaunched sweep reads it)
        "torch_num_threads": torch.get_num_threads(),
        "data_fingerprint": data_fingerprint,
        "python": sys.version.split()[0],
        "packages": {p: version(p) for p in ("regstory", "torch", "torchvision", "hydra-core", "wandb", "numpy")},
        "argv": sys.argv,
    }


def sweep_group() -> str | None:
    """In a Hydra multirun, the sweep folder (`<date>_<time>` by default), so all jobs of a sweep share one W&B group."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return "_".join(Path(hc.sweep.dir).parts[-2:]) if hc.mode == RunMode.MULTIRUN else None
    except ValueError:
        return None


def summarize(ctx: RunContext, rounds: list[dict], wall_s: float) -> dict[str, Any]:
    records = read_jsonl(ctx.run_dir / METRICS_FILE) or ctx.history
    final = ctx.history[-1] if ctx.history else (records[-1] if records else {})
    tested = [r for r in records if r.get("test_acc") is not None]
    summary: dict[str, Any] = {f"final_{k}": v for k, v in final.items() if k not in ("round", "epoch")}
    if tested:
        best = max(tested, key=lambda r: r["test_acc"])
        summary.update(best_test_acc=best["test_acc"], best_test_epoch=best["epoch"], best_test_round=best["round"])
    validated = [r for r in records if r.get("val_acc") is not None]
    if validated:
        best = max(validated, key=lambda r: r["val_acc"])
        summary.update(best_val_acc=best["val_acc"], test_acc_at_best_val=best.get("test_acc"),
                       best_val_epoch=best["epoch"], best_val_round=best["round"])
    summary.update(
        num_params=count_parameters(ctx.model),
        num_rounds=len(rounds) if rounds else None,
        epochs=ctx.epochs,
        wall_time_s=wall_s,
        device=str(ctx.device),
    )
    summary["plugins"] = {p.slot: p.finalize(ctx) for p in ctx.plugins}
    summary.update(unique_entries(summary["plugins"], taken=set(summary)))
    return summary


def unique_entries(by_plugin: dict[str, dict[str, Any]], taken: set[str]) -> dict[str, Any]:
    """The plugins' summary entries that exactly one plugin reports (and the run itself does not), for the top
    level of ``summary.json``; every entry also stays under ``plugins.<slot>``."""
    counts: dict[str, int] = {}
    for entries in by_plugin.values():
        for key in entries:
            counts[key] = counts.get(key, 0) + 1
    return {k: v for entries in by_plugin.values() for k, v in entries.items() if counts[k] == 1 and k not in taken}


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train as the config says and return the summary (also written to ``<run_dir>/summary.json``).

    Under torchrun (``WORLD_SIZE > 1``) this is one rank of a data-parallel run (:mod:`regstory.distributed`).
    SIGTERM/SIGUSR1/SIGUSR2 stop the run at the next epoch boundary with its checkpoint written
    (:mod:`regstory.preemption`, raises :class:`Preempted`).
    """
    check_values(cfg)
    check_targets(cfg)
    env = distributed.env_from_torchrun()
    if run_dir is None and not env.is_worker:
        run_dir = _hydra_run_dir()
    configure_torch(cfg)
    device = distributed.init(resolve_device(str(cfg.trainer.device)), env)
    check_precision(str(cfg.trainer.precision), device)
    threads = configure_threads(int(cfg.trainer.num_threads), device)  # before the data is prepared
    try:
        run_dir = distributed.share_run_dir(Path(run_dir) if run_dir is not None else None, env)
        resume_changes = None
        if not cfg.resume and in_sweep_job():  # a relaunched sweep: the job's folder may hold its run already
            cfg, finished = continue_sweep_job(cfg, run_dir)
            if finished is not None:
                return finished
        if auto_resume(cfg.resume, run_dir / "checkpoints" / LAST) and (run_dir / "checkpoints" / LAST).exists():
            cfg, resume_changes = config_for_resume(cfg, run_dir, explicit_override_keys())
        with PreemptionGuard() as guard:
            summary = _run(cfg, run_dir, device, env, guard, resume_changes, threads)
        distributed.wait_for_all(env)  # a rank that leaves first can take the process group down under its peers
        return summary
    finally:
        distributed.shutdown(env)


def _run(cfg: DictConfig, run_dir: Path, device: torch.device, env: distributed.DistEnv,
         guard: PreemptionGuard, resume_changes: dict[str, list[Any]] | None = None,
         threads: Any = None) -> dict[str, Any]:
    main_process = env.is_main
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = None
    ckpt_path = run_dir / "checkpoints" / LAST
    killed_early = (run_dir / METRICS_FILE).exists() and not ckpt_path.exists()
    resuming = auto_resume(cfg.resume, ckpt_path) or (in_requeued_job() and killed_early)
    if resuming and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["position"].get("finished") and "trainer.epochs" in (resume_changes or {}):
            raise ConfigError(f"the run in {run_dir} has finished: trainer.epochs can grow only for a run that has "
                              f"not; start a new run for more epochs")
    elif resuming and (killed_early or not main_process):  # rank 0 checks and clears; the other ranks follow
        if main_process:
            log.warning("%s holds a run killed before its first checkpoint (trainer.checkpoint_interval_s): "
                        "starting it over", run_dir)
            discard_logs(run_dir)
    elif resuming:
        raise CheckpointError(f"resume=true but there is no checkpoint at '{ckpt_path}'; "
                              f"pass the run's folder with hydra.run.dir=<run dir> resume=true")
    else:
        refuse_to_overwrite(run_dir)

    seed_everything(int(cfg.seed))
    with distributed.main_process_first(env):  # one download / data cache write, then the other ranks read it
        bundle = prepare_data(cfg, run_dir if main_process else None)
    if ckpt is not None and ckpt.get("architecture") is not None:  # a model changed by surgery: its own structure
        model = rebuild(ckpt["architecture"], ckpt["model"])
    else:
        model = instantiate(cfg.arch, input_shape=list(bundle.input_shape), num_classes=bundle.num_classes)
    probe(model, tuple(bundle.input_shape), str(cfg.dataset.get("name")), cfg.arch)  # can it take the data?
    logger = RunLogger(run_dir, cfg.logger, flat_config(cfg), ckpt["wandb_id"] if ckpt else None, sweep_group(),
                       enabled=main_process)
    ctx = build_context(cfg, bundle, model, device, run_dir, logger, env, guard)
    ctx.threads = threads
    if main_process:
        if ckpt is None:  # a resumed run keeps its original record; what the resume changed goes to resumes.jsonl
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
            atomic_write_json(run_dir / "provenance.json", provenance(cfg, fingerprint(bundle)))
        else:
            record_resume(run_dir, resume_changes or {}, sys.argv)
    ctx.call("setup")
    ctx.enforce_pins()

    exit_code = 1
    summary: dict[str, Any] | None = None
    try:
        start = None
        if ckpt is not None:
            start = restore(ctx, ckpt)
            where = (f"after epoch {start['epoch']} of round {start['round'] + 1}" if start["round_started"]
                     else f"at the start of round {start['round'] + 1}")
            log.info("resuming from %s %s", ckpt_path, where)
        if start is not None and start.get("finished"):
            log.info("the run in %s had already finished; rewriting its summary only", run_dir)
            rounds = read_jsonl(run_dir / ROUNDS_FILE)
        else:
            rounds = read_jsonl(run_dir / ROUNDS_FILE) + fit(ctx, start)
        summary = summarize(ctx, rounds, ctx.wall_time_s)
        if main_process:
            atomic_write_json(run_dir / "summary.json", summary)
        exit_code = 0
        return summary
    finally:
        logger.finish(summary, exit_code)


def build_context(cfg: DictConfig, bundle, model: torch.nn.Module, device: torch.device, run_dir: Path,
                  logger: RunLogger, env: distributed.DistEnv = distributed.DistEnv(),
                  preemption: PreemptionGuard | None = None) -> RunContext:
    """Everything ``fit`` needs around a model: device and memory layout, loaders, plugins, the DDP wrapper (no-op
    on one process), ``torch.compile`` and the fp16 grad scaler. Plugins are not set up yet."""
    model = place_model(model, device, bool(cfg.trainer.channels_last))
    ctx = RunContext(cfg=cfg, model=model, data=bundle, device=device, plugins=build_plugins(cfg), run_dir=run_dir,
                     loaders=make_loaders(bundle, cfg, device, shard=(env.rank, env.world)), logger=logger,
                     is_main_process=env.is_main, preemption=preemption)
    distributed.attach(ctx, env)  # metric averaging, collective stop (no-op on one process)
    ctx.wrap = training_wrapper(cfg, device, env)  # built now, and again for a model replaced by surgery
    if ctx.wrap is not None:
        ctx.forward_model = ctx.wrap(ctx.model)
    ctx.freezer = NeuronFreezer(ctx.model)
    ctx.activations = activation_recorder(ctx.plugins, ctx.model)
    if uses_grad_scaler(cfg.trainer):
        ctx.scaler = torch.amp.GradScaler(device.type)
    return ctx


def training_wrapper(cfg: DictConfig, device: torch.device, env: distributed.DistEnv):
    """What the loop trains around a bare model: DDP (several processes), then ``torch.compile``; None for the bare
    model. :func:`build_context` applies it, and ``ctx.replace_model`` after every model surgery."""
    if not env.active and not cfg.trainer.compile:
        return None

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        net = distributed.wrap_model(model, device) if env.active else model
        return torch.compile(net, mode=str(cfg.trainer.compile_mode)) if cfg.trainer.compile else net

    return wrap


def discard_logs(run_dir: Path) -> None:
    """Remove the metric files of a run that is started over (it wrote epochs but was killed before any checkpoint;
    the same epochs are written again)."""
    for name in (METRICS_FILE, ROUNDS_FILE):
        (run_dir / name).unlink(missing_ok=True)


def refuse_to_overwrite(run_dir: Path) -> None:
    """A fresh run never writes into a run dir that already holds a run's checkpoint or metrics."""
    taken = [name for name in (f"checkpoints/{LAST}", METRICS_FILE) if (run_dir / name).exists()]
    if taken:
        raise ConfigError(f"run dir '{run_dir}' already holds a run ({', '.join(taken)}); continue it with "
                          f"resume=true, or start a new run in another hydra.run.dir")


def restore(ctx: RunContext, ckpt: dict[str, Any]) -> dict[str, Any]:
    """Load model/optimizer/plugin/RNG states and rewind the metric files to the checkpoint's position."""
    ctx.model.load_state_dict(ckpt["model"])
    ctx.architecture_changed = ckpt.get("architecture") is not None
    saved = ckpt["plugins"]
    if isinstance(saved, list):  # a checkpoint from before plugin states were stored by slot
        saved = {p.slot: state for p, state in zip(ctx.plugins, saved)}
    unknown = sorted(slot for slot, state in saved.items() if state and slot not in {p.slot for p in ctx.plugins})
    if unknown:  # a plugin with state would be dropped silently
        raise CheckpointError(f"the checkpoint holds the state of plugin slot(s) {', '.join(unknown)} that this "
                              f"config does not select; resume with the run's own config")
    for plugin in ctx.plugins:
        if plugin.slot in saved:
            plugin.load_state_dict(saved[plugin.slot])
    if ckpt.get("freezer"):
        ctx.freezer.load_state_dict(ckpt["freezer"])
    ctx.enforce_pins()
    position = ckpt["position"]
    ctx.global_step = position["global_step"]
    ctx.history = ckpt["history"]
    if position["round_started"]:
        ctx.rebuild_optimizer(**ckpt.get("optimizer_overrides", {}))  # e.g. a fine-tuning round's constant lr
        ctx.optimizer.load_state_dict(ckpt["optimizer"])
        ctx.scheduler.load_state_dict(ckpt["scheduler"])
        if ctx.scaler is not None and ckpt.get("scaler"):
            ctx.scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("logs"):
        ctx.logger.rewind_to(ckpt["logs"])
    set_rng_states(ckpt["rng"])
    ctx.wall_before = float(ckpt.get("wall_time_s", 0.0))
    return position


def _hydra_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _explain(err: BaseException) -> str:
    """The innermost useful message of an error (Hydra wraps errors raised while instantiating)."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return f"{err}" if isinstance(err, USER_ERRORS + (ValueError, TypeError)) else f"{type(err).__name__}: {err}"


def run_or_exit(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any] | None:
    """:func:`run`, with a user error shown as one line and exit status 2, and a preemption as exit status
    ``regstory.preemption.PREEMPTED_EXIT_CODE`` (or a submitit requeue). File-system errors (disk full...) are user errors too."""
    started = time.time()
    try:
        return run(cfg, run_dir)
    except Preempted as err:
        log.warning("%s", err)
        exit_after_preemption(err)
    except KeyboardInterrupt:
        where = Path(run_dir) if run_dir is not None else _hydra_run_dir()
        kept = (where / "checkpoints" / LAST).exists()
        print("regstory-run: interrupted; " + (f"the last checkpoint is kept: continue with regstory-run <same "
                                                f"overrides> resume=true hydra.run.dir={where}" if kept else
                                                "no checkpoint was written yet"), file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    except USER_ERRORS + (InstantiationException, OSError) as err:
        message = _explain(err)
        log_to_files_only(logging.ERROR, message)
        if run_dir is None:
            discard_if_started_empty(_hydra_run_dir(), started)
        print(f"regstory-run: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    return None


def log_to_files_only(level: int, message: str) -> None:
    """Record ``message`` in the run's log file(s) but not on the console (the console gets one line of its own)."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def discard_if_started_empty(run_dir: Path, started: float) -> None:
    """Remove the run folder Hydra made for a run that failed at start-up: only when everything in it was written
    by this process (since ``started``) and it holds no checkpoint or metrics, so nothing of an earlier run goes."""
    if not run_dir.is_dir() or (run_dir / METRICS_FILE).exists() or (run_dir / "checkpoints").exists():
        return
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    if all(p.stat().st_mtime >= started - 1 for p in files) and run_dir.stat().st_mtime >= started - 1:
        for handler in logging.getLogger().handlers:  # Hydra's log file is in there
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(run_dir):
                handler.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        remove_empty_parents(run_dir.parent)


def remove_empty_parents(folder: Path) -> None:
    """Remove ``folder`` and its parents while they are empty (e.g. ``outputs/runs/<date>`` left by a run that
    failed at start-up), never the working directory or anything outside it."""
    stop = Path.cwd().resolve()
    folder = folder.resolve()
    while stop in folder.parents and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def hydra_entry(cfg: DictConfig) -> dict[str, Any] | None:
    return run_or_exit(cfg)


def worker_rank_main(overrides: list[str]) -> None:
    """A non-zero torchrun rank: compose the same config as rank 0 without Hydra's run dir, logs and folders
    (rank 0 creates those and tells the other ranks where the run dir is)."""
    from hydra import compose, initialize_config_dir

    logging.basicConfig(level=logging.WARNING, format=f"[rank {os.environ.get('RANK')}] %(levelname)s %(message)s")
    if any(o in ("-m", "--multirun") or o.startswith("-") for o in overrides):
        print("regstory-run: error: under torchrun pass plain overrides for one run (no -m/--multirun or Hydra "
              "flags); sweep with a launcher instead", file=sys.stderr)
        raise SystemExit(2)
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose("config", overrides=[o for o in overrides if not o.startswith(("hydra.", "hydra/"))])
    run_or_exit(cfg)


def main() -> None:
    import hydra

    from regstory.cli import answer_help_or_version

    if answer_help_or_version(sys.argv[1:]):
        return
    register_configs()
    if distributed.is_worker_rank():
        worker_rank_main(sys.argv[1:])
        return
    from regstory.preflight import preflight

    sys.argv[1:] = preflight(sys.argv[1:])
    hydra.main(version_base=None, config_path=conf_dir(), config_name="config")(hydra_entry)()


if __name__ == "__main__":
    # `python -m regstory.train`: run the importable module's main, so that launchers (joblib, submitit) pickle the
    # task function by reference; pickled from __main__ it drags torch's module state along and fails
    from regstory.train import main as importable_main

    importable_main()
