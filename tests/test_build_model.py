"""build_model: our checkpoints, parametric SegFormer checkpoints, MiT backbones, presets and overrides."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    TINY,
    tiny_config,  # noqa: I001
)
from transformers import SegformerConfig, SegformerForImageClassification, SegformerForSemanticSegmentation

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer.model_building import ModelInputError, build_model
from proto_segformer.run_training import parse_config_overrides

ID2LABEL = {0: "bg", 1: "cat", 2: "dog"}


def _segformer_config(**extra) -> SegformerConfig:
    return SegformerConfig(**TINY, num_labels=3, **extra)


def _same(a: torch.nn.Module, b: torch.nn.Module, prefix: str) -> None:
    b_state = b.state_dict()
    checked = 0
    for name, tensor in a.state_dict().items():
        if name.startswith(prefix):
            assert torch.equal(tensor, b_state[name]), name
            checked += 1
    assert checked > 0


def test_preset_with_overrides() -> None:
    model, source = build_model(
        model_name_or_path=None,
        model_preset="mit-b0",
        id2label=ID2LABEL,
        overrides={"decoder_hidden_size": 64, "num_prototypes_per_class": 2, "ppc_weight": 0.5, "prototype_dim": None},
    )
    assert "mit-b0" in source
    assert model.config.decoder_hidden_size == 64 and model.prototypes.shape == (3, 2, 64)
    assert model.config.ppc_weight == 0.5 and model.config.id2label == ID2LABEL
    with pytest.raises(ModelInputError, match=r"num_prototypes_per_class must be an integer in \[1, 1000\], got 0"):
        build_model(
            model_name_or_path=None, model_preset="mit-b0", id2label=ID2LABEL, overrides={"num_prototypes_per_class": 0}
        )
    with pytest.raises(ModelInputError, match="Unknown MiT preset"):
        build_model(model_name_or_path=None, model_preset="mit-b9", id2label=ID2LABEL)


def test_parametric_segformer_checkpoint_loads_encoder_and_decoder(tmp_path) -> None:
    torch.manual_seed(0)
    parametric = SegformerForSemanticSegmentation(_segformer_config())
    parametric.save_pretrained(tmp_path)
    model, source = build_model(model_name_or_path=str(tmp_path), model_preset=None, id2label=ID2LABEL)
    assert isinstance(model, ProtoSegformerForSemanticSegmentation) and "SegformerForSemanticSegmentation" in source
    _same(model, parametric, "segformer.")
    theirs = parametric.decode_head.state_dict()
    for name, tensor in model.decode_head.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


def test_mit_backbone_checkpoint_loads_encoder(tmp_path) -> None:
    torch.manual_seed(0)
    backbone = SegformerForImageClassification(_segformer_config())
    backbone.save_pretrained(tmp_path)
    model, _ = build_model(
        model_name_or_path=str(tmp_path),
        model_preset=None,
        id2label=ID2LABEL,
        overrides={"num_prototypes_per_class": 2},
    )
    _same(model, backbone, "segformer.")
    assert model.prototypes.shape == (3, 2, TINY["decoder_hidden_size"])


def test_our_checkpoint_keeps_or_resets_prototypes(tmp_path) -> None:
    torch.manual_seed(0)
    ours = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=3, id2label=ID2LABEL))
    ours.save_pretrained(tmp_path)
    same, source = build_model(model_name_or_path=str(tmp_path), model_preset=None, id2label=ID2LABEL)
    assert "ProtoSegformer checkpoint" in source
    assert torch.equal(same.prototypes, ours.prototypes)
    _same(same, ours, "decode_head.")
    other, _ = build_model(model_name_or_path=str(tmp_path), model_preset=None, id2label={0: "a", 1: "b"})
    assert other.prototypes.shape == (2, 4, TINY["decoder_hidden_size"])
    _same(other, ours, "segformer.")
    torch.testing.assert_close(other.prototypes.norm(dim=-1), torch.ones(2, 4))
    renamed, _ = build_model(model_name_or_path=str(tmp_path), model_preset=None, id2label={0: "x", 1: "y", 2: "z"})
    assert not torch.equal(renamed.prototypes, ours.prototypes)  # other classes: fresh prototypes


def test_wrong_checkpoints(tmp_path) -> None:
    with pytest.raises(ModelInputError, match="path .*nothing' does not exist"):
        build_model(model_name_or_path=str(tmp_path / "nothing"), model_preset=None, id2label=ID2LABEL)
    from transformers import BertConfig

    BertConfig(
        vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
    ).save_pretrained(tmp_path)
    with pytest.raises(ModelInputError, match="holds a 'bert' model"):
        build_model(model_name_or_path=str(tmp_path), model_preset=None, id2label=ID2LABEL)


def test_parse_config_overrides() -> None:
    assert parse_config_overrides("a=1,b=[1,2],c=true,d=x, e = 0.5") == {
        "a": 1,
        "b": [1, 2],
        "c": True,
        "d": "x",
        "e": 0.5,
    }
    with pytest.raises(ValueError, match="not of the form name=value"):
        parse_config_overrides("oops")
