"""Prototype initialisation from data: before step one, each class's prototypes become the spherical k-means
(with Sinkhorn equipartition) of the embeddings of its pixels in the first training batches.

`initialize_prototypes_from_dataset` is what `ProtoSegTrainer` runs before a fresh run (not a resumed one);
`initialize_prototypes_from_data` does the work on any batches (embed, subsample per class, gather across
processes, cluster, broadcast rank 0's result).
"""

from __future__ import annotations

import itertools
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .modeling_proto_segformer import ProtoSegformerForSemanticSegmentation
from .prototype_math import cluster_prototypes
from .sampling import per_class_sample

logger = logging.getLogger(__name__)


@torch.no_grad()
def collect_class_embeddings(
    model: ProtoSegformerForSemanticSegmentation,
    batches,
    max_pixels_per_class: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit embeddings (N, D) and classes (N,) of labelled pixels of `batches` ({"pixel_values", "labels"}), the
    labels downsampled to the embedding grid by nearest neighbour; at most `max_pixels_per_class` per class (random).
    """
    ignore_index = model.config.semantic_loss_ignore_index
    num_labels = model.config.num_labels
    device = model.prototypes.device
    all_embeddings, all_classes = [], []
    for batch in batches:
        pixel_values = batch["pixel_values"].to(device)
        embeddings, _ = model.embed_pixels(pixel_values)
        _, dim, height, width = embeddings.shape
        labels = F.interpolate(batch["labels"][:, None].float().to(device), size=(height, width), mode="nearest")
        labels = labels.long().view(-1)
        valid = (labels != ignore_index) & (labels >= 0) & (labels < num_labels)
        all_embeddings.append(embeddings.permute(0, 2, 3, 1).reshape(-1, dim)[valid].float())
        all_classes.append(labels[valid])
    if not all_embeddings:
        return torch.zeros(0, model.config.embedding_dim, device=device), torch.zeros(
            0, dtype=torch.long, device=device
        )
    embeddings, classes = torch.cat(all_embeddings), torch.cat(all_classes)
    keep = per_class_sample(classes, num_labels, max_pixels_per_class, generator)
    return embeddings[keep], classes[keep]


def _gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor with a variable first dimension from every process (identity without distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    largest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((largest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])


@torch.no_grad()
def initialize_prototypes_from_data(
    model: ProtoSegformerForSemanticSegmentation,
    batches,
    *,
    max_pixels_per_class: int = 2000,
    rounds: int = 10,
    seed: int = 0,
) -> torch.Tensor:
    """Set the prototypes of every class seen in `batches` to the spherical k-means (with Sinkhorn equipartition,
    `proto_segformer.prototypes.cluster_prototypes`) of its pixel embeddings; classes not seen keep theirs.

    The model embeds in eval mode (no dropout, BatchNorm running statistics untouched). Under torch.distributed each
    process embeds its own batches, the embeddings are gathered, and every process clusters the same pixels with the
    same seed; rank 0's result is broadcast so all processes hold identical prototypes. Returns the (K,) mask of
    classes that were initialised.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(int(seed))
    embeddings, classes = collect_class_embeddings(model, batches, max_pixels_per_class, generator)
    embeddings, classes = _gather_variable(embeddings), _gather_variable(classes)
    config = model.config
    centers, present = cluster_prototypes(
        embeddings,
        classes,
        config.num_labels,
        config.num_prototypes_per_class,
        epsilon=config.sinkhorn_epsilon,
        sinkhorn_iterations=config.sinkhorn_iterations,
        rounds=rounds,
        generator=torch.Generator().manual_seed(int(seed) + 1),
    )
    prototypes = torch.where(present[:, None, None], centers.to(model.prototypes), model.prototypes)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(prototypes, src=0)
        dist.broadcast(present, src=0)
    model.prototypes.copy_(prototypes)
    model.train(was_training)
    return present


def initialize_prototypes_from_dataset(
    model: ProtoSegformerForSemanticSegmentation,
    dataset,
    collate_fn,
    *,
    batches: int,
    batch_size: int,
    max_pixels_per_class: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Cluster the embeddings of the first `batches` batches per process of `dataset` into the prototypes (the
    samples are dealt to the processes in turn); returns the (K,) mask of the classes initialised."""
    if isinstance(dataset, torch.utils.data.IterableDataset):  # a stream (--streaming): its first samples
        first = itertools.islice(iter(dataset), batches * batch_size * world_size)
        subset = [sample for position, sample in enumerate(first) if position % world_size == rank]
        indices = range(len(subset))
    else:
        count = min(len(dataset), batches * batch_size * world_size)
        indices = range(rank, count, world_size)
        subset = torch.utils.data.Subset(dataset, list(indices))
    if not indices:
        raise ValueError("The training data set is empty: cannot initialise the prototypes from data.")
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate_fn)
    present = initialize_prototypes_from_data(model, loader, max_pixels_per_class=max_pixels_per_class, seed=seed)
    logger.info(
        "Initialised the prototypes of %d of %d classes from %d samples per process.",
        int(present.sum()),
        present.numel(),
        len(indices),
    )
    return present
