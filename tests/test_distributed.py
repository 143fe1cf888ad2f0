"""Two processes (gloo): every process ends the step with identical prototypes = normalise(mean of local updates),
under DDP-style replication and under FSDP2 (`fully_shard`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from proto_segformer.checkpoint import load_model, read_tensor_shapes
from proto_segformer.prototype_math import l2_normalize


def run_two_processes(worker: str, output_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(Path(__file__).with_name(worker)), str(output_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_processes_hold_the_normalised_mean_of_their_local_updates(tmp_path):
    run_two_processes("ddp_worker.py", tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0["before"], rank1["before"])
    assert not torch.equal(rank0["local"], rank1["local"])  # the ranks saw different data
    assert torch.equal(rank0["prototypes"], rank1["prototypes"])
    expected = l2_normalize((rank0["local"] + rank1["local"]) / 2)
    torch.testing.assert_close(rank0["prototypes"], expected)
    # class 3 was only seen on rank 0: the average still moves it, by half of rank 0's step
    assert not torch.equal(rank0["prototypes"][3], rank0["before"][3])


@pytest.mark.slow
def test_under_fsdp2_the_prototypes_stay_whole_and_equal_and_save_like_an_unsharded_model(tmp_path):
    run_two_processes("fsdp_worker.py", tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["local_rows"] == rank1["local_rows"] == 4  # the first patch embedding's 8 rows, sharded in two
    assert torch.equal(rank0["prototypes"], rank1["prototypes"])  # a buffer: whole on every rank, averaged
    fsdp, unsharded = tmp_path / "fsdp" / "model.safetensors", tmp_path / "unsharded" / "model.safetensors"
    assert read_tensor_shapes([fsdp]) == read_tensor_shapes([unsharded])
    model = load_model(tmp_path / "fsdp")  # from_pretrained, every tensor present and finite
    assert torch.equal(model.prototypes, rank0["prototypes"])
    assert {p.dtype for p in model.state_dict().values()} == {torch.float32, torch.int64}
