"""Shared fixtures: tiny configs and models that build in milliseconds on a CPU."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import proto_segformer  # noqa: E402
from proto_segformer import ProtoSegformerConfig, ProtoSegformerForSemanticSegmentation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is not part of the installed package; appended, so an installed proto_segformer still wins.
sys.path.append(str(ROOT))

# Optional dependencies, by the setup.cfg extra that installs them, and the browser the Space's browser test drives.
# Without them the tests that need them skip, naming the extra (`requires_extra`, `require_extra`), so that the
# README's `pip install ".[dev]"` gives a passing suite. CI (.ci/run, CI=true) installs them all: there a missing one
# stops the run at once instead of letting its tests skip silently.
EXTRAS = {"demo": ("gradio", "selenium"), "onnx": ("onnx", "onnxscript", "onnxruntime")}
BROWSER = (Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver"))  # Debian's chromium, chromium-driver
IN_CI = os.environ.get("CI") == "true"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or a finder that refuses the name
        return False


def missing_extra_reason(extra: str, *modules: str) -> str | None:
    """Why a test of `extra` (all its modules, or only `modules`) cannot run here; None if it can."""
    missing = [name for name in modules or EXTRAS[extra] if not _installed(name)]
    if not missing:
        return None
    return f"needs the [{extra}] extra: pip install '.[{extra}]' (missing: {', '.join(missing)})"


def requires_extra(extra: str, *modules: str) -> pytest.MarkDecorator:
    """Mark a test that needs the optional dependencies of `extra` (or only `modules` of it): skipped without them."""
    reason = missing_extra_reason(extra, *modules)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def require_extra(extra: str, *modules: str) -> None:
    """Inside a test or fixture: skip without the optional dependencies of `extra`; under CI fail instead."""
    reason = missing_extra_reason(extra, *modules)
    if reason is not None:
        (pytest.fail if IN_CI else pytest.skip)(reason)


def missing_optional_dependencies() -> list[str]:
    """Every extra and browser file that some test needs and this environment lacks (what CI must not lack)."""
    missing = [reason for extra in EXTRAS if (reason := missing_extra_reason(extra))]
    missing += [f"needs {path} (apt-get install chromium chromium-driver)" for path in BROWSER if not path.exists()]
    return missing


if IN_CI and (missing := missing_optional_dependencies()):
    raise pytest.UsageError(
        "CI=true but optional test dependencies are missing, and the tests that need them would be skipped: "
        + "; ".join(missing)
        + ". Install every extra as .ci/run does (pip install '.[dev,onnx,demo]')."
    )

if IN_CI:
    # CI tests the package as installed from its wheel (.ci/run), never the source tree: a file left out of the
    # package must fail here.
    package_dir = Path(proto_segformer.__file__).resolve().parent
    if "site-packages" not in package_dir.parts or package_dir == ROOT / "proto_segformer":
        raise pytest.UsageError(
            f"CI=true but proto_segformer is imported from {package_dir}, not from an installed wheel: install it"
            " with `pip install dist/proto_segformer-*.whl` and run `python -P -m pytest` (see .ci/run)."
        )

TINY = {
    "hidden_sizes": [8, 16, 24, 32],
    "depths": [1, 1, 1, 1],
    "num_attention_heads": [1, 1, 1, 1],
    "decoder_hidden_size": 32,
}


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored afterwards): tiny tensors avoid OpenMP barrier stalls on a busy
    machine, and timings inside the test (the head's block-shape measurement) see one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(num_labels: int = 5, **overrides) -> ProtoSegformerConfig:
    """A mit-b0-shaped config shrunk to a few thousand parameters."""
    fields = {"num_labels": num_labels, "num_prototypes_per_class": 4, **TINY, **overrides}
    return ProtoSegformerConfig.from_preset("mit-b0", **fields)


@pytest.fixture
def tiny_model() -> ProtoSegformerForSemanticSegmentation:
    torch.manual_seed(0)
    return ProtoSegformerForSemanticSegmentation(tiny_config())
