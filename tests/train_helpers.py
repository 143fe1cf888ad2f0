"""Shared pieces of the training tests: tiny-model arguments and a clean environment for subprocesses."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The built-in data and batches of the tiny runs (any model).
TINY_DATA_ARGS = [
    "--builtin_num_train",
    "24",
    "--builtin_num_validation",
    "6",
    "--builtin_image_size",
    "32",
    "--per_device_train_batch_size",
    "4",
    "--per_device_eval_batch_size",
    "3",
    "--logging_steps",
    "2",
    "--dataloader_num_workers",
    "0",
    "--disable_tqdm",
    "true",
]
TINY_ARGS = [
    "--config_overrides",
    "hidden_sizes=[8,16,24,32],depths=[1,1,1,1],num_attention_heads=[1,1,1,1]",
    "--decoder_hidden_size",
    "32",
    "--prototype_dim",
    "16",
    "--num_prototypes_per_class",
    "3",
    *TINY_DATA_ARGS,
]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK", "WORLD_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=env.get("PYTHONPATH", ""),  # the installed package (scripts fall back to the source tree)
    )
    return env
