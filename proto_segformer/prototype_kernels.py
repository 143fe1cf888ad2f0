"""Fast paths of ProtoSeg's head, and the one place that chooses between them and the reference.

Each fast path computes what a composition of the reference functions in `prototype_math.py` computes (its docstring
names which; the tests hold each against it), materialising less. Inside them the M*K similarities of a pixel are
laid out prototype-major (column m*K + k), so the max over the M prototypes of a class is an elementwise max of M
contiguous K-vectors.

The model calls two functions, at the end of this file, with every switch as an argument:

- `inference_logits` (no labels): the blocked head `prototype_logits` with block shapes measured on this machine, its
  traced formulation `traced_prototype_logits` (torch.compile, torch.export, ONNX), or the reference;
- `training_scores` (labels): the fused autograd Function `fused_scores_and_contrast`, its masked formulation
  `masked_scores_and_contrast` (traced), or the reference `scores_and_contrast`.

Switches: `fast` (the model's `fast_head`), `tracing` (`is_tracing()`), the similarity dtype and chunk size (config
fields `similarity_dtype`, `inference_chunk_size`), grad mode, and the environment variable PROTOSEG_HEAD_BLOCKS
(read by `head_block_shape`).

Shapes: N pixels, K classes, M prototypes per class, D embedding width.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .prototype_math import (
    class_logits,
    class_scores,
    max_similarity,
    normalize_class_scores,
    ppc_loss,
    ppd_loss,
    prototype_similarities,
    scores_and_contrast,
    sinkhorn_assignments,
)

# ------------------------------------------------------------------------------------------------------------------
# Switches and shared helpers

# Dtypes the inference head's similarity may run in (`config.similarity_dtype`).
SIMILARITY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def is_tracing() -> bool:
    """Whether the code runs under torch.compile / torch.export (dynamo or non-strict) or torch.jit.trace.

    Data-dependent branches (a Python `if` on tensor values) and Python loops over tensor sizes run only outside.
    """
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _check_similarity_dtype(similarity_dtype: torch.dtype | None) -> None:
    """A ValueError unless `similarity_dtype` is None or one of SIMILARITY_DTYPES."""
    if similarity_dtype is not None and similarity_dtype not in SIMILARITY_DTYPES.values():
        raise ValueError(
            f"similarity_dtype must be one of {sorted(SIMILARITY_DTYPES)} or None, got {similarity_dtype}."
        )


# Pixels per chunk: enough rows for an efficient matmul, few enough that a chunk's scores stay small (at most
# FAST_CHUNK_SCORES pixel-by-prototype scores, 16 MiB in float32, unless that leaves fewer than FAST_CHUNK_MIN_ROWS).
FAST_CHUNK_ROWS = 1024
FAST_CHUNK_MIN_ROWS = 256
FAST_CHUNK_SCORES = 2**22


def _compute_dtypes(tensor: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """Dtypes of `tensor @ tensor` and of a layer_norm of that product, under the current autocast state.

    The fast paths run with autocast disabled and cast explicitly, so they reproduce the dtypes of the plain path
    (which differ between devices: CPU autocast keeps layer_norm in bfloat16, CUDA autocast runs it in float32).
    """
    probe = torch.zeros(1, 1, device=tensor.device, dtype=tensor.dtype)
    product = probe @ probe
    return product.dtype, F.layer_norm(product, (1,)).dtype


def _prototype_major(prototypes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(K, M, D) -> (M*K, D) with row m*K + k holding p_{k,m}."""
    num_classes, num_prototypes, dim = prototypes.shape
    return prototypes.detach().transpose(0, 1).reshape(num_prototypes * num_classes, dim).to(dtype)


