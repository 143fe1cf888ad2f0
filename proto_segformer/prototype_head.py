"""The prototype head of ProtoSeg, shared by every model of this package.

ProtoSeg ("Rethinking Semantic Segmentation: A Prototype View", Zhou et al., CVPR 2022) replaces a segmentation
model's learnable classifier by a persistent buffer `prototypes` of shape (K, M, D): each pixel takes the class of its
nearest prototype, and the prototypes are running means of pixel embeddings. What comes before the pixel embeddings
(encoder and decoder) differs between the models; everything after them is here, once:

- `ProtoSegformerProjection`: decoder features -> unit pixel embeddings (B, D, h, w);
- `ProtoSegformerDecodeHead`: SegFormer's all-MLP decoder over any list of stages;
- `PrototypeHeadMixin`: the forward pass after the embeddings (inference logits, the training step's losses, Sinkhorn
  assignment and momentum update), the class-editing methods, the finite checks, the prototype initialisation and
  `from_pretrained` / `save_pretrained` with their clear errors. A model class mixes it in before `PreTrainedModel`
  and provides `embed_pixels`, `min_input_size` and a few class attributes naming its checkpoints;
- the output dataclass `ProtoSegSemanticSegmenterOutput` and the input checks.

Like the modelling files, this travels with a saved model as remote code: torch, transformers, safetensors and the
standard library, and sibling files by single-dot imports.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PretrainedConfig
from transformers import initialization as init
from transformers.models.segformer.modeling_segformer import SegformerMLP
from transformers.utils import CONFIG_NAME, ModelOutput, cached_file
from transformers.utils.output_capturing import resolve_hidden_states_indices, selected_hidden_states

from .configuration_proto_segformer import check_similarity_dtype
from .local_paths import check_local_source
from .prototype_kernels import SIMILARITY_DTYPES, inference_logits, is_tracing, training_scores
from .prototype_math import (
    average_across_processes,
    class_logits,
    l2_normalize,
    max_similarity,
    momentum_update,
    random_unit_prototypes,
)
from .transformers_changes import held_load_report

logger = logging.getLogger(__name__)


@dataclass
class ProtoSegSemanticSegmenterOutput(ModelOutput):
    """
    Output of [`ProtoSegformerForSemanticSegmentation`] and [`ProtoSegForSemanticSegmentation`] (h, w: the height and
    width of the pixel embeddings, height / 4 and width / 4 for SegFormer, the decoder's output stride otherwise).

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            CE + ppc_weight * PPC + ppd_weight * PPD.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels, h, w)`):
            Nearest-prototype class scores max_m <e, p_{k,m}>, normalised over the class axis by a LayerNorm without
            affine parameters. Their argmax is the nearest prototype's class.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): encoder stage outputs (SegFormer's stages, or the
            backbone's feature maps).
        attentions (`tuple(torch.FloatTensor)`, *optional*): encoder attentions, where the encoder returns them.
        pixel_embeddings (`torch.FloatTensor` of shape `(batch_size, D, h, w)`, *optional*):
            Unit-norm pixel embeddings, returned when `output_pixel_embeddings=True`.
        prototype_indices (`torch.LongTensor` of shape `(batch_size, num_labels, h, w)`, *optional*):
            Index m of each class's nearest prototype at each pixel, found in the same pass as the logits (no second
            similarity product), returned when `output_prototype_indices=True` without labels.
        loss_ce, loss_ppc, loss_ppd (`torch.FloatTensor` of shape `()`, *optional*):
            The loss terms, detached, for logging (returned with `loss`).
        max_similarity (`torch.FloatTensor` of shape `(batch_size, h, w)`, *optional*):
            The unknown score: the largest cosine similarity of each pixel to any prototype, max_{k,m} <e, p_{k,m}>
            in [-1, 1], from the class scores of the same pass as the logits (before their normalisation), returned
            when `output_max_similarity=True`. Pixels below `config.unknown_threshold` are unknown.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    pixel_embeddings: torch.FloatTensor | None = None
    loss_ce: torch.FloatTensor | None = None
    loss_ppc: torch.FloatTensor | None = None
    loss_ppd: torch.FloatTensor | None = None
    prototype_indices: torch.LongTensor | None = None
    max_similarity: torch.FloatTensor | None = None


class ProtoSegformerDecodeHead(nn.Module):
    """SegFormer's all-MLP decoder without the classifier: stages (B, C_s, H/s, W/s) -> (B, C, H/s0, W/s0), at the
    resolution of the first stage (H/4 for SegFormer's encoder).

    Parameter names are those of transformers' `SegformerDecodeHead`, so parametric checkpoints load into it.
    `in_channels`: the stages' widths (default: SegFormer's `config.hidden_sizes`, one per encoder block); the config
    gives `decoder_hidden_size` and `classifier_dropout_prob`.
    """

    def __init__(self, config: PretrainedConfig, in_channels: list[int] | None = None) -> None:
        super().__init__()
        if in_channels is None:
            in_channels = [config.hidden_sizes[i] for i in range(config.num_encoder_blocks)]
        self.linear_projections = nn.ModuleList([SegformerMLP(config, input_dim=width) for width in in_channels])
        self.linear_fuse = nn.Conv2d(
            config.decoder_hidden_size * len(in_channels),
            config.decoder_hidden_size,
            kernel_size=1,
            bias=False,
        )
        self.batch_norm = nn.BatchNorm2d(config.decoder_hidden_size)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(config.classifier_dropout_prob)

    def forward(self, encoder_hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        batch_size = encoder_hidden_states[-1].shape[0]
        target_size = encoder_hidden_states[0].shape[2:]
        upsampled = []
        for hidden_state, projection in zip(encoder_hidden_states, self.linear_projections):
            height, width = hidden_state.shape[2], hidden_state.shape[3]
            hidden_state = projection(hidden_state).transpose(1, 2).reshape(batch_size, -1, height, width)
            upsampled.append(F.interpolate(hidden_state, size=target_size, mode="bilinear", align_corners=False))
        hidden_states = self.linear_fuse(torch.cat(upsampled[::-1], dim=1))
        return self.dropout(self.activation(self.batch_norm(hidden_states)))


class ProtoSegformerProjection(nn.Module):
    """1x1 conv -> ReLU -> 1x1 conv -> LayerNorm over channels -> L2 normalisation over channels.

    (B, decoder_hidden_size, h, w) -> (B, D, h, w) with unit norm along D.
    """

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(config.decoder_hidden_size, config.decoder_hidden_size, kernel_size=1)
        self.activation = nn.ReLU()
        self.conv2 = nn.Conv2d(config.decoder_hidden_size, config.embedding_dim, kernel_size=1)
        self.layer_norm = nn.LayerNorm(config.embedding_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The 1x1 convolutions as matmuls on the channels-last pixels (B, h*w, C): same result, no im2col copy, and
        # the LayerNorm and L2 normalisation then run over a contiguous last axis.
        batch, _, height, width = hidden_states.shape
        pixels = hidden_states.flatten(2).transpose(1, 2)
        hidden = self.activation(F.linear(pixels, self.conv1.weight.flatten(1), self.conv1.bias))
        embeddings = self.layer_norm(F.linear(hidden, self.conv2.weight.flatten(1), self.conv2.bias))
        return l2_normalize(embeddings, dim=-1).view(batch, height, width, -1).permute(0, 3, 1, 2)


def _match_config_file_mode(folder) -> None:
    """Give the weight files `model*.safetensors` in `folder` the permission bits of its config.json (nothing where
    this process wrote no config, e.g. a non-main process)."""
    try:
        mode = os.stat(os.path.join(folder, CONFIG_NAME)).st_mode & 0o7777
        names = [name for name in os.listdir(folder) if name.startswith("model") and name.endswith(".safetensors")]
    except OSError:
        return
    for name in names:
        os.chmod(os.path.join(folder, name), mode)


def _check_pixel_values(
    pixel_values: torch.Tensor, num_channels: int, min_size: int = 4, encoder: str = "SegFormer encoder"
) -> None:
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values must have shape (batch_size, {num_channels}, height, width),"
            f" got {tuple(pixel_values.shape)}."
            " Use the image processor (or permute channels-last arrays) to build them."
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be a floating-point tensor (normalised images), got {pixel_values.dtype}."
            " Use the image processor, or convert with .float() and normalise."
        )
    if pixel_values.shape[2] < min_size or pixel_values.shape[3] < min_size:
        raise ValueError(
            f"pixel_values are too small for this {encoder} (height and width must be at least {min_size}),"
            f" got {tuple(pixel_values.shape)}. Resize or pad the images."
        )
    # A check on the values is a data-dependent branch: it runs in eager mode only, not in traced or compiled code.
    if not is_tracing() and not torch.isfinite(pixel_values).all():
        raise ValueError("pixel_values contain NaN or inf values.")


def _check_labels(labels: torch.Tensor, pixel_values: torch.Tensor, num_labels: int, ignore_index: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}.")
    expected = (pixel_values.shape[0], *pixel_values.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"labels must have shape (batch_size, height, width) = {expected} to match pixel_values"
            f" {tuple(pixel_values.shape)}, got {tuple(labels.shape)}."
        )
    if is_tracing():  # the value check below is data-dependent: eager mode only
        return
    invalid = ((labels < 0) | (labels >= num_labels)) & (labels != ignore_index)
    if invalid.any():
        values = torch.unique(labels[invalid]).tolist()
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise ValueError(
            f"labels contain values {shown} that are neither a class index in [0, {num_labels - 1}] nor the ignore"
            f" index {ignore_index}. If 0 is background to ignore and classes start at 1, use reduce_labels."
        )


SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
HUB_FIELDS = ("cache_dir", "revision", "token", "subfolder", "local_files_only", "force_download", "proxies")


def _local_weight_files(pretrained_model_name_or_path, kwargs: dict) -> list[str]:
    """The checkpoint's safetensors files on this machine (a local folder's, or a Hub id's cached copies); never
    downloads anything. Empty when there are none."""
    name = str(pretrained_model_name_or_path)
    hub_kwargs = {k: kwargs[k] for k in HUB_FIELDS if k in kwargs and k not in ("local_files_only", "force_download")}

    def locate(filename: str) -> str | None:
        if os.path.isdir(name):
            path = os.path.join(name, kwargs.get("subfolder") or "", filename)
            return path if os.path.isfile(path) else None
        try:
            return cached_file(
                name, filename, local_files_only=True, _raise_exceptions_for_missing_entries=False, **hub_kwargs
            )
        except (OSError, ValueError, TypeError):
            return None

    single = locate(SAFE_WEIGHTS_NAME)
    if single is not None:
        return [single]
    index = locate(SAFE_WEIGHTS_INDEX_NAME)
    if index is None:
        return []
    try:
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [path for path in map(locate, shards) if path is not None]


def _unreadable_weights(files: list[str]) -> tuple[str, Exception] | None:
    """The first of `files` whose safetensors header cannot be read, with safetensors' error; None if all read."""
    for path in files:
        try:
            with safe_open(path, framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises several types for truncated or garbage files
            return path, error
    return None


def _saved_prototype_classes(files: list[str]) -> tuple[str, int] | None:
    """(file name, K) of the `prototypes` tensor among the safetensors `files` (headers only), or None."""
    for path in files:
        try:
            with safe_open(path, framework="pt") as handle:
                if "prototypes" in handle.keys():
                    return os.path.basename(path), int(handle.get_slice("prototypes").get_shape()[0])
        except Exception:  # an unreadable file is reported elsewhere
            return None
    return None


def _corrupt_weights_message(pretrained_model_name_or_path, kwargs: dict, error: Exception) -> str:
    """One line naming the weights file safetensors could not read (corrupt or truncated) and the fix."""
    found = _unreadable_weights(_local_weight_files(pretrained_model_name_or_path, kwargs))
    path, error = found if found is not None else (f"of {pretrained_model_name_or_path}", error)
    return (
        f"The weights file {path} is corrupt or truncated (safetensors: {error}). Copy or download it again, or save"
        " the model again with save_pretrained."
    )


def _mismatch_message(pretrained_model_name_or_path, kwargs: dict) -> tuple[str, bool]:
    """Explain a size mismatch between a checkpoint and the requested model (usually the class count), and whether
    transformers' load report adds anything to the message (it does not when the class counts explain it)."""
    try:
        saved, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path)
    except (OSError, ValueError):
        saved = {}
    saved_classes = len(saved.get("id2label") or {}) or saved.get("num_labels")
    requested = kwargs.get("config")
    requested_classes = (
        kwargs.get("num_labels")
        or len(kwargs.get("id2label") or {})
        or getattr(requested, "num_labels", None)
        or saved_classes
    )
    if saved_classes != requested_classes:
        return (
            f"The checkpoint {pretrained_model_name_or_path} has prototypes for {saved_classes} classes, but the model"
            f" was asked for {requested_classes} classes (num_labels / id2label). Load it without changing the class"
            " count, add classes with model.add_classes(...), or pass ignore_mismatched_sizes=True to re-initialise"
            " the prototypes randomly (they then need training)."
        ), False
    weights, held = _saved_prototype_classes(_local_weight_files(pretrained_model_name_or_path, kwargs)) or (None, None)
    if held is not None and saved_classes is not None and held != saved_classes:
        return (
            f"config.json names {saved_classes} classes (id2label) but {weights} holds prototypes for {held}"
            f" (in {pretrained_model_name_or_path}): they belong to different models. Make id2label list the"
            f" checkpoint's {held} classes (ids 0..{held - 1}, in the order of the prototypes), or restore the"
            " config.json saved with these weights."
        ), False
    return (
        f"The checkpoint {pretrained_model_name_or_path} has tensors whose shapes differ from the requested"
        " configuration (for example num_prototypes_per_class, prototype_dim or hidden sizes); the load report"
        " above lists them. Pass ignore_mismatched_sizes=True to re-initialise those tensors."
    ), True


PARAMETRIC_CLASSIFIER_PREFIXES = ("decode_head.classifier.", "classifier.")
# Tensors a SegFormer or MiT checkpoint cannot hold: ProtoSeg's own head (and, for a MiT backbone, the decoder).
NEW_IN_PROTOSEG_PREFIXES = ("projection.", "prototypes", "decode_head.")


def _checkpoint_model_type(pretrained_model_name_or_path, kwargs: dict) -> str | None:
    """`model_type` of the checkpoint's own config.json (not of a `config` passed in), or None if it has none."""
    try:
        saved, _ = PretrainedConfig.get_config_dict(
            pretrained_model_name_or_path, **{k: kwargs[k] for k in HUB_FIELDS if k in kwargs}
        )
    except (OSError, ValueError):
        return None
    return saved.get("model_type")


SEGFORMER_CONVERSION_HINT = (
    "to start a new ProtoSeg model from a SegFormer or MiT checkpoint, load one whose config.json has model_type"
    " 'segformer'"
)


def _missing_tensors_message(
    pretrained_model_name_or_path,
    missing: set[str],
    class_name: str = "ProtoSegformerForSemanticSegmentation",
    hint: str = SEGFORMER_CONVERSION_HINT,
) -> str:
    names = sorted(missing, key=lambda name: (name != "prototypes", name))
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    what = "has no 'prototypes' tensor" if "prototypes" in missing else f"lacks {len(names)} tensor(s) of the model"
    return (
        f"The checkpoint {str(pretrained_model_name_or_path)!r} {what} (missing: {shown}): the model would run with"
        f" random values in their place. Load a complete checkpoint (saved with save_pretrained from {class_name});"
        f" {hint}."
    )


def _is_expected_conversion(
    missing: set[str],
    unexpected: set[str],
    new_prefixes: tuple[str, ...] = NEW_IN_PROTOSEG_PREFIXES,
    dropped_prefixes: tuple[str, ...] = PARAMETRIC_CLASSIFIER_PREFIXES,
) -> bool:
    """Whether loading a parametric checkpoint (SegFormer / MiT; UperNet) left exactly what it should: ProtoSeg's head
    new (and the decoder, for a bare backbone), the parametric classifier unused, and the encoder complete."""
    return all(name.startswith(new_prefixes) for name in missing) and all(
        name.startswith(dropped_prefixes) for name in unexpected
    )


def conversion_summary(
    source: str,
    missing: set[str],
    unexpected: set[str],
    num_loaded: int,
    encoder: str = "the encoder",
    dropped_prefixes: tuple[str, ...] = PARAMETRIC_CLASSIFIER_PREFIXES,
) -> str:
    """One line on a parametric checkpoint turned into a ProtoSeg model: what was carried over (`encoder`, and the
    decoder unless it is new), dropped (the parametric classifier, `dropped_prefixes`), new."""
    carried = encoder if any(n.startswith("decode_head.") for n in missing) else f"{encoder} and decoder"
    line = f"Loaded {carried} from {source} ({num_loaded} tensors)"
    if unexpected:
        prefixes = sorted({p for name in unexpected for p in dropped_prefixes if name.startswith(p)})
        line += f"; dropped the parametric classifier ({', '.join(f'{prefix}*' for prefix in prefixes)})"
    return f"{line}; new: {', '.join(sorted({name.split('.')[0] for name in missing}))}"


def non_finite_tensor_names(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors among `named_tensors` that hold NaN or inf."""
    return [name for name, tensor in named_tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def non_finite_message(names: list[str], where: str = "The model") -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"{where} holds NaN or inf values in {shown}: its predictions would be garbage (a diverged training run?)."
        " Use an earlier checkpoint, or retrain (for example with a lower learning rate)."
    )


def _similarity_dtype(config: PretrainedConfig) -> torch.dtype | None:
    """The torch dtype `config.similarity_dtype` names (None: the model's), checked again here because
    `from_pretrained(..., similarity_dtype=...)` and attribute assignment set it after the config's own validation."""
    name = check_similarity_dtype(getattr(config, "similarity_dtype", None))
    return None if name is None else SIMILARITY_DTYPES[name]


def _select_hidden_states(model: nn.Module, hidden_states: tuple, output_hidden_states) -> tuple | list | None:
    """The encoder stages `output_hidden_states` asks for, as SegFormer returns them: all of them for True, None for
    False/None, and for stage indices (an int or a list, negative ones from the end) a list with None in place of each
    stage not selected."""
    if not output_hidden_states:
        return None
    selected = selected_hidden_states(output_hidden_states)
    if selected is None:
        return hidden_states
    selected = resolve_hidden_states_indices(model, selected, num_hidden_states=len(hidden_states))
    return [state if index in selected else None for index, state in enumerate(hidden_states)]


class PrototypeHeadMixin:
    """Everything of a ProtoSeg model after its pixel embeddings, for a `PreTrainedModel` subclass that lists this mixin
    first and defines `embed_pixels` (and sets `min_input_size`, registers the `prototypes` buffer (K, M, D) and holds
    a `projection`). The class attributes name what `from_pretrained` accepts as a parametric starting point."""

    # The head's fast paths (`prototype_kernels.py`) compute what the reference functions of `prototype_math.py`
    # compute, with less memory traffic. Set to False on an instance to run the reference head (the tests check both
    # agree; the reference head also supports backward with retain_graph=True).
    fast_head: bool = True
    # Parametric checkpoints (config.json model_type) that start a new model: the tensors they cannot hold (new) and
    # the ones of their classifier (dropped), what the encoder is called in the one-line summary, and the hint of
    # the missing-tensors error.
    conversion_model_types: tuple[str, ...] = ("segformer",)
    conversion_prefixes: tuple[tuple[str, ...], tuple[str, ...]] = (
        NEW_IN_PROTOSEG_PREFIXES,
        PARAMETRIC_CLASSIFIER_PREFIXES,
    )
    encoder_name: str = "the encoder"
    conversion_hint: str = SEGFORMER_CONVERSION_HINT
    encoder_description: str = "SegFormer encoder"
    min_input_size: int = 1

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, then the weight files get the permissions that config.json got from the
        same save: safetensors 0.8 writes through a temporary file created owner-only (0600) and renamed into place,
        whatever the umask (safetensors/safetensors#782), while config.json, written with `open()`, has the mode the
        user's umask (or the file it replaced) gives."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        _match_config_file_mode(save_directory)
        return result

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PrototypeHeadMixin) and isinstance(getattr(module, "prototypes", None), torch.Tensor):
            # `init.copy_` skips a buffer that was loaded from a checkpoint, so reloading never resets prototypes.
            num_classes, num_prototypes, dim = module.prototypes.shape
            fresh = random_unit_prototypes(num_classes, num_prototypes, dim, device=module.prototypes.device)
            init.copy_(module.prototypes, fresh.to(module.prototypes.dtype))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` with ProtoSeg's load checks.

        - A local-looking path that does not exist is a one-line error at once, naming the close matches
          (`local_paths.check_local_source`, no network), not a minute of Hub retries. Whether the Hub can be reached
          is for the caller to check (the scripts use `proto_segformer.paths.check_source`).
        - A ProtoSeg checkpoint must hold every tensor of the model, `prototypes` above all: a missing one is a
          `ValueError` naming it (transformers would fill it with random values and only print a report).
        - Starting from a parametric checkpoint (config `model_type` in `conversion_model_types`: "segformer" for
          ProtoSegformer, "upernet" for ProtoSeg) is expected to leave the projection and prototypes new and drop
          the parametric classifier: transformers' load report is replaced by one line (`conversion_summary`, logged
          at INFO). Anything else keeps transformers' report.
        - A class count that differs from the checkpoint's is a clear error (unless `ignore_mismatched_sizes=True`,
          which re-initialises the prototypes on purpose, said in one line at INFO instead of a load report), and so
          is a config.json naming another class count than its weights' prototypes.
        - A weights file safetensors cannot read is a `ValueError` naming the file (corrupt or truncated).
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        name = pretrained_model_name_or_path
        if isinstance(name, (str, os.PathLike)) and kwargs.get("state_dict") is None and not kwargs.get("gguf_file"):
            check_local_source(str(name), cache_dir=kwargs.get("cache_dir"))
        with held_load_report(cls.__name__) as held:
            try:
                model, loading_info = super().from_pretrained(name, *model_args, output_loading_info=True, **kwargs)
            except RuntimeError as error:
                if "ignore_mismatched_sizes" not in str(error):
                    held.release()
                    raise
                message, with_report = _mismatch_message(name, kwargs)
                if not with_report:
                    held.discard()
                held.release()
                raise ValueError(message) from error
            except SafetensorError as error:
                held.discard()
                raise ValueError(_corrupt_weights_message(name, kwargs, error)) from error
            missing, unexpected = set(loading_info["missing_keys"]), set(loading_info["unexpected_keys"])
            if missing or unexpected:
                source_type = _checkpoint_model_type(name, kwargs)
                converting = source_type in cls.conversion_model_types
                if not converting and missing:
                    held.discard()
                    raise ValueError(_missing_tensors_message(name, missing, cls.__name__, cls.conversion_hint))
                if converting and _is_expected_conversion(missing, unexpected, *cls.conversion_prefixes):
                    held.discard()
                    num_loaded = len(model.state_dict()) - len(missing) - len(loading_info["mismatched_keys"])
                    logger.info(cls.conversion_summary(str(name), missing, unexpected, num_loaded))
            elif [entry[0] for entry in loading_info["mismatched_keys"]] == ["prototypes"]:
                # Another class count with ignore_mismatched_sizes=True: fresh prototypes, as asked.
                held.discard()
                (_, saved_shape, new_shape), *_ = loading_info["mismatched_keys"]
                logger.info(
                    "Fresh prototypes %s (the checkpoint's are %s): ignore_mismatched_sizes=True re-initialises them.",
                    tuple(new_shape),
                    tuple(saved_shape),
                )
            held.release()
        return (model, loading_info) if output_loading_info else model

    def non_finite_tensors(self) -> list[str]:
        """Names of the weights and buffers (prototypes included) that hold NaN or inf values."""
        return non_finite_tensor_names(self.state_dict().items())

    def check_finite(self) -> None:
        """Raise `ValueError` naming every weight or buffer that holds NaN or inf (a broken checkpoint)."""
        bad = self.non_finite_tensors()
        if bad:
            raise ValueError(non_finite_message(bad))

    @classmethod
    def conversion_summary(cls, source: str, missing: set[str], unexpected: set[str], num_loaded: int) -> str:
        """The one line `from_pretrained` logs for a parametric checkpoint turned into this model."""
        return conversion_summary(source, missing, unexpected, num_loaded, cls.encoder_name, cls.conversion_prefixes[1])

    def embed_pixels(self, pixel_values: torch.Tensor, **encoder_kwargs) -> tuple[torch.Tensor, ModelOutput]:
        """Unit pixel embeddings (B, D, h, w) and the encoder outputs (with `hidden_states`, `attentions`)."""
        raise NotImplementedError(f"{type(self).__name__} must define embed_pixels.")

    def input_channels(self) -> int:
        """The number of image channels the encoder takes."""
        return self.config.num_channels

    def embedding_grid_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the pixel embeddings of a (height, width) image, found by embedding a blank one (eval mode, no
        gradient; the model's mode is restored)."""
        parameter = next(self.parameters())
        probe = torch.zeros(1, self.input_channels(), height, width, dtype=parameter.dtype, device=parameter.device)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                embeddings, _ = self.embed_pixels(probe)
        finally:
            self.train(was_training)
        return int(embeddings.shape[-2]), int(embeddings.shape[-1])

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_pixel_embeddings: bool = False,
        output_prototype_indices: bool = False,
        output_max_similarity: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ProtoSegSemanticSegmenterOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): images.
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*): class indices in
                `[0, num_labels)` or `semantic_loss_ignore_index`. With labels the loss is computed; in training
                mode the prototypes are also updated (and averaged across processes under torch.distributed).
            output_pixel_embeddings (`bool`): also return the unit pixel embeddings (B, D, h, w).
            output_prototype_indices (`bool`): also return, without labels, the index of each class's nearest
                prototype at each pixel (B, num_labels, h, w), computed with the logits.
            output_max_similarity (`bool`): also return the unknown score `max_similarity` (B, h, w), the largest
                similarity to any prototype, computed with the logits.
            output_hidden_states (`bool`, `int` or `list[int]`, *optional*): the encoder stages to return, as for
                SegFormer: all four for True, the listed stage indices (negative from the end) as a list with None in
                place of the others.

        Returns: [`ProtoSegSemanticSegmenterOutput`] with `logits` of shape (B, num_labels, h, w), h and w the pixel
        embeddings' height and width (height/4 and width/4 for SegFormer; the decoder's output stride otherwise).
        """
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        return_dict = return_dict if return_dict is not None else config.return_dict
        _check_pixel_values(pixel_values, self.input_channels(), self.min_input_size, self.encoder_description)
        if labels is not None:
            _check_labels(labels, pixel_values, config.num_labels, config.semantic_loss_ignore_index)

        # docs/method.md, forward pass steps 1-3: encoder, decoder, projection to unit embeddings (B, D, h, w).
        embeddings, encoder_outputs = self.embed_pixels(pixel_values, output_attentions=output_attentions)

        loss = loss_ce = loss_ppc = loss_ppd = prototype_indices = nearest = None
        similarity_dtype = _similarity_dtype(config)
        if labels is None:  # steps 5-6: nearest-prototype class scores, normalised over the classes
            logits = inference_logits(
                embeddings,
                self.prototypes,
                fast=self.fast_head,
                tracing=is_tracing(),
                normalization=config.class_score_normalization,
                temperature=config.class_score_temperature,
                chunk_size=config.inference_chunk_size,
                similarity_dtype=similarity_dtype,
                prototype_indices=output_prototype_indices,
                with_max_similarity=output_max_similarity,
            )
            if output_prototype_indices or output_max_similarity:
                logits, *extras = logits
                prototype_indices = extras[0] if output_prototype_indices else None
                nearest = extras[-1] if output_max_similarity else None
        else:  # the training step: scores and logits, assignment, losses, (train mode) update and averaging
            logits, loss, loss_ce, loss_ppc, loss_ppd, nearest = self._train_head(embeddings, labels)
            nearest = nearest if output_max_similarity else None

        output = ProtoSegSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=_select_hidden_states(self, encoder_outputs.hidden_states, output_hidden_states),
            attentions=encoder_outputs.attentions if output_attentions else None,
            pixel_embeddings=embeddings if output_pixel_embeddings else None,
            prototype_indices=prototype_indices,
            max_similarity=nearest,
            loss_ce=loss_ce,
            loss_ppc=loss_ppc,
            loss_ppd=loss_ppd,
        )
        return output if return_dict else output.to_tuple()

    def _train_head(self, embeddings: torch.Tensor, labels: torch.Tensor):
        """Logits, losses and (in training mode) the prototype update for one labelled batch: the training step of
        docs/method.md, on embeddings (B, D, h, w) and labels (B, H, W)."""
        config = self.config
        batch, dim, height, width = embeddings.shape
        num_classes = self.prototypes.shape[0]
        # The losses use the prototypes before this step's update; a snapshot keeps autograd's saved tensor intact.
        prototypes = self.prototypes.detach().clone()
        pixels = embeddings.permute(0, 2, 3, 1).reshape(-1, dim)
        small_labels = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest").long().view(-1)

        # Steps 1-2: class scores, Sinkhorn assignment within each class, PPC and PPD.
        head = training_scores(
            pixels,
            prototypes,
            small_labels,
            fast=self.fast_head,
            tracing=is_tracing(),
            ignore_index=config.semantic_loss_ignore_index,
            epsilon=config.sinkhorn_epsilon,
            iterations=config.sinkhorn_iterations,
            temperature=config.ppc_temperature,
        )
        # Contiguous (B, K, h, w), as SegFormer's logits: the upsampling and cross-entropy below run faster on it.
        scores = head.scores.view(batch, height, width, num_classes)
        logits = class_logits(scores, -1, config.class_score_normalization, config.class_score_temperature)
        logits = logits.permute(0, 3, 1, 2).contiguous()
        nearest = max_similarity(scores.detach(), dim=-1)

        # Step 2: the cross-entropy of the upsampled logits: the mean over the labelled pixels, 0 when every pixel is
        # ignored (a sum divided by their count: no data-dependent branch, so torch.compile traces it whole).
        upsampled = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        ignore = config.semantic_loss_ignore_index
        loss_ce = F.cross_entropy(upsampled, labels.long(), ignore_index=ignore, reduction="sum")
        loss_ce = loss_ce / (labels != ignore).sum().clamp_min(1)
        loss = loss_ce + config.ppc_weight * head.loss_ppc + config.ppd_weight * head.loss_ppd

        # Steps 3-4: momentum update from the correctly classified pixels, averaged across processes.
        if self.training:
            update_embeddings, targets, mask = head.update_inputs()
            updated = momentum_update(prototypes, update_embeddings, targets, config.prototype_momentum, mask=mask)
            with torch.no_grad():
                self.prototypes.copy_(average_across_processes(updated))
        return logits, loss, loss_ce.detach(), head.loss_ppc.detach(), head.loss_ppd.detach(), nearest

    def add_classes(self, images, masks, names, **options) -> dict[str, int]:
        """Learn new classes from a few labelled images, without training; returns {name: new class id}.

        `images`: pixel_values (N, 3, H, W) float, or a list of PIL images (normalised like SegformerImageProcessor,
        optionally resized with `image_size=(h, w)`); `masks`: (N, H, W) integers at image resolution, value i + 1
        marking the pixels of `names[i]` and 0 pixels to leave out. The support pixels of each new class are embedded
        (eval mode, no gradient) and clustered into M prototypes with the training step's Sinkhorn clustering, which
        are appended to `prototypes`; `config.id2label`/`label2id`/`num_labels` are extended. Existing prototypes and
        weights stay bit-identical; on any error the model is unchanged. Options and details:
        `proto_segformer.class_editing.add_classes_to_model` (the package is needed: not shipped as remote code).
        """
        return _class_editing("add_classes").add_classes_to_model(self, images, masks, names, **options)

    def remove_classes(self, names) -> dict[int, int]:
        """Drop classes (and their prototypes) by name; returns {old id: new id}. Later class ids shift down."""
        return _class_editing("remove_classes").remove_classes_from_model(self, names)

    def rename_class(self, old: str, new: str) -> int:
        """Rename class `old` to `new` in `config.id2label`/`label2id`; returns its id."""
        return _class_editing("rename_class").rename_class_of_model(self, old, new)


def _class_editing(method: str):
    """The package's `class_editing` module, for the class-editing methods. It is not remote code (running and
    training the model do not need it), so a model loaded with `trust_remote_code=True` needs the package installed
    for these methods. The import is inside try/except, so transformers' remote-code import check does not require
    the package for loading the model."""
    try:
        from proto_segformer import class_editing
    except ImportError as error:
        raise ImportError(
            f"model.{method} needs the proto_segformer package, which is not installed: pip install proto_segformer"
            " (or `pip install .` in a clone of its repository). Running and training the model do not need it."
        ) from error
    return class_editing
