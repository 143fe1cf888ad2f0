"""ProtoSeg ("Rethinking Semantic Segmentation: A Prototype View", Zhou et al., CVPR 2022) on any transformers backbone.

A backbone built by `load_backbone` / `AutoBackbone` from `config.backbone_config` (ResNet, Swin, ConvNeXt, DINOv2, a
timm model such as HRNet, ...) gives feature maps; a UperNet decoder (PPM + FPN) or SegFormer's all-MLP decoder fuses
them at the resolution of the first one; the prototype head of `prototype_head.py` (shared with ProtoSegformer)
projects them to unit pixel embeddings and classifies each pixel by its nearest prototype.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.backbone_utils import load_backbone
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.upernet.modeling_upernet import UperNetHead

from .configuration_protoseg import ProtoSegConfig
from .prototype_head import ProtoSegformerDecodeHead, ProtoSegformerProjection, PrototypeHeadMixin
from .prototype_math import random_unit_prototypes
from .transformers_changes import declare_image_segmentation_support, register_checkpoint_layout

# The MLP decoder's stage projections under SegFormer's checkpoint names, as ProtoSegformer's (transformers_changes.py).
register_checkpoint_layout("ProtoSegForSemanticSegmentation")

TIMM_EXTRA_HINT = "pip install 'proto_segformer[timm]' (or pip install timm)"


class ProtoSegUperNetDecoder(UperNetHead):
    """transformers' `UperNetHead` (pyramid pooling on the last feature map, FPN over all of them, fused by a 3x3
    conv) without its classifier: feature maps (B, C_s, H/s, W/s) -> (B, decoder_hidden_size, H/s0, W/s0). Parameter
    names are UperNet's, so a `UperNetForSemanticSegmentation` checkpoint's decoder loads into it."""

    def __init__(self, config: ProtoSegConfig, in_channels: list[int]) -> None:
        super().__init__(config, in_channels)
        # ProtoSeg has no parametric classifier: the projection and the prototypes follow.
        self.classifier = nn.Identity()


def _check_timm(backbone_config) -> None:
    """An ImportError naming the `timm` extra when a timm backbone is asked for and timm cannot be imported."""
    if getattr(backbone_config, "model_type", None) != "timm_backbone":
        return
    try:
        import timm  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"The backbone {getattr(backbone_config, 'backbone', '?')!r} is a timm model and timm is not installed:"
            f" {TIMM_EXTRA_HINT}."
        ) from error
    except RuntimeError as error:  # torchvision (a timm dependency) built for another torch: its ops cannot register
        raise ImportError(
            f"timm is installed but cannot be imported ({error}): its dependency torchvision does not match the"
            f" installed torch {torch.__version__}. Install the torchvision built for this torch."
        ) from error


def minimum_backbone_input_size(config: ProtoSegConfig) -> int:
    """Smallest height/width worth feeding the backbone: a ViT's patch size (its maps are at the patch stride), and
    32 for hierarchical backbones (their last map is at stride 32)."""
    backbone = config.backbone_config
    if getattr(backbone, "depths", None) is None and getattr(backbone, "patch_size", None) is not None:
        patch = backbone.patch_size
        return int(patch if isinstance(patch, int) else max(patch))
    return 32


class ProtoSegPreTrainedModel(PrototypeHeadMixin, PreTrainedModel):
    config_class = ProtoSegConfig
    config: ProtoSegConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = []
    # Parametric starting point: a UperNet checkpoint (backbone and decoder load; classifier and auxiliary head are
    # dropped). Backbone-only checkpoints load through `proto_segformer.model_building`.
    conversion_model_types = ("upernet",)
    conversion_prefixes = (("projection.", "prototypes"), ("decode_head.classifier.", "auxiliary_head."))
    encoder_name = "the backbone"
    conversion_hint = (
        "to start a new ProtoSeg model from a UperNet checkpoint, load one whose config.json has model_type 'upernet'"
    )
    encoder_description = "backbone"


class ProtoSegForSemanticSegmentation(ProtoSegPreTrainedModel):
    """Any transformers backbone, a UperNet or all-MLP decoder and a non-learnable nearest-prototype classifier."""

    def __init__(self, config: ProtoSegConfig) -> None:
        super().__init__(config)
        if config.num_labels is None or config.num_labels < 2:
            raise ValueError(f"ProtoSeg needs at least 2 classes (num_labels), got {config.num_labels}.")
        ProtoSegConfig.check_protoseg_fields(config)
        _check_timm(config.backbone_config)
        try:
            self.backbone = load_backbone(config)
        except (ValueError, KeyError) as error:
            raise ValueError(
                f"backbone_config ({config.backbone_config.model_type}) does not build a backbone: {error}"
            ) from None
        channels = list(self.backbone.channels)
        if not channels:
            raise ValueError(
                f"backbone_config ({config.backbone_config.model_type}) yields no feature maps: set out_features or"
                " out_indices to the stages the decoder reads."
            )
        if config.decoder_type == "upernet":
            self.decode_head = ProtoSegUperNetDecoder(config, channels)
        else:
            self.decode_head = ProtoSegformerDecodeHead(config, in_channels=channels)
        self.projection = ProtoSegformerProjection(config)
        shape = (config.num_labels, config.num_prototypes_per_class, config.embedding_dim)
        self.register_buffer("prototypes", random_unit_prototypes(*shape), persistent=True)
        self.min_input_size = minimum_backbone_input_size(config)
        self.post_init()

    def input_channels(self) -> int:
        return self.config.num_channels

    def onnx_export_problem(self) -> str | None:
        """Why the model cannot go to ONNX with dynamic height and width, or None: the UperNet decoder's pyramid
        pooling (adaptive average pooling to 1, 2, 3, 6 cells) converts to ONNX with indices fixed at the traced size
        (ONNX Runtime then fails at any other size). torch.export handles it at every size."""
        if self.config.decoder_type == "upernet":
            return (
                "The UperNet decoder's pyramid pooling converts to ONNX only at the traced input size: export a model"
                " trained with --decoder_type mlp, or use torch.export (proto_segformer.export.export_program), which"
                " runs the UperNet decoder at any size."
            )
        return None

    def embed_pixels(self, pixel_values: torch.Tensor, **encoder_kwargs) -> tuple[torch.Tensor, BaseModelOutput]:
        """Unit pixel embeddings (B, D, h, w) at the first feature map's resolution, and the backbone's outputs
        (`hidden_states`: its feature maps; `attentions` where it returns them)."""
        outputs = self.backbone.forward_with_filtered_kwargs(pixel_values, **encoder_kwargs)
        feature_maps = tuple(outputs.feature_maps)
        decoded = self.decode_head(feature_maps)
        attentions = getattr(outputs, "attentions", None)
        return self.projection(decoded), BaseModelOutput(hidden_states=feature_maps, attentions=attentions)


# auto_map in every saved config.json, so that the Auto classes and the pipeline load the model with remote code.
ProtoSegForSemanticSegmentation.register_for_auto_class("AutoModel")
ProtoSegForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

# The image-segmentation pipeline accepts this model (see transformers_changes.py).
declare_image_segmentation_support(ProtoSegConfig.model_type, ProtoSegForSemanticSegmentation.__name__)

__all__ = [
    "ProtoSegForSemanticSegmentation",
    "ProtoSegPreTrainedModel",
    "ProtoSegUperNetDecoder",
]
