"""scripts/train.py end to end: built-in data, output folder, resume equivalence, 2 processes, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from proto_segformer.run_training import FINAL_OUTPUT_FILES, main

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = [
    "--config_overrides",
    "hidden_sizes=[8,16,24,32],depths=[1,1,1,1],num_attention_heads=[1,1,1,1]",
    "--decoder_hidden_size",
    "32",
    "--prototype_dim",
    "16",
    "--num_prototypes_per_class",
    "3",
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


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK", "WORLD_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A few training steps of a tiny model on the built-in data (in process), with a checkpoint mid-way."""
    output = tmp_path_factory.mktemp("run") / "out"
    argv = ["--output_dir", str(output), "--max_steps", "9", "--save_strategy", "steps", "--save_steps", "4"]
    argv += ["--eval_steps", "9", "--prototype_init_batches", "1", *TINY_ARGS]
    main(argv)
    return output


def test_output_folder_is_complete(demo_run: Path) -> None:
    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "all_results.json",
        "eval_results.json",
        "configuration_proto_segformer.py",
        "modeling_proto_segformer.py",
        "prototypes.py",
    ):
        assert (demo_run / name).is_file(), name
    config = json.loads((demo_run / "config.json").read_text())
    assert config["model_type"] == "proto_segformer"
    assert config["auto_map"]["AutoModel"] == "modeling_proto_segformer.ProtoSegformerForSemanticSegmentation"
    assert config["id2label"]["0"] == "background" and config["id2label"]["10"] == "digit 9"
    assert config["decoder_hidden_size"] == 32 and config["prototype_dim"] == 16
    results = json.loads((demo_run / "eval_results.json").read_text())
    assert 0.0 <= results["eval_mean_iou"] <= 1.0 and "eval_overall_accuracy" in results
    assert "eval_mean_iou" in json.loads((demo_run / "all_results.json").read_text())
    processor = json.loads((demo_run / "preprocessor_config.json").read_text())
    assert processor["do_resize"] is False
    assert (
        "mean_iou" in (demo_run / "README.md").read_text().lower()
        or "eval_mean_iou" in (demo_run / "README.md").read_text()
    )
    weights = load_file(str(demo_run / "model.safetensors"))
    assert weights["prototypes"].shape == (11, 3, 16)
    assert torch.allclose(weights["prototypes"].norm(dim=-1), torch.ones(11, 3), atol=1e-5)


def test_loss_terms_are_logged_separately(demo_run: Path) -> None:
    state = json.loads((demo_run / "checkpoint-8" / "trainer_state.json").read_text())
    train_logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert train_logs, state["log_history"]
    for entry in train_logs:
        assert {"loss_ce", "loss_ppc", "loss_ppd"} <= set(entry)
        # loss = CE + 0.01 PPC + 0.001 PPD, up to the logging average.
        assert entry["loss"] == pytest.approx(
            entry["loss_ce"] + 0.01 * entry["loss_ppc"] + 0.001 * entry["loss_ppd"], rel=1e-3, abs=1e-3
        )


def test_prototypes_initialised_from_data_differ_from_random(demo_run: Path) -> None:
    # The clustered prototypes of one class are close to each other (same class, similar pixels); random unit
    # vectors in 16 dimensions are not.
    prototypes = load_file(str(demo_run / "model.safetensors"))["prototypes"]
    background = prototypes[0]
    similarity = background @ background.t()
    assert similarity[~torch.eye(3, dtype=torch.bool)].mean() > 0.3


def test_saved_model_loads_in_a_clean_process_with_auto_classes_and_pipeline(demo_run: Path) -> None:
    code = f"""
import numpy as np, torch
from PIL import Image
from transformers import AutoModel, AutoModelForSemanticSegmentation, pipeline
model = AutoModel.from_pretrained({str(demo_run)!r}, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
model = AutoModelForSemanticSegmentation.from_pretrained({str(demo_run)!r}, trust_remote_code=True)
segmenter = pipeline("image-segmentation", model={str(demo_run)!r}, trust_remote_code=True)
out = segmenter(Image.fromarray(np.zeros((40, 30, 3), np.uint8)))
assert out and out[0]["mask"].size == (30, 40), out
print("OK", sorted(o["label"] for o in out)[:3])
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd="/",
        env={**clean_env(), "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_resume_from_checkpoint_matches_the_uninterrupted_run(demo_run: Path, tmp_path: Path) -> None:
    # Resume from the checkpoint at step 4 (mid-epoch: 6 steps per epoch) and cross an epoch boundary.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(demo_run / "checkpoint-4", resumed / "checkpoint-4")
    argv = ["--output_dir", str(resumed), "--max_steps", "9", "--save_strategy", "steps", "--save_steps", "4"]
    argv += ["--eval_steps", "9", "--prototype_init_batches", "1", "--resume_from_checkpoint", "last", *TINY_ARGS]
    main(argv)
    expected = load_file(str(demo_run / "model.safetensors"))
    got = load_file(str(resumed / "model.safetensors"))
    assert set(expected) == set(got)
    start = load_file(str(demo_run / "checkpoint-4" / "model.safetensors"))
    assert not torch.equal(start["prototypes"], expected["prototypes"])  # the steps after 4 did change them
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


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


# ------------------------------------------------------------------------------------------------ bad input


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


def test_finished_run_is_not_overwritten_silently(demo_run: Path, capsys) -> None:
    message = _fails_cleanly_existing(["--output_dir", str(demo_run), "--max_steps", "2", *TINY_ARGS], capsys)
    assert "already holds a finished run" in message and "--overwrite_output_dir" in message


def _fails_cleanly_existing(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().err


def test_bad_model_arguments(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    message = _fails_cleanly(["--prototype_momentum", "1.5"], out, capsys)
    assert "prototype_momentum must lie in [0, 1]" in message
    message = _fails_cleanly(["--model_name_or_path", str(tmp_path / "missing_model")], out, capsys)
    assert "Could not load a model config" in message
