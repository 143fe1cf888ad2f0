"""scripts/train.py end to end on the built-in data: output folder, logging, clean-process loading, resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import TINY_ARGS, clean_env

from proto_segformer.run_training import main


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
    card = (demo_run / "README.md").read_text()
    assert "| Training crop | 64x64 |" in card and "trained on `builtin:scenes`" in card  # what was used
    assert "\nwidget:" not in card.split("\n---\n")[0]  # no houses and cats for a digit model
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
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_finished_run_is_not_overwritten_silently(demo_run: Path, capsys) -> None:
    message = _fails_cleanly_existing(["--output_dir", str(demo_run), "--max_steps", "2", *TINY_ARGS], capsys)
    assert "already holds a finished run" in message and "--overwrite_output_dir" in message


def _fails_cleanly_existing(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().err
