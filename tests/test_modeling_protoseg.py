"""ProtoSegForSemanticSegmentation: ProtoSeg on transformers backbones (tiny random ResNet, Swin, ConvNeXt, DINOv2,
timm's HRNet), both decoders, the shared head, checkpoints and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from protoseg_helpers import run_with_timm, tiny_backbone, tiny_protoseg_config
from transformers import AutoConfig, ResNetConfig

from proto_segformer import BACKBONE_PRESETS, ProtoSegConfig, ProtoSegForSemanticSegmentation
from proto_segformer.configuration_protoseg import backbone_preset
from proto_segformer.modeling_protoseg import ProtoSegUperNetDecoder
from proto_segformer.prototype_head import ProtoSegformerDecodeHead, PrototypeHeadMixin


def batch(num_labels=5, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, size, size, generator=generator)
    labels = torch.randint(0, num_labels, (2, size, size), generator=generator)
    labels[:, :4] = 255
    return pixel_values, labels


# Backbone, decoder, expected output stride (the first feature map's).
CASES = [
    ("resnet", "upernet", 4),
    ("resnet", "mlp", 4),
    ("swin", "upernet", 4),
    ("convnext", "mlp", 4),
    ("dinov2", "upernet", 8),
]


@pytest.mark.parametrize("kind,decoder,stride", CASES)
def test_training_step_eval_and_reload_on_each_backbone(kind, decoder, stride, tmp_path):
    torch.manual_seed(0)
    model = ProtoSegForSemanticSegmentation(tiny_protoseg_config(kind, decoder_type=decoder))
    assert isinstance(model, PrototypeHeadMixin)
    expected_decoder = ProtoSegUperNetDecoder if decoder == "upernet" else ProtoSegformerDecodeHead
    assert isinstance(model.decode_head, expected_decoder)
    pixel_values, labels = batch()
    before = model.prototypes.clone()
    model.train()
    out = model(pixel_values, labels=labels)
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    torch.testing.assert_close(out.loss, out.loss_ce + 0.01 * out.loss_ppc + 0.001 * out.loss_ppd)
    out.loss.backward()
    assert model.decode_head.parameters().__next__().grad is not None
    assert not torch.equal(model.prototypes, before)  # the momentum update ran
    torch.testing.assert_close(model.prototypes.norm(dim=-1), torch.ones(5, 3), atol=1e-5, rtol=0)

    model.eval()
    with torch.no_grad():
        logits = model(pixel_values, output_pixel_embeddings=True, output_hidden_states=True)
    assert logits.logits.shape == (2, 5, 64 // stride, 64 // stride)
    assert logits.pixel_embeddings.shape == (2, 8, 64 // stride, 64 // stride)
    assert len(logits.hidden_states) == 4  # the backbone's feature maps

    model.save_pretrained(tmp_path)
    reloaded = ProtoSegForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert reloaded.config.backbone_config.model_type == model.config.backbone_config.model_type
    assert torch.equal(reloaded.prototypes, model.prototypes)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    with torch.no_grad():  # the same values (a ViT may reload with another attention kernel: rounding only)
        torch.testing.assert_close(reloaded(pixel_values).logits, logits.logits, rtol=1e-5, atol=1e-5)


def test_hrnet_through_timm(tmp_path):
    """HRNet-W18 from timm (`TimmBackbone`): a training step, eval at stride 4, save and reload to the same logits."""
    result = run_with_timm(
        f"""
        import json, torch
        import protoseg_helpers
        from proto_segformer import ProtoSegForSemanticSegmentation
        torch.manual_seed(0)
        model = ProtoSegForSemanticSegmentation(protoseg_helpers.tiny_protoseg_config("hrnet"))
        pixel_values = torch.randn(2, 3, 64, 64)
        labels = torch.randint(0, 5, (2, 64, 64))
        before = model.prototypes.clone()
        loss = model.train()(pixel_values, labels=labels).loss
        with torch.no_grad():
            logits = model.eval()(pixel_values).logits
        model.save_pretrained({str(tmp_path)!r})
        reloaded = ProtoSegForSemanticSegmentation.from_pretrained({str(tmp_path)!r}).eval()
        with torch.no_grad():
            same = torch.equal(reloaded(pixel_values).logits, logits)
        print(json.dumps({{"backbone": type(model.backbone).__name__, "loss": float(loss),
                           "updated": not torch.equal(before, model.prototypes),
                           "shape": list(logits.shape), "same": same}}))
        """,
        cwd=Path(__file__).parent,
    )
    assert result["backbone"] == "TimmBackbone" and math.isfinite(result["loss"]) and result["updated"]
    assert result["shape"] == [2, 5, 16, 16] and result["same"]


def test_missing_timm_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(
        ImportError, match=r"timm model and timm is not installed: pip install 'proto_segformer\[timm\]'"
    ):
        ProtoSegForSemanticSegmentation(tiny_protoseg_config("hrnet"))


def test_the_head_is_one_implementation():
    from proto_segformer import ProtoSegformerForSemanticSegmentation

    for name in ("forward", "_train_head", "add_classes", "check_finite", "from_pretrained", "save_pretrained"):
        ours, theirs = (
            getattr(cls, name) for cls in (ProtoSegForSemanticSegmentation, ProtoSegformerForSemanticSegmentation)
        )
        assert getattr(ours, "__func__", ours) is getattr(theirs, "__func__", theirs), name


def test_config_round_trips_through_json_and_auto_config(tmp_path):
    config = tiny_protoseg_config("swin", decoder_type="mlp", id2label={i: f"c{i}" for i in range(5)})
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "ProtoSegConfig" and loaded.model_type == "protoseg"
    assert loaded.backbone_config.to_dict() == config.backbone_config.to_dict()
    assert (loaded.decoder_type, loaded.embedding_dim, loaded.num_labels) == ("mlp", 8, 5)
    assert config.auto_map["AutoModelForSemanticSegmentation"] == "modeling_protoseg.ProtoSegForSemanticSegmentation"
    default = ProtoSegConfig()
    assert default.backbone_config.model_type == "resnet" and default.decoder_type == "upernet"
    assert (default.num_prototypes_per_class, default.prototype_momentum, default.ppc_weight) == (10, 0.999, 0.01)


def test_presets_build_configs_offline():
    assert {"resnet-18", "resnet-50", "swin-tiny", "convnext-tiny", "dinov2-small", "hrnet-w18", "hrnet-w48"} <= set(
        BACKBONE_PRESETS
    )
    r50 = ProtoSegConfig.from_preset("resnet-50", num_labels=19)
    assert r50.backbone_config.hidden_sizes == [256, 512, 1024, 2048] and r50.backbone_config.depths == [3, 4, 6, 3]
    assert r50.backbone_config.out_features == ["stage1", "stage2", "stage3", "stage4"]
    assert (r50.decoder_type, r50.decoder_hidden_size, r50.num_labels) == ("upernet", 512, 19)
    assert backbone_preset("swin_tiny").depths == [2, 2, 6, 2]
    assert backbone_preset("dinov2-small").out_indices == [3, 6, 9, 12]
    assert backbone_preset("hrnet-w48").backbone == "hrnet_w48"
    # Each call is a fresh config: changing one never changes the table.
    backbone_preset("resnet-18").depths[0] = 99
    assert backbone_preset("resnet-18").depths == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="Unknown backbone preset 'resnet-9'"):
        backbone_preset("resnet-9")


def test_resnet_18_preset_builds_and_runs():
    torch.manual_seed(0)
    model = ProtoSegForSemanticSegmentation(
        ProtoSegConfig.from_preset("resnet-18", num_labels=3, decoder_hidden_size=32, num_prototypes_per_class=2)
    ).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).logits.shape == (1, 3, 16, 16)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one clear line each


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"backbone_config": ResNetConfig(out_features=[])}, r"names no feature maps.*out_indices"),
        ({"backbone_config": {"model_type": "resnet", "out_indices": [7]}}, r"backbone_config \(resnet\).*out_indices"),
        ({"backbone_config": {"model_type": "no-such-model"}}, r"model_type 'no-such-model'"),
        ({"decoder_type": "fcn"}, r"decoder_type must be one of \('upernet', 'mlp'\)"),
        ({"pool_scales": []}, "pool_scales"),
        ({"num_prototypes_per_class": 0}, "num_prototypes_per_class"),
        ({"num_prototypes_per_class": 1000, "prototype_dim": 10**6}, "GiB"),
    ],
)
def test_bad_configs_are_one_line_errors(fields, match):
    with pytest.raises(ValueError, match=match) as error:
        tiny_protoseg_config(**fields)
    assert "\n" not in str(error.value)


def test_a_config_that_is_no_backbone_is_one_line():
    from transformers import BertConfig

    config = tiny_protoseg_config()
    config.backbone_config = BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=1)
    for build in (lambda: ProtoSegForSemanticSegmentation(config), lambda: ProtoSegConfig(**config.to_dict())):
        with pytest.raises(
            ValueError, match=r"backbone_config \(bert\) is not the config of a model AutoBackbone"
        ) as error:
            build()
        assert "\n" not in str(error.value) and "resnet, " in str(error.value)


def test_bad_pixel_values_name_the_backbone():
    model = ProtoSegForSemanticSegmentation(tiny_protoseg_config("dinov2")).eval()
    assert model.min_input_size == 8
    with pytest.raises(ValueError, match="too small for this backbone"):
        model(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(batch_size, 3, height, width\)"):
        model(torch.randn(1, 1, 64, 64))


def test_missing_prototypes_in_a_checkpoint_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = ProtoSegForSemanticSegmentation(tiny_protoseg_config())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["prototypes"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has no 'prototypes' tensor.*ProtoSegForSemanticSegmentation.*'upernet'"):
        ProtoSegForSemanticSegmentation.from_pretrained(tmp_path)


def test_tiny_backbones_differ():
    assert {tiny_backbone(kind).model_type for kind in ("resnet", "swin", "convnext", "dinov2")} == {
        "resnet",
        "swin",
        "convnext",
        "dinov2",
    }
