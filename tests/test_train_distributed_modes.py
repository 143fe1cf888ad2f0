"""Distributed modes as users launch them, on CPU with gloo: two shared-nothing "machines" on 127.0.0.1, accelerate
without --multi_gpu, FSDP and DeepSpeed where accelerate cannot run them, DeepSpeed ZeRO-2 in one process, mixed
precision without GPU. The mode asked for runs, or one line says why not before any output folder is touched."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from train_helpers import REPO, TINY_ARGS, clean_env

from proto_segformer.run_training import main

TRAIN = str(REPO / "scripts" / "train.py")
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no", "--dynamo_backend", "no"]
SHORT = ["--max_steps", "4", "--save_steps", "2", "--eval_steps", "4", "--output_dir", "out", *TINY_ARGS]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(command, cwd=str(cwd), env=clean_env(), capture_output=True, text=True, timeout=400)


def two_machines(root: Path, argv: list[str]) -> list[subprocess.CompletedProcess]:
    """`accelerate launch --multi_gpu --num_machines 2 --machine_rank 0|1` on 127.0.0.1, each "machine" started in
    its own folder (root/node0, root/node1) with the same relative --output_dir: they share no files."""
    port = free_port()
    launches = []
    for rank in (0, 1):
        machine = ["--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank)]
        machine += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        command = [*ACCELERATE, *machine, TRAIN, "--use_cpu", *argv]
        (root / f"node{rank}").mkdir(parents=True, exist_ok=True)
        launches.append(
            subprocess.Popen(
                command,
                cwd=str(root / f"node{rank}"),
                env=clean_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for launch in launches:
        stdout, stderr = launch.communicate(timeout=400)
        results.append(subprocess.CompletedProcess(launch.args, launch.returncode, stdout, stderr))
    return results


def tensor_kinds(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: (handle.get_slice(k).get_dtype(), tuple(handle.get_slice(k).get_shape())) for k in handle.keys()}


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def shared_nothing(tmp_path_factory) -> Path:
    """Two machines without a shared disk, --save_on_each_node: 4 steps, then resumed to 6 on both."""
    root = tmp_path_factory.mktemp("nodes")
    for result in two_machines(root, [*SHORT, "--save_on_each_node"]):
        assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.slow
def test_every_machine_keeps_complete_checkpoints_and_the_same_final_model(shared_nothing: Path) -> None:
    outputs = [shared_nothing / f"node{rank}" / "out" for rank in (0, 1)]
    for rank, output in enumerate(outputs):
        assert (output / "README.md").is_file() and not list(output.glob("tmp-*")), sorted(output.iterdir())
        for step in (2, 4):
            names = {path.name for path in (output / f"checkpoint-{step}").iterdir()}
            assert {"model.safetensors", "config.json", "trainer_state.json", f"rng_state_{rank}.pth"} <= names
        setup = json.loads((output / "all_results.json").read_text())["distributed_setup"]
        assert (setup["processes"], setup["machines"], setup["mode"], setup["backend"]) == (2, 2, "DDP", "gloo")
        assert "Setup: 2 processes on 2 machines, DDP (gloo), fp32, cpu." in (output / "README.md").read_text()
    # BatchNorm's running statistics are taken from process 0 before a save: the two copies are the same bytes.
    assert (outputs[0] / "model.safetensors").read_bytes() == (outputs[1] / "model.safetensors").read_bytes()
    checkpoints = [output / "checkpoint-2" / "model.safetensors" for output in outputs]
    assert checkpoints[0].read_bytes() == checkpoints[1].read_bytes()


@pytest.mark.slow
def test_resume_last_continues_on_every_machine(shared_nothing: Path) -> None:
    argv = [*SHORT, "--save_on_each_node", "--resume_from_checkpoint", "last", "--max_steps", "6"]
    for result in two_machines(shared_nothing, argv):
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Resuming from out/checkpoint-4" in result.stdout + result.stderr
    outputs = [shared_nothing / f"node{rank}" / "out" for rank in (0, 1)]
    for output in outputs:
        assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 6
        assert (output / "checkpoint-6" / "trainer_state.json").is_file()
    assert (outputs[0] / "model.safetensors").read_bytes() == (outputs[1] / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_machines_without_a_shared_disk_and_without_save_on_each_node_stop_at_the_first_save(tmp_path) -> None:
    results = two_machines(tmp_path, SHORT)
    assert all(result.returncode != 0 for result in results)
    errors = error_lines(results[0])
    assert len(errors) == 1 and "Pass --save_on_each_node" in errors[0], results[0].stderr[-3000:]
    for rank in (0, 1):
        output = tmp_path / f"node{rank}" / "out"
        assert not (output / "model.safetensors").exists() and not list(output.glob("*checkpoint-*"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "script", "expected"),
    [
        # accelerate's one-process launcher: every machine would train alone as rank 0.
        (["--num_machines", "2", "--num_processes", "2", "--machine_rank", "0", "--main_process_ip", "127.0.0.1"]
         + ["--main_process_port", "29599"], ["--use_cpu"], "Add --multi_gpu"),
        # accelerate runs FSDP on GPUs only: plain DDP under --use_cpu, a world of one per process without it.
        # (Without --use_cpu: a world of one per process, the same line; tests/test_distributed_setup.py.)
        (["--use_fsdp", "--fsdp_version", "2", "--num_processes", "2"], ["--use_cpu"], "runs FSDP on GPUs only"),
    ],
    ids=["no-multi-gpu", "fsdp-use-cpu"],
)  # fmt: skip
def test_a_mode_that_would_not_run_is_one_line_before_the_output_folder(tmp_path, launcher, script, expected) -> None:
    port = ["--main_process_port", str(free_port())] if "--main_process_port" not in launcher else []
    result = run([*ACCELERATE, *launcher, *port, TRAIN, *script, *SHORT], tmp_path)
    assert result.returncode != 0
    errors = error_lines(result)
    assert errors and all(expected in line for line in errors), result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_deepspeed_zero2_trains_on_cpu_in_one_process_with_the_default_schedule(tmp_path, shared_nothing) -> None:
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install --no-deps deepspeed)")
    (tmp_path / "zero2.json").write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "train_batch_size": "auto",
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
        )
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", TRAIN]
    # The default --lr_scheduler_type polynomial: transformers' schedule read `defaults` of DeepSpeed's optimizer.
    result = run([*torchrun, "--deepspeed", "zero2.json", *SHORT], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "out"
    setup = json.loads((output / "all_results.json").read_text())["distributed_setup"]
    assert (setup["mode"], setup["sharding"], setup["processes"]) == ("DeepSpeed", "ZeRO-2", 1)
    state = json.loads((output / "trainer_state.json").read_text())
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert len(rates) == 2 and rates[0] != rates[1]  # scheduled
    # The same kind of model as a DDP run's: same tensor names, dtypes and shapes.
    ddp = shared_nothing / "node0" / "out" / "model.safetensors"
    assert tensor_kinds(output / "model.safetensors") == tensor_kinds(ddp)


@pytest.mark.parametrize("flag", ["--bf16", "--fp16"])
def test_mixed_precision_without_gpu_is_one_line(tmp_path, capsys, monkeypatch, flag) -> None:
    monkeypatch.setattr("proto_segformer.run_training.accelerator_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--output_dir", str(tmp_path / "out"), flag, *TINY_ARGS])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {flag} asks for mixed precision on a GPU") and "--use_cpu" in error
    assert "\n" not in error and not (tmp_path / "out").exists()
