"""The plan of a sweep: a relaunch and a dry run (``regstory-run -m ... dry_run=true``).

A ``-m`` sweep into a sweep folder that exists already is a relaunch: each job's folder (``hydra.sweep.dir`` /
``hydra.sweep.subdir``, as Hydra will name it) is looked at, a folder that holds another experiment than its job
(:mod:`regstory.runid`) is refused in one line before anything runs, and one line counts what the relaunch does:
``9 runs: 3 finished (skipped), 2 resumed, 4 new``. The jobs themselves skip, resume or start
(:func:`regstory.resume.continue_sweep_job`), so every launcher (basic, joblib, submitit) runs a relaunch unchanged.
``dry_run=true`` prints the plan with estimated wall times and exits (:func:`dry_run_report`). Called by
:func:`regstory.preflight.preflight`.
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regstory.config import ConfigError
from regstory.preflight import _one_line, sweep_jobs
from regstory.train import build_plugins, conf_dir


# -- the plan ----------------------------------------------------------------------

#: what a job does with its folder
SKIP, RESUME, START, RESTART_RUN, REFUSE = "skip", "resume", "start", "restart", "refuse"


@dataclass
class PlannedRun:
    """One job of the plan: its overrides, its folder and what is in it, what the job will do."""

    num: int
    job: list[str]
    cfg: Any  # the job's config (without the hydra node)
    folder: Any  # regstory.runid.Folder
    action: str
    note: str = ""
    estimate_s: float | None = None
    basis: str = ""

    @property
    def name(self) -> str:
        return self.folder.path.name


@dataclass
class Plan:
    runs: list[PlannedRun]
    where: Path  # the sweep folder (a -m sweep) or the run folder
    multirun: bool
    relaunch: bool  # a -m sweep into a sweep folder that exists
    workers: int = 1
    workers_why: str = "the basic launcher: one run after another"
    hydra: Any = None  # the hydra node of the first job's config
    startup_s: float | None = None  # this process's age when planning began: imports, Hydra, the checks
    job_s: float = 0.0  # composing one job's config (what a launcher does for every job)
    cold_s: float = 0.0  # what a process's first run pays more (measured with the steps)
    notes: list[str] = field(default_factory=list)

    def count_line(self) -> str:
        """``9 runs: 3 finished (skipped), 2 resumed, 4 new``."""
        n = {a: sum(r.action == a for r in self.runs) for a in (SKIP, RESUME, START, RESTART_RUN, REFUSE)}
        parts = [f"{n[SKIP]} finished (skipped)"] if n[SKIP] else []
        parts += [f"{n[RESUME]} resumed"] if n[RESUME] else []
        parts += [f"{n[START] + n[RESTART_RUN]} new"] if n[START] + n[RESTART_RUN] else []
        parts += [f"{n[REFUSE]} refused"] if n[REFUSE] else []
        total = len(self.runs)
        return f"{total} run{'s' if total != 1 else ''}: {', '.join(parts)}"


def plan_runs(task_overrides: list[str], hydra_overrides: list[str], config_name: str, multirun: bool,
              dry_run: bool = False, resuming: bool = False) -> Plan | None:
    """Each job's folder, as Hydra will name it, and what the job will do there. A fresh ``-m`` sweep (its folder
    does not exist yet) needs no more than its folder unless ``dry_run``: then None is returned without composing
    every job. A folder that holds another experiment than its job is refused: one line, exit 2 (every such folder
    in it). With ``resuming`` (``resume=true``) the run's own config decides (no id check)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict

    from regstory.config import register_configs
    from regstory.resume import config_for_resume
    from regstory.runid import FINISHED, NEW, RESTART, RESUMABLE, RunIdMismatch, inspect_folder, run_id

    register_configs()
    startup_s = process_age_s()
    jobs = sweep_jobs(task_overrides) if multirun else [task_overrides]
    GlobalHydra.instance().clear()
    refused: list[tuple[Path, RunIdMismatch]] = []
    moved: list[tuple[list[str], Path]] = []  # jobs whose run is in another folder of the sweep
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            started = time.perf_counter()
            first = compose(config_name, overrides=[*hydra_overrides, *jobs[0]], return_hydra_config=True)
            where = Path(str(OmegaConf.select(first, "hydra.sweep.dir" if multirun else "hydra.run.dir")))
            relaunch = multirun and where.is_dir()
            plan = Plan([], where, multirun, relaunch, hydra=first.hydra, startup_s=startup_s,
                        job_s=time.perf_counter() - started)
            if multirun and not relaunch and not dry_run:
                return None  # a fresh sweep: nothing to look at
            plan.workers, plan.workers_why = parallel_workers(first.hydra, len(jobs))
            elsewhere = runs_by_id(where) if relaunch and not resuming else {}
            for num, job in enumerate(jobs):
                started = time.perf_counter()
                cfg = first if num == 0 else compose(config_name, overrides=[*hydra_overrides, *job],
                                                     return_hydra_config=True)
                if num == 1:  # a warm compose: what each job costs the launcher
                    plan.job_s = time.perf_counter() - started
                if multirun:
                    with open_dict(cfg):
                        cfg.hydra.job.num = num
                        cfg.hydra.job.id = str(num)
                    folder_path = where / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
                else:
                    folder_path = where
                task = _task_config(cfg)
                try:
                    folder = inspect_folder(folder_path, task if multirun and not resuming else None)
                    if resuming and folder.state != NEW:  # the run's own config, as the resume will have it
                        keys = [o.lstrip("+~").split("=", 1)[0].split("@", 1)[0] for o in job]
                        task, _ = config_for_resume(task, folder_path, keys)
                except RunIdMismatch as err:
                    refused.append((folder_path, err))
                    continue
                except ConfigError as err:  # a change the resume refuses
                    print(f"regstory-run: error: {_one_line(err)}", file=sys.stderr)
                    raise SystemExit(2) from None
                action, note = {NEW: (START, ""), FINISHED: (SKIP, ""), RESUMABLE: (RESUME, ""),
                                RESTART: (RESTART_RUN, "started over: killed before its first checkpoint"),
                                }[folder.state]
                other = elsewhere.get(run_id(task)) if folder.run_id is None else None
                if other is not None and other != folder_path:
                    moved.append((job, other))
                if not multirun and not resuming and folder.state != NEW:
                    action, note = REFUSE, "the folder holds a run: resume=true continues it"
                elif resuming and folder.state == NEW:
                    action, note = REFUSE, "no checkpoint to resume: the run would stop with an error"
                plan.runs.append(PlannedRun(num, job, task, folder, action, note))
    except HydraException as err:  # a hydra override Hydra itself will refuse: let it say so
        if dry_run:
            print(f"regstory-run: error: {_one_line(err)}", file=sys.stderr)
            raise SystemExit(2) from None
        return None
    finally:
        GlobalHydra.instance().clear()
    if refused:
        if len(jobs) == 1:
            message = str(refused[0][1])
        else:
            message = (f"{len(refused)} of {len(jobs)} folders of sweep {where} hold another experiment than the job "
                       f"that would run there (its config changed), nothing was run: "
                       + "; ".join(f"{path.name}: {err.diff}" for path, err in refused)
                       + ". Relaunch with the overrides they were started with, or use another hydra.sweep.dir")
        print(f"regstory-run: error: {message}", file=sys.stderr)
        raise SystemExit(2)
    taken = {r.folder.path for r in plan.runs}  # a run of the same id in another job's own folder is that job's
    moved = [(job, path) for job, path in moved if path not in taken]
    if moved:
        common = set.intersection(*(set(job) for job in jobs))
        points = "; ".join(f"[{' '.join(o for o in job if o not in common)}] is in {path.name}" for job, path in moved)
        print(f"regstory-run: error: {len(moved)} of {len(jobs)} sweep points have their run in another folder of "
              f"sweep {where} (Hydra numbers the jobs in the order of the values), nothing was run: {points}. Keep "
              f"the first launch's order (new values go at the end of the first swept key), or use another "
              f"hydra.sweep.dir", file=sys.stderr)
        raise SystemExit(2)
    return plan


