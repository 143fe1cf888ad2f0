"""proto_segformer: ProtoSeg (non-learnable prototype classifier) on SegFormer, Hugging Face native."""

from .configuration_proto_segformer import MIT_PRESETS, ProtoSegformerConfig, mit_preset
from .modeling_proto_segformer import (
    ProtoSegformerForSemanticSegmentation,
    ProtoSegformerPreTrainedModel,
    ProtoSegformerSemanticSegmenterOutput,
)

ProtoSegformerConfig.register_for_auto_class()
ProtoSegformerForSemanticSegmentation.register_for_auto_class("AutoModel")
ProtoSegformerForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

__version__ = "0.1.0"

__all__ = [
    "MIT_PRESETS",
    "ProtoSegformerConfig",
    "ProtoSegformerForSemanticSegmentation",
    "ProtoSegformerPreTrainedModel",
    "ProtoSegformerSemanticSegmenterOutput",
    "mit_preset",
]
