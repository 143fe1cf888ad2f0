"""proto_segformer: ProtoSeg (non-learnable prototype classifier) on SegFormer and any transformers backbone, HF native.

The public names load on first use (PEP 562), so that `import proto_segformer.cli` (every script's argument parsing
and `--help`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY_NAMES = {
    "BACKBONE_PRESETS": "configuration_protoseg",
    "ProtoSegConfig": "configuration_protoseg",
    "ProtoSegForSemanticSegmentation": "modeling_protoseg",
    "ProtoSegPreTrainedModel": "modeling_protoseg",
    "MIT_PRESETS": "configuration_proto_segformer",
    "ProtoSegformerConfig": "configuration_proto_segformer",
    "mit_preset": "configuration_proto_segformer",
    "ProtoSegformerForSemanticSegmentation": "modeling_proto_segformer",
    "ProtoSegformerPreTrainedModel": "modeling_proto_segformer",
    "ProtoSegformerSemanticSegmenterOutput": "modeling_proto_segformer",
}

__all__ = [
    "BACKBONE_PRESETS",
    "MIT_PRESETS",
    "ProtoSegConfig",
    "ProtoSegForSemanticSegmentation",
    "ProtoSegPreTrainedModel",
    "ProtoSegformerConfig",
    "ProtoSegformerForSemanticSegmentation",
    "ProtoSegformerPreTrainedModel",
    "ProtoSegformerSemanticSegmenterOutput",
    "mit_preset",
]

if TYPE_CHECKING:
    from .configuration_proto_segformer import MIT_PRESETS, ProtoSegformerConfig, mit_preset
    from .configuration_protoseg import BACKBONE_PRESETS, ProtoSegConfig
    from .modeling_proto_segformer import (
        ProtoSegformerForSemanticSegmentation,
        ProtoSegformerPreTrainedModel,
        ProtoSegformerSemanticSegmenterOutput,
    )
    from .modeling_protoseg import ProtoSegForSemanticSegmentation, ProtoSegPreTrainedModel


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))
