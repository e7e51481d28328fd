"""The command line checked before Hydra runs anything: ``regstory-run``'s preflight.

Every config the command line asks for (each point of a ``-m`` sweep) is composed and checked: keys, types and
ranges against the typed schemas, plugins that cannot run together, a W&B mode that cannot log. Any problem is one
line (every bad point of a sweep in it) and exit status 2, before Hydra creates a folder. The preflight also adds
``dataset=<the architecture's own>`` when only an architecture is chosen, and keeps Hydra from rewriting a run's
``.hydra/`` record on ``resume=true``.

It also plans the runs of a relaunched sweep and of a dry run (:mod:`regstory.planning`).
"""
from __future__ import annotations

import re
import sys

from hydra.errors import InstantiationException

from regstory.config import ConfigError
from regstory.plugins import CompositionError
from regstory.tracking import wandb_login_missing
from regstory.train import _explain, build_plugins, conf_dir


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override lists of a ``-m`` sweep's jobs, expanded as Hydra's basic sweeper does (``a=1,2 b=x,y``: 4)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def preflight(argv: list[str]) -> list[str]:
    """Compose and check every config the command line asks for (each job of a ``-m`` sweep) before Hydra creates any
    folder: a wrong key, type or value, a W&B mode that cannot log, or plugins that cannot run together print ``regstory-run: error: <one line>`` (every bad point of a sweep in that line) and exit
    with status 2. Returns ``argv``, plus ``dataset=<its data set>`` when an architecture is chosen without a data
    set (:func:`regstory.pairing.natural_dataset`), and without Hydra's ``.hydra/`` output on ``resume=true`` or on a
    relaunched sweep whose folders hold runs (:func:`regstory.planning.plan_runs`; the relaunch's count is printed in one line).
    ``dry_run=true`` (taken off the command line: Hydra never sees it) prints the plan (:func:`regstory.planning.dry_run_report`) and
    exits with status 0. Hydra's own help, info and completion flags, and ``--config-dir``/``--config-path``, are left
    to Hydra."""
    from hydra import initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from regstory.config import compose_checked

    if {"--version", "-h", "--help", "--hydra-help"} & set(argv):
        return argv
    argv, dry_run = take_dry_run(argv)
    args = get_args_parser().parse_args(argv)
    if args.info or args.shell_completion or args.experimental_rerun or args.config_dir or args.config_path:
        return argv
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    config_name = args.config_name or "config"
    problems: list[tuple[list[str], str]] = []
    GlobalHydra.instance().clear()
    try:
        jobs = sweep_jobs(overrides) if args.multirun else [overrides]
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            added = with_natural_dataset(overrides, config_name)
            needing = []  # the plugins that need a validation split, per job
            for job in jobs:
                try:
                    cfg = compose_checked([*job, *added], config_name)
                    login = wandb_login_missing(cfg.logger.wandb.mode)
                    if login:
                        raise ConfigError(login)
                    needing.append(needs_validation(build_plugins(cfg), cfg, job))  # build: plugins that cannot compose
                except (ConfigError, CompositionError, HydraException) as err:
                    problems.append((job, _one_line(err)))
    except (ConfigError, HydraException) as err:
        problems.append(([], _one_line(err)))
    finally:
        GlobalHydra.instance().clear()
    if problems:
        print(f"regstory-run: error: {describe_problems(problems, jobs if args.multirun else [overrides])}",
              file=sys.stderr)
        raise SystemExit(2)
    if added:
        print(f"regstory-run: {added[0].split('=')[1]} is this architecture's data set (dataset=... for another)",
              file=sys.stderr)
    if needing and all(needing) and "resume=true" not in overrides:  # a resumed run keeps its own split
        added.append(f"dataset.val_fraction={DEFAULT_VAL_FRACTION}")
        print(f"regstory-run: {needing[0]} needs a validation split: {DEFAULT_VAL_FRACTION:.0%} of the training set is "
              f"held out (dataset.val_fraction=... to choose)", file=sys.stderr)
    task_overrides = [*overrides, *added]  # in Hydra's order: the command line's, then the ones added here
    keeps_record = any(o.startswith("hydra.output_subdir=") for o in args.overrides)
    if "resume=true" in overrides and not keeps_record:
        added.append("hydra.output_subdir=null")  # Hydra would rewrite the run's .hydra/ record of how it started
    if args.cfg is None and (args.multirun or dry_run):
        hydra_overrides = [o for o in args.overrides if o not in overrides]
        from regstory.planning import dry_run_report, plan_runs

        plan = plan_runs(task_overrides, hydra_overrides, config_name, args.multirun, dry_run,
                         resuming="resume=true" in overrides)
        if dry_run:
            print(dry_run_report(plan))
            raise SystemExit(0)
        if plan is not None and plan.relaunch:
            print(f"regstory-run: {plan.count_line()} ({plan.where})", file=sys.stderr)
            holds_runs = any(r.folder.holds_run for r in plan.runs)
            if holds_runs and not keeps_record and "hydra.output_subdir=null" not in added:
                added.append("hydra.output_subdir=null")  # keep the .hydra/ record of how each run started
    return [*argv, *added]


