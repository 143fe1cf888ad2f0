"""`accelerate launch --multi_gpu --num_processes 2 scripts/train.py --use_cpu`: two gloo processes on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from train_helpers import REPO, TINY_ARGS, clean_env


def test_two_processes_hold_and_save_the_same_prototypes(tmp_path: Path) -> None:
    output = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "scripts" / "train.py"),
        "--use_cpu",
        "--output_dir",
        str(output),
        "--max_steps",
        "4",
        "--eval_steps",
        "4",
        "--save_strategy",
        "no",
        "--prototype_momentum",
        "0.5",
        "--prototype_init_batches",
        "1",
        "--save_rank_prototypes",
        *TINY_ARGS,
    ]
    result = subprocess.run(command, cwd=str(tmp_path), env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    ranks = [torch.load(output / "rank_prototypes" / f"prototypes_rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0], ranks[1])
    saved = load_file(str(output / "model.safetensors"))["prototypes"]
    assert torch.equal(saved, ranks[0])
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["train_batch_size"] == 4
    assert "eval_mean_iou" in json.loads((output / "eval_results.json").read_text())
