"""Shared fixtures: tiny configs and models that build in milliseconds on a CPU."""

from __future__ import annotations

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

if os.environ.get("CI") == "true":
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
