"""The fast paths of the head (`proto_segformer/prototype_kernels.py`) against the reference composition of
`prototype_math.py`: the same logits, losses, gradients and updates; the measured block shapes of the inference head;
bfloat16 similarities; and the path choice of the model (`fast_head`, traced, plain)."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
from conftest import tiny_config
from rounding import assert_argmax_up_to_ties, ulp_noise

from proto_segformer import (
    ProtoSegformerConfig,
    ProtoSegformerForSemanticSegmentation,
    prototype_head,
    prototype_kernels,
)
from proto_segformer.prototype_kernels import (
    _prototype_major,
    blocked_prototype_logits,
    fused_scores_and_contrast,
    head_block_shape,
    inference_logits,
    masked_scores_and_contrast,
    prototype_logits,
    traced_prototype_logits,
)
from proto_segformer.prototype_math import (
    class_scores,
    l2_normalize,
    normalize_class_scores,
    random_unit_prototypes,
    scores_and_contrast,
    sinkhorn_assignments,
)

K = prototype_kernels
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_block_measurements(monkeypatch):
    monkeypatch.setattr(K, "_measured_head_blocks", {})
    monkeypatch.delenv(K.HEAD_BLOCKS_ENV, raising=False)


def unit(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    return l2_normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype))


def random_labels(num_pixels: int, num_classes: int, seed: int, ignored_fraction: float = 0.2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_pixels,), generator=generator)
    labels[torch.rand(num_pixels, generator=generator) < ignored_fraction] = 255
    return labels


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
# Inference: prototype_logits == normalize_class_scores(class_scores(...))


@pytest.mark.parametrize(
    ("batch", "height", "width", "classes", "prototypes", "dim", "chunk_size"),
    [
        (1, 5, 7, 2, 1, 3, None),
        (2, 9, 6, 5, 4, 8, None),
        (2, 9, 6, 5, 4, 8, 1),  # one pixel per chunk
        (3, 4, 11, 13, 3, 16, 100),  # chunks that straddle nothing and end unevenly
        (1, 16, 16, 847, 10, 8, None),
        (2, 8, 8, 847, 10, 8, 847 * 10 * 7),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prototype_logits_equal_the_plain_composition(
    batch, height, width, classes, prototypes, dim, chunk_size, dtype
):
    embeddings = unit(batch, height, width, dim, seed=0, dtype=dtype).permute(0, 3, 1, 2)
    protos = unit(classes, prototypes, dim, seed=1, dtype=dtype)
    expected = normalize_class_scores(class_scores(embeddings, protos), dim=1)
    with torch.no_grad():
        fast = prototype_logits(embeddings, protos, chunk_size=chunk_size)
    assert fast.shape == (batch, classes, height, width) and fast.dtype == dtype and fast.is_contiguous()
    tolerance = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-5}
    torch.testing.assert_close(fast, expected, **tolerance)
    assert_argmax_up_to_ties(fast.argmax(dim=1), class_scores(embeddings, protos), dim=1, atol=tolerance["atol"])


def test_prototype_logits_channels_first_embeddings_and_gradients_fall_back_to_the_plain_path():
    embeddings = unit(2, 3, 6, 5, seed=2).contiguous()  # (B, D=3... ) read as (B, D, h, w) channels-first
    protos = unit(4, 2, 3, seed=3)
    expected = normalize_class_scores(class_scores(embeddings, protos), dim=1)
    with torch.no_grad():
        torch.testing.assert_close(prototype_logits(embeddings, protos), expected)
    leaf = embeddings.clone().requires_grad_(True)
    weights = torch.randn(expected.shape, dtype=expected.dtype, generator=torch.Generator().manual_seed(4))
    (inference_logits(leaf, protos, fast=True, tracing=False) * weights).sum().backward()
    reference = embeddings.clone().requires_grad_(True)
    (normalize_class_scores(class_scores(reference, protos), dim=1) * weights).sum().backward()
    torch.testing.assert_close(leaf.grad, reference.grad)


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
        rows, classes = K._bounded_block_shape(block, num_classes=847, num_prototypes=10, chunk_size=chunk_size)
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
# The traced inference head (torch.compile, torch.export, ONNX)


@pytest.mark.parametrize(("batch", "height", "width", "num_blocks"), [(1, 16, 16, 64), (2, 7, 9, 5), (3, 5, 3, 64)])
def test_traced_head_equals_the_plain_composition_and_the_fused_loop(batch, height, width, num_blocks):
    generator = torch.Generator().manual_seed(batch)
    embeddings = l2_normalize(torch.randn(batch, 32, height, width, generator=generator), dim=1)
    prototypes = random_unit_prototypes(19, 10, 32, generator=generator)
    expected = normalize_class_scores(class_scores(embeddings, prototypes), dim=1)
    traced = traced_prototype_logits(embeddings, prototypes, num_blocks=num_blocks)
    assert traced.shape == (batch, 19, height, width) and traced.is_contiguous()
    torch.testing.assert_close(traced, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(traced, prototype_logits(embeddings, prototypes), atol=1e-5, rtol=0)


def test_traced_head_has_the_plain_gradient():
    generator = torch.Generator().manual_seed(3)
    embeddings = l2_normalize(torch.randn(2, 16, 5, 6, generator=generator), dim=1)
    prototypes = random_unit_prototypes(4, 3, 16, generator=generator)
    weights = torch.randn(2, 4, 5, 6, generator=generator)
    grads = []
    for head in (traced_prototype_logits, lambda e, p: normalize_class_scores(class_scores(e, p), dim=1)):
        leaf = embeddings.clone().requires_grad_(True)
        (head(leaf, prototypes) * weights).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Block shapes: measured once per process and key, pinned by the environment, never a result change


def test_small_heads_use_the_default_block_without_measuring(monkeypatch):
    monkeypatch.setattr(K, "_measure_head_blocks", lambda *a, **k: pytest.fail("measured a tiny head"))
    embeddings, prototypes = embedding_map(1, 8, 8, 16, seed=9), unit_prototypes(19, 10, 16, seed=10)
    assert head_block_shape(embeddings, prototypes, torch.float32, torch.float32) == K.DEFAULT_HEAD_BLOCK


def test_large_heads_are_measured_once_per_key_and_the_choice_is_a_candidate(monkeypatch):
    monkeypatch.setattr(K, "HEAD_TUNING_MIN_MACS", 1)
    calls = []
    measure = K._measure_head_blocks
    monkeypatch.setattr(K, "_measure_head_blocks", lambda *a, **k: calls.append(1) or measure(*a, **k))
    embeddings, prototypes = embedding_map(1, 40, 40, 16, seed=11), unit_prototypes(300, 2, 16, seed=12)
    first = head_block_shape(embeddings, prototypes, torch.float32, torch.float32)
    second = head_block_shape(embeddings, prototypes, torch.float32, torch.float32)
    assert first == second and len(calls) == 1
    candidates = {(rows, classes or 300) for rows in K.HEAD_BLOCK_ROWS for classes in K.HEAD_BLOCK_CLASSES}
    assert first in candidates | {K.DEFAULT_HEAD_BLOCK}
    key = ("cpu", 16, 300, 2, torch.float32, 1)
    assert K.measured_head_blocks() == {key: first}
    head_block_shape(
        embedding_map(1, 40, 40, 16, seed=13), unit_prototypes(301, 2, 16, seed=12), torch.float32, torch.float32
    )
    assert len(calls) == 2  # another class count is another key


class FakeClock:
    """The tuner's clock (`prototype_kernels.tuning_clock`) advanced by the test, not by the machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_shape_that_changes_any_bit_is_never_chosen(monkeypatch):
    # Make every other shape faster than the default but give it different bits: the default must still win.
    monkeypatch.setattr(K, "HEAD_TUNING_MIN_MACS", 1)
    clock = FakeClock()
    monkeypatch.setattr(K, "tuning_clock", clock)
    real = K.blocked_prototype_logits

    def perturbed(embeddings, prototypes, rows, classes, *args):
        result = real(embeddings, prototypes, rows, classes, *args)
        if (rows, classes) == K.DEFAULT_HEAD_BLOCK:  # the probe has more pixels and classes than the default block
            clock.now += 0.02  # the others take no time at all
            return result
        return torch.nextafter(result, torch.full_like(result, math.inf))

    monkeypatch.setattr(K, "blocked_prototype_logits", perturbed)
    embeddings, prototypes = embedding_map(1, 40, 40, 16, seed=14), unit_prototypes(300, 2, 16, seed=15)
    assert head_block_shape(embeddings, prototypes, torch.float32, torch.float32) == K.DEFAULT_HEAD_BLOCK


