"""``regstory-run --help`` and ``--version``: the tool's own help (config groups read from ``conf/``, where runs go,
examples), not Hydra's."""
from __future__ import annotations

import io
from importlib import metadata
from pathlib import Path

import pytest

from regstory.cli import answer_help_or_version, config_groups, help_text, output_dirs
from regstory.train import conf_dir
from tests.conftest import run_cli

CONF = Path(conf_dir())


def test_help_lists_every_group_and_option_of_conf_without_schema_entries():
    text = help_text(CONF)
    assert text.startswith("regstory-run ") and "powered by Hydra" not in text and "_schema" not in text
    groups = {g: options for g, options, _ in config_groups(CONF)}
    folders = {p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml") if p.parent != CONF}
    assert set(groups) == folders
    for folder in folders:
        assert groups[folder] == sorted(p.stem for p in (CONF / folder).glob("*.yaml"))
        for option in groups[folder]:
            assert option in text, option
    assert list(groups)[:3] == ["dataset", "arch", "noise"]  # the order of config.yaml's defaults


def test_help_marks_the_defaults_and_says_where_runs_go():
    text = help_text(CONF)
    defaults = {g: d for g, _, d in config_groups(CONF)}
    assert defaults["dataset"] == "mnist1d" and defaults["method"] == "none" and defaults["experiment"] is None
    assert "mnist1d*" in text and "none*, imp" in text
    assert output_dirs(CONF) == ("outputs/runs/<date>/<time>", "outputs/multirun/<date>/<time>/<job number>_<overrides>")
    assert "outputs/runs/<date>/<time>/" in text
    assert "examples:" in text and "regstory-run -m " in text and "README" in text and "regstory-report" in text


def test_version_is_the_installed_package_version():
    out = io.StringIO()
    assert answer_help_or_version(["--version"], out)
    assert out.getvalue() == f"regstory {metadata.version('regstory')}\n"


@pytest.mark.parametrize("argv, answered", [
    (["--help"], True), (["-h"], True), (["--version"], True),
    (["--hydra-help"], False), (["--help", "method=imp"], False), (["method=imp"], False), ([], False),
])
def test_only_the_bare_flags_are_answered(argv, answered):
    out = io.StringIO()
    assert answer_help_or_version(argv, out) is answered
    assert bool(out.getvalue()) is answered


def test_regstory_run_help_and_version(tmp_path):
    """Needs the two lines of ``regstory.train.main`` that call :func:`regstory.cli.answer_help_or_version`."""
    help_out = run_cli("--help", cwd=tmp_path).stdout
    assert help_out == help_text(CONF)
    assert run_cli("--version", cwd=tmp_path).stdout == f"regstory {metadata.version('regstory')}\n"
    assert run_cli("--hydra-help", cwd=tmp_path).stdout.startswith("Hydra (")  # Hydra's own help stays
    assert not (tmp_path / "outputs").exists()
