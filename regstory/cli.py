"""``regstory-run --help`` and ``--version``: the tool's own help, built from the config folders (``conf/``).

Hydra's help (``--hydra-help``, or ``--help`` with overrides) also lists the internal ``*_schema`` entries of the
config store; this help lists the options a user can pick, read from the files of each config group.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path
from typing import TextIO

from omegaconf import OmegaConf

#: what each config group of ``conf/config.yaml`` is for (a group missing here is listed without a note)
GROUP_NOTES = {
    "dataset": "the data set, its split, validation fraction and bias labels",
    "arch": "the network",
    "noise": "label noise on the train split (noise.rate=0.2)",
    "method": "pruning: rounds of training and pruning (method.rounds=10)",
    "debias": "debiasing method",
    "distill": "knowledge distillation",
    "trainer": "optimizer, schedule, epochs, batch size, device, precision",
    "logger": "W&B mode/project/tags; console progress: logger.progress=auto|bar|plain|none",
    "experiment": "a whole protocol: a paper preset that sets several groups at once",
    "row": "one row of a table preset: experiment=table2_1 row=<arch>_<method>",
}

EXAMPLES = """\
  regstory-run dataset=mnist1d arch=mlp                         # on CPU, no download
  regstory-run dataset=digits arch=lenet5 trainer.epochs=30 trainer.optimizer=adam trainer.lr=1e-3
  regstory-run method=imp method.rounds=10 noise.rate=0.5       # iterative magnitude pruning, 11 rounds
  regstory-run experiment=sdd_mnist1d                           # the CPU-scale sparse double descent
  regstory-run -m noise.rate=0.0,0.2,0.5 seed=0,1               # a sweep: 6 runs, one after another
  regstory-run -m hydra/launcher=local_parallel seed=0,1,2,3    # a sweep in parallel processes
  regstory-run -m seed=0,1,2 hydra.sweep.dir=outputs/s dry_run=true   # its plan and estimated time, nothing run
  regstory-run -m seed=0,1,2 hydra.sweep.dir=outputs/s          # relaunch: finished runs skipped, killed ones resumed
  regstory-run --cfg job method=imp                             # print the composed config, run nothing
  regstory-run hydra.run.dir=outputs/my_run resume=true         # continue a stopped run from its checkpoint"""


def version() -> str:
    """The installed package's version (``regstory.__version__`` when it is not installed)."""
    try:
        return metadata.version("regstory")
    except metadata.PackageNotFoundError:
        from regstory import __version__

        return __version__


def print_version(out: TextIO | None = None) -> None:
    """Print ``regstory <version>``."""
    print(f"regstory {version()}", file=out or sys.stdout)


def config_groups(conf: Path) -> list[tuple[str, list[str], str | None]]:
    """(group, options, default option or None) for each group of ``conf/config.yaml``'s defaults list, in its order,
    then the other folders of ``conf`` (``hydra/launcher``...). Options are the ``<option>.yaml`` files of the
    group's folder; ``*_schema`` entries are not options and are left out."""
    conf = Path(conf)
    defaults = OmegaConf.to_container(OmegaConf.load(conf / "config.yaml")).get("defaults", [])
    chosen: dict[str, str | None] = {}
    for entry in defaults:
        if isinstance(entry, dict):
            for key, value in entry.items():
                chosen[key.split()[-1]] = value  # "optional experiment" -> experiment
    folders = sorted({p.parent.relative_to(conf).as_posix() for p in conf.rglob("*.yaml") if p.parent != conf})
    order = [g for g in chosen if g in folders] + [g for g in folders if g not in chosen]
    groups = []
    for group in order:
        options = sorted(p.stem for p in (conf / group).glob("*.yaml") if not p.stem.endswith("_schema"))
        if options:
            groups.append((group, options, chosen.get(group)))
    return groups


