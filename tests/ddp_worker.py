"""Worker for tests/test_distributed.py: one training step per process under torch.distributed (gloo).

Each rank trains on different data; it saves its prototypes after the step, and the update it would have made on
its own (recomputed with the pure functions from the returned embeddings), so the test can check that every rank
holds normalise(mean of the local updates).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # tests/, for conftest

from conftest import tiny_config  # noqa: E402

from proto_segformer import ProtoSegformerForSemanticSegmentation  # noqa: E402
from proto_segformer.prototype_math import momentum_update, own_class_similarities, sinkhorn_assignments  # noqa: E402


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # identical initial model on every rank
    config = tiny_config(num_labels=4, classifier_dropout_prob=0.0, drop_path_rate=0.0, prototype_momentum=0.9)
    model = ProtoSegformerForSemanticSegmentation(config).train()
    before = model.prototypes.clone()
    generator = torch.Generator().manual_seed(100 + rank)
    pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 4, (2, 32, 32), generator=generator)
    if rank == 1:
        labels[labels == 3] = 255  # class 3 present on rank 0 only
    out = model(pixel_values, labels=labels, output_pixel_embeddings=True)
    out.loss.backward()

    pixels = out.pixel_embeddings.detach().permute(0, 2, 3, 1).reshape(-1, config.embedding_dim)
    small = F.interpolate(labels[:, None].float(), size=(8, 8), mode="nearest").long().view(-1)
    valid = small != 255
    classes = small[valid]
    own = own_class_similarities(pixels[valid], classes, before)
    assignments = sinkhorn_assignments(own, classes, 4)
    correct = torch.einsum("nd,kmd->nkm", pixels[valid], before).amax(-1).argmax(1) == classes
    targets = classes * config.num_prototypes_per_class + assignments
    local = momentum_update(before, pixels[valid][correct], targets[correct], 0.9)
    torch.save({"prototypes": model.prototypes, "local": local, "before": before}, f"{output_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
