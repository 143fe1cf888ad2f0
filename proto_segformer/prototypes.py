"""Prototype math of ProtoSeg as small pure functions over tensors.

Shapes: N pixels, K classes, M prototypes per class, D embedding width. Every function works on all classes at
once (no Python loop over K); the model in `modeling_proto_segformer.py` wires them together.
"""

from __future__ import annotations

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


def sinkhorn_knopp(
    scores: torch.Tensor,
    classes: torch.Tensor,
    num_classes: int,
    epsilon: float = 0.05,
    iterations: int = 3,
) -> torch.Tensor:
    """Equipartition transport plans of each class's pixels onto that class's prototypes, all classes at once.

    Args:
        scores: (N, M) similarity of each pixel to the M prototypes of its own class.
        classes: (N,) class of each pixel, in [0, num_classes).
        num_classes: K.
        epsilon: entropy regularisation; Q = exp(scores / epsilon).
        iterations: T rounds of (prototype columns sum to 1/M, pixel rows sum to 1/n_k), per class.

    Returns:
        (N, M) plan Q in float32 (float64 if `scores` is); within each class the rows sum to 1/n_k.
    """
    if scores.shape[0] == 0:
        return _float32_or_wider(scores)
    device_type = scores.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        scores = _float32_or_wider(scores.detach())
        num_prototypes = scores.shape[1]
        tiny = torch.finfo(scores.dtype).tiny
        # Shift each class by its own maximum before exp: the per-class normalisation cancels the shift.
        class_max = torch.full((num_classes,), float("-inf"), device=scores.device, dtype=scores.dtype)
        class_max = class_max.scatter_reduce(0, classes, scores.amax(dim=1), reduce="amax", include_self=True)
        plan = torch.exp((scores - class_max[classes, None]) / epsilon)
        class_total = torch.zeros(num_classes, device=scores.device, dtype=scores.dtype)
        class_total.index_add_(0, classes, plan.sum(dim=1))
        plan = plan / class_total[classes, None].clamp_min(tiny)
        pixels_per_class = torch.bincount(classes, minlength=num_classes).to(scores.dtype)
        for _ in range(iterations):
            column_sums = torch.zeros(num_classes, num_prototypes, device=scores.device, dtype=scores.dtype)
            column_sums.index_add_(0, classes, plan)
            plan = plan / (column_sums[classes] * num_prototypes).clamp_min(tiny)
            row_sums = plan.sum(dim=1, keepdim=True)
            plan = plan / (row_sums * pixels_per_class[classes, None]).clamp_min(tiny)
    return plan


def sinkhorn_assignments(
    scores: torch.Tensor,
    classes: torch.Tensor,
    num_classes: int,
    epsilon: float = 0.05,
    iterations: int = 3,
) -> torch.Tensor:
    """(N,) index in [0, M) of the prototype of its own class each pixel is assigned to (argmax of the plan)."""
    if scores.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return sinkhorn_knopp(scores, classes, num_classes, epsilon, iterations).argmax(dim=1)


def ppc_loss(similarities: torch.Tensor, targets: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Pixel-prototype contrast: cross-entropy over all K*M prototypes.

    Args:
        similarities: (N, K, M) or (N, K*M) cosine similarities of labelled pixels to every prototype.
        targets: (N,) flat index k_i * M + a_i of each pixel's assigned prototype.
    """
    logits = similarities.flatten(1)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(_float32_or_wider(logits) / temperature, targets)


def ppd_loss(assigned_similarities: torch.Tensor) -> torch.Tensor:
    """Pixel-prototype distance: mean over pixels of (1 - s_{k_i, a_i}(i))^2 for (N,) similarities."""
    if assigned_similarities.numel() == 0:
        return assigned_similarities.sum() * 0.0
    return (1.0 - _float32_or_wider(assigned_similarities)).pow(2).mean()


def momentum_update(
    prototypes: torch.Tensor,
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    momentum: float = 0.999,
) -> torch.Tensor:
    """New prototypes after one momentum step; the input is not modified.

    For each (k, m): f = normalise(sum of the embeddings whose target is k*M + m), and
    p <- normalise(momentum * p + (1 - momentum) * f). Prototypes that no embedding targets stay unchanged.

    Args:
        prototypes: (K, M, D) unit prototypes.
        embeddings: (N, D) unit embeddings of the pixels that update (the caller keeps only correct ones).
        targets: (N,) flat prototype index k*M + m of each embedding.
    """
    num_classes, num_prototypes, dim = prototypes.shape
    with torch.no_grad(), torch.autocast(device_type=prototypes.device.type, enabled=False):
        flat = _float32_or_wider(prototypes.reshape(num_classes * num_prototypes, dim))
        sums = torch.zeros_like(flat).index_add_(0, targets, embeddings.detach().to(flat.dtype))
        counts = torch.bincount(targets, minlength=flat.shape[0])
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
    "average_across_processes",
    "class_scores",
    "cluster_prototypes",
    "l2_normalize",
    "momentum_update",
    "normalize_class_scores",
    "own_class_similarities",
    "ppc_loss",
    "ppd_loss",
    "prototype_similarities",
    "random_unit_prototypes",
    "sinkhorn_assignments",
    "sinkhorn_knopp",
]
