"""build_model for ProtoSegForSemanticSegmentation: backbone presets, UperNet checkpoints, backbone-only checkpoints
(ResNetModel, Dinov2Model, SwinModel folders), our checkpoints, resume checks and bad input; all offline."""

from __future__ import annotations

import logging

import pytest
import torch
from protoseg_helpers import tiny_backbone, tiny_protoseg_config
from transformers import (
    Dinov2Model,
    ResNetModel,
    SwinModel,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from proto_segformer import ProtoSegConfig, ProtoSegformerForSemanticSegmentation, ProtoSegForSemanticSegmentation
from proto_segformer.model_building import (
    ModelInputError,
    build_model,
    parametric_upernet_config,
    preset_names,
    resume_config_problem,
)

ID2LABEL = {0: "sky", 1: "road", 2: "car"}
SMALL = {"decoder_hidden_size": 16, "prototype_dim": 8, "num_prototypes_per_class": 2}


def test_backbone_presets_build_protoseg_models_and_mit_presets_protosegformer():
    model, description = build_model(
        model_name_or_path=None, model_preset="resnet-18", id2label=ID2LABEL, overrides=SMALL
    )
    assert isinstance(model, ProtoSegForSemanticSegmentation) and "resnet-18 preset, random init" in description
    assert model.config.backbone_config.hidden_sizes == [64, 128, 256, 512] and model.prototypes.shape == (3, 2, 8)
    mlp, _ = build_model(
        model_name_or_path=None,
        model_preset="resnet-18",
        id2label=ID2LABEL,
        overrides={**SMALL, "decoder_type": "mlp"},
    )
    assert type(mlp.decode_head).__name__ == "ProtoSegformerDecodeHead"
    mit, _ = build_model(model_name_or_path=None, model_preset="mit-b0", id2label=ID2LABEL, overrides=SMALL)
    assert isinstance(mit, ProtoSegformerForSemanticSegmentation)
    assert {"mit-b0", "resnet-50", "swin-tiny", "convnext-tiny", "dinov2-small", "hrnet-w48"} <= set(preset_names())
    with pytest.raises(ModelInputError, match=r"Unknown model preset 'resnet-9'.*mit-b0.*resnet-18"):
        build_model(model_name_or_path=None, model_preset="resnet-9", id2label=ID2LABEL)
    with pytest.raises(ModelInputError, match="decoder_type applies to the backbone presets"):
        build_model(model_name_or_path=None, model_preset="mit-b0", id2label=ID2LABEL, overrides={"decoder_type": "x"})


def test_parametric_upernet_config_matches_the_preset():
    ours = ProtoSegConfig.from_preset("swin-tiny", num_labels=19)
    theirs = parametric_upernet_config("swin-tiny", num_labels=19)
    assert theirs.backbone_config.to_dict() == ours.backbone_config.to_dict()
    assert theirs.hidden_size == ours.decoder_hidden_size and list(theirs.pool_scales) == ours.pool_scales
    assert theirs.use_auxiliary_head is False


def test_upernet_checkpoint_keeps_backbone_and_decoder_drops_the_classifier(tmp_path, caplog):
    torch.manual_seed(0)
    config = UperNetConfig(
        backbone_config=tiny_backbone("convnext"), hidden_size=16, auxiliary_in_channels=None, num_labels=7
    )
    parametric = UperNetForSemanticSegmentation(config)
    parametric.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO):
        model, description = build_model(
            model_name_or_path=str(tmp_path), model_preset=None, id2label=ID2LABEL, overrides={"prototype_dim": 8}
        )
    assert isinstance(model, ProtoSegForSemanticSegmentation) and model.config.decoder_type == "upernet"
    assert "Loaded the backbone and decoder from" in description
    assert "dropped the parametric classifier (auxiliary_head.*, decode_head.classifier.*)" in description
    assert description.endswith("new: projection, prototypes")
    theirs = parametric.state_dict()
    for name, tensor in model.state_dict().items():
        if name.startswith(("backbone.", "decode_head.")):
            assert torch.equal(tensor, theirs[name]), name
    assert "LOAD REPORT" not in caplog.text  # one summary line instead of transformers' report


