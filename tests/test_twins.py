"""benchmarks/twins.py: the parametric twin of a ProtoSeg model (UperNet for a backbone model, SegFormer for MiT)
shares every tensor but the heads' own, and both harnesses build their pairs through it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from protoseg_helpers import tiny_protoseg_config
from transformers import SegformerForSemanticSegmentation, UperNetForSemanticSegmentation

from benchmarks import speed, twins
from benchmarks.arguments import QualityArguments, SpeedArguments
from benchmarks.run_quality import QualityInputError, build_settings, default_output
from proto_segformer import ProtoSegformerForSemanticSegmentation, ProtoSegForSemanticSegmentation

PROTOSEG_ONLY = [
    "projection.conv1.bias",
    "projection.conv1.weight",
    "projection.conv2.bias",
    "projection.conv2.weight",
    "projection.layer_norm.bias",
    "projection.layer_norm.weight",
    "prototypes",
]
PARAMETRIC_ONLY = ["decode_head.classifier.bias", "decode_head.classifier.weight"]


def assert_twins(parametric: torch.nn.Module, protoseg: torch.nn.Module) -> None:
    """Same shared names and values; the classifier against the projection + prototypes is the only difference."""
    p_state, q_state = parametric.state_dict(), protoseg.state_dict()
    shared = twins.shared_parameter_names(p_state, "parametric")
    assert shared == twins.shared_parameter_names(q_state, "protoseg")
    for name in shared:
        assert torch.equal(p_state[name], q_state[name]), name
    assert twins.own_parameter_names(p_state, "parametric") == PARAMETRIC_ONLY
    assert twins.own_parameter_names(q_state, "protoseg") == PROTOSEG_ONLY
    assert twins.shared_weights_fingerprint(parametric, "parametric") == twins.shared_weights_fingerprint(
        protoseg, "protoseg"
    )


@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_upernet_twin_of_a_backbone_model_shares_backbone_and_decoder(kind):
    torch.manual_seed(0)
    protoseg = ProtoSegForSemanticSegmentation(tiny_protoseg_config(kind, num_labels=5))
    parametric = twins.twin_pair(protoseg, seed=3)
    assert isinstance(parametric, UperNetForSemanticSegmentation)
    assert parametric.auxiliary_head is None
    shared = twins.shared_parameter_names(parametric.state_dict(), "parametric")
    assert any(name.startswith("backbone.") for name in shared)
    assert "decode_head.fpn_bottleneck.batch_norm.running_mean" in shared
    assert_twins(parametric, protoseg)
    config = parametric.config
    assert config.backbone_config.to_dict() == protoseg.config.backbone_config.to_dict()
    assert (config.hidden_size, list(config.pool_scales)) == (16, protoseg.config.pool_scales)
    assert config.id2label == protoseg.config.id2label and config.num_labels == 5
    assert config.loss_ignore_index == config.semantic_loss_ignore_index == 255
    # The classifier is C x K, the projection C x C + C x D (C = 16, D = 8, K = 5).
    assert parametric.decode_head.classifier.weight.shape == (5, 16, 1, 1)
    assert protoseg.projection.conv2.weight.shape == (8, 16, 1, 1)
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    for model in (parametric, protoseg):
        outputs = model(pixel_values=pixel_values, labels=labels)
        assert torch.isfinite(outputs.loss) and outputs.logits.shape[:2] == (2, 5)


def test_twin_pair_depends_on_the_seed_and_builds_the_same_for_the_same_seed():
    fingerprints = []
    for seed in (1, 1, 2):
        torch.manual_seed(100 + len(fingerprints))  # the global state must not matter
        protoseg = ProtoSegForSemanticSegmentation(tiny_protoseg_config("resnet"))
        fingerprints.append(twins.shared_weights_fingerprint(twins.twin_pair(protoseg, seed), "parametric"))
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_segformer_twin_of_a_mit_model():
    config = tiny_config(num_labels=4, decoder_hidden_size=16, prototype_dim=8, num_prototypes_per_class=3)
    protoseg = ProtoSegformerForSemanticSegmentation(config)
    parametric = twins.twin_pair(protoseg, seed=0)
    assert isinstance(parametric, SegformerForSemanticSegmentation)
    assert parametric.config.hidden_sizes == [8, 16, 24, 32] and parametric.config.num_labels == 4
    assert_twins(parametric, protoseg)


def test_mlp_decoder_has_no_twin():
    protoseg = ProtoSegForSemanticSegmentation(tiny_protoseg_config("resnet", decoder_type="mlp"))
    with pytest.raises(ValueError, match="decoder_type='mlp' has no parametric twin in transformers"):
        twins.twin_pair(protoseg, seed=0)


def test_speed_harness_builds_backbone_presets_as_twins():
    setting = speed.Setting(preset="resnet-18", num_labels=19, device="cpu", num_prototypes_per_class=2)
    models = speed.build_models(setting)
    assert isinstance(models["parametric"], UperNetForSemanticSegmentation)
    assert isinstance(models["protoseg"], ProtoSegForSemanticSegmentation)
    assert models["protoseg"].prototypes.shape == (19, 2, 512)
    assert_twins(models["parametric"], models["protoseg"])
    assert speed.head_flops(setting)["classifier_macs"] == 128 * 128 * 19 * 512


def test_speed_arguments_take_backbone_presets_and_name_every_preset_for_a_bad_one():
    assert SpeedArguments(presets=["resnet-18", "swin-tiny", "mit-b0"]).presets == ["resnet-18", "swin-tiny", "mit-b0"]
    with pytest.raises(ValueError, match=r"Unknown preset 'resnet-7'.*mit-b0 \.\. mit-b5.*resnet-18, resnet-50"):
        SpeedArguments(presets=["resnet-7"])


def test_quality_model_preset_goes_to_both_heads_options_and_names_the_output():
    settings, _ = build_settings(
        QualityArguments(quick=True, device="cpu", model_preset="swin-tiny", train_options="max_steps=5")
    )
    assert settings.train_options["model_preset"] == "swin-tiny" and settings.train_options["max_steps"] == 5
    assert default_output(settings).name == "quality_quick_swin-tiny.json"
    for arguments, message in (
        ({"model_preset": "resnet-7"}, "Unknown --model_preset 'resnet-7'"),
        ({"model_preset": "resnet-18", "train_options": "decoder_type=mlp"}, "has no parametric twin"),
        ({"model_preset": "resnet-18", "train_options": "model_preset=swin-tiny"}, "exclude each other"),
    ):
        with pytest.raises(QualityInputError, match=message):
            build_settings(QualityArguments(quick=True, device="cpu", **arguments))