def runs_by_id(sweep_dir: Path) -> dict[str, Path]:
    """The run folders of a sweep folder by their stored run id."""
    from regstory.runid import stored_run_id

    found: dict[str, Path] = {}
    for folder in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        stored = stored_run_id(folder)
        if stored is not None:
            found.setdefault(stored, folder)
    return found


def _task_config(cfg):
    """A composed config without its hydra node: what the job's task function gets."""
    from omegaconf import open_dict, read_write

    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def parallel_workers(hydra_cfg, n_runs: int) -> tuple[int, str]:
    """How many runs the launcher runs at once, and why: 1 (basic), ``n_jobs`` (joblib), ``array_parallelism``
    (submitit: SLURM or local)."""
    launcher = hydra_cfg.get("launcher") or {}
    target = str(launcher.get("_target_", ""))
    if "joblib" in target.lower():
        n_jobs = int(launcher.get("n_jobs") or 1)
        workers = n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)
        return max(1, min(workers, n_runs)), f"joblib n_jobs={n_jobs}"
    if "submitit" in target.lower():
        parallel = int(launcher.get("array_parallelism") or n_runs)
        kind = "SLURM" if "Slurm" in target else "submitit"
        return max(1, min(parallel, n_runs)), f"{kind} array_parallelism={parallel}"
    return 1, "the basic launcher: one run after another"


