"""The model to train: built once from a preset, a parametric checkpoint, a backbone, or our checkpoint.

`read_model_source` checks a checkpoint's location (a mistyped path or an unreachable Hub is one line at once) and
reads its config.json, once; `build_model` turns that (or a preset) into a `ProtoSegformerForSemanticSegmentation`
(MiT presets, SegFormer / MiT checkpoints) or a `ProtoSegForSemanticSegmentation` (backbone presets, UperNet
checkpoints, backbone-only checkpoints such as a `ResNetModel` or `Dinov2Model` folder) for the run's classes.
`resume_config_problem` says whether a checkpoint of the run resumes into that model, and `load_checkpoint_weights`
loads a checkpoint's weights into it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from .configuration_proto_segformer import MIT_PRESETS, ProtoSegformerConfig
from .configuration_protoseg import BACKBONE_PRESETS, PRESET_DECODER, ProtoSegConfig, backbone_preset
from .modeling_proto_segformer import ProtoSegformerForSemanticSegmentation
from .modeling_protoseg import ProtoSegForSemanticSegmentation
from .paths import check_source

logger = logging.getLogger(__name__)

# Every ProtoSeg field of the config (the CLI exposes each of them).
PROTOSEG_FIELDS = (
    "num_prototypes_per_class",
    "prototype_dim",
    "prototype_momentum",
    "sinkhorn_epsilon",
    "sinkhorn_iterations",
    "ppc_weight",
    "ppd_weight",
    "ppc_temperature",
    "inference_chunk_size",
)

# Config fields that fix the shapes of the weights (and the meaning of the prototypes): a checkpoint resumes only
# into a model that agrees on all of them.
RESUME_FIELDS = (
    "num_labels",
    "num_prototypes_per_class",
    "prototype_dim",
    "decoder_hidden_size",
    "hidden_sizes",
    "depths",
    "num_attention_heads",
    "num_encoder_blocks",
    "sr_ratios",
    "patch_sizes",
    "strides",
    "mlp_ratios",
    "num_channels",
    "decoder_type",
    "pool_scales",
    "backbone_config",
)
# Our checkpoints' model types (their classes are kept when the run's are the same).
PROTOSEG_MODEL_TYPES = ("proto_segformer", "protoseg")
# Checkpoint model types the backbone-generic model starts from: a parametric UperNet (backbone and decoder load) or
# a backbone model AutoBackbone builds (ResNetModel, Dinov2Model, SwinModel, ConvNextModel, ...: the backbone loads).
UPERNET_MODEL_TYPE = "upernet"
# The backbone-config keys that say which network a checkpoint holds (compared on resume).
BACKBONE_SIGNATURE_KEYS = (
    "model_type",
    "backbone",
    "out_features",
    "out_indices",
    "hidden_sizes",
    "depths",
    "embed_dim",
    "hidden_size",
    "num_hidden_layers",
    "patch_size",
    "layer_type",
)


class ModelInputError(ValueError):
    """A model the user asked for cannot be built or loaded (bad path, wrong kind of checkpoint, bad config value)."""


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint to start from (local folder or Hub id), its location checked and its config.json read once."""

    name: str
    config: dict[str, Any]
    hub_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def id2label(self) -> dict[int, str] | None:
        """The class names of our checkpoint (None for a SegFormer / MiT checkpoint, or one without names)."""
        if self.model_type not in PROTOSEG_MODEL_TYPES or not self.config.get("id2label"):
            return None
        return {int(k): v for k, v in self.config["id2label"].items()}


def check_model_source(model_name_or_path: str, cache_dir: str | None = None) -> None:
    """`ModelInputError` at once (one line) for a local-looking path that does not exist or a Hub id that cannot be
    fetched (not cached, Hub unreachable): `proto_segformer.paths.check_source`."""
    try:
        check_source(model_name_or_path, cache_dir=cache_dir)
    except OSError as error:
        raise ModelInputError(str(error)) from error