def test_the_environment_pins_the_block_shape_and_a_bad_value_names_the_variable(monkeypatch):
    embeddings, prototypes = embedding_map(1, 8, 8, 16, seed=16), unit_prototypes(19, 10, 16, seed=17)
    monkeypatch.setenv(K.HEAD_BLOCKS_ENV, "48,7")
    assert head_block_shape(embeddings, prototypes, torch.float32, torch.float32) == (48, 7)
    with torch.no_grad():
        torch.testing.assert_close(prototype_logits(embeddings, prototypes), plain_logits(embeddings, prototypes))
    for bad in ("48", "a,b", "0,7", "48,7,1"):
        monkeypatch.setenv(K.HEAD_BLOCKS_ENV, bad)
        with pytest.raises(ValueError, match=K.HEAD_BLOCKS_ENV):
            head_block_shape(embeddings, prototypes, torch.float32, torch.float32)


@pytest.mark.parametrize(("other_seconds", "expected"), [(0.0295, "default"), (0.012, "other")])
def test_another_shape_replaces_the_default_only_when_clearly_faster(monkeypatch, other_seconds, expected):
    # Timings made by the test's clock: the default takes 30 ms, one other shape `other_seconds`, the rest 60 ms.
    monkeypatch.setattr(K, "HEAD_TUNING_MIN_MACS", 1)
    clock = FakeClock()
    monkeypatch.setattr(K, "tuning_clock", clock)
    real = K.blocked_prototype_logits
    other = (256, 64)

    def timed(embeddings, prototypes, rows, classes, *args):
        clock.now += {K.DEFAULT_HEAD_BLOCK: 0.03, other: other_seconds}.get((rows, classes), 0.06)
        return real(embeddings, prototypes, rows, classes, *args)

    monkeypatch.setattr(K, "blocked_prototype_logits", timed)
    embeddings, prototypes = embedding_map(1, 40, 40, 16, seed=22), unit_prototypes(300, 2, 16, seed=23)
    chosen = head_block_shape(embeddings, prototypes, torch.float32, torch.float32)
    assert chosen == (K.DEFAULT_HEAD_BLOCK if expected == "default" else other)


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