# -- a dry run: the plan with estimated wall times -------------------------------------------------------------------

def dry_run_report(plan: Plan) -> str:
    """The plan as printed by ``dry_run=true``: one line per run (its folder, finished / resumable / new, an
    estimated wall time and what it is based on), the count, the total over the parallel workers."""
    estimate_times(plan)
    what = f"{len(plan.runs)} sweep point{'s' if len(plan.runs) != 1 else ''} in {plan.where}" if plan.multirun \
        else f"one run in {plan.where}"
    lines = [f"regstory-run: dry run, nothing is run or written: {what}"]
    label = {SKIP: "finished", RESUME: "resumable", START: "new", RESTART_RUN: "new", REFUSE: "refused"}
    width = max(len(r.name) for r in plan.runs)
    for r in plan.runs:
        state = label[r.action] + (f" ({r.note})" if r.note else "")
        if r.action == RESUME:
            state += f", {r.folder.epochs_done} epoch(s) done"
        time_part = "" if r.action in (SKIP, REFUSE) else (
            f"  ~{duration(r.estimate_s)}" if r.estimate_s is not None else "  no estimate")
        basis = f"  [{r.basis}]" if r.basis else ""
        lines.append(f"  {r.name:<{width}}  {state}{time_part}{basis}")
    lines.append(plan.count_line())
    todo = [r for r in plan.runs if r.action in (RESUME, START, RESTART_RUN)]
    known = [r.estimate_s for r in todo if r.estimate_s is not None]
    workers = max(1, min(plan.workers, len(todo))) if todo else 1
    # start-up: the launching process (imports, checks), then each process that runs jobs pays for imports and for its
    # first run's cold start: the basic launcher's own process; joblib's workers, in parallel; submitit, every job
    launch = plan.startup_s or 0.0
    process = launch + plan.cold_s
    per_job = process if "array_parallelism" in plan.workers_why else 0.0
    runs_s = makespan([k + per_job for k in known], workers)
    once = launch + (process if "joblib" in plan.workers_why else plan.cold_s if not per_job else 0.0)
    once = once if todo else launch
    unknown = len(todo) - len(known)
    lines.append(f"estimated wall time: ~{duration(once + runs_s)} with {workers} parallel worker"
                 f"{'s' if workers != 1 else ''} ({plan.workers_why}): runs ~{duration(runs_s)}"
                 f" (~{duration(sum(known))} of run time in all) + start-up ~{duration(once)}"
                 + (f"; {unknown} run(s) without an estimate" if unknown else ""))
    if any(str(r.cfg.logger.wandb.mode) != "disabled" for r in todo):
        lines.append("not counted: W&B's own start and end of each run (logger.wandb.mode=disabled has none)")
    lines += plan.notes
    return "\n".join(lines)


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc), or None."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d} min"


def makespan(durations: list[float], workers: int) -> float:
    """The wall time of running ``durations`` on ``workers`` parallel workers, longest first, each to the worker
    that is free first (what a launcher's queue does)."""
    loads = [0.0] * max(1, workers)
    for d in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += d
    return max(loads)


