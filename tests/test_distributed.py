"""Two processes (gloo): every process ends the step with identical prototypes = normalise(mean of local updates)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from proto_segformer.prototype_math import l2_normalize


@pytest.mark.slow
def test_two_gloo_processes_hold_the_normalised_mean_of_their_local_updates(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(worker),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0["before"], rank1["before"])
    assert not torch.equal(rank0["local"], rank1["local"])  # the ranks saw different data
    assert torch.equal(rank0["prototypes"], rank1["prototypes"])
    expected = l2_normalize((rank0["local"] + rank1["local"]) / 2)
    torch.testing.assert_close(rank0["prototypes"], expected)
    # class 3 was only seen on rank 0: the average still moves it, by half of rank 0's step
    assert not torch.equal(rank0["prototypes"][3], rank0["before"][3])
