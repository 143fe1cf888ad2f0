"""The package ships everything it reads at run time: a wheel (what `pip install .` installs) holds it."""

from __future__ import annotations

import configparser
import fnmatch
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import proto_segformer
from proto_segformer.model_card import TEMPLATE_PATH
from proto_segformer.space import APP_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(proto_segformer.__file__).resolve().parent


def package_data_patterns() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser["options.package_data"]["proto_segformer"].split()


def data_files() -> list[str]:
    """Files under the package that are not Python modules (relative to the package)."""
    return sorted(
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    )


def test_the_model_card_and_space_templates_are_inside_the_package():
    for template in (TEMPLATE_PATH, APP_TEMPLATE):
        assert template.is_file()
        assert PACKAGE in template.resolve().parents, f"{template} lies outside the package {PACKAGE}"


def test_the_space_app_template_is_package_data():
    """templates/space/ is no Python package, so its app.py ships only as package data."""
    assert not (PACKAGE / "templates" / "space" / "__init__.py").exists()
    assert any(fnmatch.fnmatch("templates/space/app.py", p) for p in package_data_patterns())


def test_every_data_file_of_the_package_is_package_data():
    patterns = package_data_patterns()
    missing = [name for name in data_files() if not any(fnmatch.fnmatch(name, p) for p in patterns)]
    assert "templates/model_card.md" in data_files()
    assert not missing, f"not in setup.cfg [options.package_data]: {missing}"


def test_the_wheel_holds_the_template_and_the_metric(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to setup.cfg
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "proto_segformer", ignore=shutil.ignore_patterns("__pycache__"))
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (wheel,) = tmp_path.glob("proto_segformer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("templates/model_card.md", "templates/space/app.py", "metrics/mean_iou.py", "endpoint_handler.py",
                 "space.py", *data_files()):  # fmt: skip
        assert f"proto_segformer/{name}" in names, name