def estimate_times(plan: Plan) -> None:
    """Fill each run's ``estimate_s`` and ``basis``: 0 for a finished run; a resumable run's epochs left times its own
    mean epoch time (``metrics.jsonl``); a new run's from finished runs of the same config in the sweep
    (``summary.json``'s ``wall_time_s``, other seeds), else from a few training steps measured here."""
    from regstory.runid import config_id, epoch_records

    finished = finished_wall_times(plan.where) if plan.multirun else {}
    measured: dict[str, Any] = {}
    for r in plan.runs:
        if r.action in (SKIP, REFUSE):
            continue
        total_epochs, evals = run_length(r.cfg)
        if r.action == RESUME:
            times = [rec["time_s"] for rec in epoch_records(r.folder.path)
                     if isinstance(rec.get("time_s"), (int, float))]
            if times:
                left = max(total_epochs - r.folder.epochs_done, 0)
                mean = sum(times) / len(times)
                r.estimate_s = plan.job_s + left * mean
                r.basis = f"{left} epoch(s) left x {mean:.3g} s, its own epochs; + {plan.job_s:.2g} s job set-up"
                continue
        same = finished.get(config_id(r.cfg))
        if same:
            mean = sum(same) / len(same)
            if r.action == RESUME:  # what is left of it
                mean *= max(total_epochs - r.folder.epochs_done, 0) / max(total_epochs, 1)
            r.estimate_s = plan.job_s + mean
            r.basis = f"wall_time_s of {len(same)} finished run(s) of this config; + {plan.job_s:.2g} s job set-up"
            continue
        key = cost_key(r.cfg)
        if key not in measured:
            measured[key] = measure_steps(r.cfg, plan.hydra)
        m = measured[key]
        if not isinstance(m, str):
            plan.cold_s = max(plan.cold_s, m.cold_s)
        if isinstance(m, str):
            r.basis = m
            continue
        epochs_left = total_epochs - (r.folder.epochs_done if r.action == RESUME else 0)
        evals_left = evals * epochs_left / max(total_epochs, 1)
        setup_s = plan.job_s + m.setup_s
        r.estimate_s = setup_s + epochs_left * m.steps * m.step_s + evals_left * m.eval_s
        r.basis = (f"measured here: {m.step_s * 1e3:.3g} ms/step x {m.steps} steps x {epochs_left} epochs + "
                   f"{evals_left:.0f} evals x {m.eval_s:.2g} s + {setup_s:.2g} s job set-up; {m.device}, "
                   f"{m.threads} thread(s)")


def finished_wall_times(sweep_dir: Path) -> dict[str, list[float]]:
    """``wall_time_s`` of the finished runs in a sweep folder, by config id (:func:`regstory.runid.config_id`)."""
    import json

    from regstory.runid import config_id, saved_config

    out: dict[str, list[float]] = {}
    if not sweep_dir.is_dir():
        return out
    for summary in sorted(sweep_dir.glob("*/summary.json")):
        try:
            wall = json.loads(summary.read_text()).get("wall_time_s")
            saved = saved_config(summary.parent)
        except (OSError, ValueError):
            continue
        if isinstance(wall, (int, float)) and saved is not None:
            out.setdefault(config_id(saved), []).append(float(wall))
    return out


def run_length(cfg) -> tuple[int, int]:
    """(epochs, evaluation passes) of a whole run: rounds x ``trainer.epochs``; an evaluation every ``eval_every``
    epochs and at each round's last (plugins that end a round early make it shorter)."""
    from regstory.loop import num_rounds

    rounds = num_rounds(build_plugins(cfg))
    epochs, every = int(cfg.trainer.epochs), int(cfg.trainer.eval_every)
    evals = sum(1 for e in range(epochs) if (e + 1) % every == 0 or e + 1 == epochs)
    return rounds * epochs, rounds * evals


def cost_key(cfg) -> str:
    """Configs that differ only in seed or label noise take the same time per step: measured once."""
    from regstory.runid import hash_identity, identity

    return hash_identity(identity(cfg, leave_out=("seed", "noise")))


@dataclass
class Measured:
    step_s: float  # one training step (forward, backward, optimizer step)
    steps: int  # training steps per epoch
    eval_s: float  # one evaluation pass over the test (and validation) split
    setup_s: float  # data preparation and model construction
    device: str
    threads: int
    cold_s: float = 0.0  # what a process's first run pays more (imports, caches, first kernels)


