"""The blocked inference head (`blocked_prototype_logits`, its measured block shapes) and the bfloat16 similarity
option, against the plain composition `normalize_class_scores(class_scores(...))`."""

from __future__ import annotations

import math
import time

import pytest
import torch
from conftest import require_extra, tiny_config
from rounding import assert_argmax_up_to_ties

from proto_segformer import ProtoSegformerConfig, ProtoSegformerForSemanticSegmentation
from proto_segformer import prototypes as P
from proto_segformer.prototypes import (
    blocked_prototype_logits,
    class_scores,
    head_block_shape,
    l2_normalize,
    normalize_class_scores,
    prototype_logits,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_block_measurements(monkeypatch):
    monkeypatch.setattr(P, "_measured_head_blocks", {})
    monkeypatch.delenv(P.HEAD_BLOCKS_ENV, raising=False)


def embedding_map(batch, height, width, dim, seed, dtype=torch.float32, channels_last=True) -> torch.Tensor:
    """Unit embeddings (B, D, h, w); channels-last in memory as the projection returns them, or contiguous."""
    values = l2_normalize(torch.randn(batch, height, width, dim, generator=torch.Generator().manual_seed(seed)))
    values = values.to(dtype).permute(0, 3, 1, 2)
    return values if channels_last else values.contiguous()


def unit_prototypes(classes, count, dim, seed, dtype=torch.float32) -> torch.Tensor:
    return l2_normalize(torch.randn(classes, count, dim, generator=torch.Generator().manual_seed(seed))).to(dtype)


def plain_logits(embeddings, prototypes):
    return normalize_class_scores(class_scores(embeddings, prototypes), dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Blocked head == plain composition


@pytest.mark.parametrize("classes", [19, 150, 847])
@pytest.mark.parametrize(
    ("block_shape", "height", "width", "channels_last"),
    [
        ((1024, 256), 17, 13, True),  # default shape, odd sizes: one pixel block, classes in blocks of 256 (+ rest)
        ((37, 29), 17, 13, True),  # blocks that divide neither the pixels nor the classes
        ((1, 1), 3, 5, True),  # one pixel and one class per block
        ((64, 10**6), 9, 11, False),  # all classes in one block; contiguous (not channels-last) embeddings
    ],
)
def test_blocked_head_equals_the_plain_composition_float32(classes, block_shape, height, width, channels_last):
    embeddings = embedding_map(2, height, width, 32, seed=classes, channels_last=channels_last)
    prototypes = unit_prototypes(classes, 10 if classes < 847 else 3, 32, seed=1)
    expected = plain_logits(embeddings, prototypes)
    with torch.no_grad():
        blocked = prototype_logits(embeddings, prototypes, block_shape=block_shape)
    assert blocked.shape == expected.shape and blocked.dtype == torch.float32 and blocked.is_contiguous()
    torch.testing.assert_close(blocked, expected, atol=2e-5, rtol=1e-5)
    assert_argmax_up_to_ties(blocked.argmax(dim=1), class_scores(embeddings, prototypes), dim=1, atol=1e-5)


def test_blocked_head_equals_the_plain_composition_float64_and_every_block_shape_agrees():
    embeddings = embedding_map(1, 7, 9, 16, seed=3, dtype=torch.float64)
    prototypes = unit_prototypes(23, 4, 16, seed=4, dtype=torch.float64)
    expected = plain_logits(embeddings, prototypes)
    for rows, classes in [(1, 1), (5, 3), (63, 23), (64, 24), (1000, 7)]:
        result = blocked_prototype_logits(embeddings, prototypes, rows, classes, torch.float64, torch.float64)
        torch.testing.assert_close(
            result, expected, atol=1e-12, rtol=1e-12, msg=lambda m, s=(rows, classes): f"{s}: {m}"
        )


def test_chunk_size_bounds_the_similarities_held_at_once():
    # A block holds at most chunk_size pixel-by-prototype scores, whatever shape was measured or pinned.
    for chunk_size, block in [(1, (1024, 256)), (847 * 10 * 7, (1024, 847)), (10 * 5 * 3, (1024, 64)), (None, (7, 9))]:
        rows, classes = P._bounded_block_shape(block, num_classes=847, num_prototypes=10, chunk_size=chunk_size)
        assert rows >= 1 and 1 <= classes <= 847
        if chunk_size is not None:
            assert rows * classes * 10 <= max(chunk_size, 10), (chunk_size, rows, classes)
        else:
            assert (rows, classes) == block
    embeddings = embedding_map(1, 6, 5, 8, seed=5)
    prototypes = unit_prototypes(13, 4, 8, seed=6)
    with torch.no_grad():
        bounded = prototype_logits(embeddings, prototypes, chunk_size=4 * 3 * 2)
    torch.testing.assert_close(bounded, plain_logits(embeddings, prototypes), atol=2e-5, rtol=1e-5)


def test_autocast_keeps_the_plain_paths_dtypes():
    embeddings = embedding_map(1, 8, 8, 16, seed=7)
    prototypes = unit_prototypes(19, 10, 16, seed=8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        blocked = prototype_logits(embeddings, prototypes, block_shape=(16, 8))
        expected = plain_logits(embeddings, prototypes)
    assert blocked.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(blocked.float(), expected.float(), atol=0.05, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Block shapes: measured once per process and key, pinned by the environment, never a result change


def test_small_heads_use_the_default_block_without_measuring(monkeypatch):
    monkeypatch.setattr(P, "_measure_head_blocks", lambda *a, **k: pytest.fail("measured a tiny head"))
    embeddings, prototypes = embedding_map(1, 8, 8, 16, seed=9), unit_prototypes(19, 10, 16, seed=10)
    assert head_block_shape(embeddings, prototypes, torch.float32, torch.float32) == P.DEFAULT_HEAD_BLOCK


def test_large_heads_are_measured_once_per_key_and_the_choice_is_a_candidate(monkeypatch):
    monkeypatch.setattr(P, "HEAD_TUNING_MIN_MACS", 1)
    calls = []
    measure = P._measure_head_blocks
    monkeypatch.setattr(P, "_measure_head_blocks", lambda *a, **k: calls.append(1) or measure(*a, **k))
    embeddings, prototypes = embedding_map(1, 40, 40, 16, seed=11), unit_prototypes(300, 2, 16, seed=12)
    first = head_block_shape(embeddings, prototypes, torch.float32, torch.float32)
    second = head_block_shape(embeddings, prototypes, torch.float32, torch.float32)
    assert first == second and len(calls) == 1
    candidates = {(rows, classes or 300) for rows in P.HEAD_BLOCK_ROWS for classes in P.HEAD_BLOCK_CLASSES}
    assert first in candidates | {P.DEFAULT_HEAD_BLOCK}
    key = ("cpu", 16, 300, 2, torch.float32, 1)
    assert P.measured_head_blocks() == {key: first}
    head_block_shape(
        embedding_map(1, 40, 40, 16, seed=13), unit_prototypes(301, 2, 16, seed=12), torch.float32, torch.float32
    )
    assert len(calls) == 2  # another class count is another key


def test_a_shape_that_changes_any_bit_is_never_chosen(monkeypatch):
    # Make every other shape faster than the default but give it different bits: the default must still win.
    monkeypatch.setattr(P, "HEAD_TUNING_MIN_MACS", 1)
    real = P.blocked_prototype_logits

    def perturbed(embeddings, prototypes, rows, classes, *args):
        result = real(embeddings, prototypes, rows, classes, *args)
        if (rows, classes) == P.DEFAULT_HEAD_BLOCK:  # the probe has more pixels and classes than the default block
            time.sleep(0.02)
            return result
        return torch.nextafter(result, torch.full_like(result, math.inf))

    monkeypatch.setattr(P, "blocked_prototype_logits", perturbed)
    embeddings, prototypes = embedding_map(1, 40, 40, 16, seed=14), unit_prototypes(300, 2, 16, seed=15)
    assert head_block_shape(embeddings, prototypes, torch.float32, torch.float32) == P.DEFAULT_HEAD_BLOCK


def test_the_environment_pins_the_block_shape_and_a_bad_value_names_the_variable(monkeypatch):
    embeddings, prototypes = embedding_map(1, 8, 8, 16, seed=16), unit_prototypes(19, 10, 16, seed=17)
    monkeypatch.setenv(P.HEAD_BLOCKS_ENV, "48,7")
    assert head_block_shape(embeddings, prototypes, torch.float32, torch.float32) == (48, 7)
    with torch.no_grad():
        torch.testing.assert_close(prototype_logits(embeddings, prototypes), plain_logits(embeddings, prototypes))
    for bad in ("48", "a,b", "0,7", "48,7,1"):
        monkeypatch.setenv(P.HEAD_BLOCKS_ENV, bad)
        with pytest.raises(ValueError, match=P.HEAD_BLOCKS_ENV):
            head_block_shape(embeddings, prototypes, torch.float32, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# bfloat16 similarities: the stated agreement


# Unit vectors rounded to bfloat16 (relative error <= 2^-9 per element) give a cosine within 2 * 2^-9 of the float32
# one (Cauchy-Schwarz), and the bf16 product adds one more rounding of <= 2^-9: |S_bf16 - S_fp32| <= 3 * 2^-9.
BF16_SCORE_BOUND = 3 * 2**-9


@pytest.mark.parametrize("classes", [19, 150, 847])
def test_bfloat16_similarity_stays_within_its_stated_bound(classes):
    embeddings = embedding_map(1, 24, 20, 64, seed=classes)
    prototypes = unit_prototypes(classes, 10 if classes < 847 else 2, 64, seed=18)
    with torch.no_grad():
        reduced = prototype_logits(embeddings, prototypes, similarity_dtype=torch.bfloat16)
    assert reduced.dtype == torch.float32 and reduced.is_contiguous()
    # It is exactly the composition in bf16 then LayerNorm in float32 (up to the LayerNorm's rounding).
    bf16_scores = class_scores(embeddings.bfloat16(), prototypes).float()
    torch.testing.assert_close(reduced, normalize_class_scores(bf16_scores, dim=1), atol=2e-5, rtol=1e-5)
    exact_scores = class_scores(embeddings.double(), prototypes.double())
    assert (bf16_scores.double() - exact_scores).abs().max() <= BF16_SCORE_BOUND
    # A pixel's class can change only where its two best float32 classes are within twice the bound.
    assert_argmax_up_to_ties(reduced.argmax(dim=1), exact_scores, dim=1, atol=2 * BF16_SCORE_BOUND)


def test_the_model_option_is_off_by_default_and_validated():
    assert ProtoSegformerConfig().similarity_dtype is None
    with pytest.raises(ValueError, match="similarity_dtype must be one of"):
        ProtoSegformerConfig(similarity_dtype="float16")
    with pytest.raises(ValueError, match="similarity_dtype must be one of"):
        prototype_logits(
            embedding_map(1, 2, 2, 4, seed=0), unit_prototypes(2, 1, 4, seed=0), similarity_dtype=torch.half
        )


def test_the_model_runs_its_head_in_bfloat16_when_configured_and_saves_the_option(tmp_path):
    torch.manual_seed(0)
    model = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=7)).eval()
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(pixel_values).logits
        embeddings, _ = model.embed_pixels(pixel_values)
        model.config.similarity_dtype = "bfloat16"
        reduced = model(pixel_values).logits
        expected = normalize_class_scores(class_scores(embeddings.bfloat16(), model.prototypes).float(), dim=1)
        model.fast_head = False  # the plain path honours the option too
        plain = model(pixel_values).logits
    assert reduced.dtype == torch.float32
    torch.testing.assert_close(reduced, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(plain, expected, atol=2e-5, rtol=1e-5)
    assert not torch.equal(reduced, reference)  # the option does something
    model.save_pretrained(tmp_path / "m")
    assert ProtoSegformerForSemanticSegmentation.from_pretrained(tmp_path / "m").config.similarity_dtype == "bfloat16"
    # Set at load time (a config attribute transformers assigns after the config's validation): used, or refused.
    loaded = ProtoSegformerForSemanticSegmentation.from_pretrained(tmp_path / "m", similarity_dtype=None).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, reference, atol=1e-6, rtol=0)
    loaded.config.similarity_dtype = "float16"
    with pytest.raises(ValueError, match="similarity_dtype must be one of"), torch.no_grad():
        loaded(pixel_values)
    # Training (labels given) keeps the model's precision: the loss equals the float32 one.
    model.fast_head = True
    labels = torch.randint(0, 7, (2, 64, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss_reduced = model(pixel_values, labels=labels).loss
        model.config.similarity_dtype = None
        loss_reference = model(pixel_values, labels=labels).loss
    assert torch.equal(loss_reduced, loss_reference)


def test_onnx_export_refuses_bfloat16_similarities_before_writing(tmp_path):
    require_extra("onnx", "onnx", "onnxscript")
    from proto_segformer.export import export_onnx

    model = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=3, similarity_dtype="bfloat16")).eval()
    with pytest.raises(ValueError, match="similarity_dtype = None"):
        export_onnx(model, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_traced_and_compiled_heads_honour_bfloat16_similarities():
    from proto_segformer.prototypes import traced_prototype_logits

    embeddings, prototypes = embedding_map(2, 9, 7, 16, seed=19), unit_prototypes(31, 3, 16, seed=20)
    with torch.no_grad():
        eager = prototype_logits(embeddings, prototypes, similarity_dtype=torch.bfloat16)
        traced = traced_prototype_logits(embeddings, prototypes, num_blocks=4, similarity_dtype=torch.bfloat16)
    assert traced.dtype == torch.float32
    torch.testing.assert_close(traced, eager, atol=2e-5, rtol=1e-5)

    torch.manual_seed(0)
    model = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=5, similarity_dtype="bfloat16")).eval()
    pixel_values = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        expected = model(pixel_values).logits  # eager first (transformers' first call takes a lock dynamo refuses)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(pixel_values).logits, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("other_seconds", "expected"), [(0.0295, "default"), (0.012, "other")])
def test_another_shape_replaces_the_default_only_when_clearly_faster(monkeypatch, other_seconds, expected):
    # Timings made by sleeping: the default takes 30 ms, one other shape `other_seconds`, the rest 60 ms.
    monkeypatch.setattr(P, "HEAD_TUNING_MIN_MACS", 1)
    real = P.blocked_prototype_logits
    other = (256, 64)

    def timed(embeddings, prototypes, rows, classes, *args):
        seconds = {P.DEFAULT_HEAD_BLOCK: 0.03, other: other_seconds}.get((rows, classes), 0.06)
        time.sleep(seconds)
        return real(embeddings, prototypes, rows, classes, *args)

    monkeypatch.setattr(P, "blocked_prototype_logits", timed)
    embeddings, prototypes = embedding_map(1, 40, 40, 16, seed=22), unit_prototypes(300, 2, 16, seed=23)
    chosen = head_block_shape(embeddings, prototypes, torch.float32, torch.float32)
    assert chosen == (P.DEFAULT_HEAD_BLOCK if expected == "default" else other)
