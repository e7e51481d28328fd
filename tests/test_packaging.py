"""The package ships everything a plain (non-editable) install needs, the Hydra configs included."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def declared_packages() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_subpackage_is_declared_in_pyproject():
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "regstory").rglob("__init__.py")}
    assert found | {"regstory.conf"} == declared_packages()


def test_wheel_carries_the_configs_and_finds_them_when_installed(tmp_path):
    source = tmp_path / "source"  # build from a copy: setuptools leaves a build/ folder in the source tree
    for name in ("regstory", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("regstory-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("regstory/conf/") for n in names if n.startswith("regstory/conf/") and n.endswith(".yaml")}
    expected = {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped == expected
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = "import regstory.train as t; print(t.conf_dir())"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout.strip()
    assert Path(out) == tmp_path / "site" / "regstory" / "conf" and (Path(out) / "config.yaml").exists()