def _rows_per_chunk(num_scores_per_row: int, limit: int | None) -> int:
    """Pixels per chunk (see FAST_CHUNK_ROWS), fewer when `limit` (scores held at once) asks for it."""
    rows = min(FAST_CHUNK_ROWS, max(FAST_CHUNK_MIN_ROWS, FAST_CHUNK_SCORES // max(1, num_scores_per_row)))
    if limit is not None:
        rows = min(rows, limit // max(1, num_scores_per_row))
    return max(1, rows)


# ------------------------------------------------------------------------------------------------------------------
# Inference: logits = normalize_class_scores(class_scores(embeddings, prototypes), dim=1), without autograd

# Pixel blocks of the traced formulation of `prototype_logits` (torch.export, torch.compile, ONNX): a fixed count,
# because the number of pixels is symbolic there. A block holds B*h*w / TRACED_PIXEL_BLOCKS pixel-by-prototype scores
# (a 512x512 image at K = 847, M = 10: 8.5 MiB in float32).
TRACED_PIXEL_BLOCKS = 64


def traced_prototype_logits(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    eps: float = 1e-5,
    num_blocks: int = TRACED_PIXEL_BLOCKS,
    similarity_dtype: torch.dtype | None = None,
    with_max_similarity: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The traced inference head: `normalize_class_scores(class_scores(embeddings, prototypes), dim=1)` as tensor
    operations over a fixed number of pixel blocks, (B, D, h, w) -> (B, K, h, w).

    Same values as `prototype_logits` (per block: one matmul against the prototype-major prototypes, the max over the
    M prototypes of each class, the class-axis LayerNorm), with no Python loop over the batch or the pixels, so
    torch.export and torch.compile keep batch, height and width symbolic. Differentiable w.r.t. `embeddings`.
    `similarity_dtype` as in `prototype_logits`. `with_max_similarity`: also the largest similarity to any prototype
    (B, h, w) (`prototype_math.max_similarity` of the block's class scores), as (logits, max_similarity).
    """
    batch, dim, height, width = embeddings.shape
    num_classes, num_prototypes, _ = prototypes.shape
    matmul_dtype, out_dtype = _head_dtypes(embeddings, similarity_dtype)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        num_pixels = batch * height * width
        pixels = embeddings.permute(0, 2, 3, 1).reshape(num_pixels, dim).to(matmul_dtype)
        flat_prototypes = _prototype_major(prototypes, matmul_dtype).t()
        # Zero rows pad the pixels to a multiple of the block count (no guard on the symbolic size); dropped below.
        padded = F.pad(pixels, (0, 0, 0, (-num_pixels) % num_blocks))
        class_blocks = [
            (block @ flat_prototypes).view(-1, num_prototypes, num_classes).amax(dim=1).to(out_dtype)
            for block in padded.view(num_blocks, -1, dim).unbind(0)
        ]
        scores = torch.cat([F.layer_norm(block, (num_classes,), eps=eps) for block in class_blocks])[:num_pixels]
        logits = scores.view(batch, height, width, num_classes).permute(0, 3, 1, 2).contiguous()
        if not with_max_similarity:
            return logits
        nearest = torch.cat([max_similarity(block, dim=-1) for block in class_blocks])[:num_pixels]
    return logits, nearest.view(batch, height, width)


def prototype_logits(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    chunk_size: int | None = None,
    eps: float = 1e-5,
    similarity_dtype: torch.dtype | None = None,
    block_shape: tuple[int, int] | None = None,
    indices: torch.Tensor | None = None,
    nearest: torch.Tensor | None = None,
) -> torch.Tensor:
    """The eager inference head: `normalize_class_scores(class_scores(embeddings, prototypes), dim=1)`, (B, K, h, w).

    Embeddings (B, D, h, w), prototypes (K, M, D). Runs `blocked_prototype_logits` (the similarity matmul, the max
    over prototypes and the class-axis LayerNorm per block of pixels and classes) with the block shape `block_shape`
    (pixels, classes), else the one measured on this machine (`head_block_shape`); `chunk_size` bounds the
    pixel-by-prototype scores held at once. No autograd (the inputs are detached) and no tracing: `inference_logits`
    chooses the reference or `traced_prototype_logits` there.

    `similarity_dtype` (None: the embeddings' dtype, or autocast's): the dtype of the similarity matmul, e.g.
    torch.bfloat16 for CPUs and GPUs with fast bf16 matrix units; the class scores are then normalised in float32
    (or the embeddings' wider dtype). `indices`, `nearest`: see `blocked_prototype_logits`.
    """
    _check_similarity_dtype(similarity_dtype)
    matmul_dtype, out_dtype = _head_dtypes(embeddings, similarity_dtype)
    num_classes, num_prototypes, _ = prototypes.shape
    if block_shape is None:
        block_shape = head_block_shape(embeddings, prototypes, matmul_dtype, out_dtype, eps=eps)
    rows, classes = _bounded_block_shape(block_shape, num_classes, num_prototypes, chunk_size)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return blocked_prototype_logits(
            embeddings.detach(), prototypes.detach(), rows, classes, matmul_dtype, out_dtype, eps, indices, nearest
        )


def _head_dtypes(embeddings: torch.Tensor, similarity_dtype: torch.dtype | None) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, output dtype) of the inference head: as the plain path under the current autocast state, or
    the similarity in `similarity_dtype` with the class scores normalised in float32 (or a wider input dtype)."""
    matmul_dtype, out_dtype = _compute_dtypes(embeddings)
    if similarity_dtype is None or similarity_dtype == matmul_dtype:
        return matmul_dtype, out_dtype
    return similarity_dtype, torch.promote_types(out_dtype, torch.float32)


def _bounded_block_shape(
    block_shape: tuple[int, int], num_classes: int, num_prototypes: int, chunk_size: int | None
) -> tuple[int, int]:
    """(pixels, classes) per block, clipped to K and to at most `chunk_size` pixel-by-prototype scores per block."""
    rows, classes = (max(1, int(value)) for value in block_shape)
    classes = min(classes, num_classes)
    if chunk_size is not None:
        classes = min(classes, max(1, chunk_size // num_prototypes))
        rows = min(rows, max(1, chunk_size // (classes * num_prototypes)))
    return rows, classes


def _class_blocks(
    prototypes: torch.Tensor, classes_per_block: int, dtype: torch.dtype
) -> list[tuple[int, torch.Tensor]]:
    """(first class, (M*k, D) prototypes of classes [first, first + k), row m*k + j holding p_{first+j,m}) per block."""
    return [
        (start, _prototype_major(prototypes[start : start + classes_per_block], dtype).contiguous())
        for start in range(0, prototypes.shape[0], classes_per_block)
    ]


def blocked_prototype_logits(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    rows: int,
    classes: int,
    matmul_dtype: torch.dtype,
    out_dtype: torch.dtype,
    eps: float = 1e-5,
    indices: torch.Tensor | None = None,
    nearest: torch.Tensor | None = None,
) -> torch.Tensor:
    """The inference head, blocked for the caches: (B, D, h, w), (K, M, D) -> logits (B, K, h, w), contiguous.

    For each block of `rows` pixels and each block of `classes` classes, one matmul (M*classes, D) @ (D, rows) fills a
    cache-sized tile of similarities, prototype-major, and the max over the M prototypes reads it back while it is
    still in cache (an elementwise max of M contiguous (classes, rows) slabs) into the block's (K, rows) class scores;
    then the LayerNorm over the class axis (mean and variance over K per pixel, in `out_dtype`) writes the pixels'
    logits, already in the (K, pixels) layout of the result. Computes exactly what `normalize_class_scores(
    class_scores(...))` computes (the same products and max; the LayerNorm up to rounding).

    `indices`, optional (B, K, h*w) int64: filled in the same pass with the index m of each class's nearest prototype
    (the first of equal maxima), the max itself unchanged, so the logits are the same bits with or without it.
    `nearest`, optional (B, h*w) in `out_dtype`: filled in the same pass with the largest similarity to any prototype
    (`prototype_math.max_similarity` of the block's class scores, before the LayerNorm).
    """
    batch, dim, height, width = embeddings.shape
    num_classes, num_prototypes, _ = prototypes.shape
    num_pixels = height * width
    rows = min(rows, num_pixels)
    device = embeddings.device
    # (B, N, D) pixel rows; a channels-last map (as the projection returns) needs no copy.
    pixels = embeddings.permute(0, 2, 3, 1).reshape(batch, num_pixels, dim).to(matmul_dtype)
    blocks = _class_blocks(prototypes, classes, matmul_dtype)
    logits = torch.empty(batch, num_classes, num_pixels, device=device, dtype=out_dtype)
    tile = torch.empty(num_prototypes * min(classes, num_classes) * rows, device=device, dtype=matmul_dtype)
    scores = torch.empty(num_classes, rows, device=device, dtype=matmul_dtype)
    for image in range(batch):
        for start in range(0, num_pixels, rows):
            count = min(num_pixels, start + rows) - start
            block_pixels = pixels[image, start : start + count].t()
            for first, block in blocks:
                width_k = block.shape[0] // num_prototypes
                similarities = tile[: block.shape[0] * count].view(block.shape[0], count)
                torch.mm(block, block_pixels, out=similarities)
                if indices is None:
                    torch.amax(
                        similarities.view(num_prototypes, width_k, count),
                        dim=0,
                        out=scores[first : first + width_k, :count],
                    )
                else:
                    best, index = similarities.view(num_prototypes, width_k, count).max(dim=0)
                    scores[first : first + width_k, :count] = best
                    indices[image, first : first + width_k, start : start + count] = index
            if nearest is not None:
                nearest[image, start : start + count] = max_similarity(scores[:, :count], dim=0)
            _normalize_columns(scores[:, :count].to(out_dtype), eps, out=logits[image, :, start : start + count])
    return logits.view(batch, num_classes, height, width)


def _normalize_columns(scores: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters over the first axis of (K, n) scores, into `out` (K, n).

    Two passes (mean, then the mean square of the centred scores), each a reduction over the outer axis that is
    vectorised along the n contiguous pixels (several times faster here than `var_mean(dim=0)` or a transposed
    `F.layer_norm`); the same values as `F.layer_norm` over K up to rounding.
    """
    torch.sub(scores, scores.mean(dim=0), out=out)
    variance = out.square().mean(dim=0)
    return out.mul_(torch.rsqrt(variance + eps))


# ------------------------------------------------------------------------------------------------------------------
# Block shapes of the inference head, measured per machine.

# Candidate (pixels, classes) per block; None: all classes in one block (the unblocked product).
HEAD_BLOCK_ROWS = (256, 1024)
HEAD_BLOCK_CLASSES = (64, 256, None)
DEFAULT_HEAD_BLOCK = (1024, 256)
# Heads cheaper than this (multiply-adds per image) use DEFAULT_HEAD_BLOCK: measuring would cost more than it saves.
HEAD_TUNING_MIN_MACS = 2**30
# Timed rounds per candidate, and how much faster than the default a candidate must be to replace it.
HEAD_TUNING_ROUNDS = 2
HEAD_TUNING_MARGIN = 0.05
# Environment variable pinning the block shape, e.g. PROTOSEG_HEAD_BLOCKS=512,128 (pixels, classes).
HEAD_BLOCKS_ENV = "PROTOSEG_HEAD_BLOCKS"
# The clock the candidates are timed with, in seconds (a module attribute, so that a test can replace it).
tuning_clock = time.perf_counter
_measured_head_blocks: dict[tuple, tuple[int, int]] = {}


def measured_head_blocks() -> dict[tuple, tuple[int, int]]:
    """The block shapes measured in this process: {(device, D, K, M, dtype, threads): (pixels, classes)}."""
    return dict(_measured_head_blocks)


def _pinned_head_blocks() -> tuple[int, int] | None:
    value = os.environ.get(HEAD_BLOCKS_ENV)
    if not value:
        return None
    try:
        rows, classes = (int(part) for part in value.split(","))
        if rows < 1 or classes < 1:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{HEAD_BLOCKS_ENV}={value!r}: expected two positive integers 'pixels,classes', e.g. 1024,256."
        ) from None
    return rows, classes


def head_block_shape(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    matmul_dtype: torch.dtype,
    out_dtype: torch.dtype,
    eps: float = 1e-5,
) -> tuple[int, int]:
    """(pixels, classes) per block of `blocked_prototype_logits` for this machine, measured once per process.

    The first call for a given device, D, K, M, dtype and thread count times each candidate shape (HEAD_BLOCK_ROWS x
    HEAD_BLOCK_CLASSES) on the first pixels of `embeddings` and keeps the fastest among those whose logits are
    bit-identical to DEFAULT_HEAD_BLOCK's (so the choice never changes a result), the default unless another shape
    is HEAD_TUNING_MARGIN faster. CUDA: one block of all classes.
    `PROTOSEG_HEAD_BLOCKS=pixels,classes` pins the shape; heads under HEAD_TUNING_MIN_MACS use the default.
    """
    pinned = _pinned_head_blocks()
    if pinned is not None:
        return pinned
    num_classes, num_prototypes, dim = prototypes.shape
    if embeddings.device.type != "cpu":
        return (FAST_CHUNK_ROWS * 8, num_classes)
    num_pixels = embeddings.shape[0] * embeddings.shape[2] * embeddings.shape[3]
    if num_pixels * num_classes * num_prototypes * dim < HEAD_TUNING_MIN_MACS:
        return DEFAULT_HEAD_BLOCK
    key = (str(embeddings.device), dim, num_classes, num_prototypes, matmul_dtype, torch.get_num_threads())
    if key not in _measured_head_blocks:
        _measured_head_blocks[key] = _measure_head_blocks(embeddings, prototypes, matmul_dtype, out_dtype, eps)
    return _measured_head_blocks[key]


def _measure_head_blocks(embeddings, prototypes, matmul_dtype, out_dtype, eps) -> tuple[int, int]:
    """Time the candidate block shapes on the first pixels, HEAD_TUNING_ROUNDS rounds in turns (best time of each, by
    `tuning_clock`).

    Another shape replaces DEFAULT_HEAD_BLOCK only when it is at least HEAD_TUNING_MARGIN faster (a shared machine's
    noise must not pick a slow shape), and only if its logits are bit-identical to the default's.
    """
    num_classes = prototypes.shape[0]
    probe_rows = max(HEAD_BLOCK_ROWS)
    # The first pixels as a (1, D, n, 1) map with the memory layout of a channels-last embedding map.
    pixels = embeddings[:1].detach().permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])[:probe_rows].contiguous()
    probe = pixels.t()[None, :, :, None]
    candidates = [(rows, classes or num_classes) for rows in HEAD_BLOCK_ROWS for classes in HEAD_BLOCK_CLASSES]
    candidates = list(dict.fromkeys([DEFAULT_HEAD_BLOCK, *candidates]))
    timings = {shape: math.inf for shape in candidates}
    with torch.autocast(device_type=embeddings.device.type, enabled=False):

        def run(shape):
            rows, classes = min(shape[0], probe.shape[2]), min(shape[1], num_classes)
            return blocked_prototype_logits(probe, prototypes.detach(), rows, classes, matmul_dtype, out_dtype, eps)

        reference = run(DEFAULT_HEAD_BLOCK)
        for _ in range(HEAD_TUNING_ROUNDS):
            for shape in [shape for shape in candidates if shape in timings]:
                start = tuning_clock()
                result = run(shape)
                elapsed = tuning_clock() - start
                if torch.equal(result, reference):  # a shape that changed a bit is never chosen
                    timings[shape] = min(timings[shape], elapsed)
                else:
                    del timings[shape]
    best = min(timings, key=timings.get)
    return best if timings[best] < (1 - HEAD_TUNING_MARGIN) * timings[DEFAULT_HEAD_BLOCK] else DEFAULT_HEAD_BLOCK


# ------------------------------------------------------------------------------------------------------------------
# Training: scores, assignment and PPC loss = `prototype_math.scores_and_contrast`, differentiable w.r.t. the pixels


def masked_scores_and_contrast(
    pixels: torch.Tensor,
    prototypes: torch.Tensor,
    labelled: torch.Tensor,
    classes: torch.Tensor,
    assign,
    temperature: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`scores_and_contrast` over all N pixels with a mask of the labelled ones instead of their indices.

    No shape depends on the labels, so torch.compile and torch.export trace it without a graph break (the training
    head runs it there); the values on the labelled pixels are those of `scores_and_contrast`.

    Args:
        pixels: (N, D) unit embeddings (may require grad).
        prototypes: (K, M, D) unit prototypes (used as constants).
        labelled: (N,) bool mask of the labelled pixels; classes: (N,) their classes, in [0, K) everywhere (e.g. 0
            where not labelled).
        assign: (own (N, M), classes (N,), mask=labelled) -> (N,) prototype index in [0, M), e.g. Sinkhorn
            assignments with a mask.

    Returns:
        scores (N, K), loss_ppc () over the labelled pixels, assigned (N,) and targets (N,) (meaningful where
        `labelled`).
    """
    num_prototypes = prototypes.shape[1]
    similarities = prototype_similarities(pixels, prototypes.detach().to(pixels.dtype))
    scores = similarities.amax(dim=-1)
    own = similarities.gather(1, classes[:, None, None].expand(-1, 1, num_prototypes)).squeeze(1)
    assignments = assign(own.detach(), classes, mask=labelled)
    targets = classes * num_prototypes + assignments
    loss_ppc = ppc_loss(similarities, targets, temperature, mask=labelled)
    assigned = own.gather(1, assignments[:, None]).squeeze(1)
    return scores, loss_ppc, assigned, targets


def _index_dtype(num_prototypes: int) -> torch.dtype:
    return torch.uint8 if num_prototypes <= 256 else torch.long


def _max_over_prototypes(similarities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and argmax over m of (n, M, K) similarities: (n, K) each.

    Same values and indices as `similarities.max(dim=1)`; computed as a (M x 1) max-pooling of the channels-last
    view (n, K, M, 1), whose kernel is vectorised over the K channels (several times faster than `max(dim=1)`).
    """
    count, num_prototypes, num_classes = similarities.shape
    channels_last = similarities.view(count, num_prototypes, 1, num_classes).permute(0, 3, 1, 2)
    values, indices = F.max_pool2d(channels_last, kernel_size=(num_prototypes, 1), return_indices=True)
    return values.reshape(count, num_classes), indices.reshape(count, num_classes)


class _FusedScoresAndContrast(torch.autograd.Function):
    """Class scores, PPC loss and own-prototype similarities from one (N, M*K) similarity buffer.

    Forward, per chunk of pixels: similarities by one matmul, max and argmax over the M prototypes of each class,
    each labelled pixel's M similarities to its own class, then the buffer is overwritten in place with
    exp((s - max_row s) / tau) and its row sums (the softmax of the PPC loss). The Sinkhorn assignment runs on the
    own-class similarities. Backward writes the gradient with respect to the similarities into the same buffer (the
    PPC softmax term, the one-hot target terms, and the class-score gradient at each argmax) and multiplies it by the
    prototypes once. So the (N, M*K) similarities exist once, in the matmul's dtype, and nothing else of that size.
    """

    @staticmethod
    def forward(ctx, pixels, prototypes, rows, classes, assign, temperature, chunk_rows):
        num_classes, num_prototypes, dim = prototypes.shape
        num_pixels = pixels.shape[0]
        matmul_dtype, _ = _compute_dtypes(pixels)
        stats_dtype = torch.promote_types(matmul_dtype, torch.float32)
        device = pixels.device
        with torch.autocast(device_type=device.type, enabled=False):
            flat_prototypes = _prototype_major(prototypes, matmul_dtype)
            buffer = torch.empty(num_pixels, num_prototypes * num_classes, device=device, dtype=matmul_dtype)
            scores = torch.empty(num_pixels, num_classes, device=device, dtype=matmul_dtype)
            best = torch.empty(num_pixels, num_classes, device=device, dtype=_index_dtype(num_prototypes))
            row_max = torch.empty(num_pixels, device=device, dtype=stats_dtype)
            row_sum = torch.empty(num_pixels, device=device, dtype=stats_dtype)
            # Column of each pixel's own class, m*K + k (pixels without a label use class 0; they are dropped).
            own_class = torch.zeros(num_pixels, device=device, dtype=torch.long).index_copy_(0, rows, classes)
            own_columns = own_class[:, None] + torch.arange(num_prototypes, device=device) * num_classes
            own = torch.empty(num_pixels, num_prototypes, device=device, dtype=matmul_dtype)
            for start in range(0, num_pixels, chunk_rows):
                stop = min(num_pixels, start + chunk_rows)
                sims = buffer[start:stop]
                torch.mm(pixels[start:stop].detach().to(matmul_dtype), flat_prototypes.t(), out=sims)
                values, indices = _max_over_prototypes(sims.view(stop - start, num_prototypes, num_classes))
                scores[start:stop] = values
                best[start:stop] = indices
                torch.gather(sims, 1, own_columns[start:stop], out=own[start:stop])
                row_max[start:stop] = scores[start:stop].amax(dim=1)
                # exp(s / tau - max_row s / tau): in (0, 1], no overflow whatever tau is.
                shifted = sims.to(stats_dtype)
                torch.add(row_max[start:stop, None] / -temperature, shifted, alpha=1.0 / temperature, out=shifted)
                torch.sum(shifted.exp_(), dim=1, out=row_sum[start:stop])
                if stats_dtype != matmul_dtype:  # `shifted` is a float32 copy, not `sims` itself
                    sims.copy_(shifted)
            own = own[rows]
            assignments = assign(own, classes)
            assigned = own.gather(1, assignments[:, None]).squeeze(1)
            targets = classes * num_prototypes + assignments
            if rows.numel() > 0:
                log_partition = row_max[rows] / temperature + row_sum[rows].log()
                loss_ppc = (log_partition - assigned.to(stats_dtype) / temperature).mean()
            else:
                loss_ppc = torch.zeros((), device=device, dtype=stats_dtype)
        ctx.mark_non_differentiable(targets)
        ctx.save_for_backward(buffer, best, row_sum, rows, assignments * num_classes + classes, flat_prototypes)
        ctx.temperature, ctx.chunk_rows, ctx.pixels_dtype = temperature, chunk_rows, pixels.dtype
        ctx.consumed = False
        return scores, loss_ppc, assigned, targets

    @staticmethod
    def backward(ctx, grad_scores, grad_ppc, grad_assigned, _grad_targets):
        if ctx.consumed:
            raise RuntimeError(
                "The fused prototype head frees its similarity buffer in backward; it cannot be back-propagated twice"
                " (set model.fast_head = False to use the plain head with retain_graph=True)."
            )
        ctx.consumed = True
        buffer, best, row_sum, rows, target_columns, flat_prototypes = ctx.saved_tensors
        num_pixels = buffer.shape[0]
        num_classes = best.shape[1]
        num_labelled = rows.numel()
        device = buffer.device
        stats_dtype = row_sum.dtype
        # d PPC / d s = (softmax(s / tau) - onehot(target)) / (tau * V) on labelled rows, 0 on the others.
        row_scale = torch.zeros(num_pixels, device=device, dtype=stats_dtype)
        target_grad = torch.zeros(num_pixels, device=device, dtype=stats_dtype)
        target_column = torch.zeros(num_pixels, device=device, dtype=torch.long)
        if num_labelled > 0:
            target_column[rows] = target_columns
            if grad_ppc is not None:
                factor = grad_ppc.to(stats_dtype) / (ctx.temperature * num_labelled)
                row_scale[rows] = factor / row_sum[rows]
                target_grad[rows] = -factor
            if grad_assigned is not None:
                target_grad[rows] += grad_assigned.to(stats_dtype)
        grad_pixels = torch.empty(num_pixels, flat_prototypes.shape[1], device=device, dtype=buffer.dtype)
        with torch.autocast(device_type=device.type, enabled=False):
            for start in range(0, num_pixels, ctx.chunk_rows):
                stop = min(num_pixels, start + ctx.chunk_rows)
                grad = buffer[start:stop].mul_(row_scale[start:stop, None].to(buffer.dtype))
                grad.scatter_add_(1, target_column[start:stop, None], target_grad[start:stop, None].to(buffer.dtype))
                if grad_scores is not None:
                    grad.view(stop - start, -1, num_classes).scatter_add_(
                        1, best[start:stop, None].long(), grad_scores[start:stop, None].to(buffer.dtype)
                    )
                torch.mm(grad, flat_prototypes, out=grad_pixels[start:stop])
        return grad_pixels.to(ctx.pixels_dtype), None, None, None, None, None, None


def fused_scores_and_contrast(
    pixels: torch.Tensor,
    prototypes: torch.Tensor,
    rows: torch.Tensor,
    classes: torch.Tensor,
    assign,
    temperature: float = 0.1,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fast path of the training head's scores, PPC loss and assignment, differentiable w.r.t. `pixels`.

    Computes what `scores_and_contrast` computes (same values and gradients to float rounding), keeping one (N, K*M)
    buffer (see `_FusedScoresAndContrast`) where the plain composition makes several. One difference, on exact ties
    only: where two prototypes of a class have exactly the same similarity to a pixel, the class-score gradient goes
    to one of them instead of being split between them. It cannot be back-propagated twice (retain_graph).

    Args:
        pixels: (N, D) unit embeddings (may require grad).
        prototypes: (K, M, D) unit prototypes (constants: no gradient flows to them).
        rows: (V,) indices of the labelled pixels; classes: (V,) their classes.
        assign: (own (V, M), classes (V,)) -> (V,) prototype index in [0, M), e.g. Sinkhorn assignments.
        chunk_size: pixel-by-prototype scores per chunk (cache blocking only; results do not depend on it).

    Returns:
        scores (N, K) class scores, loss_ppc (), assigned (V,) similarity to the assigned prototype, targets (V,)
        flat index k*M + a (no gradient).
    """
    chunk_rows = _rows_per_chunk(prototypes.shape[0] * prototypes.shape[1], chunk_size)
    return _FusedScoresAndContrast.apply(pixels, prototypes, rows, classes, assign, temperature, chunk_rows)


# ------------------------------------------------------------------------------------------------------------------
# The path choice: every switch of the head is an argument here, and nowhere else is a path chosen.


def inference_logits(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    fast: bool,
    tracing: bool,
    normalization: str = "layer_norm",
    temperature: float = 0.1,
    chunk_size: int | None = None,
    similarity_dtype: torch.dtype | None = None,
    prototype_indices: bool = False,
    with_max_similarity: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The inference head: logits (B, K, h, w) from unit embeddings (B, D, h, w) and prototypes (K, M, D).

    | path | taken when |
    |---|---|
    | `traced_prototype_logits` | `fast`, LayerNorm normalisation, `tracing` (torch.compile / torch.export / jit) |
    | reference `normalize_class_scores(class_scores(...))` in the embeddings' dtype | `fast`, LayerNorm, and a
    gradient is needed (grad mode, an input requires grad) |
    | `prototype_logits` (blocked; block shape measured, or PROTOSEG_HEAD_BLOCKS) | `fast`, LayerNorm, otherwise |
    | reference `class_logits(class_scores(...))` with the similarity in `similarity_dtype` | not `fast`, or the
    temperature normalisation |

    All compute the same logits (up to rounding). `chunk_size` bounds the pixel-by-prototype scores held at once
    (eager paths); `similarity_dtype` (None: the embeddings' dtype) is the dtype of the similarity matmul, the class
    scores being normalised in float32 or wider.

    With `prototype_indices`, returns (logits, indices): indices (B, K, h, w) int64, the index m of each class's
    nearest prototype at each pixel, found in the same pass as the class scores (the path's own max over the M
    prototypes, so the logits are those of the path without indices; the traced path takes the reference's).
    With `with_max_similarity`, the largest similarity to any prototype (B, h, w) (`prototype_math.max_similarity`,
    the unknown score) comes last in the tuple, taken from the same class scores as the logits.
    """
    _check_similarity_dtype(similarity_dtype)
    if prototype_indices:
        return _logits_and_prototype_indices(
            embeddings,
            prototypes,
            fast,
            tracing,
            normalization,
            temperature,
            chunk_size,
            similarity_dtype,
            with_max_similarity,
        )
    if fast and normalization == "layer_norm":
        if tracing:
            return traced_prototype_logits(
                embeddings, prototypes, similarity_dtype=similarity_dtype, with_max_similarity=with_max_similarity
            )
        if torch.is_grad_enabled() and (embeddings.requires_grad or prototypes.requires_grad):
            scores = class_scores(embeddings, prototypes, chunk_size)
            logits = normalize_class_scores(scores, dim=1)
            return (logits, max_similarity(scores, dim=1)) if with_max_similarity else logits
        if not with_max_similarity:
            return prototype_logits(embeddings, prototypes, chunk_size=chunk_size, similarity_dtype=similarity_dtype)
        batch, _, height, width = embeddings.shape
        nearest = embeddings.new_empty(batch, height * width, dtype=_head_dtypes(embeddings, similarity_dtype)[1])
        logits = prototype_logits(
            embeddings, prototypes, chunk_size=chunk_size, similarity_dtype=similarity_dtype, nearest=nearest
        )
        return logits, nearest.view(batch, height, width)
    scores = class_scores(embeddings.to(similarity_dtype or embeddings.dtype), prototypes, chunk_size=chunk_size)
    scores = scores.to(torch.promote_types(scores.dtype, embeddings.dtype))
    logits = class_logits(scores, 1, normalization, temperature)
    return (logits, max_similarity(scores, dim=1)) if with_max_similarity else logits


def _logits_and_prototype_indices(
    embeddings, prototypes, fast, tracing, normalization, temperature, chunk_size, similarity_dtype, with_max_similarity
) -> tuple[torch.Tensor, ...]:
    """`inference_logits(..., prototype_indices=True)`: the blocked head fills the indices in its own pass; the other
    paths take the reference's class scores with their argmax over the M prototypes."""
    batch, _, height, width = embeddings.shape
    num_classes = prototypes.shape[0]
    needs_grad = torch.is_grad_enabled() and (embeddings.requires_grad or prototypes.requires_grad)
    if fast and normalization == "layer_norm" and not tracing and not needs_grad:
        indices = torch.empty(batch, num_classes, height * width, dtype=torch.long, device=embeddings.device)
        nearest = None
        if with_max_similarity:
            nearest = embeddings.new_empty(batch, height * width, dtype=_head_dtypes(embeddings, similarity_dtype)[1])
        logits = prototype_logits(
            embeddings,
            prototypes,
            chunk_size=chunk_size,
            similarity_dtype=similarity_dtype,
            indices=indices,
            nearest=nearest,
        )
        indices = indices.view(batch, num_classes, height, width)
        return (logits, indices, nearest.view(batch, height, width)) if with_max_similarity else (logits, indices)
    dtype = embeddings.dtype if fast else (similarity_dtype or embeddings.dtype)
    scores, indices = class_scores(embeddings.to(dtype), prototypes, chunk_size, return_indices=True)
    scores = scores.to(torch.promote_types(scores.dtype, embeddings.dtype))
    logits = class_logits(scores, 1, normalization, temperature)
    return (logits, indices, max_similarity(scores, dim=1)) if with_max_similarity else (logits, indices)


@dataclass
class TrainingScores:
    """The training head's results for one labelled batch (docs/method.md, training steps 1 and 2).

    `scores` (N, K): class scores S_k(i) of every pixel; `loss_ppc`, `loss_ppd` (): the losses. The rest says which
    pixels update the prototypes (`update_inputs`): eagerly the labelled ones by index (`rows`, with `classes` and
    `targets` per labelled pixel), traced all of them with a mask (`labelled`, `classes` and `targets` per pixel).
    """

    scores: torch.Tensor
    loss_ppc: torch.Tensor
    loss_ppd: torch.Tensor
    pixels: torch.Tensor
    classes: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor | None = None
    labelled: torch.Tensor | None = None

    def update_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(embeddings, targets, mask) for `momentum_update`: the labelled pixels whose class the scores predict
        (argmax_k S == k_i), each with its assigned prototype k_i * M + a_i (training step 3)."""
        if self.labelled is not None:
            updating = self.labelled & (self.scores.detach().argmax(dim=1) == self.classes)
            return self.pixels, self.targets, updating
        correct = self.scores.detach()[self.rows].argmax(dim=1) == self.classes
        return self.pixels[self.rows[correct]], self.targets[correct], None


def training_scores(
    pixels: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    *,
    fast: bool,
    tracing: bool,
    ignore_index: int,
    epsilon: float,
    iterations: int,
    temperature: float,
) -> TrainingScores:
    """The training head: class scores, Sinkhorn assignments (`epsilon`, `iterations`), PPC (`temperature`) and PPD
    of unit pixel embeddings (N, D) (may require grad) with labels (N,) against prototypes (K, M, D) (constants).

    | path | taken when |
    |---|---|
    | `masked_scores_and_contrast`: all pixels, a mask of the labelled ones | `tracing` (no shape depends on labels) |
    | `fused_scores_and_contrast`: the labelled pixels by index | `fast` |
    | reference `scores_and_contrast`: the labelled pixels by index | otherwise |

    All give the same values and gradients (up to rounding); pixels labelled `ignore_index` take no part.
    """
    labelled = labels != ignore_index
    assign = partial(sinkhorn_assignments, num_classes=prototypes.shape[0], epsilon=epsilon, iterations=iterations)
    if tracing:
        classes = torch.where(labelled, labels, 0)
        scores, loss_ppc, assigned, targets = masked_scores_and_contrast(
            pixels, prototypes, labelled, classes, assign, temperature
        )
        loss_ppd = ppd_loss(assigned, mask=labelled)
        return TrainingScores(scores, loss_ppc, loss_ppd, pixels, classes, targets, labelled=labelled)
    rows = labelled.nonzero().squeeze(1)
    classes = labels[rows]
    head = fused_scores_and_contrast if fast else scores_and_contrast
    scores, loss_ppc, assigned, targets = head(pixels, prototypes, rows, classes, assign, temperature)
    return TrainingScores(scores, loss_ppc, ppd_loss(assigned), pixels, classes, targets, rows=rows)
