"""Configuration of ProtoSeg on any transformers backbone (`model_type = "protoseg"`).

The backbone is described by `backbone_config`, as transformers 5's `UperNetConfig` takes it: the config of any model
`AutoBackbone` builds (ResNet, Swin, ConvNeXt, DINOv2, ... or a `TimmBackboneConfig` for a timm model such as HRNet),
with `out_features` / `out_indices` naming the stages the decoder reads. `BACKBONE_PRESETS` names offline sizes.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES

from .configuration_proto_segformer import check_model_size, check_prototype_fields
from .local_paths import check_local_source

# The decoders (`decoder_type`): UperNet's PPM + FPN (as the paper's ResNet / Swin / HRNet models) and SegFormer's
# all-MLP decoder, each over the backbone's feature maps; the first is the default.
DECODER_TYPES = ("upernet", "mlp")

# The ProtoSeg fields and their defaults (the contract's; as ProtoSegformerConfig's, see its docstring).
PROTOTYPE_FIELD_DEFAULTS: dict[str, Any] = {
    "num_prototypes_per_class": 10,
    "prototype_dim": None,
    "prototype_momentum": 0.999,
    "sinkhorn_epsilon": 0.05,
    "sinkhorn_iterations": 3,
    "ppc_weight": 0.01,
    "ppd_weight": 0.001,
    "ppc_temperature": 0.1,
    "inference_chunk_size": 2**24,
    "class_score_normalization": "layer_norm",
    "class_score_temperature": 0.1,
    "similarity_dtype": None,
    "unknown_threshold": None,
    "unknown_calibration": None,
}

_FOUR_STAGES = ["stage1", "stage2", "stage3", "stage4"]


def _resnet(layer_type: str, hidden_sizes: list[int], depths: list[int]) -> dict[str, Any]:
    return {"model_type": "resnet", "layer_type": layer_type, "hidden_sizes": hidden_sizes, "depths": depths}


def _swin(embed_dim: int, depths: list[int], num_heads: list[int]) -> dict[str, Any]:
    return {"model_type": "swin", "embed_dim": embed_dim, "depths": depths, "num_heads": num_heads, "window_size": 7}


def _vit(model_type: str, hidden_size: int, heads: int, patch_size: int, out_indices: list[int]) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "hidden_size": hidden_size,
        "num_hidden_layers": max(out_indices),
        "num_attention_heads": heads,
        "patch_size": patch_size,
        "out_indices": out_indices,
    }


def _timm(name: str) -> dict[str, Any]:
    return {
        "model_type": "timm_backbone",
        "backbone": name,
        "use_pretrained_backbone": False,
        "out_indices": [1, 2, 3, 4],
    }


# The backbone presets' names, a literal (the scripts' --help reads it from this source without importing anything).
BACKBONE_PRESET_NAMES = (
    "resnet-18",
    "resnet-50",
    "resnet-101",
    "swin-tiny",
    "swin-small",
    "swin-base",
    "convnext-tiny",
    "convnext-small",
    "dinov2-small",
    "dinov2-base",
    "hrnet-w18",
    "hrnet-w48",
)
# Backbone sizes for random initialisation offline (the published architectures' sizes; `model_type` picks the
# transformers config class). Hierarchical backbones give stages 1-4 (strides 4-32); ViTs (DINOv2) give the tokens of
# layers 3, 6, 9, 12 as stages, all at the patch stride (14). HRNet is timm's (the `timm` extra).
BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "resnet-18": _resnet("basic", [64, 128, 256, 512], [2, 2, 2, 2]),
    "resnet-50": _resnet("bottleneck", [256, 512, 1024, 2048], [3, 4, 6, 3]),
    "resnet-101": _resnet("bottleneck", [256, 512, 1024, 2048], [3, 4, 23, 3]),
    "swin-tiny": _swin(96, [2, 2, 6, 2], [3, 6, 12, 24]),
    "swin-small": _swin(96, [2, 2, 18, 2], [3, 6, 12, 24]),
    "swin-base": _swin(128, [2, 2, 18, 2], [4, 8, 16, 32]),
    "convnext-tiny": {"model_type": "convnext", "hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 9, 3]},
    "convnext-small": {"model_type": "convnext", "hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 27, 3]},
    "dinov2-small": _vit("dinov2", 384, 6, 14, [3, 6, 9, 12]),
    "dinov2-base": _vit("dinov2", 768, 12, 14, [3, 6, 9, 12]),
    "hrnet-w18": _timm("hrnet_w18"),
    "hrnet-w48": _timm("hrnet_w48"),
}
assert tuple(BACKBONE_PRESETS) == BACKBONE_PRESET_NAMES
for _fields in BACKBONE_PRESETS.values():
    if "out_indices" not in _fields:
        _fields["out_features"] = list(_FOUR_STAGES)
# The decoder of every preset: UperNet with a 512-wide PPM + FPN (UperNet's and mmsegmentation's default width).
PRESET_DECODER: dict[str, Any] = {"decoder_type": "upernet", "decoder_hidden_size": 512}


def backbone_preset(name: str) -> PretrainedConfig:
    """A fresh backbone config of a named size (`BACKBONE_PRESETS`), for random initialisation offline."""
    key = name.lower().replace("_", "-")
    if key not in BACKBONE_PRESETS:
        raise ValueError(f"Unknown backbone preset {name!r}; choose one of {sorted(BACKBONE_PRESETS)}.")
    fields = copy.deepcopy(BACKBONE_PRESETS[key])
    return CONFIG_MAPPING[fields.pop("model_type")](**fields)


def backbone_config_from(value: Any) -> PretrainedConfig:
    """`backbone_config` as a transformers config: a config is kept, a dict (as config.json holds it) is built by its
    `model_type`, None is ResNet-50's stages 1-4 (UperNetConfig's default). A ValueError (one line) otherwise."""
    if value is None:
        return backbone_preset("resnet-50")
    if isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        fields = dict(value)
        model_type = fields.pop("model_type", None)
        if model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"backbone_config has model_type {model_type!r}, which transformers does not know: give the config of"
                " a backbone model (resnet, swin, convnext, dinov2, timm_backbone, ...)."
            )
        try:
            return CONFIG_MAPPING[model_type].from_dict(fields)
        except (ValueError, TypeError) as error:
            raise ValueError(f"backbone_config ({model_type}): {error}") from None
    raise ValueError(f"backbone_config must be a transformers config or a dict, got {type(value).__name__}.")


# Written into config.json so that the Auto classes and the pipeline find the custom code next to the weights.
AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_protoseg.ProtoSegConfig",
    "AutoModel": "modeling_protoseg.ProtoSegForSemanticSegmentation",
    "AutoModelForSemanticSegmentation": "modeling_protoseg.ProtoSegForSemanticSegmentation",
}


class ProtoSegConfig(PretrainedConfig):
    r"""
    Configuration of [`ProtoSegForSemanticSegmentation`]: ProtoSeg's non-learnable prototype classifier on any
    backbone `AutoBackbone` builds, with a UperNet or SegFormer-MLP decoder.

    Args:
        backbone_config (`PretrainedConfig` or `dict`, *optional*): the backbone's config, as `UperNetConfig` takes it
            (default: ResNet-50, stages 1-4). Its `out_features` / `out_indices` name the feature maps the decoder
            reads, from the highest resolution to the lowest.
        decoder_type (`str`, defaults to `"upernet"`): `"upernet"` (pyramid pooling on the last map + FPN over all
            of them, transformers' `UperNetHead` without its classifier) or `"mlp"` (SegFormer's all-MLP decoder).
            Both give features at the resolution of the first feature map (stride 4 for ResNet, Swin, ConvNeXt and
            HRNet; the patch size, 14, for DINOv2).
        decoder_hidden_size (`int`, defaults to 512): the decoder's width (UperNet's `hidden_size`).
        pool_scales (`list[int]`, defaults to `[1, 2, 3, 6]`): the pyramid pooling scales of the UperNet decoder.
        classifier_dropout_prob (`float`, defaults to 0.1): dropout before the projection (MLP decoder).
        initializer_range (`float`, defaults to 0.02): std of the decoder's initial weights.
        The ProtoSeg fields (`num_prototypes_per_class`, `prototype_dim`, `prototype_momentum`, `sinkhorn_*`,
            `ppc_*`, `ppd_weight`, `inference_chunk_size`, `class_score_*`, `similarity_dtype`): as
            [`ProtoSegformerConfig`], with the same defaults (`PROTOTYPE_FIELD_DEFAULTS`) and checks.
    """

    model_type = "protoseg"
    # transformers' UperNetHead reads `hidden_size`: here it is the decoder's width.
    attribute_map = {"hidden_size": "decoder_hidden_size"}

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict | None = None,
        decoder_type: str = "upernet",
        decoder_hidden_size: int = 512,
        pool_scales: list[int] | tuple[int, ...] = (1, 2, 3, 6),
        classifier_dropout_prob: float = 0.1,
        initializer_range: float = 0.02,
        semantic_loss_ignore_index: int = 255,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("model_type", None)
        protoseg_fields = {name: kwargs.pop(name, default) for name, default in PROTOTYPE_FIELD_DEFAULTS.items()}
        super().__init__(**kwargs)
        self.backbone_config = backbone_config_from(backbone_config)
        self.decoder_type = decoder_type
        self.decoder_hidden_size = decoder_hidden_size
        self.pool_scales = list(pool_scales)
        self.classifier_dropout_prob = classifier_dropout_prob
        self.initializer_range = initializer_range
        self.semantic_loss_ignore_index = semantic_loss_ignore_index
        for name, value in protoseg_fields.items():
            setattr(self, name, value)
        if not getattr(self, "auto_map", None):
            self.auto_map = dict(AUTO_MAP)
        self.check_protoseg_fields()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs: Any) -> ProtoSegConfig:
        """`PretrainedConfig.from_pretrained`; a local-looking path that does not exist is a one-line error at once."""
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            check_local_source(str(pretrained_model_name_or_path), cache_dir=kwargs.get("cache_dir"))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """`PretrainedConfig.from_dict`, with the fields checked again after the keyword overrides it sets."""
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).check_protoseg_fields()
        return result

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> ProtoSegConfig:
        """The config of a named backbone size (`BACKBONE_PRESETS`: "resnet-50", "swin-tiny", "dinov2-small",
        "hrnet-w48", ...) with the UperNet decoder (`PRESET_DECODER`), offline; `kwargs` override any field."""
        return cls(**{**PRESET_DECODER, "backbone_config": backbone_preset(name), **kwargs})

    @property
    def embedding_dim(self) -> int:
        """D: `prototype_dim`, or `decoder_hidden_size` when it is `None`."""
        return self.prototype_dim if self.prototype_dim is not None else self.decoder_hidden_size

    @property
    def num_channels(self) -> int:
        """The image channels the backbone takes."""
        return int(getattr(self.backbone_config, "num_channels", 3))

    def model_size_terms(self) -> list[tuple[str, int]]:
        """(description, float32 values) of the head's tensors: the prototype buffer, the decoder's widest product
        and the projection (the backbone's size is its own config's business)."""
        k, m, d, c = self.num_labels or 0, self.num_prototypes_per_class, self.embedding_dim, self.decoder_hidden_size
        return [
            (f"the prototype buffer K*M*D = {k}*{m}*{d}", k * m * d),
            (f"the decoder, 9*(4*decoder_hidden_size)*decoder_hidden_size = 9*{4 * c}*{c}", 9 * 4 * c * c),
            (f"the projection decoder_hidden_size*(decoder_hidden_size + D) = {c}*{c + d}", c * (c + d)),
        ]

    def check_protoseg_fields(self) -> None:
        """A ValueError (one line) for the first field out of its range (see `ProtoSegformerConfig`), a decoder type
        not in `DECODER_TYPES`, or a backbone_config that names no feature maps."""
        check_prototype_fields(self)
        if self.decoder_type not in DECODER_TYPES:
            raise ValueError(f"decoder_type must be one of {DECODER_TYPES}, got {self.decoder_type!r}.")
        if not self.pool_scales or not all(isinstance(s, int) and s >= 1 for s in self.pool_scales):
            raise ValueError(f"pool_scales must be a non-empty list of integers >= 1, got {self.pool_scales!r}.")
        backbone = self.backbone_config
        if backbone.model_type not in MODEL_FOR_BACKBONE_MAPPING_NAMES:
            raise ValueError(
                f"backbone_config ({backbone.model_type}) is not the config of a model AutoBackbone builds: give one of"
                f" {', '.join(sorted(MODEL_FOR_BACKBONE_MAPPING_NAMES))}."
            )
        stages = getattr(backbone, "out_features", None) or getattr(backbone, "out_indices", None)
        if stages is not None and len(stages) == 0:
            raise ValueError(
                f"backbone_config ({backbone.model_type}) names no feature maps (out_features /"
                " out_indices are empty): list the stages the decoder reads, e.g. out_indices=[1, 2, 3, 4]."
            )
        check_model_size(self, self.model_size_terms())


# auto_map in every saved config.json (AutoConfig.from_pretrained(..., trust_remote_code=True)).
ProtoSegConfig.register_for_auto_class()

__all__ = ["BACKBONE_PRESETS", "DECODER_TYPES", "ProtoSegConfig", "backbone_preset"]
