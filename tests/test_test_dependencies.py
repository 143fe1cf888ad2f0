"""The optional test dependencies: without an extra its tests skip naming it; CI (CI=true) refuses to run without."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import conftest
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_missing_extra_is_named_with_its_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxscript" else real(name))
    reason = conftest.missing_extra_reason("onnx")
    assert reason is not None and "[onnx]" in reason and "pip install '.[onnx]'" in reason and "onnxscript" in reason
    assert any("[onnx]" in line for line in conftest.missing_optional_dependencies())


def test_every_extra_of_setup_cfg_that_tests_need_is_known():
    setup = (ROOT / "setup.cfg").read_text()
    for extra, modules in conftest.EXTRAS.items():
        section = setup.split(f"\n{extra} =\n", 1)[1].split("\n\n", 1)[0].split("\n#", 1)[0]
        for module in modules:
            assert module in section, f"{module} is not in the [{extra}] extra of setup.cfg"


@pytest.mark.slow
def test_ci_refuses_to_run_when_an_extra_is_missing(tmp_path):
    """A conftest-time error, not skips: a module that hides gradio from the import system stands in for an
    environment without the [demo] extra."""
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'gradio':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    path = [str(tmp_path), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "CI": "true", "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "tests/test_safe_files.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "[demo]" in done.stdout + done.stderr
