"""ProtoSegformerForSemanticSegmentation: training step, eval, parameter counts, checkpoints, bad input."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, tiny_config
from rounding import assert_argmax_up_to_ties
from safetensors import safe_open
from transformers import (
    SegformerConfig,
    SegformerForImageClassification,
    SegformerForSemanticSegmentation,
)

from proto_segformer import MIT_PRESETS, ProtoSegformerConfig, ProtoSegformerForSemanticSegmentation
from proto_segformer.modeling_proto_segformer import ProtoSegformerProjection
from proto_segformer.prototype_math import (
    l2_normalize,
    momentum_update,
    own_class_similarities,
    sinkhorn_assignments,
)


def make_batch(num_labels=5, batch=2, size=32, seed=0, ignore_rows=4):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, num_labels, (batch, size, size), generator=generator)
    labels[:, :ignore_rows] = 255
    return pixel_values, labels


def no_dropout_model(num_labels=5, **overrides):
    torch.manual_seed(0)
    config = tiny_config(num_labels, classifier_dropout_prob=0.0, drop_path_rate=0.0, **overrides)
    return ProtoSegformerForSemanticSegmentation(config)


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def test_presets_cover_b0_to_b5_with_paper_sizes():
    assert sorted(MIT_PRESETS) == [f"mit-b{i}" for i in range(6)]
    b0 = ProtoSegformerConfig.from_preset("mit-b0", num_labels=19)
    b2 = ProtoSegformerConfig.from_preset("b2")
    assert b0.hidden_sizes == [32, 64, 160, 256] and b0.decoder_hidden_size == 256 and b0.depths == [2, 2, 2, 2]
    assert b2.hidden_sizes == [64, 128, 320, 512] and b2.decoder_hidden_size == 768 and b2.depths == [3, 4, 6, 3]
    assert ProtoSegformerConfig.from_preset("mit-b5").depths == [3, 6, 40, 3]
    assert b0.model_type == "proto_segformer" and b0.num_labels == 19
    with pytest.raises(ValueError, match="Unknown MiT preset 'mit-b9'"):
        ProtoSegformerConfig.from_preset("mit-b9")


def test_config_defaults_follow_the_contract():
    config = ProtoSegformerConfig()
    assert config.num_prototypes_per_class == 10
    assert config.prototype_dim is None and config.embedding_dim == config.decoder_hidden_size
    assert (config.prototype_momentum, config.sinkhorn_epsilon, config.sinkhorn_iterations) == (0.999, 0.05, 3)
    assert (config.ppc_weight, config.ppd_weight, config.ppc_temperature) == (0.01, 0.001, 0.1)
    assert ProtoSegformerConfig(prototype_dim=48).embedding_dim == 48
    assert set(config.auto_map) == {"AutoConfig", "AutoModel", "AutoModelForSemanticSegmentation"}


@pytest.mark.parametrize(
    "field,value",
    [("num_prototypes_per_class", 0), ("prototype_momentum", 1.5), ("sinkhorn_epsilon", 0), ("ppc_temperature", -1)],
)
def test_config_rejects_bad_prototype_fields(field, value):
    with pytest.raises(ValueError, match=field):
        ProtoSegformerConfig(**{field: value})


SKIPPING_IDS = {**{index: f"class {index}" for index in range(10)}, 12: "class 12"}


def test_config_id2label_must_number_the_classes_0_to_k_minus_1():
    message = (
        "id2label in config.json must number its 11 classes 0..10 (one per prototype class), but it lacks id(s) 10"
        " and has extra id(s) 12. Renumber id2label (and label2id) as 0..10, in the order of the prototypes."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_config(num_labels=11, id2label=SKIPPING_IDS)
    with pytest.raises(ValueError, match=r"lacks id\(s\) 1 and has extra id\(s\) 2"):  # ids as JSON strings
        ProtoSegformerConfig.from_dict({"id2label": {"0": "a", "2": "b"}})
    # a config.json as every version wrote it (string ids 0..K-1) loads as before
    assert ProtoSegformerConfig.from_dict({"id2label": {"0": "a", "1": "b"}}).id2label == {0: "a", 1: "b"}


@pytest.mark.parametrize("name", ["sky\nblue", "tab\there", "nul\x00", "line\u2028break", "", "   "])
def test_config_refuses_empty_class_names_and_control_characters(name):
    message = rf"^Class name {re.escape(repr(name))} \(id 1\) in config.json's id2label (is empty|holds the)"
    with pytest.raises(ValueError, match=message):
        tiny_config(num_labels=2, id2label={0: "ground", 1: name})
    assert tiny_config(num_labels=2, id2label={0: "ground", 1: "sky (blue) é‍"}).num_labels == 2


RESOURCE_CASES = [
    ({"num_prototypes_per_class": 10**7}, "num_prototypes_per_class must be an integer in [1, 1000], got 10000000."),
    ({"num_prototypes_per_class": 1e7}, "num_prototypes_per_class must be an integer in [1, 1000], got 10000000.0."),
    ({"sinkhorn_iterations": 10**9}, "sinkhorn_iterations must be an integer in [0, 100], got 1000000000."),
    ({"inference_chunk_size": -1}, "inference_chunk_size must be an integer in [1, 2147483648], got -1."),
    ({"inference_chunk_size": 0}, "inference_chunk_size must be an integer in [1, 2147483648], got 0."),
    (
        {"decoder_hidden_size": 10**6},
        "over the 8 GiB limit; most of it is the decoder, (num_encoder_blocks*decoder_hidden_size)*decoder_hidden_size"
        " = 4000000*1000000 values (14,901.5 GiB). Lower the sizes in that product.",
    ),
    (
        {"num_labels": 100_000, "num_prototypes_per_class": 1000, "prototype_dim": 64},
        "over the 8 GiB limit; most of it is the prototype buffer K*M*D = 100000*1000*64 values (23.8 GiB).",
    ),
]


@pytest.mark.parametrize("fields,message", RESOURCE_CASES)
def test_config_refuses_sizes_beyond_the_resource_bounds(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_config(**fields)


def test_resource_bounds_hold_for_overrides_and_fields_set_after_the_config_was_built(tmp_path):
    no_dropout_model().save_pretrained(tmp_path)
    for load in (ProtoSegformerConfig.from_pretrained, ProtoSegformerForSemanticSegmentation.from_pretrained):
        with pytest.raises(ValueError, match=r"sinkhorn_iterations must be an integer in \[0, 100\]"):
            load(tmp_path, sinkhorn_iterations=10**9)
    config = tiny_config()
    config.num_prototypes_per_class = 5000
    with pytest.raises(ValueError, match=r"num_prototypes_per_class must be an integer in \[1, 1000\], got 5000"):
        ProtoSegformerForSemanticSegmentation(config)


def test_the_size_estimate_is_within_a_few_percent_of_the_model():
    from proto_segformer.configuration_proto_segformer import model_size_terms

    config = tiny_config(num_labels=19)
    model = ProtoSegformerForSemanticSegmentation(config)
    actual = sum(parameter.numel() for parameter in model.parameters()) + model.prototypes.numel()
    estimate = sum(values for _, values in model_size_terms(config))
    assert 0.9 < estimate / actual < 1.1


def test_model_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=1))


# ----------------------------------------------------------------------------------------------------------------
# Forward and training step


def test_prototypes_are_a_unit_persistent_buffer_not_a_parameter(tiny_model):
    names = dict(tiny_model.named_buffers())
    assert "prototypes" in names and names["prototypes"].shape == (5, 4, 32)
    assert "prototypes" in tiny_model.state_dict()
    assert all(p is not tiny_model.prototypes for p in tiny_model.parameters())
    torch.testing.assert_close(tiny_model.prototypes.norm(dim=-1), torch.ones(5, 4))


def test_inference_outputs_shapes_and_nearest_prototype_prediction(tiny_model):
    tiny_model.eval()
    pixel_values, _ = make_batch()
    before = tiny_model.prototypes.clone()
    out = tiny_model(pixel_values, output_pixel_embeddings=True, output_hidden_states=True)
    assert out.loss is None and out.logits.shape == (2, 5, 8, 8)
    assert out.pixel_embeddings.shape == (2, 32, 8, 8)
    torch.testing.assert_close(out.pixel_embeddings.norm(dim=1), torch.ones(2, 8, 8))
    assert len(out.hidden_states) == 4
    sims = torch.einsum("bdhw,kmd->bkmhw", out.pixel_embeddings, tiny_model.prototypes)
    assert_argmax_up_to_ties(out.logits.argmax(1), sims.amax(2), dim=1, atol=1e-5)  # the nearest prototype's class
    assert torch.equal(tiny_model.prototypes, before)
    assert tiny_model(pixel_values).pixel_embeddings is None
    assert isinstance(tiny_model(pixel_values, return_dict=False), tuple)


def test_training_step_losses_gradients_and_update_follow_the_contract():
    model = no_dropout_model()
    model.train()
    config = model.config
    pixel_values, labels = make_batch()
    before = model.prototypes.clone()
    out = model(pixel_values, labels=labels, output_pixel_embeddings=True)
    expected_loss = out.loss_ce + config.ppc_weight * out.loss_ppc + config.ppd_weight * out.loss_ppd
    torch.testing.assert_close(out.loss.detach(), expected_loss)
    assert all(torch.isfinite(t) for t in (out.loss, out.loss_ce, out.loss_ppc, out.loss_ppd))
    out.loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not [n for n in trainable if n.startswith(("projection", "decode_head.linear_fuse"))], trainable
    assert model.prototypes.grad is None

    # Recompute the update from the returned embeddings with the pure functions and the pre-update prototypes.
    pixels = out.pixel_embeddings.detach().permute(0, 2, 3, 1).reshape(-1, config.embedding_dim)
    small = torch.nn.functional.interpolate(labels[:, None].float(), size=(8, 8), mode="nearest").long().view(-1)
    valid = small != 255
    classes = small[valid]
    own = own_class_similarities(pixels[valid], classes, before)
    assignments = sinkhorn_assignments(own, classes, 5, config.sinkhorn_epsilon, config.sinkhorn_iterations)
    scores = torch.einsum("nd,kmd->nkm", pixels[valid], before).amax(-1)
    correct = scores.argmax(1) == classes
    assert 0 < int(correct.sum()) < len(classes)
    expected = momentum_update(before, pixels[valid][correct], (classes * 4 + assignments)[correct], 0.999)
    torch.testing.assert_close(model.prototypes, expected)
    assert not torch.equal(model.prototypes, before)
    torch.testing.assert_close(model.prototypes.norm(dim=-1), torch.ones(5, 4))
    # PPD with the pre-update prototypes
    assigned = own.gather(1, assignments[:, None]).squeeze(1)
    torch.testing.assert_close(out.loss_ppd, (1 - assigned).pow(2).mean(), rtol=1e-4, atol=1e-6)


def test_only_present_and_correctly_predicted_classes_update():
    model = no_dropout_model()
    model.train()
    pixel_values, labels = make_batch()
    labels[labels >= 2] = 255  # only classes 0 and 1 present
    before = model.prototypes.clone()
    model(pixel_values, labels=labels)
    assert torch.equal(model.prototypes[2:], before[2:])


def test_eval_mode_with_labels_gives_loss_but_never_updates(tiny_model):
    tiny_model.eval()
    pixel_values, labels = make_batch()
    before = tiny_model.prototypes.clone()
    out1 = tiny_model(pixel_values, labels=labels)
    out2 = tiny_model(pixel_values, labels=labels)
    assert torch.isfinite(out1.loss) and torch.equal(out1.loss, out2.loss)
    assert torch.equal(tiny_model.prototypes, before)
    torch.testing.assert_close(out1.logits, tiny_model(pixel_values).logits)


def test_all_ignored_labels_give_finite_loss_and_no_update(tiny_model):
    tiny_model.train()
    pixel_values, labels = make_batch()
    labels[:] = 255
    before = tiny_model.prototypes.clone()
    out = tiny_model(pixel_values, labels=labels)
    assert torch.isfinite(out.loss) and out.loss_ppc.item() == 0.0
    out.loss.backward()
    assert torch.equal(tiny_model.prototypes, before)


def test_learnable_parameter_count_does_not_depend_on_the_class_count():
    def learnable(num_labels):
        model = ProtoSegformerForSemanticSegmentation(ProtoSegformerConfig.from_preset("mit-b0", num_labels=num_labels))
        return sum(p.numel() for p in model.parameters() if p.requires_grad), model.prototypes.shape

    (count_19, shape_19), (count_847, shape_847) = learnable(19), learnable(847)
    assert count_19 == count_847
    assert shape_19 == (19, 10, 256) and shape_847 == (847, 10, 256)
    parametric = SegformerForSemanticSegmentation(
        SegformerConfig(**ProtoSegformerConfig.from_preset("mit-b0").to_dict())
    )
    # same encoder/decoder, minus the classifier, plus the projection (2 x 1x1 conv + LayerNorm at D = 256)
    projection = 256 * 256 + 256 + 256 * 256 + 256 + 2 * 256
    classifier = 256 * parametric.config.num_labels + parametric.config.num_labels
    assert count_19 == sum(p.numel() for p in parametric.parameters()) - classifier + projection


def test_bfloat16_autocast_training_step_is_finite_with_unit_prototypes():
    model = no_dropout_model()
    model.train()
    pixel_values, labels = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.prototypes.dtype == torch.float32 and torch.isfinite(model.prototypes).all()
    torch.testing.assert_close(model.prototypes.norm(dim=-1), torch.ones(5, 4))
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(pixel_values).logits).all()


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, and nothing updated


@pytest.mark.parametrize(
    "make_input,message",
    [
        (lambda x, y: (x[0], None), r"pixel_values must have shape \(batch_size, 3, height, width\)"),
        (lambda x, y: (x[:, :1], None), r"pixel_values must have shape \(batch_size, 3"),
        (lambda x, y: ((x * 100).long(), None), "must be a floating-point tensor"),
        (lambda x, y: (x.numpy(), None), "pixel_values must be a torch.Tensor"),
        (lambda x, y: (x.index_fill(2, torch.tensor([3]), float("nan")), None), "NaN or inf"),
        (lambda x, y: (x.index_fill(3, torch.tensor([1]), float("inf")), None), "NaN or inf"),
        (
            lambda x, y: (x, y.masked_fill(y == 3, 7)),
            r"labels contain values 7 that are neither a class index in \[0, 4\]",
        ),
        (lambda x, y: (x, y.masked_fill(y == 3, -1)), "labels contain values -1"),
        (lambda x, y: (x, y[:, :16]), r"labels must have shape \(batch_size, height, width\) = \(2, 32, 32\)"),
        (lambda x, y: (x, y.float()), "labels must be an integer tensor"),
        (lambda x, y: (x, y[:1]), r"= \(2, 32, 32\)"),
    ],
)
def test_bad_input_gets_a_clear_error_and_nothing_changes(tiny_model, make_input, message):
    tiny_model.train()
    pixel_values, labels = make_batch()
    state = copy.deepcopy(tiny_model.state_dict())
    bad_pixels, bad_labels = make_input(pixel_values, labels)
    with pytest.raises((ValueError, TypeError), match=message):
        tiny_model(bad_pixels, labels=bad_labels if bad_labels is not None else labels)
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_images_too_small_for_the_encoder_are_a_clear_error(tiny_model):
    assert tiny_model.min_input_size == 29  # stage 1 (stride 4) must keep >= sr_ratio 8 cells
    tiny_model(torch.randn(1, 3, 29, 29))
    with pytest.raises(ValueError, match=r"height and width must be at least 29\), got \(1, 3, 32, 24\)"):
        tiny_model(torch.randn(1, 3, 32, 24))


def test_reduce_labels_hint_when_labels_start_at_one(tiny_model):
    pixel_values, labels = make_batch()
    with pytest.raises(ValueError, match="reduce_labels"):
        tiny_model(pixel_values, labels=labels + 1)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def trained_tiny_model(steps=2):
    model = no_dropout_model()
    model.train()
    for seed in range(steps):
        model(*make_batch(seed=seed)[:1], labels=make_batch(seed=seed)[1])
    return model.eval()


def test_save_load_round_trip_keeps_prototypes_and_logits(tmp_path):
    model = trained_tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor("prototypes"), model.prototypes)
    assert any(k.startswith("decode_head.linear_c.") for k in keys)  # SegFormer's on-disk layout
    assert not any("classifier" in k for k in keys)
    for name in ("config.json", "modeling_proto_segformer.py", "configuration_proto_segformer.py", "prototype_math.py"):
        assert (tmp_path / name).exists(), name
    reloaded = ProtoSegformerForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.prototypes, model.prototypes)  # never re-initialised on load
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    pixel_values, _ = make_batch(seed=9)
    assert torch.equal(reloaded(pixel_values).logits, model(pixel_values).logits)


def test_checkpoint_with_a_different_class_count_is_a_clear_error(tmp_path):
    trained_tiny_model(1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has prototypes for 5 classes, but the model was asked for 9 classes"):
        ProtoSegformerForSemanticSegmentation.from_pretrained(tmp_path, num_labels=9)
    model = ProtoSegformerForSemanticSegmentation.from_pretrained(tmp_path, num_labels=9, ignore_mismatched_sizes=True)
    assert model.prototypes.shape == (9, 4, 32)
    torch.testing.assert_close(model.prototypes.norm(dim=-1), torch.ones(9, 4))


def parametric_config(num_labels=7):
    return SegformerConfig(num_labels=num_labels, **TINY)


def test_parametric_segformer_checkpoint_loads_every_encoder_and_decoder_weight(tmp_path):
    torch.manual_seed(1)
    parametric = SegformerForSemanticSegmentation(parametric_config())
    parametric.save_pretrained(tmp_path)
    model = ProtoSegformerForSemanticSegmentation.from_pretrained(tmp_path, num_prototypes_per_class=3)
    source, loaded = parametric.state_dict(), model.state_dict()
    carried = [k for k in source if not k.startswith("decode_head.classifier")]
    assert len(carried) == len(source) - 2
    for name in carried:
        assert torch.equal(loaded[name], source[name]), name
    assert not any("classifier" in k for k in loaded)
    assert model.prototypes.shape == (7, 3, 32)
    torch.testing.assert_close(model.prototypes.norm(dim=-1), torch.ones(7, 3))
    assert model.config.model_type == "proto_segformer"


def test_mit_backbone_checkpoint_loads_the_encoder(tmp_path):
    torch.manual_seed(2)
    backbone = SegformerForImageClassification(parametric_config(num_labels=3))
    backbone.save_pretrained(tmp_path)
    model = ProtoSegformerForSemanticSegmentation.from_pretrained(tmp_path, num_labels=6)
    source, loaded = backbone.state_dict(), model.state_dict()
    encoder = [k for k in source if k.startswith("segformer.")]
    assert encoder and all(torch.equal(loaded[k], source[k]) for k in encoder)
    assert model.prototypes.shape[0] == 6


def test_in_memory_parametric_weights_load_with_load_state_dict():
    torch.manual_seed(3)
    parametric = SegformerForSemanticSegmentation(parametric_config())
    model = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=7))
    result = model.load_state_dict(parametric.state_dict(), strict=False)
    assert set(result.unexpected_keys) == {"decode_head.classifier.weight", "decode_head.classifier.bias"}
    assert all(k.startswith(("projection.", "prototypes")) for k in result.missing_keys)


def test_projection_equals_its_convolution_reference():
    torch.manual_seed(8)
    projection = ProtoSegformerProjection(tiny_config(prototype_dim=12)).double()
    hidden = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    reference = projection.conv2(F.relu(projection.conv1(hidden)))
    reference = l2_normalize(projection.layer_norm(reference.permute(0, 2, 3, 1)), dim=-1).permute(0, 3, 1, 2)
    out = projection(hidden)
    assert out.shape == (2, 12, 5, 7)
    torch.testing.assert_close(out, reference)
