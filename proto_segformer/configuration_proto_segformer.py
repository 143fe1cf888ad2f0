"""Configuration of ProtoSeg on SegFormer (`model_type = "proto_segformer"`)."""

from __future__ import annotations

import numbers
import os
import unicodedata
from typing import Any

from transformers import PretrainedConfig, SegformerConfig

from .local_paths import check_local_source

# Mix Transformer sizes from the SegFormer paper (Xie et al., 2021, Table 6 and Sec. 4.1).
MIT_PRESETS: dict[str, dict[str, Any]] = {
    "mit-b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "mit-b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "mit-b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
    "mit-b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "decoder_hidden_size": 768},
    "mit-b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "decoder_hidden_size": 768},
    "mit-b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "decoder_hidden_size": 768},
}
# Shared by all sizes (SegFormer's defaults, repeated so a preset is complete on its own).
_MIT_COMMON: dict[str, Any] = {
    "num_encoder_blocks": 4,
    "sr_ratios": [8, 4, 2, 1],
    "num_attention_heads": [1, 2, 5, 8],
    "patch_sizes": [7, 3, 3, 3],
    "strides": [4, 2, 2, 2],
    "mlp_ratios": [4, 4, 4, 4],
}


def mit_preset(name: str) -> dict[str, Any]:
    """The SegformerConfig fields of a named Mix Transformer size (`"mit-b0"` .. `"mit-b5"`)."""
    key = name.lower().replace("_", "-")
    if not key.startswith("mit-"):
        key = "mit-" + key
    if key not in MIT_PRESETS:
        raise ValueError(f"Unknown MiT preset {name!r}; choose one of {sorted(MIT_PRESETS)}.")
    return {**_MIT_COMMON, **MIT_PRESETS[key]}


# How class scores become logits (config.class_score_normalization); the first is the contract's default.
CLASS_SCORE_NORMALIZATIONS = ("layer_norm", "temperature")
# Values of `similarity_dtype` (None: the model's dtype); the torch dtypes are `prototype_kernels.SIMILARITY_DTYPES`.
SIMILARITY_DTYPE_NAMES = (None, "float32", "bfloat16")


def check_unknown_threshold(threshold: Any) -> float | None:
    """`unknown_threshold` as a float in [-1, 1] (the range of a cosine similarity), or None; else one ValueError."""
    if threshold is None:
        return None
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(threshold, bool) or not -1.0 <= value <= 1.0:
        raise ValueError(
            f"unknown_threshold must be a number in [-1, 1] (the range of max_similarity, a cosine similarity),"
            f" got {threshold!r}."
        )
    return value


def check_similarity_dtype(name: str | None) -> str | None:
    """`name` if it is one of SIMILARITY_DTYPE_NAMES, else a ValueError listing them."""
    if name not in SIMILARITY_DTYPE_NAMES:
        raise ValueError(f"similarity_dtype must be one of {SIMILARITY_DTYPE_NAMES}, got {name!r}.")
    return name


# Upper bounds of the fields that size tensors and loops: far above any real use (the paper: M = 10, T = 3), so that a
# typo (10000000 for 10) is a one-line error before anything is allocated, not gigabytes allocated or hours of loops.
MAX_PROTOTYPES_PER_CLASS = 1000
MAX_SINKHORN_ITERATIONS = 100
# inference_chunk_size bounds the pixel-by-prototype scores held at once: 2**31 float32 scores are 8 GiB.
MAX_INFERENCE_CHUNK_SIZE = 2**31
# The float32 weights and prototype buffer a config may ask for (estimated from its sizes, `model_size_terms`).
MAX_MODEL_BYTES = 8 * 2**30
# Unicode categories a class name may not contain: control characters (newline, tab, ...), line/paragraph separators.
FORBIDDEN_NAME_CATEGORIES = ("Cc", "Zl", "Zp")