def test_traced_and_compiled_heads_honour_bfloat16_similarities():
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


# ----------------------------------------------------------------------------------------------------------------
# Training head: fused_scores_and_contrast == scores_and_contrast, values and gradients


def run_head(head, pixels, prototypes, rows, classes, upstream, chunk_size=None, temperature=0.1):
    leaf = pixels.clone().requires_grad_(True)
    assign = partial(sinkhorn_assignments, num_classes=prototypes.shape[0])
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    scores, loss_ppc, assigned, targets = head(leaf, prototypes, rows, classes, assign, temperature, **kwargs)
    grad_scores, grad_ppc, grad_assigned = upstream
    total = (scores * grad_scores[: scores.shape[0]]).sum() + grad_ppc * loss_ppc
    total = total + (assigned * grad_assigned[: assigned.shape[0]]).sum()
    total.backward()
    return scores.detach(), loss_ppc.detach(), assigned.detach(), targets, leaf.grad


@pytest.mark.parametrize(
    ("num_pixels", "classes", "prototypes", "dim", "ignored", "chunk_size"),
    [
        (37, 5, 3, 8, 0.2, None),
        (37, 5, 3, 8, 0.0, 15 * 4),  # 4 pixels per chunk
        (64, 2, 1, 4, 0.5, 2),  # one pixel per chunk, M = 1
        (300, 847, 10, 16, 0.1, None),
        (300, 847, 10, 16, 0.3, 847 * 10 * 128),
        (50, 19, 10, 8, 1.0, None),  # every pixel ignored: no PPC term, gradients from the scores only
    ],
)
def test_fused_scores_and_contrast_equal_the_plain_composition(
    num_pixels, classes, prototypes, dim, ignored, chunk_size
):
    pixels = unit(num_pixels, dim, seed=5)
    protos = unit(classes, prototypes, dim, seed=6)
    labels = random_labels(num_pixels, classes, seed=7, ignored_fraction=ignored)
    rows = (labels != 255).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(8)
    upstream = (
        torch.randn(num_pixels, classes, generator=generator, dtype=torch.float64),
        torch.tensor(1.7, dtype=torch.float64),
        torch.randn(num_pixels, generator=generator, dtype=torch.float64),
    )
    plain = run_head(scores_and_contrast, pixels, protos, rows, labels[rows], upstream)
    fast = run_head(fused_scores_and_contrast, pixels, protos, rows, labels[rows], upstream, chunk_size)
    for name, a, b in zip(("scores", "loss_ppc", "assigned", "targets", "gradient"), fast, plain):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    assert fast[4].abs().max() > 0.1  # the gradient is not trivially zero
    if rows.numel() == 0:
        assert fast[1].item() == 0.0


