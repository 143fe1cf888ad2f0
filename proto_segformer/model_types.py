"""The package's two models by their config.json `model_type`: the one small interface for code that takes either.

- "proto_segformer": `ProtoSegformerConfig` / `ProtoSegformerForSemanticSegmentation` (MiT encoder, SegFormer decoder);
- "protoseg": `ProtoSegConfig` / `ProtoSegForSemanticSegmentation` (any AutoBackbone, UperNet or MLP decoder).

Both share the prototype head (`prototype_head.py`): loading, checks, inference and class editing work the same on
either, so the rest of the package asks this module which classes and which remote-code files a checkpoint needs and
never branches on the class itself. The classes are imported on first use (torch is not needed to ask for names).
"""

from __future__ import annotations

import importlib
from pathlib import Path

# model_type -> (configuration module, config class, modeling module, model class)
MODELS: dict[str, tuple[str, str, str, str]] = {
    "proto_segformer": (
        "configuration_proto_segformer",
        "ProtoSegformerConfig",
        "modeling_proto_segformer",
        "ProtoSegformerForSemanticSegmentation",
    ),
    "protoseg": ("configuration_protoseg", "ProtoSegConfig", "modeling_protoseg", "ProtoSegForSemanticSegmentation"),
}
MODEL_TYPES = tuple(MODELS)


def _entry(model_type: str | None) -> tuple[str, str, str, str]:
    if model_type not in MODELS:
        raise ValueError(f"model_type {model_type!r} is not one of this package's models {MODEL_TYPES}.")
    return MODELS[model_type]


def config_class(model_type: str | None) -> type:
    """The config class of our checkpoints of `model_type`."""
    module, name, _, _ = _entry(model_type)
    return getattr(importlib.import_module(f".{module}", __package__), name)


def model_class(model_type: str | None) -> type:
    """The model class of our checkpoints of `model_type`."""
    _, _, module, name = _entry(model_type)
    return getattr(importlib.import_module(f".{module}", __package__), name)


def modeling_file(model_type: str | None) -> Path:
    """The modelling source file of `model_type` (what auto_map names; remote code starts there)."""
    return Path(__file__).resolve().parent / f"{_entry(model_type)[2]}.py"


def model_name(model_type: str | None) -> str:
    """'ProtoSegformer' or 'ProtoSeg', for messages."""
    return _entry(model_type)[1].removesuffix("Config")
