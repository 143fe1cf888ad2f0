"""config.class_score_normalization: LayerNorm over classes (the contract's default) or a fixed temperature."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from proto_segformer import ProtoSegformerConfig, ProtoSegformerForSemanticSegmentation
from proto_segformer.prototype_math import class_scores, normalize_class_scores


def model_with(**overrides) -> ProtoSegformerForSemanticSegmentation:
    torch.manual_seed(0)
    config = tiny_config(5, classifier_dropout_prob=0.0, drop_path_rate=0.0, **overrides)
    return ProtoSegformerForSemanticSegmentation(config).eval()


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 5, (2, 32, 32), generator=generator)
    return pixel_values, labels


def test_default_is_the_contracts_layer_norm():
    config = ProtoSegformerConfig()
    assert config.class_score_normalization == "layer_norm" and config.class_score_temperature == 0.1
    model = model_with()
    pixel_values, _ = batch()
    with torch.no_grad():
        embeddings, _ = model.embed_pixels(pixel_values)
        expected = normalize_class_scores(class_scores(embeddings, model.prototypes), dim=1)
        torch.testing.assert_close(model(pixel_values).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_temperature_divides_the_class_scores_in_eval_and_training(temperature):
    model = model_with(class_score_normalization="temperature", class_score_temperature=temperature)
    layer_norm = model_with()
    pixel_values, labels = batch()
    with torch.no_grad():
        embeddings, _ = model.embed_pixels(pixel_values)
        scores = class_scores(embeddings, model.prototypes)
        logits = model(pixel_values).logits
        torch.testing.assert_close(logits, scores / temperature, atol=1e-5, rtol=1e-5)
        # Same weights and prototypes: the prediction (argmax) is the same as with LayerNorm.
        assert torch.equal(logits.argmax(1), layer_norm(pixel_values).logits.argmax(1))
        # With labels (eval mode: no update) the logits and the cross-entropy use the same normalisation.
        output = model(pixel_values, labels=labels)
        torch.testing.assert_close(output.logits, scores / temperature, atol=1e-5, rtol=1e-5)
        upsampled = torch.nn.functional.interpolate(output.logits, size=(32, 32), mode="bilinear")
        torch.testing.assert_close(output.loss_ce, torch.nn.functional.cross_entropy(upsampled, labels))


def test_temperature_changes_the_loss_but_not_the_prototype_update():
    temperature, layer_norm = model_with(class_score_normalization="temperature"), model_with()
    pixel_values, labels = batch(1)
    outputs = []
    for model in (temperature, layer_norm):
        model.train()
        outputs.append(model(pixel_values, labels=labels))
        outputs[-1].loss.backward()
        assert torch.isfinite(outputs[-1].loss)
    # The update uses the argmax of the scores (which pixels are right) and the Sinkhorn plan: both independent of
    # how the scores are normalised. The cross-entropy is not.
    torch.testing.assert_close(temperature.prototypes, layer_norm.prototypes)
    assert not torch.equal(temperature.prototypes, model_with().prototypes)
    assert not torch.isclose(outputs[0].loss_ce, outputs[1].loss_ce)
    torch.testing.assert_close(outputs[0].loss_ppc, outputs[1].loss_ppc)


def test_the_option_survives_save_and_load(tmp_path):
    model = model_with(class_score_normalization="temperature", class_score_temperature=0.2)
    model.save_pretrained(tmp_path)
    loaded = ProtoSegformerForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert loaded.config.class_score_normalization == "temperature"
    assert loaded.config.class_score_temperature == 0.2
    pixel_values, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"class_score_normalization": "softmax"}, r"class_score_normalization must be one of .*'softmax'"),
        ({"class_score_temperature": 0.0}, "class_score_temperature must be > 0, got 0.0"),
    ],
)
def test_bad_values_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ProtoSegformerConfig(**overrides)