def class_name_problem(name: Any) -> str | None:
    """Why `name` cannot name a class (not a string, empty, or holding a control character such as a newline: it
    would break the one-line-per-class outputs), or None when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name.strip():
        return "is empty"
    bad = sorted({char for char in name if unicodedata.category(char) in FORBIDDEN_NAME_CATEGORIES})
    if bad:
        return f"holds the control character(s) {', '.join(repr(char) for char in bad)}"
    return None


def _shown(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids[:10]) + (", ..." if len(ids) > 10 else "")


def check_id2label(id2label: dict | None) -> None:
    """A ValueError (one line, naming config.json and the fix) unless `id2label` numbers its K classes 0..K-1 (one per
    prototype class: K = num_labels) with names `class_name_problem` accepts."""
    id2label = id2label or {}
    try:
        ids = {int(key) for key in id2label}
    except (TypeError, ValueError):
        keys = [key for key in id2label if not str(key).lstrip("-").isdigit()]
        raise ValueError(
            f"id2label in config.json must map class ids 0..{len(id2label) - 1} to names, but has keys {keys[:5]}"
            " that are not integers. Renumber id2label (and label2id) as 0..K-1."
        ) from None
    count = len(id2label)
    if ids != set(range(count)):  # then some id in 0..K-1 is missing (K names), and maybe others are extra
        missing, extra = sorted(set(range(count)) - ids), sorted(ids - set(range(count)))
        found = f"lacks id(s) {_shown(missing)}" + (f" and has extra id(s) {_shown(extra)}" if extra else "")
        raise ValueError(
            f"id2label in config.json must number its {count} classes 0..{count - 1} (one per prototype class), but"
            f" it {found}. Renumber id2label (and label2id) as 0..{count - 1}, in the order of the prototypes."
        )
    for key, name in id2label.items():
        problem = class_name_problem(name)
        if problem is not None:
            raise ValueError(
                f"Class name {name!r} (id {int(key)}) in config.json's id2label {problem}: class names must be"
                " non-empty one-line text. Rename it in id2label and label2id (or model.rename_class)."
            )


def _integer(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    """A ValueError unless `value` is an integer (not a bool or float) in [minimum, maximum]."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value >= minimum and (maximum is None or value <= maximum):
            return
    bound = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    raise ValueError(f"{name} must be {bound}, got {value!r}.")


def model_size_terms(config: ProtoSegformerConfig) -> list[tuple[str, int]]:
    """(description, float32 values) of the tensors a model of `config` holds: the prototype buffer K*M*D, the
    decoder, the projection and each encoder stage (attention, Mix-FFN, sequence reduction, patch embedding; an
    estimate within a few percent, enough to refuse sizes far beyond any machine's memory)."""
    k, m, d = config.num_labels or 0, config.num_prototypes_per_class, config.embedding_dim
    c, blocks = config.decoder_hidden_size, config.num_encoder_blocks
    terms = [
        (f"the prototype buffer K*M*D = {k}*{m}*{d}", k * m * d),
        (
            f"the decoder, (num_encoder_blocks*decoder_hidden_size)*decoder_hidden_size = {blocks * c}*{c}",
            blocks * c * c + sum(config.hidden_sizes) * c,
        ),
        (f"the projection decoder_hidden_size*(decoder_hidden_size + D) = {c}*{c + d}", c * (c + d)),
    ]
    previous = config.num_channels
    stages = zip(config.hidden_sizes, config.depths, config.mlp_ratios, config.sr_ratios, config.patch_sizes)
    for index, (hidden, depth, ratio, reduction, patch) in enumerate(stages):
        per_layer = hidden * hidden * (4 + 2 * ratio + (reduction * reduction if reduction > 1 else 0))
        terms.append(
            (
                f"encoder stage {index + 1} (hidden_sizes[{index}] = {hidden}, depths[{index}] = {depth})",
                depth * per_layer + previous * hidden * patch * patch,
            )
        )
        previous = hidden
    return terms


def check_model_size(config: PretrainedConfig, terms: list[tuple[str, int]] | None = None) -> None:
    """A ValueError naming the largest product when the model's float32 weights and prototypes would exceed
    MAX_MODEL_BYTES (a decoder_hidden_size or prototype count far beyond any machine), before anything is allocated.
    `terms`: (description, float32 values) of the model's tensors; default `model_size_terms(config)` (SegFormer)."""
    terms = model_size_terms(config) if terms is None else terms
    total = 4 * sum(values for _, values in terms)
    if total > MAX_MODEL_BYTES:
        name, values = max(terms, key=lambda term: term[1])
        raise ValueError(
            f"This configuration needs about {total / 2**30:,.1f} GiB of float32 weights and prototypes, over the"
            f" {MAX_MODEL_BYTES // 2**30} GiB limit; most of it is {name} values ({4 * values / 2**30:,.1f} GiB)."
            " Lower the sizes in that product."
        )


