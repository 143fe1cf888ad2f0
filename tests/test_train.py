"""scripts/train.py end to end on the built-in data: output folder, logging, clean-process loading, resume."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import REPO, TINY_ARGS, clean_env

from proto_segformer.run_training import main
from proto_segformer.safe_files import current_umask


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
        "prototype_math.py",
        "prototype_kernels.py",
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
    # The unknown-pixel threshold, calibrated on the validation split after the final evaluation (issue 24).
    calibration = config["unknown_calibration"]
    assert -1.0 <= config["unknown_threshold"] <= 1.0 and calibration["split"] == "validation"
    assert calibration["accepted_fraction"] == 0.95 and calibration["known_pixels"] > 0
    assert calibration["measured_accepted_fraction"] >= 0.95
    weights = load_file(str(demo_run / "model.safetensors"))
    assert weights["prototypes"].shape == (11, 3, 16)
    assert torch.allclose(weights["prototypes"].norm(dim=-1), torch.ones(11, 3), atol=1e-5)


def test_output_folder_has_the_modes_of_new_files(demo_run: Path) -> None:
    """Weights, checkpoints and every other output get 0666 & ~umask (folders 0777 & ~umask), not the 0600 that
    safetensors gives its files."""
    mask = current_umask()
    wrong = [
        f"{path.relative_to(demo_run)}: {oct(stat.S_IMODE(path.stat().st_mode))}"
        for path in [demo_run, *demo_run.rglob("*")]
        if stat.S_IMODE(path.stat().st_mode) != (0o777 if path.is_dir() else 0o666) & ~mask
    ]
    assert wrong == []


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


@pytest.mark.slow
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
    changed = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not changed, changed  # bit-identical: data order, augmentation and RNG states are restored


def test_finished_run_is_not_overwritten_silently(demo_run: Path, capsys) -> None:
    message = _fails_cleanly_existing(["--output_dir", str(demo_run), "--max_steps", "2", *TINY_ARGS], capsys)
    assert "already holds a finished run" in message
    assert "continue it from checkpoint-9 with --resume_from_checkpoint last" in message
    assert "--overwrite_output_dir (deletes its model files and checkpoint-* folders)" in message


def test_rerun_into_a_folder_with_checkpoints_is_refused(demo_run: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "out"
    output.mkdir()
    shutil.copytree(demo_run / "checkpoint-4", output / "checkpoint-4")
    before = (output / "checkpoint-4" / "model.safetensors").read_bytes()
    message = _fails_cleanly_existing(["--output_dir", str(output), "--max_steps", "4", *TINY_ARGS], capsys)
    assert f"{output} already holds an unfinished run with checkpoints checkpoint-4" in message
    assert "continue it from checkpoint-4 with --resume_from_checkpoint last" in message
    assert "--overwrite_output_dir (deletes" in message
    assert (output / "checkpoint-4" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-4"]


def test_overwrite_output_dir_deletes_only_what_the_library_wrote(demo_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    shutil.copytree(demo_run, output)
    user_files = [output / "notes.txt", output / ".git" / "HEAD", output / "checkpoint-best-by-hand" / "notes.txt"]
    user_files.append(output / "training.py")
    for path in user_files:
        path.parent.mkdir(exist_ok=True)
        path.write_text("the user's")
    argv = ["--output_dir", str(output), "--max_steps", "2", "--save_strategy", "no", "--eval_strategy", "no"]
    main([*argv, "--overwrite_output_dir", *TINY_ARGS])
    assert all(path.read_text() == "the user's" for path in user_files)
    assert not list(output.glob("checkpoint-[0-9]*"))  # the previous run's checkpoints are gone, as the flag says
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2
    assert (output / "model.safetensors").read_bytes() != (demo_run / "model.safetensors").read_bytes()


def _train_process(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "train.py"), *argv]
    return subprocess.run(command, cwd=str(cwd), env=clean_env(), capture_output=True, text=True, timeout=300)


def test_the_same_seed_gives_the_same_model(tmp_path: Path) -> None:
    # Two runs with the same arguments and --seed: the same bytes, the model's random initialisation included (the
    # runs share this process, whose random state differs between them; two processes: tests/test_faults.py and
    # tests/test_train_multiprocess.py).
    weights = []
    for name in ("a", "b"):
        torch.rand(3)  # the global random state at the start of a run must not matter
        argv = ["--output_dir", str(tmp_path / name), "--seed", "0", "--max_steps", "2", "--save_strategy", "no"]
        main([*argv, *TINY_ARGS])
        weights.append((tmp_path / name / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


@pytest.mark.slow
def test_short_demo_saves_checkpoints_and_the_readme_resume_command_works(tmp_path: Path) -> None:
    # --max_steps 20 equals the demo's warm-up (the polynomial schedule divided by zero at step 19); --save_steps
    # alone means saving every N steps; the README's resume command, short version, runs as written.
    argv = ["--output_dir", "runs/demo", "--max_steps", "20", "--save_steps", "10", *TINY_ARGS]
    result = _train_process(argv, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "runs" / "demo"
    assert "Warm-up of 20 steps is not shorter than the 20 training steps: warm-up clipped to 19 steps." in (
        result.stdout + result.stderr
    )
    assert (output / "checkpoint-10" / "trainer_state.json").is_file()
    assert (output / "checkpoint-20" / "trainer_state.json").is_file()
    # The run ends on a short summary, not on a metrics table or a save message.
    tail = result.stdout.strip().splitlines()[-5:]
    assert tail[0].startswith("Training done in ") and tail[0].endswith("(20 steps). Model: runs/demo"), tail
    results = json.loads((output / "eval_results.json").read_text())
    assert tail[1].startswith(
        f"Validation: mean IoU {results['eval_mean_iou']:.3f}, pixel accuracy {results['eval_overall_accuracy']:.3f}"
    ), tail
    assert tail[2:] == [
        "Next:",
        f"  python {REPO / 'scripts' / 'predict.py'} --model runs/demo --inputs IMAGES_OR_FOLDER"
        " --output_dir predictions",
        f"  python {REPO / 'scripts' / 'push_to_hub.py'} --model runs/demo --repo_id YOU/NAME",
    ]
    assert "***** eval metrics *****" not in result.stdout
    finished = (output / "model.safetensors").read_bytes()

    readme = ["--output_dir", "runs/demo", "--resume_from_checkpoint", "runs/demo/checkpoint-10"]
    result = _train_process([*readme, "--max_steps", "20", "--save_steps", "10", *TINY_ARGS], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output / "model.safetensors").read_bytes() == finished


def _fails_cleanly_existing(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().err


def test_save_steps_alone_means_saving_every_n_steps() -> None:
    from proto_segformer.run_training import build_parser

    def strategy(argv: list[str]) -> str:
        argv = ["--output_dir", "unused", "--dataset_name", "some/data", *argv]
        return str(build_parser(argv).parse_args_into_dataclasses(args=argv)[2].save_strategy.value)

    assert strategy([]) == "epoch"
    assert strategy(["--save_steps", "10"]) == "steps"
    assert strategy(["--save_steps=10", "--save_strategy", "no"]) == "no"


def test_the_divergence_message_names_the_step_the_term_and_a_fix() -> None:
    from proto_segformer.trainer import divergence_message

    nan = float("nan")
    message = divergence_message(7, torch.tensor([[1.2, 1.1, 2.0, 0.5], [nan, 1.0, nan, 0.5]]), 0.5)
    assert message.startswith("Training diverged at step 7: the loss is nan on process 1 (CE 1, PPC nan, PPD 0.5;")
    assert "non-finite: PPC)" in message and "--learning_rate 0.05" in message


def test_a_model_ignoring_254_trains_and_evaluates_on_crops_padded_with_254(tmp_path: Path) -> None:
    # The run's ignore index is the model's config.semantic_loss_ignore_index, through the data (crop padding, the
    # batches' padding), the loss and the metric. On main the data padded with a hard-coded 255 while the model
    # ignored 254: the model refused the padded pixels ("labels contain values 255 that are neither a class index
    # in [0, 10] nor the ignore index 254").
    from proto_segformer.run_training import build_parser, prepare_data

    args = list(TINY_ARGS)
    args[args.index("--config_overrides") + 1] += ",semantic_loss_ignore_index=254"
    args[args.index("--builtin_image_size") + 1] = "24"  # validation batches padded to 32 (SegFormer's least input)
    # Every training crop padded: images scaled to 16 px (0.5 x the 32 px crop) before the 32 x 32 crop.
    args += ["--crop_size", "32", "--min_scale", "0.5", "--max_scale", "0.5"]
    output = tmp_path / "run"
    main(["--output_dir", str(output), "--max_steps", "1", "--eval_steps", "1", "--save_strategy", "no", *args])
    config = json.loads((output / "config.json").read_text())
    assert config["semantic_loss_ignore_index"] == 254
    results = json.loads((output / "eval_results.json").read_text())
    assert 0.0 <= results["eval_overall_accuracy"] <= 1.0 and results["eval_loss"] == pytest.approx(
        results["eval_loss"]
    )  # finite (NaN is not approximately equal to itself)

    model_args, data_args, training_args = build_parser(args).parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path / "data"), *args]
    )
    data = prepare_data(model_args, data_args, training_args, ignore_index=254)
    crop = data.train[0]["labels"]
    assert crop.shape == (32, 32) and (crop == 254).any() and not (crop == 255).any()


def test_max_steps_evaluates_the_final_model_once(tmp_path: Path) -> None:
    # The last step of a --max_steps run also ends an epoch: the Trainer evaluated there (--eval_strategy epoch) and
    # the final evaluation evaluated the same model again (2 x 40 s in the issue). Now: once, the same numbers.
    output = tmp_path / "run"
    argv = ["--output_dir", str(output), "--max_steps", "2", "--eval_strategy", "epoch", "--save_strategy", "no"]
    results = main([*argv, *TINY_ARGS])
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2]
    assert results["eval"]["eval_loss"] == evaluations[0]["eval_loss"]
    saved = json.loads((output / "eval_results.json").read_text())
    assert saved["eval_mean_iou"] == evaluations[0]["eval_mean_iou"]
