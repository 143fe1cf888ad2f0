"""The mathematics of ProtoSeg's head, as small pure functions over tensors: the reference.

Each function is one equation of docs/method.md (the section is named in its docstring), written plainly and for all
classes at once (no Python loop over K). The fast paths in `prototype_kernels.py` compute the same values with less
memory traffic; the tests hold each of them against the function here it equals.

Shapes: N pixels, K classes, M prototypes per class, D embedding width.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------------------------
# Unit vectors (forward pass, step 4)


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


# ------------------------------------------------------------------------------------------------------------------
# Scores and logits (forward pass, steps 5 and 6)


def prototype_similarities(embeddings: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """s_{k,m}(i) = <e_i, p_{k,m}>: unit pixel embeddings (N, D), unit prototypes (K, M, D) -> (N, K, M)."""
    num_classes, num_prototypes, dim = prototypes.shape
    flat = embeddings @ prototypes.reshape(num_classes * num_prototypes, dim).t()
    return flat.view(embeddings.shape[0], num_classes, num_prototypes)


def class_scores(
    embeddings: torch.Tensor, prototypes: torch.Tensor, chunk_size: int | None = None, return_indices: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """S_k(i) = max_m <e_i, p_{k,m}> for embeddings (B, D, h, w) and prototypes (K, M, D): (B, K, h, w).

    With `chunk_size`, at most about `chunk_size` pixel-by-prototype scores exist at once (the classes are
    processed in blocks); results are identical. With `return_indices`, also argmax_m (B, K, h, w) int64, the
    nearest prototype of each class (the first of equal maxima), from the same max.
    """
    batch, dim, height, width = embeddings.shape
    num_classes, num_prototypes, _ = prototypes.shape
    pixels = embeddings.permute(0, 2, 3, 1).reshape(-1, dim)
    prototypes = prototypes.to(pixels.dtype)
    if chunk_size is None:
        block = num_classes
    else:
        block = max(1, min(num_classes, chunk_size // max(1, pixels.shape[0] * num_prototypes)))
    if return_indices:
        parts = [
            prototype_similarities(pixels, prototypes[start : start + block]).max(dim=-1)
            for start in range(0, num_classes, block)
        ]
        scores, indices = torch.cat([part.values for part in parts], 1), torch.cat([part.indices for part in parts], 1)
        return (
            scores.view(batch, height, width, num_classes).permute(0, 3, 1, 2),
            indices.view(batch, height, width, num_classes).permute(0, 3, 1, 2),
        )
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


def class_logits(
    scores: torch.Tensor, dim: int, normalization: str = "layer_norm", temperature: float = 0.1
) -> torch.Tensor:
    """Class scores S (classes along `dim`) -> logits, as `config.class_score_normalization` says: the contract's
    LayerNorm over the classes (`normalize_class_scores`), or S / `temperature`."""
    if normalization == "temperature":
        return scores / temperature
    return normalize_class_scores(scores, dim=dim)


def max_similarity(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The unknown score: max_k S_k(i) = max_{k,m} <e_i, p_{k,m}>, the cosine similarity of a pixel to its nearest
    prototype of any class, from the class scores S (classes along `dim`, before the class-axis normalisation, which
    removes the scale). In [-1, 1]; low means far from everything the model has seen (docs/method.md, "Unknown
    pixels")."""
    return scores.amax(dim=dim)


# ------------------------------------------------------------------------------------------------------------------
# Assignment: Sinkhorn-Knopp within each class, argmax robust to rounding (training step, step 1)


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
    """a_i: (N,) index in [0, M) of the prototype of its own class each pixel is assigned to, the argmax of the plan.

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


# ------------------------------------------------------------------------------------------------------------------
# Losses (training step, step 2)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the entries where `mask` is True, 0 if there are none (static shapes, no branch)."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def ppc_loss(
    similarities: torch.Tensor, targets: torch.Tensor, temperature: float = 0.1, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Pixel-prototype contrast: cross-entropy over all K*M prototypes with logits s(i) / tau, target k_i * M + a_i.

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


def scores_and_contrast(
    pixels: torch.Tensor,
    prototypes: torch.Tensor,
    rows: torch.Tensor,
    classes: torch.Tensor,
    assign,
    temperature: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training head's class scores, assignment and PPC loss (steps 1 and 2), composed from the functions above.

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


# ------------------------------------------------------------------------------------------------------------------
# Prototype update (training step, steps 3 and 4)


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


def average_across_processes(prototypes: torch.Tensor) -> torch.Tensor:
    """All-reduce mean of the prototypes over processes, L2-normalised; identity without torch.distributed.

    Every process must call it at the same step (it is a collective when a process group exists).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return prototypes
    averaged = _float32_or_wider(prototypes).clone()
    dist.all_reduce(averaged, op=dist.ReduceOp.SUM)
    return l2_normalize(averaged / dist.get_world_size()).to(prototypes.dtype)


# ------------------------------------------------------------------------------------------------------------------
# Initialisation from data (forward pass, step 4; also how `add_classes` learns a class)


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
