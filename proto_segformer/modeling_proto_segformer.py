"""ProtoSeg ("Rethinking Semantic Segmentation: A Prototype View", Zhou et al., CVPR 2022) on SegFormer.

SegFormer's Mix Transformer encoder and all-MLP decoder, a projection to unit pixel embeddings, and instead of a
learnable classifier a persistent buffer `prototypes` of shape (K, M, D): each pixel takes the class of its nearest
prototype. The prototypes are running means of pixel embeddings, updated in training mode from labelled pixels. The
prototype head (everything after the pixel embeddings) is `prototype_head.py`, shared with `modeling_protoseg.py`.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.models.segformer.modeling_segformer import SegformerModel
from transformers.utils import ModelOutput

from .configuration_proto_segformer import ProtoSegformerConfig
from .prototype_head import (
    ProtoSegformerDecodeHead,
    ProtoSegformerProjection,
    ProtoSegSemanticSegmenterOutput,
    PrototypeHeadMixin,
)
from .prototype_math import random_unit_prototypes
from .transformers_changes import (
    declare_image_segmentation_support,
    install_output_capturing_hooks,
    register_checkpoint_layout,
)

# SegFormer's checkpoint layout for our class (`decode_head.linear_c.*`): see transformers_changes.py.
register_checkpoint_layout("ProtoSegformerForSemanticSegmentation")

# The output of both ProtoSeg models, under the name this model's users know.
ProtoSegformerSemanticSegmenterOutput = ProtoSegSemanticSegmenterOutput


class ProtoSegformerPreTrainedModel(PrototypeHeadMixin, PreTrainedModel):
    config_class = ProtoSegformerConfig
    config: ProtoSegformerConfig
    base_model_prefix = "segformer"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SegformerStage"]
    # The attention back-ends of SegFormer's encoder, which this model runs unchanged (SegformerPreTrainedModel's).
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True


def minimum_input_size(config: ProtoSegformerConfig) -> int:
    """Smallest height/width the encoder accepts: every stage with sequence reduction needs a map >= its sr_ratio."""
    size = 1
    while True:
        current, fits = size, True
        for patch, stride, reduction in zip(config.patch_sizes, config.strides, config.sr_ratios):
            current = (current + 2 * (patch // 2) - patch) // stride + 1
            if current < max(1, reduction):
                fits = False
                break
        if fits:
            return size
        size += 1


class ProtoSegformerForSemanticSegmentation(ProtoSegformerPreTrainedModel):
    """SegFormer encoder and decoder with a non-learnable nearest-prototype classifier (ProtoSeg)."""

    def __init__(self, config: ProtoSegformerConfig) -> None:
        super().__init__(config)
        if config.num_labels is None or config.num_labels < 2:
            raise ValueError(f"ProtoSeg needs at least 2 classes (num_labels), got {config.num_labels}.")
        # Again here, before anything is allocated: fields set on the config after it was built are checked too.
        ProtoSegformerConfig.check_protoseg_fields(config)
        self.segformer = SegformerModel(config)
        self.decode_head = ProtoSegformerDecodeHead(config)
        self.projection = ProtoSegformerProjection(config)
        shape = (config.num_labels, config.num_prototypes_per_class, config.embedding_dim)
        self.register_buffer("prototypes", random_unit_prototypes(*shape), persistent=True)
        self.min_input_size = minimum_input_size(config)
        self.post_init()
        install_output_capturing_hooks(self.segformer)  # for torch.compile(fullgraph=True)

    def embed_pixels(self, pixel_values: torch.Tensor, **encoder_kwargs) -> tuple[torch.Tensor, ModelOutput]:
        """Unit pixel embeddings (B, D, H/4, W/4) and the encoder outputs."""
        encoder_outputs = self.segformer(pixel_values, output_hidden_states=True, **encoder_kwargs)
        decoded = self.decode_head(encoder_outputs.hidden_states)
        return self.projection(decoded), encoder_outputs


# auto_map in every saved config.json, so that the Auto classes and the pipeline load the model with remote code.
ProtoSegformerForSemanticSegmentation.register_for_auto_class("AutoModel")
ProtoSegformerForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")


# The image-segmentation pipeline accepts this model (see transformers_changes.py).
declare_image_segmentation_support(ProtoSegformerConfig.model_type, ProtoSegformerForSemanticSegmentation.__name__)

__all__ = [
    "ProtoSegformerDecodeHead",
    "ProtoSegformerForSemanticSegmentation",
    "ProtoSegformerPreTrainedModel",
    "ProtoSegformerProjection",
    "ProtoSegformerSemanticSegmenterOutput",
]
