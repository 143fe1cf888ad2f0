"""Prototype math of ProtoSeg as small pure functions over tensors.

Shapes: N pixels, K classes, M prototypes per class, D embedding width. Every function works on all classes at
once (no Python loop over K); the model in `modeling_proto_segformer.py` wires them together.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """`x / ||x||` along `dim` (zero vectors stay zero)."""
    return F.normalize(x, p=2.0, dim=dim, eps=eps)


def random_unit_prototypes(
    num_classes: int,
    num_prototypes: int,
    dim: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(K, M, D) prototypes drawn from a standard normal and L2-normalised along D."""
    values = torch.randn(num_classes, num_prototypes, dim, generator=generator, device=device, dtype=dtype)
    return l2_normalize(values)


def _float32_or_wider(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def prototype_similarities(embeddings: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of unit pixel embeddings (N, D) to unit prototypes (K, M, D): (N, K, M)."""
    num_classes, num_prototypes, dim = prototypes.shape
    flat = embeddings @ prototypes.reshape(num_classes * num_prototypes, dim).t()
    return flat.view(embeddings.shape[0], num_classes, num_prototypes)


def class_scores(embeddings: torch.Tensor, prototypes: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """S_k(i) = max_m <e_i, p_{k,m}> for embeddings (B, D, h, w) and prototypes (K, M, D): (B, K, h, w).

    With `chunk_size`, at most about `chunk_size` pixel-by-prototype scores exist at once (the classes are
    processed in blocks); results are identical.
    """
    batch, dim, height, width = embeddings.shape
    num_classes, num_prototypes, _ = prototypes.shape
    pixels = embeddings.permute(0, 2, 3, 1).reshape(-1, dim)
    prototypes = prototypes.to(pixels.dtype)
    if chunk_size is None:
        block = num_classes
    else:
        block = max(1, min(num_classes, chunk_size // max(1, pixels.shape[0] * num_prototypes)))
    if block >= num_classes:
        scores = prototype_similarities(pixels, prototypes).amax(dim=-1)
    else:
        scores = torch.cat(
            [
                prototype_similarities(pixels, prototypes[start : start + block]).amax(dim=-1)
                for start in range(0, num_classes, block)
            ],
            dim=1,
        )
    return scores.view(batch, height, width, num_classes).permute(0, 3, 1, 2)


def normalize_class_scores(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """LayerNorm without affine parameters over the class axis `dim` (keeps the argmax; acts as a temperature)."""
    moved = scores.movedim(dim, -1)
    return F.layer_norm(moved, (moved.shape[-1],)).movedim(-1, dim)


# ------------------------------------------------------------------------------------------------------------------
# Fast paths. Each computes exactly what a composition of the plain functions above computes (the tests check both
# against each other); they differ in how much they materialise. Inside them the M*K similarities of a pixel are laid
# out prototype-major (column m*K + k), so the max over the M prototypes of a class is an elementwise max of M
# contiguous K-vectors.

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


# Pixel blocks of the traced formulation of `prototype_logits` (torch.export, torch.compile, ONNX): a fixed count,
# because the number of pixels is symbolic there. A block holds B*h*w / TRACED_PIXEL_BLOCKS pixel-by-prototype scores
# (a 512x512 image at K = 847, M = 10: 8.5 MiB in float32).
TRACED_PIXEL_BLOCKS = 64


def is_tracing() -> bool:
    """Whether the code runs under torch.compile / torch.export (dynamo or non-strict) or torch.jit.trace.

    Data-dependent branches (a Python `if` on tensor values) and Python loops over tensor sizes run only outside.
    """
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def traced_prototype_logits(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    eps: float = 1e-5,
    num_blocks: int = TRACED_PIXEL_BLOCKS,
    similarity_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The fused head as tensor operations over a fixed number of pixel blocks: (B, D, h, w) -> (B, K, h, w).

    Same values as `prototype_logits` (per block: one matmul against the prototype-major prototypes, the max over the
    M prototypes of each class, the class-axis LayerNorm), with no Python loop over the batch or the pixels, so
    torch.export and torch.compile keep batch, height and width symbolic. Differentiable w.r.t. `embeddings`.
    `similarity_dtype` as in `prototype_logits`.
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
        blocks = [
            F.layer_norm(
                (block @ flat_prototypes).view(-1, num_prototypes, num_classes).amax(dim=1).to(out_dtype),
                (num_classes,),
                eps=eps,
            )
            for block in padded.view(num_blocks, -1, dim).unbind(0)
        ]
        scores = torch.cat(blocks)[:num_pixels]
    return scores.view(batch, height, width, num_classes).permute(0, 3, 1, 2).contiguous()


def prototype_logits(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    chunk_size: int | None = None,
    eps: float = 1e-5,
    similarity_dtype: torch.dtype | None = None,
    block_shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Fast path of `normalize_class_scores(class_scores(embeddings, prototypes, chunk_size), dim=1)`: (B, K, h, w).

    Embeddings (B, D, h, w), prototypes (K, M, D). Without autograd it runs `blocked_prototype_logits`: the similarity
    matmul, the max over prototypes and the class-axis LayerNorm per block of pixels and classes, with block shapes
    measured on this machine (`head_block_shape`); `chunk_size` bounds the pixel-by-prototype scores held at once. When
    a gradient is needed it returns the plain, differentiable composition. Under torch.compile / torch.export it runs
    `traced_prototype_logits` (the same computation without Python loops over sizes, so shapes stay dynamic; its block
    count is fixed, so `chunk_size` and `block_shape` do not apply there).

    `similarity_dtype` (None: the embeddings' dtype, or autocast's): the dtype of the similarity matmul, e.g.
    torch.bfloat16 for CPUs and GPUs with fast bf16 matrix units; the class scores are then normalised in float32
    (or the embeddings' wider dtype). `block_shape`: (pixels, classes) per block instead of the measured choice.
    """
    if similarity_dtype is not None and similarity_dtype not in SIMILARITY_DTYPES.values():
        raise ValueError(
            f"similarity_dtype must be one of {sorted(SIMILARITY_DTYPES)} or None, got {similarity_dtype}."
        )
    if is_tracing():
        return traced_prototype_logits(embeddings, prototypes, eps=eps, similarity_dtype=similarity_dtype)
    if torch.is_grad_enabled() and (embeddings.requires_grad or prototypes.requires_grad):
        return normalize_class_scores(class_scores(embeddings, prototypes, chunk_size), dim=1)
    matmul_dtype, out_dtype = _head_dtypes(embeddings, similarity_dtype)
    num_classes, num_prototypes, _ = prototypes.shape
    if block_shape is None:
        block_shape = head_block_shape(embeddings, prototypes, matmul_dtype, out_dtype, eps=eps)
    rows, classes = _bounded_block_shape(block_shape, num_classes, num_prototypes, chunk_size)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return blocked_prototype_logits(
            embeddings.detach(), prototypes.detach(), rows, classes, matmul_dtype, out_dtype, eps
        )


# Dtypes the inference head's similarity may run in (`config.similarity_dtype`).
SIMILARITY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
) -> torch.Tensor:
    """The inference head, blocked for the caches: (B, D, h, w), (K, M, D) -> logits (B, K, h, w), contiguous.

    For each block of `rows` pixels and each block of `classes` classes, one matmul (M*classes, D) @ (D, rows) fills a
    cache-sized tile of similarities, prototype-major, and the max over the M prototypes reads it back while it is
    still in cache (an elementwise max of M contiguous (classes, rows) slabs) into the block's (K, rows) class scores;
    then the LayerNorm over the class axis (mean and variance over K per pixel, in `out_dtype`) writes the pixels'
    logits, already in the (K, pixels) layout of the result. Computes exactly what `normalize_class_scores(
    class_scores(...))` computes (the same products and max; the LayerNorm up to rounding).
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
                torch.amax(
                    similarities.view(num_prototypes, width_k, count),
                    dim=0,
                    out=scores[first : first + width_k, :count],
                )
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
    """Time the candidate block shapes on the first pixels, HEAD_TUNING_ROUNDS rounds in turns (best time of each).

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
                start = time.perf_counter()
                result = run(shape)
                elapsed = time.perf_counter() - start
                if torch.equal(result, reference):  # a shape that changed a bit is never chosen
                    timings[shape] = min(timings[shape], elapsed)
                else:
                    del timings[shape]
    best = min(timings, key=timings.get)
    return best if timings[best] < (1 - HEAD_TUNING_MARGIN) * timings[DEFAULT_HEAD_BLOCK] else DEFAULT_HEAD_BLOCK


def scores_and_contrast(
    pixels: torch.Tensor,
    prototypes: torch.Tensor,
    rows: torch.Tensor,
    classes: torch.Tensor,
    assign,
    temperature: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training head's class scores, PPC loss and prototype assignment: the plain reference composition.

    Args:
        pixels: (N, D) unit embeddings (may require grad).
        prototypes: (K, M, D) unit prototypes (used as constants).
        rows: (V,) indices of the labelled pixels; classes: (V,) their classes.
        assign: (own (V, M), classes (V,)) -> (V,) prototype index in [0, M), e.g. Sinkhorn assignments.

    Returns:
        scores (N, K) = max_m s_{k,m}, loss_ppc (), assigned (V,) = s_{k_i, a_i}(i), targets (V,) = k_i * M + a_i.
    """
    num_prototypes = prototypes.shape[1]
    similarities = prototype_similarities(pixels, prototypes.detach().to(pixels.dtype))
    scores = similarities.amax(dim=-1)
    labelled = similarities[rows]
    own = labelled.gather(1, classes[:, None, None].expand(-1, 1, num_prototypes)).squeeze(1)
    assignments = assign(own.detach(), classes)
    targets = classes * num_prototypes + assignments
    loss_ppc = ppc_loss(labelled, targets, temperature)
    assigned = own.gather(1, assignments[:, None]).squeeze(1)
    return scores, loss_ppc, assigned, targets


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


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for sums over many pixels (float32 sums sequentially: 1e5 equal terms drift by 1e-4), where supported."""
    return tensor.dtype if tensor.device.type == "mps" else torch.float64


def sinkhorn_knopp(
    scores: torch.Tensor,
    classes: torch.Tensor,
    num_classes: int,
    epsilon: float = 0.05,
    iterations: int = 3,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Equipartition transport plans of each class's pixels onto that class's prototypes, all classes at once.

    Args:
        scores: (N, M) similarity of each pixel to the M prototypes of its own class.
        classes: (N,) class of each pixel, in [0, num_classes).
        num_classes: K.
        epsilon: entropy regularisation; Q = exp(scores / epsilon).
        iterations: T rounds of (prototype columns sum to 1/M, pixel rows sum to 1/n_k), per class.
        mask: (N,) bool, optional: the pixels that take part (the others get zero rows and count in no class), so
            a caller can pass all pixels with a fixed shape instead of selecting rows (torch.compile, torch.export).

    Returns:
        (N, M) plan Q in float32 (float64 if `scores` is); within each class the rows sum to 1/n_k. The sums over a
        class's pixels accumulate in float64, so a plan entry is within a few units in the last place of the exact
        plan of its (rounded) scores, however many pixels a class has. Every shape is static (no `bincount`).
    """
    if scores.shape[0] == 0:
        return _float32_or_wider(scores)
    device_type = scores.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        scores = _float32_or_wider(scores.detach())
        num_prototypes = scores.shape[1]
        tiny = torch.finfo(scores.dtype).tiny
        wide = _accumulation_dtype(scores)
        # Shift each class by its own maximum before exp: the per-class normalisation cancels the shift.
        row_max = scores.amax(dim=1)
        if mask is not None:
            row_max = torch.where(mask, row_max, float("-inf"))
        class_max = torch.full((num_classes,), float("-inf"), device=scores.device, dtype=scores.dtype)
        class_max = class_max.scatter_reduce(0, classes, row_max, reduce="amax", include_self=True)
        plan = torch.exp((scores - class_max[classes, None]) / epsilon)
        members = torch.ones_like(classes, dtype=wide) if mask is None else mask.to(wide)
        if mask is not None:
            plan = torch.where(mask[:, None], plan, 0.0)
        class_total = torch.zeros(num_classes, device=scores.device, dtype=wide)
        class_total.index_add_(0, classes, plan.sum(dim=1, dtype=wide))
        plan = plan / class_total.to(scores.dtype)[classes, None].clamp_min(tiny)
        # Pixel counts as float sums (exact integers), not `bincount`, whose output size depends on the values.
        pixels_per_class = torch.zeros(num_classes, device=scores.device, dtype=wide).index_add_(0, classes, members)
        pixels_per_class = pixels_per_class.to(scores.dtype)
        for _ in range(iterations):
            column_sums = torch.zeros(num_classes, num_prototypes, device=scores.device, dtype=wide)
            column_sums.index_add_(0, classes, plan.to(wide))
            plan = plan / (column_sums.to(scores.dtype)[classes] * num_prototypes).clamp_min(tiny)
            row_sums = plan.sum(dim=1, keepdim=True)
            plan = plan / (row_sums * pixels_per_class[classes, None]).clamp_min(tiny)
    return plan


# Ties in the assignment. Two similarities (cosines, in [-1, 1]) closer than SIMILARITY_TIE_TOLERANCE are equal. Two
# code paths or two CPUs computing the same D-term dot products differ by rounding: measured up to 4e-7 in float32
# (mm vs bmm, AVX-512 vs SSE kernels, D = 16..768). 1e-5 (about 80 float32 ulps near 1) is 25x that, and far below
# the spread of a pixel's similarities to distinct prototypes (about 1 / sqrt(D), over 0.03 for D <= 1024). float64
# uses the same tolerance, so a float64 run assigns like a float32 one. In bfloat16 / float16 the matmul accumulates
# in float32 and rounds once, so two paths differ by one rounding step (2^-8 / 2^-11 near 1): the tolerance is 4 steps.
# A plan entry ties with its row's maximum when epsilon * log(Q / max Q) (a similarity difference, shifted by the
# columns' scalings) is within the similarity tolerance, or its relative difference within PLAN_TIE_TOLERANCE, 4x the
# float32 Sinkhorn's own rounding (measured <= 2.5e-6 against float64 after T = 3 to 10 iterations).
SIMILARITY_TIE_TOLERANCE = 1e-5
HALF_PRECISION_TIE_TOLERANCE = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}
PLAN_TIE_TOLERANCE = 1e-5


def similarity_tie_tolerance(dtype: torch.dtype) -> float:
    """Similarities computed in `dtype` closer than this count as equal in the assignment's tie-breaks."""
    return HALF_PRECISION_TIE_TOLERANCE.get(dtype, SIMILARITY_TIE_TOLERANCE)


def argmax_with_ties(
    plan: torch.Tensor, similarities: torch.Tensor, log_tolerance: float, similarity_tolerance: float
) -> torch.Tensor:
    """Row-wise argmax of a transport plan that does not depend on the last bits of rounding: (N, M) -> (N,) long.

    Candidates are the entries of a row with log(plan) within `log_tolerance` of the row's maximum (plan >= max *
    exp(-log_tolerance)); among them the one with the highest similarity wins, and candidates whose similarity is
    within `similarity_tolerance` of that highest are equal, the lowest index winning. A row that is uniform up to
    rounding (a class with fewer pixels than prototypes, or whose pixels are all equal) thus goes to its nearest
    prototype, and duplicated prototypes to the first of them. Rows without a candidate (NaN) get 0.

    Args:
        plan: (N, M) non-negative plan (float32 or float64).
        similarities: (N, M) similarity of each pixel to each prototype (any float dtype).
    """
    top = plan.amax(dim=1, keepdim=True)
    candidates = plan >= top * math.exp(-log_tolerance)
    values = torch.where(candidates, similarities.to(plan.dtype), float("-inf"))
    best = values.amax(dim=1, keepdim=True)
    chosen = candidates & (values >= best - similarity_tolerance)
    return chosen.to(torch.uint8).argmax(dim=1)  # the first maximum: the lowest chosen index (0 if none)


def sinkhorn_assignments(
    scores: torch.Tensor,
    classes: torch.Tensor,
    num_classes: int,
    epsilon: float = 0.05,
    iterations: int = 3,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N,) index in [0, M) of the prototype of its own class each pixel is assigned to: the argmax of the plan.

    Ties in the plan go to the prototype most similar to the pixel, ties in similarity to the lowest index
    (`argmax_with_ties`), so the assignment is the same on every CPU and in every code path. Plan entries tie when
    epsilon * log Q (a similarity shifted by the column's scaling) agree within the similarity tolerance of the
    scores' dtype (`similarity_tie_tolerance`), or their relative difference is within PLAN_TIE_TOLERANCE.
    With `mask` (see `sinkhorn_knopp`), the pixels outside it get an index in [0, M) that means nothing.
    """
    if scores.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    plan = sinkhorn_knopp(scores, classes, num_classes, epsilon, iterations, mask)
    tolerance = similarity_tie_tolerance(scores.dtype)
    return argmax_with_ties(plan, scores.detach(), max(tolerance / epsilon, PLAN_TIE_TOLERANCE), tolerance)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the entries where `mask` is True, 0 if there are none (static shapes, no branch)."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def ppc_loss(
    similarities: torch.Tensor, targets: torch.Tensor, temperature: float = 0.1, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Pixel-prototype contrast: cross-entropy over all K*M prototypes.

    Args:
        similarities: (N, K, M) or (N, K*M) cosine similarities of labelled pixels to every prototype.
        targets: (N,) flat index k_i * M + a_i of each pixel's assigned prototype.
        mask: (N,) bool, optional: average over these pixels only (the others are ignored pixels whose targets
            mean nothing); the same loss as passing the masked rows, with shapes that do not depend on the labels.
    """
    logits = similarities.flatten(1)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if mask is not None:
        per_pixel = F.cross_entropy(_float32_or_wider(logits) / temperature, targets, reduction="none")
        return _masked_mean(per_pixel, mask)
    return F.cross_entropy(_float32_or_wider(logits) / temperature, targets)


def ppd_loss(assigned_similarities: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-prototype distance: mean over pixels (those in the (N,) bool `mask`, if given) of (1 - s_{k_i, a_i}(i))^2
    for (N,) similarities."""
    if assigned_similarities.numel() == 0:
        return assigned_similarities.sum() * 0.0
    distances = (1.0 - _float32_or_wider(assigned_similarities)).pow(2)
    return distances.mean() if mask is None else _masked_mean(distances, mask)


def momentum_update(
    prototypes: torch.Tensor,
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    momentum: float = 0.999,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """New prototypes after one momentum step; the input is not modified.

    For each (k, m): f = normalise(sum of the embeddings whose target is k*M + m), and
    p <- normalise(momentum * p + (1 - momentum) * f). Prototypes that no embedding targets stay unchanged.
    Embeddings with a NaN or inf (a diverging step) are left out, so they never reach the buffer.

    Args:
        prototypes: (K, M, D) unit prototypes.
        embeddings: (N, D) unit embeddings of the pixels that update (the caller keeps only correct ones).
        targets: (N,) flat prototype index k*M + m of each embedding (in range also where `mask` is False).
        mask: (N,) bool, optional: only these embeddings update (the same result as passing only them, with shapes
            that do not depend on which they are: torch.compile traces it without a graph break).
    """
    num_classes, num_prototypes, dim = prototypes.shape
    with torch.no_grad(), torch.autocast(device_type=prototypes.device.type, enabled=False):
        flat = _float32_or_wider(prototypes.reshape(num_classes * num_prototypes, dim))
        embeddings = embeddings.detach().to(flat.dtype)
        finite = torch.isfinite(embeddings).all(dim=1)
        if mask is not None:
            finite = finite & mask
        embeddings = torch.where(finite[:, None], embeddings, torch.zeros_like(embeddings))
        sums = torch.zeros_like(flat).index_add_(0, targets, embeddings)
        counts = torch.zeros_like(flat[:, 0]).index_add_(0, targets, finite.to(flat.dtype))
        moved = l2_normalize(momentum * flat + (1.0 - momentum) * l2_normalize(sums))
        updated = torch.where((counts > 0)[:, None], moved, flat)
    return updated.view(num_classes, num_prototypes, dim).to(prototypes.dtype)


def own_class_similarities(
    embeddings: torch.Tensor, classes: torch.Tensor, prototypes: torch.Tensor, chunk_pixels: int = 4096
) -> torch.Tensor:
    """(N, M) similarity of each embedding (N, D) to the M prototypes of its own class, prototypes (K, M, D).

    Gathers only the own class's prototypes, in chunks of pixels, so memory is O(chunk * M * D) whatever K is.
    """
    parts = [
        torch.bmm(
            prototypes[classes[start : start + chunk_pixels]], embeddings[start : start + chunk_pixels, :, None]
        ).squeeze(-1)
        for start in range(0, embeddings.shape[0], chunk_pixels)
    ]
    if not parts:
        return embeddings.new_zeros(0, prototypes.shape[1])
    return torch.cat(parts)


def cluster_prototypes(
    embeddings: torch.Tensor,
    classes: torch.Tensor,
    num_classes: int,
    num_prototypes: int,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    rounds: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of each class's embeddings into M prototypes, with Sinkhorn equipartition assignments.

    The same clustering the training step uses, run to convergence from M pixels of each class picked at random.
    All classes at once.

    Args:
        embeddings: (N, D) unit embeddings.
        classes: (N,) class of each embedding in [0, num_classes).

    Returns:
        (K, M, D) unit prototypes (rows of classes without any embedding are zero) and a (K,) bool mask of the
        classes that had embeddings.
    """
    embeddings = _float32_or_wider(embeddings.detach())
    counts = torch.bincount(classes, minlength=num_classes)
    present = counts > 0
    # Random order within each class, classes contiguous: sort by class + uniform noise in [0, 1).
    noise = torch.rand(classes.shape[0], generator=generator, dtype=torch.float64).to(classes.device)
    order = torch.argsort(classes.double() + noise)
    starts = torch.cumsum(counts, 0) - counts
    picks = (
        starts[:, None]
        + (torch.arange(num_prototypes, device=classes.device)[None] * counts[:, None]) // num_prototypes
    )
    picks = picks.clamp(max=max(classes.shape[0] - 1, 0))
    if classes.shape[0] == 0:
        return embeddings.new_zeros(num_classes, num_prototypes, embeddings.shape[1]), present
    centers = embeddings[order[picks]] * present[:, None, None]
    for _ in range(rounds):
        own = own_class_similarities(embeddings, classes, centers)
        assignments = sinkhorn_assignments(own, classes, num_classes, epsilon, sinkhorn_iterations)
        targets = classes * num_prototypes + assignments
        flat = centers.reshape(num_classes * num_prototypes, -1)
        sums = torch.zeros_like(flat).index_add_(0, targets, embeddings)
        hit = torch.bincount(targets, minlength=flat.shape[0]) > 0
        centers = torch.where(hit[:, None], l2_normalize(sums), flat).view_as(centers)
    return centers, present


def average_across_processes(prototypes: torch.Tensor) -> torch.Tensor:
    """All-reduce mean of the prototypes over processes, L2-normalised; identity without torch.distributed.

    Every process must call it at the same step (it is a collective when a process group exists).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return prototypes
    averaged = _float32_or_wider(prototypes).clone()
    dist.all_reduce(averaged, op=dist.ReduceOp.SUM)
    return l2_normalize(averaged / dist.get_world_size()).to(prototypes.dtype)


__all__ = [
    "argmax_with_ties",
    "average_across_processes",
    "class_scores",
    "cluster_prototypes",
    "fused_scores_and_contrast",
    "is_tracing",
    "l2_normalize",
    "masked_scores_and_contrast",
    "momentum_update",
    "normalize_class_scores",
    "own_class_similarities",
    "ppc_loss",
    "ppd_loss",
    "prototype_logits",
    "prototype_similarities",
    "random_unit_prototypes",
    "scores_and_contrast",
    "similarity_tie_tolerance",
    "sinkhorn_assignments",
    "sinkhorn_knopp",
    "traced_prototype_logits",
]