# Written into config.json so that the Auto classes and the pipeline find the custom code next to the weights.
AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_proto_segformer.ProtoSegformerConfig",
    "AutoModel": "modeling_proto_segformer.ProtoSegformerForSemanticSegmentation",
    "AutoModelForSemanticSegmentation": "modeling_proto_segformer.ProtoSegformerForSemanticSegmentation",
}


class ProtoSegformerConfig(SegformerConfig):
    r"""
    Configuration of [`ProtoSegformerForSemanticSegmentation`]: every [`SegformerConfig`] field keeps its meaning, and
    these fields describe the non-learnable prototype classifier (ProtoSeg, Zhou et al., CVPR 2022).

    Args:
        num_prototypes_per_class (`int`, defaults to 10): M, prototypes per class.
        prototype_dim (`int`, *optional*): D, the width of the pixel embeddings and prototypes; `None` means
            `decoder_hidden_size`.
        prototype_momentum (`float`, defaults to 0.999): mu of the momentum update of the prototypes.
        sinkhorn_epsilon (`float`, defaults to 0.05): entropy regularisation of the Sinkhorn-Knopp clustering.
        sinkhorn_iterations (`int`, defaults to 3): Sinkhorn-Knopp iterations.
        ppc_weight (`float`, defaults to 0.01): weight of the pixel-prototype contrastive loss.
        ppd_weight (`float`, defaults to 0.001): weight of the pixel-prototype distance loss.
        ppc_temperature (`float`, defaults to 0.1): temperature of the pixel-prototype contrastive loss.
        inference_chunk_size (`int`, defaults to 2**24): bound on the number of pixel-by-prototype scores held at
            once at inference (in units of pixels x classes x M); it changes memory, never results.
        class_score_normalization (`str`, defaults to `"layer_norm"`): how the class scores S become `logits`:
            `"layer_norm"` (the contract: LayerNorm over the class axis without affine parameters) or `"temperature"`
            (S / `class_score_temperature`, a fixed temperature whose scale does not depend on K). Both keep the
            argmax; only training changes. An option for experiments (scripts/benchmark_quality.py --ablate).
        class_score_temperature (`float`, defaults to 0.1): the temperature of `"temperature"` normalisation.
        similarity_dtype (`str`, *optional*): the dtype of the inference head's pixel-prototype similarities:
            `None` (default: the model's dtype, or autocast's) or `"float32"`, or `"bfloat16"`, a reduced-precision
            option for CPUs and GPUs with fast bf16 matrix units (the class scores are then normalised in float32).
            Inference only (no labels); training always computes the similarities in the model's precision. Off by
            default; its agreement with float32 is in the README's performance section.
        unknown_threshold (`float`, *optional*): pixels whose `max_similarity` (the largest cosine similarity to
            any prototype) is below it are unknown when rejection is asked for (`--reject_unknown`); in [-1, 1].
            `None` (a model never calibrated): rejection is an error naming scripts/calibrate_unknown.py.
        unknown_calibration (`dict`, *optional*): how `unknown_threshold` was obtained (split, accepted fraction of
            known pixels, pixel count, date, ...), written with it by `proto_segformer.unknown`.

    Checked when the config is built or loaded (`check_protoseg_fields`, one line per problem): `id2label` must number
    the classes 0..K-1 with non-empty one-line names; num_prototypes_per_class <= MAX_PROTOTYPES_PER_CLASS (1000),
    sinkhorn_iterations <= MAX_SINKHORN_ITERATIONS (100), 1 <= inference_chunk_size <= 2**31, and the float32
    weights and prototype buffer (K*M*D) together <= MAX_MODEL_BYTES (8 GiB).
    """

    model_type = "proto_segformer"

    def __init__(
        self,
        num_prototypes_per_class: int = 10,
        prototype_dim: int | None = None,
        prototype_momentum: float = 0.999,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        ppc_weight: float = 0.01,
        ppd_weight: float = 0.001,
        ppc_temperature: float = 0.1,
        inference_chunk_size: int = 2**24,
        class_score_normalization: str = "layer_norm",
        class_score_temperature: float = 0.1,
        similarity_dtype: str | None = None,
        unknown_threshold: float | None = None,
        unknown_calibration: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # A parametric SegFormer config.json says "segformer"; this config is always a proto_segformer one.
        kwargs.pop("model_type", None)
        if kwargs.get("id2label") is not None:
            check_id2label(kwargs["id2label"])  # before transformers turns the keys into ints
        super().__init__(**kwargs)
        self.num_prototypes_per_class = num_prototypes_per_class
        self.prototype_dim = prototype_dim
        self.prototype_momentum = prototype_momentum
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.ppc_weight = ppc_weight
        self.ppd_weight = ppd_weight
        self.ppc_temperature = ppc_temperature
        self.inference_chunk_size = inference_chunk_size
        self.class_score_normalization = class_score_normalization
        self.class_score_temperature = class_score_temperature
        self.similarity_dtype = similarity_dtype
        self.unknown_threshold = unknown_threshold
        self.unknown_calibration = unknown_calibration
        if not getattr(self, "auto_map", None):
            self.auto_map = dict(AUTO_MAP)
        self.check_protoseg_fields()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs: Any) -> ProtoSegformerConfig:
        """`PretrainedConfig.from_pretrained`; a local-looking path that does not exist is a one-line error at once,
        naming the closest existing folders (`local_paths.check_local_source`, no network), not a minute of Hub
        retries."""
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            check_local_source(str(pretrained_model_name_or_path), cache_dir=kwargs.get("cache_dir"))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """`PretrainedConfig.from_dict`, with the fields checked again after the keyword overrides it sets (as
        `from_pretrained(..., num_prototypes_per_class=...)` does) on the built config."""
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).check_protoseg_fields()
        return result

    @property
    def embedding_dim(self) -> int:
        """D: `prototype_dim`, or `decoder_hidden_size` when it is `None`."""
        return self.prototype_dim if self.prototype_dim is not None else self.decoder_hidden_size

    def check_protoseg_fields(self) -> None:
        """A ValueError (one line) for the first field out of its range: the class names, the ProtoSeg fields and
        the resource bounds (see the class docstring). The model checks its config again when it is built."""
        check_prototype_fields(self)
        check_model_size(self)

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> ProtoSegformerConfig:
        """Build the config of a named MiT size (`"mit-b0"` .. `"mit-b5"`) offline; `kwargs` override any field."""
        return cls(**{**mit_preset(name), **kwargs})