def tied_batch(dtype: torch.dtype):
    """Pixels (N, D), prototypes (K = 7, M = 4, D) and labels whose Sinkhorn plan rows tie.

    Classes 0-2: one pixel each (uniform plan rows); 3: two pixels (fewer than M); 4: 6 copies of one pixel (uniform
    rows); 5: 30 pixels, prototypes 1 and 3 the same vector; 6: one pixel nearest to prototype 2, a copy of prototype
    0 (a tie in the plan and in similarity: prototype 0). Then 20 unlabelled pixels.
    """
    generator = torch.Generator().manual_seed(30)
    protos = unit(7, 4, 16, seed=31)
    protos[5, 3] = protos[5, 1]
    protos[6, 2] = protos[6, 0]
    counts = torch.tensor([1, 1, 1, 2, 6, 30, 1])
    classes = torch.repeat_interleave(torch.arange(7), counts)
    near = torch.randint(0, 4, (len(classes),), generator=generator)
    near[-1] = 2
    pixels = l2_normalize(protos[classes, near] + 0.3 * torch.randn(len(classes), 16, generator=generator).double())
    pixels[classes == 4] = pixels[classes == 4][0]
    pixels = torch.cat([pixels, unit(20, 16, seed=32)])
    labels = torch.cat([classes, torch.full((20,), 255)])
    return pixels.to(dtype), protos.to(dtype), labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_both_heads_assign_tied_plan_rows_alike_and_to_the_nearest_prototype(dtype):
    # docs/method.md: ties in Q go to the most similar prototype, the same assignment on every CPU and code path.
    # A few ulps of noise on the pixels stand for another CPU's rounding; bfloat16 runs under autocast (float32 inputs).
    compute = torch.float32 if dtype == torch.bfloat16 else dtype
    pixels, protos, labels = tied_batch(compute)
    rows = (labels != 255).nonzero().squeeze(1)
    classes = labels[rows]
    generator = torch.Generator().manual_seed(33)
    upstream = (torch.randn(len(labels), 7, generator=generator, dtype=compute), torch.tensor(1.3, dtype=compute))
    upstream += (torch.randn(len(labels), generator=generator, dtype=compute),)
    nearest = torch.einsum("nd,nmd->nm", pixels[rows].double(), protos[classes].double()).argmax(1)
    nearest[classes == 6] = 0  # prototype 2 of class 6 is a copy of prototype 0: the lower index
    lone_or_copies = torch.isin(classes, torch.tensor([0, 1, 2, 4, 6]))
    results = {}
    for seed in range(4):
        noisy = pixels if seed == 0 else ulp_noise(pixels, seed=seed)
        for name, head in (("plain", scores_and_contrast), ("fused", fused_scores_and_contrast)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                results[name, seed] = run_head(head, noisy, protos, rows, classes, upstream)
    expected = results["plain", 0][3]
    assert torch.equal(expected[lone_or_copies] % 4, nearest[lone_or_copies]), (expected % 4, nearest)
    assert not ((expected[classes == 5] % 4) == 3).any()  # the later copy of a duplicated prototype is never chosen
    for (name, seed), result in results.items():
        assert torch.equal(result[3], expected), (name, seed, result[3], expected)
    tolerance = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}
    if dtype == torch.bfloat16:
        tolerance = {"atol": 0.05, "rtol": 0.02}
    for field, a, b in zip(
        ("scores", "loss_ppc", "assigned", "targets", "gradient"), results["fused", 0], results["plain", 0]
    ):
        torch.testing.assert_close(a, b, **tolerance, msg=lambda m, n=field: f"{n}: {m}")