@pytest.mark.parametrize(
    "model_class,kind,stages",
    [(ResNetModel, "resnet", [1, 2, 3, 4]), (SwinModel, "swin", [1, 2, 3, 4]), (Dinov2Model, "dinov2", [1, 2, 3, 4])],
)
def test_backbone_only_checkpoint_loads_the_backbone(model_class, kind, stages, tmp_path):
    torch.manual_seed(0)
    backbone_config = tiny_backbone(kind)
    backbone_config.out_features = None  # a backbone model's own config
    backbone_config.out_indices = None
    source = model_class(backbone_config)
    source.save_pretrained(tmp_path)
    model, description = build_model(
        model_name_or_path=str(tmp_path), model_preset=None, id2label=ID2LABEL, overrides=SMALL
    )
    assert isinstance(model, ProtoSegForSemanticSegmentation)
    assert model.config.backbone_config.out_indices == stages
    assert f"{model_class.__name__} checkpoint: Loaded the backbone from {tmp_path}" in description
    assert "new: decode_head, projection, prototypes" in description
    # Every backbone tensor is the saved model's (except the stage norms a backbone adds).
    saved = [tensor for tensor in source.state_dict().values()]
    for name, tensor in model.backbone.state_dict().items():
        if "hidden_states_norms" not in name and tensor.is_floating_point():
            assert any(t.shape == tensor.shape and torch.equal(t, tensor) for t in saved), name
    pixel_values = torch.randn(1, 3, 64, 64)
    if kind == "resnet":  # the same features
        with torch.no_grad():
            ours = model.backbone.eval()(pixel_values).feature_maps[-1]
            torch.testing.assert_close(ours, source.eval()(pixel_values).last_hidden_state)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(pixel_values).logits).all()


def test_our_checkpoint_keeps_prototypes_for_the_same_classes(tmp_path):
    torch.manual_seed(0)
    saved = ProtoSegForSemanticSegmentation(
        tiny_protoseg_config("resnet", num_labels=3, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()})
    )
    saved.save_pretrained(tmp_path)
    same, description = build_model(model_name_or_path=str(tmp_path), model_preset=None, id2label=ID2LABEL)
    assert description.startswith("ProtoSeg checkpoint") and torch.equal(same.prototypes, saved.prototypes)
    other, _ = build_model(model_name_or_path=str(tmp_path), model_preset=None, id2label={0: "a", 1: "b", 2: "c"})
    assert not torch.equal(other.prototypes, saved.prototypes)
    assert resume_config_problem(tmp_path, same.config) is None
    changed = tiny_protoseg_config(
        "swin", num_labels=3, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()}
    )
    assert "backbone_config" in resume_config_problem(tmp_path, changed)
    changed = tiny_protoseg_config(
        "resnet", num_labels=3, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()}, decoder_type="mlp"
    )
    assert "decoder_type upernet there, mlp now" in resume_config_problem(tmp_path, changed)


def test_unsupported_checkpoint_type_is_one_line(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=1, intermediate_size=8)
    ).save_pretrained(tmp_path)
    with pytest.raises(ModelInputError, match=r"holds a 'bert' model; expected .*upernet.*AutoBackbone") as error:
        build_model(model_name_or_path=str(tmp_path), model_preset=None, id2label=ID2LABEL)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "backbone,match",
    [
        ({"model_type": "resnet", "out_features": []}, "names no feature maps"),
        ({"model_type": "resnet", "out_indices": [7]}, r"backbone_config \(resnet\): out_indices must be valid"),
        ({"model_type": "bert"}, r"backbone_config \(bert\) is not the config of a model AutoBackbone builds"),
    ],
)
def test_bad_backbone_configs_are_one_line(backbone, match):
    with pytest.raises(ModelInputError, match=match) as error:
        build_model(
            model_name_or_path=None,
            model_preset="resnet-18",
            id2label=ID2LABEL,
            overrides={"backbone_config": backbone},
        )
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_bad_model_input_stops_train_py_before_anything_is_written(tmp_path):
    import subprocess
    import sys

    from train_helpers import REPO, clean_env

    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--model_preset", "resnet-18", "--config_overrides",
         'backbone_config={"model_type":"resnet","out_indices":[7]}', "--output_dir", str(out)],
        cwd=str(tmp_path), env=clean_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode != 0 and not out.exists()
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "out_indices must be valid indices" in errors[0]