def take_dry_run(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without its ``dry_run=<bool>`` (the preflight's own switch: Hydra never sees it), and its value."""
    rest, dry = [], False
    for arg in argv:
        match = re.fullmatch(r"\+{0,2}dry_run=(.*)", arg)
        if match is None:
            rest.append(arg)
            continue
        value = match.group(1).strip().lower()
        if value not in ("true", "false"):
            print(f"regstory-run: error: dry_run must be true or false, got {match.group(1)}", file=sys.stderr)
            raise SystemExit(2)
        dry = value == "true"
    return rest, dry


def _one_line(err: BaseException) -> str:
    from hydra.errors import HydraException

    plain = isinstance(err, HydraException) and not isinstance(err, InstantiationException)
    return " ".join((str(err) if plain else _explain(err)).split())


def describe_problems(problems: list[tuple[list[str], str]], jobs: list[list[str]]) -> str:
    """One line for every bad job: the message alone for one run, ``k of n sweep points ...`` for a sweep, each point
    named by the overrides that vary over the sweep."""
    if len(jobs) == 1 or len(problems) == 1 and not problems[0][0]:
        return problems[0][1]
    common = set.intersection(*(set(job) for job in jobs))
    points = "; ".join(f"[{' '.join(o for o in job if o not in common)}] {message}" for job, message in problems)
    return f"{len(problems)} of {len(jobs)} sweep points are invalid, nothing was run: {points}"


#: the validation fraction held out for a method that needs one when the command line sets none
DEFAULT_VAL_FRACTION = 0.1


def needs_validation(plugins: list, cfg, job: list[str]) -> str:
    """The slot and class of the first plugin that needs a validation split the job does not have ("" when none does, or when
    the job sets ``dataset.val_fraction`` itself)."""
    if any(o.lstrip("+~").startswith("dataset.val_fraction=") for o in job) or cfg.dataset.get("val_fraction"):
        return ""
    return next((f"{p.slot} ({type(p).__name__})" for p in plugins if p.needs_validation), "")


def with_natural_dataset(overrides: list[str], config_name: str) -> list[str]:
    """``["dataset=<name>"]`` when the command line picks an architecture (one, not a sweep of several) but neither
    a data set nor an experiment preset, and the architecture is made for another data set than the default."""
    from hydra import compose

    from regstory.pairing import natural_dataset

    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    picks_arch = any(k == "arch" for k in keys) and not any(o.startswith(("arch=", "+arch=")) and "," in o
                                                           for o in overrides)
    if not picks_arch or any(k in ("dataset", "experiment") or k.startswith("dataset@") for k in keys):
        return []
    cfg = compose(config_name, overrides=list(overrides))
    natural = natural_dataset(cfg.arch)
    return [f"dataset={natural}"] if natural and natural != cfg.dataset.get("name") else []
