"""Worker for tests/test_distributed.py: two training steps of FSDP2 (`fully_shard`, gloo, CPU) per process.

accelerate runs FSDP on GPUs only; this runs torch's FSDP2 directly to check the model under it: parameters sharded,
the `prototypes` buffer whole and identical on every rank (averaged in forward), and the full state dict saved once
(rank 0) with `save_pretrained`. Each rank writes its prototypes and the local shape of a sharded weight.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # tests/, for conftest

from conftest import tiny_config  # noqa: E402

from proto_segformer import ProtoSegformerForSemanticSegmentation  # noqa: E402


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial model on every rank
    config = tiny_config(num_labels=4, classifier_dropout_prob=0.0, drop_path_rate=0.0, prototype_momentum=0.5)
    model = ProtoSegformerForSemanticSegmentation(config).train()
    for stage in model.segformer.stages:
        fully_shard(stage)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    for _ in range(2):
        pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 4, (2, 32, 32), generator=generator)
        model(pixel_values, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    weight = model.segformer.stages[0].patch_embeddings.proj.weight
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.save(
        {"prototypes": model.prototypes.detach().clone(), "local_rows": weight.to_local().shape[0]},
        f"{output_dir}/rank{rank}.pt",
    )
    if rank == 0:
        plain = ProtoSegformerForSemanticSegmentation(config)
        plain.save_pretrained(f"{output_dir}/unsharded")  # what a single-process or DDP run saves
        plain.save_pretrained(f"{output_dir}/fsdp", state_dict=full)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