def read_model_source(
    model_name_or_path: str, cache_dir: str | None = None, revision: str = "main", token: str | bool | None = None
) -> ModelSource:
    """Check where the checkpoint is and read its config.json (`ModelInputError`, one line, when either fails)."""
    hub_kwargs = {"cache_dir": cache_dir, "revision": revision, "token": token}
    check_model_source(model_name_or_path, cache_dir)
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(model_name_or_path, **hub_kwargs)
    except OSError as error:
        raise ModelInputError(
            f"Could not load a model config from {model_name_or_path!r}: {error}. Give a folder with config.json"
            " (our checkpoint, a SegFormer checkpoint, or a MiT backbone) or a Hub id (needs the network)."
        ) from error
    return ModelSource(str(model_name_or_path), config_dict, hub_kwargs)


def _mit_weights_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The SegFormer fields of a checkpoint's config (drops the parametric head's and the wrapper's keys)."""
    drop = {"architectures", "auto_map", "model_type", "transformers_version", "id2label", "label2id", "num_labels"}
    return {k: v for k, v in config_dict.items() if k not in drop and not k.startswith("_")}


def backbone_model_types() -> list[str]:
    """The model types AutoBackbone builds (a backbone-only checkpoint of one of them starts a ProtoSeg model)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES

    return sorted(MODEL_FOR_BACKBONE_MAPPING_NAMES)


def decoder_stages(backbone_config: PretrainedConfig) -> PretrainedConfig:
    """`backbone_config` reading the stages a decoder needs: every stage of a hierarchical backbone (at most 4), four
    evenly spaced layers of a ViT (layers 3, 6, 9, 12 of 12). A backbone model's own config names only its last one."""
    stage_names = list(getattr(backbone_config, "stage_names", None) or [])[1:]  # without the stem
    if not stage_names:
        return backbone_config
    count = len(stage_names)
    indices = list(range(1, count + 1)) if count <= 4 else [round(count * (i + 1) / 4) for i in range(4)]
    backbone_config.out_indices = indices  # transformers aligns out_features with it
    if hasattr(backbone_config, "reshape_hidden_states"):
        backbone_config.reshape_hidden_states = True
    return backbone_config


