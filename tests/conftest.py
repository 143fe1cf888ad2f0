"""Shared fixtures: tiny configs and models that build in milliseconds on a CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from proto_segformer import ProtoSegformerConfig, ProtoSegformerForSemanticSegmentation  # noqa: E402

TINY = {
    "hidden_sizes": [8, 16, 24, 32],
    "depths": [1, 1, 1, 1],
    "num_attention_heads": [1, 1, 1, 1],
    "decoder_hidden_size": 32,
}


def tiny_config(num_labels: int = 5, **overrides) -> ProtoSegformerConfig:
    """A mit-b0-shaped config shrunk to a few thousand parameters."""
    fields = {"num_labels": num_labels, "num_prototypes_per_class": 4, **TINY, **overrides}
    return ProtoSegformerConfig.from_preset("mit-b0", **fields)


@pytest.fixture
def tiny_model() -> ProtoSegformerForSemanticSegmentation:
    torch.manual_seed(0)
    return ProtoSegformerForSemanticSegmentation(tiny_config())
