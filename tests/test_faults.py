"""kill -9 during checkpoint saves and the final save of a real `scripts/train.py` process, then resume.

The library's test hook PROTOSEG_FAULT=<point>[@<step>] makes the training process SIGKILL itself at a named point
of a save (`proto_segformer.folder_writer.fault_point`). After each kill: no incomplete folder is taken for a
checkpoint, a plain rerun is refused with both options named, `--resume_from_checkpoint last` continues from the newest
complete checkpoint, and the result is bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, TINY_ARGS, clean_env

from proto_segformer.run_training import main

# TINY_ARGS with 64 training images, batch 4 (16 steps per epoch): a checkpoint every 2 steps, 6 steps (a flag given
# twice takes its last value).
FAULT_ARGS = [
    *TINY_ARGS,
    *("--builtin_num_train", "64", "--builtin_num_validation", "8", "--per_device_eval_batch_size", "4"),
    *("--max_steps", "6", "--save_steps", "2", "--eval_steps", "6"),
]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """main() in this process sets torch's thread count (the demo's --torch_threads 1): restore it for later tests,
    whose in-process results are compared with other processes' bit for bit."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train_process(output: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = clean_env()
    if fault is not None:
        env["PROTOSEG_FAULT"] = fault
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--output_dir", str(output), *FAULT_ARGS]
    return subprocess.run(command, cwd=str(output.parent), env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("faults") / "uninterrupted"
    result = train_process(output)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def _killed(tmp_path: Path, fault: str) -> Path:
    output = tmp_path / "run"
    result = train_process(output, fault)
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-3000:])
    return output