def _backbone_checkpoint_config(config_dict: dict[str, Any]) -> PretrainedConfig:
    """The backbone config of a backbone-only checkpoint's config.json, reading the decoder's stages."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fields = {k: v for k, v in config_dict.items() if k not in ("architectures", "auto_map", "transformers_version")}
    fields = {k: v for k, v in fields.items() if k not in ("id2label", "label2id", "num_labels", "out_features")}
    fields.pop("out_indices", None)
    return decoder_stages(CONFIG_MAPPING[fields.pop("model_type")].from_dict(fields))


def _checkpoint_config(source: ModelSource, overrides, label_fields, id2label):
    """(config, whether the classes are the checkpoint's, a description) for a checkpoint's config: a
    ProtoSegformerConfig for our SegFormer checkpoints and SegFormer / MiT ones, a ProtoSegConfig for the others."""
    config_dict = source.config
    if source.model_type == "protoseg":
        same_classes = {int(k): v for k, v in (config_dict.get("id2label") or {}).items()} == id2label
        config = ProtoSegConfig.from_dict(dict(config_dict), **overrides, **label_fields)
        return config, same_classes, "ProtoSeg checkpoint"
    if source.model_type == UPERNET_MODEL_TYPE:
        fields = {
            "backbone_config": config_dict.get("backbone_config"),
            "decoder_type": "upernet",
            "decoder_hidden_size": config_dict.get("hidden_size", 512),
            "pool_scales": config_dict.get("pool_scales", [1, 2, 3, 6]),
        }
        config = ProtoSegConfig(**{**fields, **overrides, **label_fields})
        return config, False, "UperNetForSemanticSegmentation checkpoint"
    if source.model_type in backbone_model_types() and source.model_type != "timm_backbone":
        backbone_config = _backbone_checkpoint_config(config_dict)
        config = ProtoSegConfig(**{**PRESET_DECODER, "backbone_config": backbone_config, **overrides, **label_fields})
        architectures = config_dict.get("architectures") or [f"{source.model_type} backbone"]
        return config, False, f"{architectures[0]} checkpoint"
    if source.model_type == "proto_segformer":
        same_classes = {int(k): v for k, v in (config_dict.get("id2label") or {}).items()} == id2label
        # What ProtoSegformerConfig.from_pretrained does with the config.json it reads (read once, here).
        config = ProtoSegformerConfig.from_dict(dict(config_dict), **overrides, **label_fields)
        return config, same_classes, "ProtoSegformer checkpoint"
    if source.model_type == "segformer":
        config = ProtoSegformerConfig(**{**_mit_weights_config(config_dict), **overrides, **label_fields})
        architectures = config_dict.get("architectures") or ["SegformerModel"]
        return config, False, f"{architectures[0]} checkpoint"
    raise ModelInputError(
        f"{source.name!r} holds a {source.model_type!r} model; expected a proto_segformer or segformer checkpoint"
        " (a MiT backbone such as nvidia/mit-b0, or a SegFormer such as nvidia/segformer-b0-finetuned-ade-512-512),"
        " a protoseg or upernet checkpoint (such as openmmlab/upernet-convnext-tiny), or a backbone AutoBackbone"
        " builds (such as microsoft/resnet-50 or facebook/dinov2-small)."
    )


def preset_names() -> list[str]:
    """Every --model_preset name: the MiT sizes (ProtoSegformer) and the backbone presets (ProtoSeg)."""
    return [*sorted(MIT_PRESETS), *BACKBONE_PRESETS]


def preset_config(model_preset: str, overrides: Mapping[str, Any], label_fields: Mapping[str, Any]):
    """The config of a named preset: a MiT size ("mit-b0" .. "mit-b5", "b0" ..) gives a ProtoSegformerConfig, a
    backbone preset ("resnet-50", "swin-tiny", "dinov2-small", "hrnet-w48", ...) a ProtoSegConfig with the UperNet
    decoder. `ModelInputError` (one line) for an unknown name or a bad field."""
    key = model_preset.lower().replace("_", "-")
    try:
        if key in BACKBONE_PRESETS:
            return ProtoSegConfig.from_preset(key, **overrides, **label_fields)
        if key.startswith("mit") or key in {name.removeprefix("mit-") for name in MIT_PRESETS}:
            if "decoder_type" in overrides:
                raise ValueError("decoder_type applies to the backbone presets; a MiT model has SegFormer's decoder")
            return ProtoSegformerConfig.from_preset(key, **overrides, **label_fields)
    except (ValueError, TypeError) as error:
        raise ModelInputError(f"Invalid model configuration: {error}") from error
    raise ModelInputError(
        f"Unknown model preset {model_preset!r}: choose a MiT size ({', '.join(sorted(MIT_PRESETS))}) or a backbone"
        f" ({', '.join(BACKBONE_PRESETS)})."
    )


def model_for(config: PretrainedConfig) -> torch.nn.Module:
    """A randomly initialised model of `config` (either class); `ModelInputError` (one line) when it cannot be built
    (a backbone config that yields no feature maps, timm missing for a timm backbone)."""
    model_class = ProtoSegForSemanticSegmentation if isinstance(config, ProtoSegConfig) else None
    model_class = model_class or ProtoSegformerForSemanticSegmentation
    try:
        return model_class(config)
    except (ValueError, ImportError) as error:
        raise ModelInputError(str(error)) from error


def parametric_upernet_config(model_preset: str, **fields: Any) -> PretrainedConfig:
    """transformers' `UperNetConfig` with the backbone and decoder width of a backbone preset: the parametric
    counterpart of `ProtoSegConfig.from_preset(model_preset)` for same-budget comparisons (no auxiliary head unless
    `fields` ask for one)."""
    from transformers import UperNetConfig

    defaults = {"hidden_size": PRESET_DECODER["decoder_hidden_size"], "use_auxiliary_head": False}
    return UperNetConfig(backbone_config=backbone_preset(model_preset), **{**defaults, **fields})


def _load_backbone_weights(model: ProtoSegForSemanticSegmentation, source: ModelSource) -> str:
    """Load a backbone-only checkpoint's weights into `model.backbone` (through the backbone class, so transformers'
    renamings apply, e.g. SwinModel's names to SwinBackbone's); the one-line summary of what was loaded and what is
    new."""
    # The backbone's own class (AutoBackbone.from_pretrained asks the Hub about local folders).
    with quiet_transformers():
        loaded, info = type(model.backbone).from_pretrained(
            source.name, config=model.config.backbone_config, output_loading_info=True, **source.hub_kwargs
        )
    state = loaded.state_dict()
    model.backbone.load_state_dict(state, strict=True)
    missing = sorted({name.split(".")[0] for name in info.get("missing_keys", [])})
    dropped = sorted({name.split(".")[0] for name in info.get("unexpected_keys", [])})
    line = f"Loaded the backbone from {source.name} ({len(state) - len(info.get('missing_keys', []))} tensors)"
    if dropped:
        line += f"; dropped {', '.join(f'{prefix}*' for prefix in dropped)}"
    new = ["decode_head", "projection", "prototypes", *(f"backbone.{name}" for name in missing)]
    return f"{line}; new: {', '.join(new)}"


def build_model(
    *,
    model_name_or_path: str | None,
    model_preset: str | None,
    id2label: Mapping[int, str],
    overrides: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
    revision: str = "main",
    token: str | bool | None = None,
    source: ModelSource | None = None,
) -> tuple[ProtoSegformerForSemanticSegmentation, str]:
    """A ProtoSegformer for the classes `id2label`, and a description of where its weights came from.

    `model_name_or_path` (local folder or Hub id) may hold: our checkpoint (its prototypes are kept when the classes
    are the same, re-initialised otherwise), a parametric SegFormer checkpoint (`SegformerForSemanticSegmentation`:
    encoder and decoder load, the classifier is dropped), or a MiT backbone (`SegformerForImageClassification` /
    `SegformerModel`: the encoder loads). Without it, `model_preset` ("mit-b0" .. "mit-b5") builds a model from
    scratch. `overrides` set any config field (ProtoSeg fields, decoder_hidden_size, dropouts, ...). `source`: the
    checkpoint already read by `read_model_source` (then its location is not checked and its config not read again).
    """
    id2label = {int(k): str(v) for k, v in id2label.items()}
    label_fields = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}, "num_labels": len(id2label)}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if model_name_or_path is None:
        config = preset_config(model_preset or "mit-b0", overrides, label_fields)
        return model_for(config), f"{model_preset or 'mit-b0'} preset, random init"

    if source is None or source.name != str(model_name_or_path):
        source = read_model_source(model_name_or_path, cache_dir, revision, token)
    try:
        config, same_classes, description = _checkpoint_config(source, overrides, label_fields, id2label)
    except (ValueError, TypeError) as error:
        if isinstance(error, ModelInputError):
            raise
        raise ModelInputError(f"Invalid model configuration: {error}") from error
    if isinstance(config, ProtoSegConfig) and source.model_type not in (*PROTOSEG_MODEL_TYPES, UPERNET_MODEL_TYPE):
        model = model_for(config)  # a backbone-only checkpoint: its weights go into the backbone
        try:
            return model, f"{description}: {_load_backbone_weights(model, source)}"
        except (OSError, ValueError, RuntimeError) as error:
            raise ModelInputError(f"Could not load the backbone of {model_name_or_path!r}: {error}") from error
    model_class = ProtoSegForSemanticSegmentation if isinstance(config, ProtoSegConfig) else None
    model_class = model_class or ProtoSegformerForSemanticSegmentation
    try:
        model, loading_info = model_class.from_pretrained(
            model_name_or_path,
            config=config,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            **source.hub_kwargs,
        )
    except (ValueError, ImportError) as error:  # e.g. a ProtoSeg checkpoint without prototypes
        raise ModelInputError(str(error)) from error
    mismatched = [str(m[0]) if isinstance(m, tuple | list) else str(m) for m in loading_info.get("mismatched_keys", [])]
    if source.model_type in PROTOSEG_MODEL_TYPES and not same_classes:
        logger.info("The classes differ from the checkpoint's: prototypes start from random unit vectors.")
        if not any("prototypes" in m for m in mismatched):
            with torch.no_grad():
                model.prototypes.copy_(torch.nn.functional.normalize(torch.randn_like(model.prototypes), dim=-1))
    encoder_prefix = "backbone." if isinstance(config, ProtoSegConfig) else "segformer."
    missing_encoder = [k for k in loading_info.get("missing_keys", []) if k.startswith(encoder_prefix)]
    if missing_encoder:
        what = "backbone" if isinstance(config, ProtoSegConfig) else "SegFormer encoder"
        raise ModelInputError(
            f"{model_name_or_path!r} does not hold {what} weights (missing e.g. {missing_encoder[:3]})."
        )
    if source.model_type in ("segformer", UPERNET_MODEL_TYPE):
        missing, unexpected = set(loading_info["missing_keys"]), set(loading_info["unexpected_keys"])
        num_loaded = len(model.state_dict()) - len(missing) - len(mismatched)
        summary = model_class.conversion_summary(model_name_or_path, missing, unexpected, num_loaded)
        return model, f"{description}: {summary}"
    return model, f"{description} {model_name_or_path}"


def model_summary(config: PretrainedConfig) -> str:
    """A few words on a model's size: 'MiT widths [8, 16, 24, 32], decoder 32, 3 prototypes x 16 per class' (or
    'resnet backbone, upernet decoder 512, ...')."""
    dim = getattr(config, "prototype_dim", None) or config.decoder_hidden_size
    if isinstance(config, ProtoSegConfig):
        return (
            f"{config.backbone_config.model_type} backbone, {config.decoder_type} decoder {config.decoder_hidden_size},"
            f" {config.num_prototypes_per_class} prototypes x {dim} per class"
        )
    return (
        f"MiT widths {list(config.hidden_sizes)}, decoder {config.decoder_hidden_size},"
        f" {config.num_prototypes_per_class} prototypes x {dim} per class"
    )


def resume_config_problem(checkpoint: str | Path, config: PretrainedConfig) -> str | None:
    """Why the checkpoint cannot be resumed into a model of `config` (the `RESUME_FIELDS` and class names that
    differ, with the fix), or None."""
    try:
        saved = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # checkpoint_problem has looked at it; loading reports anything else
    current = config.to_dict()
    for fields in (saved, current):
        if isinstance(fields.get("backbone_config"), dict):
            backbone = fields["backbone_config"]
            fields["backbone_config"] = {k: backbone[k] for k in BACKBONE_SIGNATURE_KEYS if backbone.get(k) is not None}
    differing = [
        f"{name} {saved.get(name)} there, {current.get(name)} now"
        for name in RESUME_FIELDS
        if saved.get(name) != current.get(name)
    ]
    names = [{str(k): str(v) for k, v in (dict_.get("id2label") or {}).items()} for dict_ in (saved, current)]
    if saved.get("num_labels") == current.get("num_labels") and names[0] != names[1]:
        differing.append("the class names (id2label)")
    if not differing:
        return None
    return (
        f"--resume_from_checkpoint {checkpoint} holds a model of another configuration: {'; '.join(differing)}."
        " Resume with the options the run was started with (see its config.json and training_args.json), or"
        " start a new run in another --output_dir."
    )


@contextlib.contextmanager
def quiet_transformers():
    """transformers' info logs (a loaded model's whole config) and progress bars off for the block."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(max(verbosity, hf_logging.WARNING))
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_checkpoint_weights(model: torch.nn.Module, checkpoint_dir: str | Path) -> None:
    """Load the weights (and prototypes, BatchNorm statistics) of a saved checkpoint folder into `model`, strictly.

    Trainer's own resume path calls `load_state_dict(saved_state, strict=False)`, but the saved names are not the
    in-memory names: transformers 5 writes SegFormer encoders and decoders under their checkpoint names
    (`segformer.encoder.block.*`, `decode_head.linear_c.*`) through registered conversion mappings, so most
    weights would be skipped in silence. Loading through `from_pretrained` applies the same conversions.
    """
    with quiet_transformers():  # not the whole config and a progress bar at every resume
        loaded, info = type(model).from_pretrained(str(checkpoint_dir), output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise RuntimeError(f"The checkpoint {checkpoint_dir} does not match the model: {problems}.")
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