def check_prototype_fields(config: PretrainedConfig) -> None:
    """A ValueError (one line) for the first ProtoSeg field of a config (either model's) out of its range: the class
    names, num_prototypes_per_class, prototype_dim, decoder_hidden_size, the momentum, Sinkhorn, loss and inference
    fields."""
    check_id2label(config.id2label)
    _integer("num_prototypes_per_class", config.num_prototypes_per_class, 1, MAX_PROTOTYPES_PER_CLASS)
    if config.prototype_dim is not None:
        _integer("prototype_dim", config.prototype_dim, 1)
    _integer("decoder_hidden_size", config.decoder_hidden_size, 1)
    if not 0.0 <= float(config.prototype_momentum) <= 1.0:
        raise ValueError(f"prototype_momentum must lie in [0, 1], got {config.prototype_momentum}.")
    if float(config.sinkhorn_epsilon) <= 0:
        raise ValueError(f"sinkhorn_epsilon must be > 0, got {config.sinkhorn_epsilon}.")
    _integer("sinkhorn_iterations", config.sinkhorn_iterations, 0, MAX_SINKHORN_ITERATIONS)
    _integer("inference_chunk_size", config.inference_chunk_size, 1, MAX_INFERENCE_CHUNK_SIZE)
    if float(config.ppc_temperature) <= 0:
        raise ValueError(f"ppc_temperature must be > 0, got {config.ppc_temperature}.")
    if config.class_score_normalization not in CLASS_SCORE_NORMALIZATIONS:
        raise ValueError(
            f"class_score_normalization must be one of {CLASS_SCORE_NORMALIZATIONS},"
            f" got {config.class_score_normalization!r}."
        )
    check_similarity_dtype(config.similarity_dtype)
    check_unknown_threshold(getattr(config, "unknown_threshold", None))
    if float(config.class_score_temperature) <= 0:
        raise ValueError(f"class_score_temperature must be > 0, got {config.class_score_temperature}.")


# auto_map in every saved config.json (AutoConfig.from_pretrained(..., trust_remote_code=True)).
ProtoSegformerConfig.register_for_auto_class()

__all__ = ["MIT_PRESETS", "ProtoSegformerConfig", "mit_preset"]
