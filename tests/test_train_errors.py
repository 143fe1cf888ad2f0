"""Bad input to scripts/train.py: a clear message, exit code 2, no output folder that looks complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import REPO, TINY_ARGS, clean_env

from proto_segformer.run_training import FINAL_OUTPUT_FILES, main


def _ade_folder(root: Path, label_values=(0, 1, 2), sizes=None, bad_image: bool = False) -> Path:
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(3):
            h, w = (sizes or {}).get((split, i), (24, 24))
            rng = np.random.default_rng(i)
            image_path = root / "images" / split / f"{i}.jpg"
            if bad_image and split == "training" and i == 1:
                image_path.write_bytes(b"\x00garbage")
            else:
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image_path)
            label = rng.choice(np.array(label_values, np.uint8), size=(24, 24))
            Image.fromarray(label).save(root / "annotations" / split / f"{i}.png")
    (root / "id2label.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    return root


def _fails_cleanly(argv: list[str], output: Path, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["--output_dir", str(output), "--max_steps", "2", *TINY_ARGS, *argv])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and "Traceback" not in message
    assert not any((output / name).exists() for name in FINAL_OUTPUT_FILES)
    assert not list(output.glob("checkpoint-*")) if output.exists() else True
    return message


def test_bad_inputs_fail_before_training_with_clear_messages(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    good = _ade_folder(tmp_path / "good")
    message = _fails_cleanly(["--dataset_name", str(good), "--label_column_name", "mask"], out, capsys)
    assert "no label column 'mask'; its columns are ['image', 'label']" in message

    one_based = _ade_folder(tmp_path / "one_based", label_values=(1, 2, 3))
    message = _fails_cleanly(["--dataset_name", str(one_based)], out, capsys)
    assert "label values 3" in message and "--reduce_labels" in message

    wrong = _ade_folder(tmp_path / "wrong", label_values=(0, 7))
    message = _fails_cleanly(["--dataset_name", str(wrong)], out, capsys)
    assert "label values 7" in message and "outside id2label (class ids 0..2)" in message

    sizes = _ade_folder(tmp_path / "sizes", sizes={("validation", 2): (20, 24)})
    message = _fails_cleanly(["--dataset_name", str(sizes)], out, capsys)
    assert "Split 'validation', sample 2" in message and "20x24" in message and "24x24" in message

    broken = _ade_folder(tmp_path / "broken", bad_image=True)
    message = _fails_cleanly(["--dataset_name", str(broken)], out, capsys)
    assert "sample 1, image" in message and "1.jpg" in message and "cannot read" in message

    message = _fails_cleanly(["--dataset_name", str(tmp_path / "no" / "such" / "folder")], out, capsys)
    assert "does not exist" in message

    message = _fails_cleanly(["--dataset_name", "builtin:scenes-large", "--builtin_long_tail", "-1"], out, capsys)
    assert "builtin:scenes-large: long_tail" in message and "must be >= 0, got -1.0" in message
    message = _fails_cleanly(["--builtin_num_train", "0"], out, capsys)
    assert "num_train must be >= 1, got 0" in message

    # A Hub id goes through datasets.load_dataset; offline (as in the tests) it fails with a message, not a trace.
    message = _fails_cleanly(["--dataset_name", "some-org/not-downloaded"], out, capsys)
    assert "Could not load the data set 'some-org/not-downloaded'" in message


def test_empty_split(tmp_path: Path, capsys) -> None:
    root = _ade_folder(tmp_path / "ade")
    for path in (root / "images" / "validation").iterdir():
        path.unlink()
    for path in (root / "annotations" / "validation").iterdir():
        path.unlink()
    message = _fails_cleanly(["--dataset_name", str(root)], tmp_path / "out", capsys)
    assert "The 'validation' split is empty" in message


def test_reduce_labels_makes_one_based_labels_train(tmp_path: Path) -> None:
    root = _ade_folder(tmp_path / "ade", label_values=(0, 1, 2, 3))
    output = tmp_path / "out"
    main(
        [
            "--dataset_name",
            str(root),
            "--reduce_labels",
            "--output_dir",
            str(output),
            "--max_steps",
            "2",
            "--crop_size",
            "32",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            *TINY_ARGS,
        ]
    )
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"] == {"0": "a", "1": "b", "2": "c"}
    assert json.loads((output / "preprocessor_config.json").read_text())["do_reduce_labels"] is True
    assert 0.0 <= json.loads((output / "eval_results.json").read_text())["eval_mean_iou"] <= 1.0


def test_bad_model_arguments(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    message = _fails_cleanly(["--prototype_momentum", "1.5"], out, capsys)
    assert "prototype_momentum must lie in [0, 1]" in message
    message = _fails_cleanly(["--model_name_or_path", str(tmp_path / "missing_model")], out, capsys)
    assert "missing_model' does not exist" in message


@pytest.mark.slow
def test_a_diverging_run_stops_and_says_so(tmp_path: Path) -> None:
    # As a user types it: a learning rate of 1000 makes the loss NaN within a few steps.
    output = tmp_path / "out"
    argv = ["--output_dir", str(output), "--learning_rate", "1000", "--warmup_steps", "0", "--max_steps", "12"]
    command = [sys.executable, str(REPO / "scripts" / "train.py"), *argv, "--save_steps", "2", *TINY_ARGS]
    result = subprocess.run(command, cwd=str(tmp_path), env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: Training diverged at step "), error
    assert "the loss is nan" in error and "CE nan" in error and "--learning_rate 100" in error, error
    step = int(error.split("at step ")[1].split(":")[0])
    assert 1 < step <= 12
    # No folder that looks like a finished model; the checkpoints written before the divergence stay.
    assert not any((output / name).exists() for name in FINAL_OUTPUT_FILES)
    assert not list(output.glob("tmp-*"))
    assert sorted(p.name for p in output.glob("checkpoint-*")) == sorted(f"checkpoint-{n}" for n in range(2, step, 2))
    # The logs never report a NaN loss as 0 (the Trainer's NaN filter).
    assert "'loss': '0'" not in result.stdout and "'loss': 0.0" not in result.stdout


@pytest.mark.parametrize("where", ["checkpoint", "final save"])
def test_a_full_disk_while_saving_is_one_line_and_the_checkpoints_stay(
    where: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A full disk at the second checkpoint (torch.save into /dev/full: torch 2.13's own error, without an errno)
    or at the final save (OSError 28): on main a `RuntimeError: [enforce fail at inline_container.cc:672]` or an
    `OSError` traceback. Now one line naming the folder, that the disk is full, what is intact and how to resume;
    the half-written staging folder is gone."""
    import errno
    import shutil

    import torch

    from proto_segformer import output_folders, training

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    output = tmp_path / "run"
    real_save, usage = torch.save, shutil.disk_usage(tmp_path)

    def save(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            monkeypatch.setattr(output_folders.shutil, "disk_usage", lambda path: usage._replace(free=0))
            return real_save(obj, "/dev/full", *args, **kwargs)
        return real_save(obj, path, *args, **kwargs)

    def write_json(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "checkpoint":
        monkeypatch.setattr(torch, "save", save)
    else:
        monkeypatch.setattr(training, "_write_json", write_json)
    argv = ["--output_dir", str(output), *TINY_ARGS, "--max_steps", "4", "--save_steps", "2", "--eval_steps", "4"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    what, newest = ("checkpoint-4", "checkpoint-2") if where == "checkpoint" else ("the final model", "checkpoint-4")
    assert line.startswith(f"error: Could not write {what} into {output}: the disk is full ("), line
    assert f"free). The checkpoints saved before are intact (newest: {newest}); free some space, then resume with:" in (
        line
    )
    assert line.endswith(f"--eval_steps 4 --resume_from_checkpoint last (continues from {newest}).")
    assert not list(output.glob("tmp-*")) and (output / newest / "trainer_state.json").is_file()
    assert not (output / "README.md").exists()


def test_a_bad_label_past_the_checked_samples_stops_training_naming_its_file(tmp_path: Path, capsys) -> None:
    # Only the first --check_samples are read before training (a 3,000-image folder started in 48 s with 2,000);
    # the others are checked as they are read: the same message, with the file, when training reaches it.
    folder = _ade_folder(tmp_path / "late")
    Image.fromarray(np.full((24, 24), 7, np.uint8)).save(folder / "annotations" / "training" / "2.png")
    message = _fails_cleanly(["--dataset_name", str(folder), "--check_samples", "1"], tmp_path / "out", capsys)
    assert "label values 7 (sample 2)" in message and "outside id2label (class ids 0..2)" in message
    assert str(folder / "annotations" / "training" / "2.png") in message
    # Read by a dataloader worker process: the same line (torch re-raises it with the worker's traceback).
    argv = ["--dataset_name", str(folder), "--check_samples", "1", "--dataloader_num_workers", "1"]
    assert _fails_cleanly(argv, tmp_path / "out", capsys) == message