@pytest.mark.parametrize("temperature", [0.1, 0.002])  # exp(s / 0.002) overflows float32 unshifted
def test_fused_head_float32_at_847_classes_matches_the_plain_head(temperature):
    pixels = unit(512, 32, seed=9, dtype=torch.float32)
    protos = unit(847, 10, 32, seed=10, dtype=torch.float32)
    labels = random_labels(512, 847, seed=11)
    rows = (labels != 255).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(12)
    upstream = (torch.randn(512, 847, generator=generator), torch.tensor(1.0), torch.randn(512, generator=generator))
    plain = run_head(scores_and_contrast, pixels, protos, rows, labels[rows], upstream, temperature=temperature)
    fast = run_head(fused_scores_and_contrast, pixels, protos, rows, labels[rows], upstream, temperature=temperature)
    assert torch.equal(fast[3], plain[3]) and torch.isfinite(fast[1]) and torch.isfinite(fast[4]).all()
    for name, a, b in zip(("scores", "loss_ppc", "assigned", "gradient"), fast[:3] + fast[4:], plain[:3] + plain[4:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_fused_head_cannot_be_back_propagated_twice():
    pixels = unit(20, 4, seed=13).requires_grad_(True)
    protos = unit(3, 2, 4, seed=14)
    rows = torch.arange(20)
    classes = rows % 3
    assign = partial(sinkhorn_assignments, num_classes=3)
    scores, loss_ppc, assigned, _ = fused_scores_and_contrast(pixels, protos, rows, classes, assign)
    loss = scores.sum() + loss_ppc
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot be back-propagated twice.*fast_head = False"):
        loss.backward()



@pytest.mark.parametrize(
    ("num_pixels", "classes", "prototypes", "dim", "ignored"),
    [(37, 5, 3, 8, 0.2), (64, 2, 1, 4, 0.5), (300, 847, 10, 16, 0.1), (50, 19, 10, 8, 1.0), (40, 3, 2, 4, 0.0)],
)
def test_masked_scores_and_contrast_equal_the_index_composition(num_pixels, classes, prototypes, dim, ignored):
    """The traced training head (all pixels, a mask of the labelled ones) against the index one, values and
    gradients: the ignored pixels' outputs are left out and their upstream gradients are zero."""
    pixels = unit(num_pixels, dim, seed=15)
    protos = unit(classes, prototypes, dim, seed=16)
    labels = random_labels(num_pixels, classes, seed=17, ignored_fraction=ignored)
    labelled = labels != 255
    rows = labelled.nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(18)
    grad_scores = torch.randn(num_pixels, classes, generator=generator, dtype=torch.float64)
    grad_assigned = torch.randn(num_pixels, generator=generator, dtype=torch.float64) * labelled
    upstream = (grad_scores, torch.tensor(1.7, dtype=torch.float64), grad_assigned)
    plain = run_head(scores_and_contrast, pixels, protos, rows, labels[rows], (*upstream[:2], grad_assigned[rows]))

    def masked_head(leaf, prototypes, _rows, classes, assign, temperature):
        return masked_scores_and_contrast(leaf, prototypes, labelled, classes, assign, temperature)

    masked = run_head(masked_head, pixels, protos, rows, torch.where(labelled, labels, 0), upstream)
    scores, loss_ppc, assigned, targets, gradient = masked
    torch.testing.assert_close(scores, plain[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(loss_ppc, plain[1], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(assigned[rows], plain[2], atol=1e-12, rtol=0)
    assert torch.equal(targets[rows], plain[3])
    torch.testing.assert_close(gradient, plain[4], atol=1e-10, rtol=1e-10)
    assert gradient.abs().max() > 0.1


# ----------------------------------------------------------------------------------------------------------------
# The model: fast_head True vs False


def twin_models(num_labels: int, dtype: torch.dtype, **overrides):
    torch.manual_seed(0)
    fast = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=num_labels, **overrides)).to(dtype)
    plain = copy.deepcopy(fast)
    plain.fast_head = False
    return fast, plain


@pytest.mark.parametrize(
    ("num_labels", "prototypes", "batch", "height", "width", "dtype"),
    [
        (5, 4, 2, 32, 48, torch.float64),
        (19, 10, 1, 64, 40, torch.float32),
        (847, 10, 2, 32, 32, torch.float64),
        (847, 10, 2, 32, 32, torch.float32),
    ],
)
def test_model_fast_and_plain_heads_give_the_same_step(num_labels, prototypes, batch, height, width, dtype):
    fast, plain = twin_models(num_labels, dtype, num_prototypes_per_class=prototypes)
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(batch, 3, height, width, generator=generator, dtype=dtype)
    labels = torch.randint(0, num_labels, (batch, height, width), generator=generator)
    labels[:, :5] = 255
    outputs = {}
    for name, model in (("fast", fast), ("plain", plain)):
        model.train()
        torch.manual_seed(2)  # the same dropout masks
        out = model(pixel_values, labels=labels)
        out.loss.backward()
        outputs[name] = out
    tolerance = {"atol": 1e-9, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}
    for field in ("logits", "loss", "loss_ce", "loss_ppc", "loss_ppd"):
        torch.testing.assert_close(getattr(outputs["fast"], field), getattr(outputs["plain"], field), **tolerance)
    assert outputs["fast"].logits.is_contiguous()
    # Gradients relative to the largest one (some, e.g. biases before a BatchNorm, are zero up to rounding).
    scale = max(p.grad.abs().max() for p in plain.parameters())
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad / scale, b.grad / scale, **tolerance, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(fast.prototypes, plain.prototypes, **tolerance)
    fast.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(pixel_values).logits, plain(pixel_values).logits, **tolerance)



@pytest.mark.parametrize(
    ("num_labels", "dtype", "ignored_rows", "updates"),
    [
        (5, torch.float64, 5, True),
        (847, torch.float32, 5, False),  # random prototypes: no pixel predicted right, so none updates
        (4, torch.float32, 32, False),  # every pixel ignored
    ],
)
def test_model_traced_training_head_gives_the_eager_step(monkeypatch, num_labels, dtype, ignored_rows, updates):
    """The masked formulation that torch.compile / torch.export trace, run eagerly, against the fused index path."""
    fast, traced = twin_models(num_labels, dtype, num_prototypes_per_class=4)
    traced.fast_head = True
    before = fast.prototypes.clone()
    generator = torch.Generator().manual_seed(11)
    pixel_values = torch.randn(2, 3, 32, 32, generator=generator, dtype=dtype)
    labels = torch.randint(0, num_labels, (2, 32, 32), generator=generator)
    labels[:, :ignored_rows] = 255
    outputs = {}
    for name, model in (("fast", fast), ("traced", traced)):
        with monkeypatch.context() as patch:
            if name == "traced":
                patch.setattr(prototype_head, "is_tracing", lambda: True)
            torch.manual_seed(2)
            out = model.train()(pixel_values, labels=labels)
            out.loss.backward()
            outputs[name] = out
    tolerance = {"atol": 1e-9, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}
    for field in ("logits", "loss", "loss_ce", "loss_ppc", "loss_ppd"):
        torch.testing.assert_close(getattr(outputs["traced"], field), getattr(outputs["fast"], field), **tolerance)
    scale = max(max(p.grad.abs().max().item() for p in fast.parameters()), 1e-30)  # all 0 when nothing labelled
    for (name, a), b in zip(traced.named_parameters(), fast.parameters()):
        torch.testing.assert_close(a.grad / scale, b.grad / scale, **tolerance, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(traced.prototypes, fast.prototypes, **tolerance)
    assert bool((traced.prototypes != before).any()) == updates


def test_model_prototype_update_happens_on_the_fast_path():
    fast, _ = twin_models(3, torch.float32, num_prototypes_per_class=2)
    before = fast.prototypes.clone()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(4))
    fast.train()(pixel_values, labels=labels).loss.backward()
    assert not torch.equal(before, fast.prototypes)
    torch.testing.assert_close(fast.prototypes.norm(dim=-1), torch.ones(3, 2))


def test_model_all_ignored_labels_on_the_fast_path():
    fast, plain = twin_models(4, torch.float32)
    pixel_values = torch.randn(1, 3, 32, 32)
    labels = torch.full((1, 32, 32), 255)
    results = []
    for model in (fast, plain):
        torch.manual_seed(5)
        out = model.train()(pixel_values, labels=labels)
        out.loss.backward()
        results.append((out.loss.item(), out.loss_ppc.item(), out.loss_ppd.item()))
    assert results[0] == results[1] and results[0][1] == 0.0


def test_bfloat16_autocast_fast_head_matches_plain_to_bfloat16_precision():
    fast, plain = twin_models(19, torch.float32, num_prototypes_per_class=4)
    generator = torch.Generator().manual_seed(6)
    pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 19, (2, 32, 32), generator=generator)
    outputs = []
    for model in (fast, plain):
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.train()(pixel_values, labels=labels)
        out.loss.backward()
        outputs.append(out)
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(model(pixel_values))
    (fast_train, fast_eval, plain_train, plain_eval) = outputs
    assert fast_train.logits.dtype == plain_train.logits.dtype
    assert fast_eval.logits.dtype == plain_eval.logits.dtype
    for field in ("loss", "loss_ce", "loss_ppc", "loss_ppd"):
        torch.testing.assert_close(getattr(fast_train, field), getattr(plain_train, field), atol=0.05, rtol=0.02)
    torch.testing.assert_close(fast_eval.logits, plain_eval.logits, atol=0.05, rtol=0.02)
    torch.testing.assert_close(fast.prototypes, plain.prototypes, atol=1e-3, rtol=0)


def test_random_unit_prototypes_stay_unit_in_the_prototype_major_layout():
    # Guards the layout used inside the fused paths: row m*K + k of the reordered prototypes is p_{k,m}.
    protos = random_unit_prototypes(3, 4, 5, dtype=torch.float64)
    flat = _prototype_major(protos, torch.float64)
    for k in range(3):
        for m in range(4):
            assert torch.equal(flat[m * 3 + k], protos[k, m])


# ------------------------------------------------------------------------------------- nearest-prototype indices


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("classes", [3, 19])
def test_the_forward_returns_each_class_nearest_prototype_with_the_same_logits(fast, classes):
    """output_prototype_indices: the argmax over the M prototypes of each class, from the head's own pass: the logits
    are the same bits as without it, and the indices are those of a separate similarity product."""
    torch.manual_seed(0)
    model = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=classes)).eval()
    model.fast_head = fast
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        plain = model(pixel_values, output_pixel_embeddings=True)
        both = model(pixel_values, output_prototype_indices=True)
    assert torch.equal(both.logits, plain.logits)
    embeddings = plain.pixel_embeddings
    similarities = torch.einsum("bdhw,kmd->bkmhw", embeddings, model.prototypes)
    expected = similarities.argmax(dim=2)
    assert both.prototype_indices.shape == (2, classes, 16, 24) and both.prototype_indices.dtype == torch.long
    # where the best two prototypes of a class are not within rounding of each other, the index is exact
    top2 = similarities.topk(2, dim=2).values
    clear = (top2[:, :, 0] - top2[:, :, 1]) > 1e-5
    assert clear.float().mean() > 0.9
    assert torch.equal(both.prototype_indices[clear], expected[clear])
    assert plain.prototype_indices is None


def test_prototype_indices_of_the_blocked_head_do_not_depend_on_the_block_shape():
    torch.manual_seed(1)
    embeddings = torch.nn.functional.normalize(torch.randn(1, 16, 12, 20), dim=1)
    prototypes = torch.nn.functional.normalize(torch.randn(37, 5, 16), dim=-1)
    results = []
    for shape in [(1024, 256), (37, 29), (1, 1)]:
        indices = torch.empty(1, 37, 240, dtype=torch.long)
        logits = prototype_logits(embeddings, prototypes, block_shape=shape, indices=indices)
        results.append((logits, indices))
        assert torch.equal(logits, prototype_logits(embeddings, prototypes, block_shape=shape))
    for _, indices in results[1:]:
        assert torch.equal(indices, results[0][1])
    _, reference = class_scores(embeddings, prototypes, return_indices=True)
    assert torch.equal(results[0][1].view(1, 37, 12, 20), reference)
