"""The parametric twin of a ProtoSeg model: transformers' own model with the same encoder / backbone and decoder, and
a learnable 1x1 classifier where ProtoSeg has its projection and prototypes.

- `ProtoSegformerForSemanticSegmentation` (MiT encoder + all-MLP decoder) -> `SegformerForSemanticSegmentation`;
- `ProtoSegForSemanticSegmentation` with the UperNet decoder (any AutoBackbone + PPM + FPN) ->
  `UperNetForSemanticSegmentation` (no auxiliary head). transformers has no parametric model of the MLP decoder on
  another backbone, so a ProtoSeg model with `decoder_type="mlp"` has no twin (a clear error).

The in-memory parameter names of both models are the same (`segformer.*` / `backbone.*`, `decode_head.*`); only the
classifier (parametric) and the projection and prototypes (ProtoSeg) differ. `twin_pair` builds the parametric twin
of a ProtoSeg model and copies its encoder and decoder weights into the ProtoSeg model, so both start alike;
`shared_weights_fingerprint` proves it. The speed harness (benchmarks/speed.py) and the quality harness
(benchmarks/quality.py) both build their models here.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping

import torch
from transformers import (
    PretrainedConfig,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from proto_segformer.configuration_protoseg import ProtoSegConfig

HEADS = ("parametric", "protoseg")
# Tensors that exist in one head only: the parametric classifier (and UperNet's auxiliary head, off here), the ProtoSeg
# projection and prototypes. Everything else (encoder / backbone, decoder) is shared.
PARAMETRIC_ONLY_PREFIXES = ("decode_head.classifier.", "auxiliary_head.")
PROTOSEG_ONLY_PREFIXES = ("projection.", "prototypes")


def parametric_config(proto_config: PretrainedConfig) -> PretrainedConfig:
    """The config of the parametric twin of a ProtoSeg config: a `SegformerConfig` (every SegFormer field equal) for a
    `ProtoSegformerConfig`, an `UperNetConfig` (same backbone config, decoder width, pool scales, initialiser range,
    ignore index; no auxiliary head) for a `ProtoSegConfig` with the UperNet decoder. A ValueError (one line) for a
    `ProtoSegConfig` with the MLP decoder."""
    labels = {"id2label": dict(proto_config.id2label), "label2id": dict(proto_config.label2id)}
    if isinstance(proto_config, ProtoSegConfig):
        if proto_config.decoder_type != "upernet":
            raise ValueError(
                f"A ProtoSeg model with decoder_type={proto_config.decoder_type!r} has no parametric twin in"
                " transformers (UperNetForSemanticSegmentation has the UperNet decoder): compare with"
                " decoder_type='upernet'."
            )
        return UperNetConfig(
            backbone_config=copy.deepcopy(proto_config.backbone_config),
            hidden_size=proto_config.decoder_hidden_size,
            pool_scales=list(proto_config.pool_scales),
            initializer_range=proto_config.initializer_range,
            use_auxiliary_head=False,
            loss_ignore_index=proto_config.semantic_loss_ignore_index,
            # The name ProtoSegTrainer's evaluation reads (SegFormer's), beside UperNet's own.
            semantic_loss_ignore_index=proto_config.semantic_loss_ignore_index,
            **labels,
        )
    segformer_fields = set(SegformerConfig().to_dict())
    values = {k: v for k, v in proto_config.to_dict().items() if k in segformer_fields}
    for key in ("model_type", "auto_map", "architectures", "transformers_version"):
        values.pop(key, None)
    return SegformerConfig(**{**values, **labels})


def parametric_model(proto_config: PretrainedConfig) -> torch.nn.Module:
    """A randomly initialised parametric twin of a ProtoSeg config (`parametric_config`)."""
    config = parametric_config(proto_config)
    if isinstance(config, UperNetConfig):
        return UperNetForSemanticSegmentation(config)
    return SegformerForSemanticSegmentation(config)


def shared_parameter_names(state_dict: Mapping[str, torch.Tensor], head: str) -> list[str]:
    """Names of the encoder / backbone and decoder tensors (those both heads have) in a state_dict of the given head."""
    own = PARAMETRIC_ONLY_PREFIXES if head == "parametric" else PROTOSEG_ONLY_PREFIXES
    return sorted(name for name in state_dict if not name.startswith(own))


def own_parameter_names(state_dict: Mapping[str, torch.Tensor], head: str) -> list[str]:
    """Names of the tensors of the given head that its twin does not have (classifier, or projection + prototypes)."""
    shared = set(shared_parameter_names(state_dict, head))
    return sorted(name for name in state_dict if name not in shared)


def shared_weights_fingerprint(model: torch.nn.Module, head: str) -> str:
    """sha256 over the names and values of the encoder / backbone and decoder tensors (parameters and buffers)."""
    state = model.state_dict()
    digest = hashlib.sha256()
    for name in shared_parameter_names(state, head):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def copy_shared_weights(parametric: torch.nn.Module, protoseg: torch.nn.Module) -> None:
    """Load the parametric model's encoder / backbone and decoder weights into the ProtoSeg model (in place).

    The in-memory names match; the parametric classifier is dropped and the ProtoSeg projection and prototypes keep
    their values. Raises if anything else differs (a tensor of another shape, a name only one of them has)."""
    report = protoseg.load_state_dict(parametric.state_dict(), strict=False)
    unexpected = [k for k in report.unexpected_keys if not k.startswith(PARAMETRIC_ONLY_PREFIXES)]
    missing = [k for k in report.missing_keys if not k.startswith(PROTOSEG_ONLY_PREFIXES)]
    if unexpected or missing:
        raise RuntimeError(
            "The parametric and ProtoSeg models do not share their encoder and decoder:"
            f" unexpected {unexpected[:5]}, missing {missing[:5]}."
        )


def twin_pair(protoseg: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The parametric twin of `protoseg` (its config through `parametric_config`), initialised from `seed`; its
    encoder / backbone and decoder weights are copied into `protoseg` (in place), so both start alike. Returns the
    twin; raises when the two do not share every tensor but the heads' own."""
    torch.manual_seed(seed)
    parametric = parametric_model(protoseg.config).to(next(protoseg.parameters()).device)
    copy_shared_weights(parametric, protoseg)
    if shared_weights_fingerprint(parametric, "parametric") != shared_weights_fingerprint(protoseg, "protoseg"):
        raise RuntimeError("The parametric twin and the ProtoSeg model start from different shared weights.")
    return parametric


__all__ = [
    "HEADS",
    "PARAMETRIC_ONLY_PREFIXES",
    "PROTOSEG_ONLY_PREFIXES",
    "copy_shared_weights",
    "own_parameter_names",
    "parametric_config",
    "parametric_model",
    "shared_parameter_names",
    "shared_weights_fingerprint",
    "twin_pair",
]
