"""`accelerate launch --multi_gpu --num_processes 2 scripts/train.py --use_cpu`: two gloo processes on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import REPO, TINY_ARGS, clean_env

# Subprocess runs of whole commands: the slow tier (pytest -m slow).
pytestmark = pytest.mark.slow

LAUNCH = [
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
]
# --max_steps 20 equals the demo's warm-up of 20 steps (a ZeroDivisionError at step 19 before the clip).
DDP_ARGS = ["--max_steps", "20", "--eval_steps", "20", "--save_steps", "10", "--prototype_momentum", "0.5"]
DDP_ARGS += ["--prototype_init_batches", "1", "--seed", "0", *TINY_ARGS]


def launch(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *argv], cwd=str(cwd), env=clean_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """Two 2-process runs with the same arguments and seed."""
    root = tmp_path_factory.mktemp("ddp")
    results = [launch(["--output_dir", name, "--save_rank_prototypes", *DDP_ARGS], root) for name in ("a", "b")]
    for result in results:
        assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return root, results


def test_two_processes_hold_and_save_the_same_prototypes(ddp_runs) -> None:
    root, _ = ddp_runs
    output = root / "a"
    ranks = [torch.load(output / "rank_prototypes" / f"prototypes_rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0], ranks[1])
    saved = load_file(str(output / "model.safetensors"))["prototypes"]
    assert torch.equal(saved, ranks[0])
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 20 and state["train_batch_size"] == 4
    assert "eval_mean_iou" in json.loads((output / "eval_results.json").read_text())
    # Checkpoints are renamed into place once both processes have written their part (each its RNG state).
    for step in (10, 20):
        names = {p.name for p in (output / f"checkpoint-{step}").iterdir()}
        expected = {"model.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"}
        assert expected <= names, names
    assert not list(output.glob("tmp-*"))


def test_the_same_seed_gives_the_same_model_under_two_processes(ddp_runs) -> None:
    root, _ = ddp_runs
    assert (root / "a" / "model.safetensors").read_bytes() == (root / "b" / "model.safetensors").read_bytes()


def test_no_ddp_warnings_on_the_happy_path(ddp_runs) -> None:
    _, results = ddp_runs
    for result in results:
        log = result.stdout + result.stderr
        assert "find_unused_parameters" not in log
        assert "Grad strides do not match" not in log
        assert "Warm-up of 20 steps is not shorter than the 20 training steps: warm-up clipped to 19 steps." in log


def test_a_diverging_run_stops_every_process(tmp_path: Path) -> None:
    # Every process stops at the same step (no process left waiting in a collective), with one message.
    argv = ["--output_dir", "out", "--learning_rate", "1000", "--warmup_steps", "0", "--max_steps", "12", *TINY_ARGS]
    result = launch(argv, tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: Training diverged at step")]
    assert len(errors) == 1, result.stderr[-4000:]
    assert "on process" in errors[0] and "--learning_rate 100" in errors[0]
    assert not (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "README.md").exists()
