"""Configuration of ProtoSeg on SegFormer (`model_type = "proto_segformer"`)."""

from __future__ import annotations

from typing import Any

from transformers import SegformerConfig

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
# Values of `similarity_dtype` (None: the model's dtype); the torch dtypes are `prototypes.SIMILARITY_DTYPES`.
SIMILARITY_DTYPE_NAMES = (None, "float32", "bfloat16")


def check_similarity_dtype(name: str | None) -> str | None:
    """`name` if it is one of SIMILARITY_DTYPE_NAMES, else a ValueError listing them."""
    if name not in SIMILARITY_DTYPE_NAMES:
        raise ValueError(f"similarity_dtype must be one of {SIMILARITY_DTYPE_NAMES}, got {name!r}.")
    return name

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
        **kwargs: Any,
    ) -> None:
        # A parametric SegFormer config.json says "segformer"; this config is always a proto_segformer one.
        kwargs.pop("model_type", None)
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
        if not getattr(self, "auto_map", None):
            self.auto_map = dict(AUTO_MAP)
        self._validate_prototype_fields()

    @property
    def embedding_dim(self) -> int:
        """D: `prototype_dim`, or `decoder_hidden_size` when it is `None`."""
        return self.prototype_dim if self.prototype_dim is not None else self.decoder_hidden_size

    def _validate_prototype_fields(self) -> None:
        if int(self.num_prototypes_per_class) < 1:
            raise ValueError(f"num_prototypes_per_class must be >= 1, got {self.num_prototypes_per_class}.")
        if self.prototype_dim is not None and int(self.prototype_dim) < 1:
            raise ValueError(f"prototype_dim must be >= 1 or None, got {self.prototype_dim}.")
        if not 0.0 <= float(self.prototype_momentum) <= 1.0:
            raise ValueError(f"prototype_momentum must lie in [0, 1], got {self.prototype_momentum}.")
        if float(self.sinkhorn_epsilon) <= 0:
            raise ValueError(f"sinkhorn_epsilon must be > 0, got {self.sinkhorn_epsilon}.")
        if int(self.sinkhorn_iterations) < 0:
            raise ValueError(f"sinkhorn_iterations must be >= 0, got {self.sinkhorn_iterations}.")
        if float(self.ppc_temperature) <= 0:
            raise ValueError(f"ppc_temperature must be > 0, got {self.ppc_temperature}.")
        if self.class_score_normalization not in CLASS_SCORE_NORMALIZATIONS:
            raise ValueError(
                f"class_score_normalization must be one of {CLASS_SCORE_NORMALIZATIONS},"
                f" got {self.class_score_normalization!r}."
            )
        check_similarity_dtype(self.similarity_dtype)
        if float(self.class_score_temperature) <= 0:
            raise ValueError(f"class_score_temperature must be > 0, got {self.class_score_temperature}.")

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> ProtoSegformerConfig:
        """Build the config of a named MiT size (`"mit-b0"` .. `"mit-b5"`) offline; `kwargs` override any field."""
        return cls(**{**mit_preset(name), **kwargs})


# auto_map in every saved config.json (AutoConfig.from_pretrained(..., trust_remote_code=True)).
ProtoSegformerConfig.register_for_auto_class()

__all__ = ["MIT_PRESETS", "ProtoSegformerConfig", "mit_preset"]