def _refused_then_resumed(output: Path, uninterrupted: Path, resumes_from: str, capsys) -> str:
    """A plain rerun is refused (naming both options, saying what the overwrite deletes) and changes nothing;
    resuming from the newest complete checkpoint ends with the uninterrupted run's exact weights."""
    before = sorted(str(p.relative_to(output)) for p in output.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--output_dir", str(output), *FAULT_ARGS])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert f"continue it from {resumes_from} with --resume_from_checkpoint last" in message, message
    assert "--overwrite_output_dir (deletes its model files and checkpoint-* folders)" in message, message
    assert sorted(str(p.relative_to(output)) for p in output.rglob("*")) == before

    main(["--output_dir", str(output), "--resume_from_checkpoint", "last", *FAULT_ARGS])
    out = capsys.readouterr().out
    assert (output / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        expected = (uninterrupted / name / "model.safetensors").read_bytes()
        assert (output / name / "model.safetensors").read_bytes() == expected, name
    assert not list(output.glob("tmp-*")), list(output.glob("tmp-*"))
    assert "Training done" in out
    return message


@pytest.mark.parametrize(
    "fault",
    ["checkpoint-save:after-weights@4", "checkpoint-save:before-rename@4", "checkpoint-save:after-rename@4"],
)
@pytest.mark.slow
def test_kill_during_a_checkpoint_save(fault: str, uninterrupted: Path, tmp_path: Path, capsys, caplog) -> None:
    output = _killed(tmp_path, fault)
    renamed = fault.startswith("checkpoint-save:after-rename")
    assert (output / "checkpoint-2" / "trainer_state.json").is_file()
    assert (output / "checkpoint-4").is_dir() == renamed  # a checkpoint-N folder only once it is complete
    assert not (output / "checkpoint-6").exists() and not (output / "model.safetensors").exists()
    if not renamed:
        # The half-written checkpoint is in its staging folder, never taken for a checkpoint: an explicit path to
        # it is a clear error.
        staged = output / "tmp-checkpoint-4" / "checkpoint-4"
        with pytest.raises(SystemExit):
            main(["--output_dir", str(output), "--resume_from_checkpoint", str(staged), *FAULT_ARGS])
        message = capsys.readouterr().err
        assert "is not a complete checkpoint: it is the staging folder of a checkpoint save that was interrupted" in (
            message
        )
        assert f"The newest complete checkpoint there is {output / 'checkpoint-2'}." in message
    with caplog.at_level("WARNING", logger="proto_segformer.run_training"):
        _refused_then_resumed(output, uninterrupted, "checkpoint-4" if renamed else "checkpoint-2", capsys)
    if not renamed:
        assert "Skipping the incomplete checkpoint" in caplog.text and "tmp-checkpoint-4" in caplog.text


@pytest.mark.parametrize("fault", ["final-save:after-weights", "final-save:during-move"])
@pytest.mark.slow
def test_kill_during_the_final_save(fault: str, uninterrupted: Path, tmp_path: Path, capsys) -> None:
    output = _killed(tmp_path, fault)
    assert not (output / "README.md").exists()  # the card is moved last: the run does not look finished
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        assert (output / name / "trainer_state.json").is_file(), name
    message = _refused_then_resumed(output, uninterrupted, "checkpoint-6", capsys)
    assert "a run whose final save was interrupted (no model card)" in message
    assert (output / "README.md").is_file() and (output / "config.json").is_file()


def test_an_incomplete_checkpoint_in_place_is_skipped(uninterrupted: Path, tmp_path: Path, capsys, caplog) -> None:
    # A checkpoint-N written in place and cut short (as by a version that did not stage its saves): no
    # trainer_state.json, a truncated model file. Resume skips it by name; an explicit path to it is an error.
    import shutil

    output = tmp_path / "run"
    output.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-2", output / "checkpoint-2")
    shutil.copytree(uninterrupted / "checkpoint-4", output / "checkpoint-4")
    (output / "checkpoint-4" / "trainer_state.json").unlink()
    weights = output / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SystemExit):
        main(["--output_dir", str(output), "--resume_from_checkpoint", str(output / "checkpoint-4"), *FAULT_ARGS])
    message = capsys.readouterr().err
    assert "checkpoint-4 is not a complete checkpoint: trainer_state.json is missing or truncated" in message
    assert f"The newest complete checkpoint there is {output / 'checkpoint-2'}" in message
    with caplog.at_level("WARNING", logger="proto_segformer.run_training"):
        main(["--output_dir", str(output), "--resume_from_checkpoint", "True", *FAULT_ARGS])
    assert f"Skipping the incomplete checkpoint {output / 'checkpoint-4'}" in caplog.text
    assert (output / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------------- Ctrl-C, resuming, finished runs


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_ctrl_c_says_where_it_stopped_and_the_command_resumes(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) during training: on main a KeyboardInterrupt traceback and no hint. Now one line with the
    step and the command that resumes, exit code 130; that command (one more checkpoint's worth) finishes the run."""
    import re
    import shlex
    import time

    output = tmp_path / "run"
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--output_dir", str(output), *FAULT_ARGS]
    command += ["--max_steps", "100000", "--eval_steps", "100000"]
    process = subprocess.Popen(
        command, cwd=str(tmp_path), env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a shell may start jobs ignoring SIGINT
    )  # fmt: skip
    try:
        while not (output / "checkpoint-2").is_dir() and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    pattern = r"train\.py: interrupted at step (\d+); resume with: (.*) \(continues from checkpoint-(\d+)\)\."
    match = re.fullmatch(pattern, line)
    assert match, line
    step, resume, newest = int(match[1]), shlex.split(match[2]), int(match[3])
    assert 2 <= newest <= step and newest % 2 == 0 and not list(output.glob("tmp-*"))
    assert resume[0] == "python" and resume[-2:] == ["--resume_from_checkpoint", "last"]
    assert resume[1:-2] == command[1:]  # the user's own command line
    resumed = subprocess.run(
        [sys.executable, *resume[1:], "--max_steps", str(newest + 2)], cwd=str(tmp_path), env=clean_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from checkpoint-{newest} (step {newest} of {newest + 2})." in resumed.stdout
    assert (output / "README.md").is_file() and (output / f"checkpoint-{newest + 2}").is_dir()


def test_the_interrupted_message_without_a_checkpoint(tmp_path: Path) -> None:
    from proto_segformer.run_training import interrupted_message

    assert interrupted_message(3, str(tmp_path), []) == (
        "interrupted at step 3; no checkpoint was saved yet: run the command again to start over."
    )
    assert interrupted_message(None, str(tmp_path), []).startswith("interrupted before training started")


def test_resuming_a_finished_run_says_so_and_keeps_its_results(uninterrupted: Path, tmp_path: Path, capsys) -> None:
    """On main, `--resume_from_checkpoint last` on a finished run rewrote train_results.json as {"train_steps": 0}
    (the next card lost its train loss and runtime) and re-saved everything."""
    import shutil

    output = tmp_path / "run"
    shutil.copytree(uninterrupted, output)
    before = _files(output)
    with pytest.raises(SystemExit) as exit_info:
        main(["--output_dir", str(output), "--resume_from_checkpoint", "last", *FAULT_ARGS])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"{output} holds a finished run: checkpoint-6 is its last step (step 6, --max_steps 6). Nothing to resume; its"
        " model and results are unchanged. To train it further, resume with a larger --max_steps (or"
        " --num_train_epochs)."
    )
    assert _files(output) == before


def test_redoing_the_final_save_keeps_the_training_results(uninterrupted: Path, tmp_path: Path) -> None:
    """A run whose final save was cut short after its results were written (no card): resuming at the last step
    trains nothing and writes the final save again, with the results of the training (on main: {"train_steps": 0})."""
    import json
    import shutil

    output = tmp_path / "run"
    shutil.copytree(uninterrupted, output)
    (output / "README.md").unlink()
    main(["--output_dir", str(output), "--resume_from_checkpoint", "last", *FAULT_ARGS])
    results = json.loads((output / "train_results.json").read_text())
    assert results == json.loads((uninterrupted / "train_results.json").read_text()) and "train_loss" in results
    assert "train_loss" in json.loads((output / "all_results.json").read_text())
    assert (output / "README.md").is_file()


@pytest.mark.parametrize(
    "flags, differences",
    [
        (["--num_prototypes_per_class", "4"], "num_prototypes_per_class 3 there, 4 now"),
        (["--decoder_hidden_size", "16", "--prototype_dim", "8"], "prototype_dim 16 there, 8 now; decoder_hidden_size"
         " 32 there, 16 now"),
    ],
)  # fmt: skip
def test_resuming_into_another_configuration_names_the_fields(
    flags, differences, uninterrupted: Path, tmp_path: Path, capsys
) -> None:
    """On main a `size mismatch for prototypes` RuntimeError traceback from load_state_dict."""
    import shutil

    output = tmp_path / "run"
    output.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-2", output / "checkpoint-2")
    with pytest.raises(SystemExit) as exit_info:
        main(["--output_dir", str(output), "--resume_from_checkpoint", "last", *FAULT_ARGS, *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --resume_from_checkpoint {output / 'checkpoint-2'} holds a model of another configuration:"
        f" {differences}. Resume with the options the run was started with (see its config.json and"
        " training_args.json), or start a new run in another --output_dir."
    ]
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-2"]


def test_the_resume_log_names_the_checkpoint_and_the_step(
    uninterrupted: Path, tmp_path: Path, capfd, caplog
) -> None:
    """On main the resume logged "random init" and printed the checkpoint's whole config."""
    import shutil

    output = tmp_path / "run"
    output.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-4", output / "checkpoint-4")
    with caplog.at_level("INFO"):
        main(["--output_dir", str(output), "--resume_from_checkpoint", "last", *FAULT_ARGS])
    logs = caplog.text + "".join(capfd.readouterr())
    assert "Resumed from checkpoint-4 (step 4 of 6)." in logs
    assert "resuming checkpoint-4 of" in logs and "random init" not in logs
    assert "ProtoSegformerConfig {" not in logs and '"num_prototypes_per_class"' not in logs
    assert (output / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