def output_dirs(conf: Path) -> tuple[str, str]:
    """Where runs and sweeps go, from ``hydra.run.dir`` and ``hydra.sweep.dir``/``subdir`` of ``config.yaml``, with
    interpolations as placeholders: ``outputs/runs/<date>/<time>``."""
    hydra = OmegaConf.to_container(OmegaConf.load(Path(conf) / "config.yaml")).get("hydra", {})

    def readable(template: str) -> str:
        template = re.sub(r"\$\{now:[^}]*%d[^}]*\}", "<date>", template)
        template = re.sub(r"\$\{now:[^}]*\}", "<time>", template)
        template = template.replace("${hydra.job.num}", "<job number>")
        template = template.replace("${hydra.job.override_dirname}", "<overrides>")
        return re.sub(r"\$\{([^}]*\.)?([^}.]*)\}", r"<\2>", template)

    run = readable(hydra.get("run", {}).get("dir", "outputs/runs/<date>/<time>"))
    sweep = hydra.get("sweep", {})
    sweep_dir = readable(f"{sweep.get('dir', 'multirun/<date>/<time>')}/{sweep.get('subdir', '<job number>')}")
    return run, sweep_dir


def _wrapped(words: list[str], indent: int, width: int = 100) -> str:
    lines, line = [], ""
    for word in words:
        if line and indent + len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return ("\n" + " " * indent).join(lines)


def help_text(conf: Path | None = None) -> str:
    """The text of ``regstory-run --help``."""
    if conf is None:
        from regstory.train import conf_dir

        conf = Path(conf_dir())
    groups = config_groups(conf)
    width = max(len(g) for g, _, _ in groups) + 2
    rows = []
    for group, options, default in groups:
        ordered = ([f"{default}*"] if default in options else []) + [o for o in options if o != default]
        note = GROUP_NOTES.get(group, "")
        if group.startswith("hydra/"):
            note = f"how a -m sweep runs: {group}=<option> (or Hydra's basic, joblib...)"
        if note:
            rows.append(f"  {group:<{width}}{note}")
        rows.append(f"  {'' if note else group:<{width}}{_wrapped([o + ',' for o in ordered[:-1]] + ordered[-1:], 2 + width)}")
    run_dir, sweep_dir = output_dirs(conf)
    return f"""\
regstory-run {version()}: train a network as a composed config says (pruning, debiasing, distillation, label
noise), write its metrics, checkpoints and summary to a run folder, and log it to W&B (offline by default).

usage: regstory-run [group=option ...] [group.key=value ...]
       regstory-run -m key=a,b ...   a sweep: one run per combination of the values
       regstory-run --cfg job ...    print the composed config (every key and its value) and run nothing
       regstory-run --help | --version | --hydra-help (Hydra's own flags and help)

config groups: pick one option with group=option (* marks the default; each option is conf/<group>/<option>.yaml)
{chr(10).join(rows)}

Override any key with group.key=value (trainer.epochs=50 noise.rate=0.2); top-level keys: seed=0,
resume=false (true: continue the run in hydra.run.dir from its checkpoint), data.root (default $REGSTORY_DATA,
else ~/.cache/regstory/data), data.download=true. A wrong key or value stops before anything is created.
More plugins beside method/debias/distill go under plugins: +method@plugins.second=random plugins.second.rate=0.5.

where runs go (relative to the current folder):
  one run   {run_dir}/  (choose with hydra.run.dir=...)
  a sweep   {sweep_dir}/
  each holds metrics.jsonl (one line per epoch), rounds.jsonl, summary.json, checkpoints/last.pt, config.yaml,
  provenance.json and wandb/ (sync later with: wandb sync <run folder>/wandb/offline-run-*)

examples:
{EXAMPLES}

tables and figures from run folders: regstory-report <run or sweep folder> (regstory-report --help)
more: the README (README.md of the source tree: config groups, outputs, sweeps, resuming, methods)
"""


def print_help(out: TextIO | None = None, conf: Path | None = None) -> None:
    """Print :func:`help_text`."""
    print(help_text(conf), end="", file=out or sys.stdout)


def answer_help_or_version(argv: list[str], out: TextIO | None = None) -> bool:
    """Print the help (argv exactly ``--help`` or ``-h``) or the version (exactly ``--version``) and return True;
    return False for anything else (``--hydra-help``, ``--help`` with overrides...: left to Hydra)."""
    if argv in (["--help"], ["-h"]):
        print_help(out)
        return True
    if argv == ["--version"]:
        print_version(out)
        return True
    return False