def job_threads(cfg, hydra_cfg) -> int:
    """The torch threads the job will use: ``trainer.num_threads``, else the launcher's ``OMP_NUM_THREADS`` (env_set),
    SLURM's ``cpus_per_task``, this shell's ``OMP_NUM_THREADS``, or torch's default; at most this machine's cores."""
    import torch

    n = int(cfg.trainer.num_threads)
    if n <= 0:
        env_set = (hydra_cfg.get("job") or {}).get("env_set") or {}
        cpus = (hydra_cfg.get("launcher") or {}).get("cpus_per_task")
        for value in (env_set.get("OMP_NUM_THREADS"), cpus, os.environ.get("OMP_NUM_THREADS")):
            if value is not None and str(value).isdigit() and int(value) > 0:
                n = int(value)
                break
        else:
            n = torch.get_num_threads()
    return max(1, min(n, os.cpu_count() or n))


def measure_steps(cfg, hydra_cfg, target_s: float = 0.5) -> Measured | str:
    """Time a few training steps of the job's model on its data (the loop's own step, without plugins), an evaluation
    pass, and the set-up, here, with the job's thread count. Nothing is written and nothing downloaded: a data set
    not on disk gives no estimate (the reason is returned instead)."""
    import itertools

    import torch
    from hydra.utils import instantiate
    from omegaconf import read_write

    from regstory.data.prepare import make_loaders, prepare_data
    from regstory.loop import HookCaller, RunContext, evaluate, place_model, train_one_epoch, uses_grad_scaler
    from regstory.train import USER_ERRORS, resolve_device
    from regstory.utils import seed_everything

    cfg = copy.deepcopy(cfg)
    with read_write(cfg):
        cfg.data.download = False
    threads = job_threads(cfg, hydra_cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        device = resolve_device(str(cfg.trainer.device))

        def set_up():
            seed_everything(int(cfg.seed))
            bundle = prepare_data(cfg, None)
            model = instantiate(cfg.arch, input_shape=list(bundle.input_shape), num_classes=bundle.num_classes)
            model = place_model(model, device, bool(cfg.trainer.channels_last))
            return bundle, model, make_loaders(bundle, cfg, device)

        start = time.perf_counter()
        bundle, model, loaders = set_up()
        setup_s = cold_s = time.perf_counter() - start
        if setup_s < 5:  # the first one pays for imports and caches, as only a process's first run does: again
            start = time.perf_counter()
            bundle, model, loaders = set_up()
            setup_s = time.perf_counter() - start
        ctx = RunContext(cfg=cfg, model=model, data=bundle, loaders=loaders, device=device, plugins=[],
                         run_dir=Path(os.devnull), logger=None)
        if uses_grad_scaler(cfg.trainer):
            ctx.scaler = torch.amp.GradScaler(device.type)
        ctx.rebuild_optimizer()
        hooks = HookCaller([])
        train = loaders["train"]
        steps = len(train)

        def timed(n: int) -> float:
            t0 = time.perf_counter()
            train_one_epoch(ctx, hooks, itertools.islice(iter(train), n))  # reads its sums back: synchronised
            return time.perf_counter() - t0

        warm_up = timed(min(2, steps))  # first-call allocations, kernel selection
        n = min(steps, 5)
        dt = timed(n)
        if dt < target_s and n < steps:
            n = min(steps, max(n + 1, math.ceil(n * target_s / max(dt, 1e-6))))
            dt = timed(n)
        step_s = dt / n
        cold_s = max(0.0, cold_s - setup_s) + max(0.0, warm_up - min(2, steps) * step_s)
        eval_s = 0.0
        for split in ("val", "test"):
            if split in loaders:
                loader = loaders[split]
                k = min(len(loader), 3)
                t0 = time.perf_counter()
                evaluate(model, itertools.islice(iter(loader), k), ctx.autocast)
                eval_s += (time.perf_counter() - t0) * len(loader) / max(k, 1)
        return Measured(step_s, steps, eval_s, setup_s, device.type, threads, cold_s)
    except USER_ERRORS as err:
        return f"no estimate: {_one_line(err)}"
    finally:
        torch.set_num_threads(before)
