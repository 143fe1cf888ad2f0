"""A checkpoint never loads with made-up or broken prototypes (issue 11, part 2), on every path a user loads through:
the class's from_pretrained, the Auto classes and the pipeline with remote code, the endpoint handler,
scripts/add_classes.py, scripts/train.py --model_name_or_path, and inference's load_model / validate_checkpoint.
Starting from a SegFormer checkpoint keeps giving fresh prototypes, with one line instead of a load report."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_config
from safetensors.torch import load_file, save_file
from test_class_editing import load_script, write_support_folder
from test_hf_integration import run_clean
from train_helpers import REPO, TINY_ARGS, clean_env
from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessorPil

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer.checkpoint import CheckpointError, load_model, validate_checkpoint
from proto_segformer.model_building import ModelInputError, build_model

LABELS = {0: "background", 1: "a", 2: "b", 3: "c", 4: "d"}
MISSING = "has no 'prototypes' tensor (missing: prototypes)"


@pytest.fixture(scope="module")
def complete(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("complete")
    torch.manual_seed(0)
    config = tiny_config(num_labels=5, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    ProtoSegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 32, "width": 32}, do_resize=False).save_pretrained(folder)
    return folder


def edited_copy(source: Path, target: Path, edit) -> Path:
    """A copy of checkpoint `source` whose weights are `edit(state_dict)` (edited in place)."""
    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    edit(weights)
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def without_prototypes(complete, tmp_path_factory) -> Path:
    return edited_copy(complete, tmp_path_factory.mktemp("stripped") / "model", lambda w: w.pop("prototypes"))


def test_class_from_pretrained_without_prototypes_is_an_error(without_prototypes, caplog) -> None:
    with pytest.raises(ValueError, match=re.escape(MISSING)):
        ProtoSegformerForSemanticSegmentation.from_pretrained(without_prototypes)
    # ignore_mismatched_sizes re-initialises mismatched tensors on purpose, but a missing one is still an error
    with pytest.raises(ValueError, match=re.escape(MISSING)):
        ProtoSegformerForSemanticSegmentation.from_pretrained(without_prototypes, ignore_mismatched_sizes=True)
    with pytest.raises(ValueError, match=re.escape(MISSING)):
        ProtoSegformerForSemanticSegmentation.from_pretrained(
            without_prototypes, num_labels=3, ignore_mismatched_sizes=True
        )
    assert "LOAD REPORT" not in caplog.text  # the error says it; no table of MISSING keys besides


def test_any_missing_tensor_of_a_protoseg_checkpoint_is_named(complete, tmp_path) -> None:
    folder = edited_copy(complete, tmp_path / "model", lambda w: w.pop("projection.conv2.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) of the model \(missing: projection.conv2.weight\)"):
        ProtoSegformerForSemanticSegmentation.from_pretrained(folder)


@pytest.mark.slow
def test_remote_code_paths_without_prototypes_are_errors_in_a_clean_process(without_prototypes, tmp_path) -> None:
    handler_dir = tmp_path / "handler"
    handler_dir.mkdir()
    package = Path(__file__).resolve().parents[1] / "proto_segformer"
    shutil.copyfile(package / "endpoint_handler.py", handler_dir / "handler.py")
    shutil.copyfile(package / "image_decoding.py", handler_dir / "image_decoding.py")  # as hub.py ships it
    folder = str(without_prototypes)
    result = run_clean(
        f"""
        import json, sys
        sys.path.insert(0, {str(handler_dir)!r})
        from transformers import AutoModel, AutoModelForSemanticSegmentation, pipeline
        from handler import EndpointHandler
        loaders = {{
            "AutoModel": lambda: AutoModel.from_pretrained({folder!r}, trust_remote_code=True),
            "AutoModelForSemanticSegmentation": lambda: AutoModelForSemanticSegmentation.from_pretrained(
                {folder!r}, trust_remote_code=True
            ),
            "pipeline": lambda: pipeline("image-segmentation", model={folder!r}, trust_remote_code=True),
            "handler": lambda: EndpointHandler({folder!r}),
        }}
        errors = {{}}
        for name, load in loaders.items():
            try:
                load()
                errors[name] = None
            except Exception as error:
                errors[name] = type(error).__name__ + ": " + str(error)
        print(json.dumps(errors))
        """,
        cwd=tmp_path,
    )
    for path, error in result.items():
        assert error is not None and MISSING in error, (path, error)


def test_add_classes_script_refuses_a_checkpoint_without_prototypes(without_prototypes, tmp_path) -> None:
    script = load_script("add_classes")
    write_support_folder(tmp_path / "support")
    arguments = script.AddClassesArguments(
        model_dir=str(without_prototypes),
        support_dir=str(tmp_path / "support"),
        names=["red", "blue"],
        output_dir=str(tmp_path / "out"),
    )
    # The script validates the folder first (checkpoint.validate_checkpoint): its message names the tensor too.
    with pytest.raises(ValueError, match="no 'prototypes' tensor"):
        script.main(arguments)
    assert not (tmp_path / "out").exists()  # nothing saved that would pass validation


def test_train_from_a_checkpoint_without_prototypes_is_an_error(without_prototypes, tmp_path, capsys) -> None:
    with pytest.raises(ModelInputError, match=re.escape(MISSING)):
        build_model(model_name_or_path=str(without_prototypes), model_preset=None, id2label=LABELS)
    # other classes: prototypes are re-initialised on purpose, but a missing tensor is still an error
    with pytest.raises(ModelInputError, match=re.escape(MISSING)):
        build_model(model_name_or_path=str(without_prototypes), model_preset=None, id2label={0: "x", 1: "y"})
    from proto_segformer.run_training import main

    argv = ["--model_name_or_path", str(without_prototypes), "--output_dir", str(tmp_path / "run"), "--max_steps", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--builtin_num_train", "4", "--builtin_num_validation", "2", "--builtin_image_size", "32"])
    assert exit_info.value.code == 2
    assert MISSING in capsys.readouterr().err


def test_parametric_segformer_start_gives_fresh_prototypes_and_one_line(tmp_path, caplog) -> None:
    SegformerForSemanticSegmentation(SegformerConfig(num_labels=7, **TINY)).save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO):
        model = ProtoSegformerForSemanticSegmentation.from_pretrained(tmp_path, num_labels=3)
    assert model.prototypes.shape == (3, 10, TINY["decoder_hidden_size"])
    torch.testing.assert_close(model.prototypes.norm(dim=-1), torch.ones(3, 10))
    assert "LOAD REPORT" not in caplog.text and "MISSING" not in caplog.text
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Loaded the encoder and decoder")]
    assert lines == [
        f"Loaded the encoder and decoder from {tmp_path} (122 tensors); dropped the parametric classifier"
        " (decode_head.classifier.*); new: projection, prototypes"
    ]
    _, source = build_model(model_name_or_path=str(tmp_path), model_preset=None, id2label={0: "a", 1: "b"})
    assert source.endswith("new: projection, prototypes") and "(122 tensors)" in source


@pytest.mark.slow
def test_train_from_a_parametric_segformer_says_one_line_instead_of_a_load_report(tmp_path) -> None:
    SegformerForSemanticSegmentation(SegformerConfig(num_labels=7, **TINY)).save_pretrained(tmp_path / "seg")
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--model_name_or_path", "seg", "--output_dir"]
    command += ["out", "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", *TINY_ARGS]
    done = subprocess.run(command, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "LOAD REPORT" not in output and "MISSING" not in output and "UNEXPECTED" not in output
    assert (
        "Model: SegformerForSemanticSegmentation checkpoint: Loaded the encoder and decoder from seg (122 tensors);"
        " dropped the parametric classifier (decode_head.classifier.*); new: projection, prototypes; 11 classes"
    ) in output


def test_unexpected_tensors_in_a_protoseg_checkpoint_keep_the_load_report(complete, tmp_path, caplog) -> None:
    folder = edited_copy(complete, tmp_path / "model", lambda w: w.update(extra=torch.zeros(2)))
    logging.getLogger("transformers.modeling_utils").addHandler(caplog.handler)
    try:
        ProtoSegformerForSemanticSegmentation.from_pretrained(folder)
    finally:
        logging.getLogger("transformers.modeling_utils").removeHandler(caplog.handler)
    assert "LOAD REPORT" in caplog.text and "extra" in caplog.text


def test_another_class_count_asked_for_gives_one_line_not_a_load_report(complete, caplog) -> None:
    logging.getLogger("transformers.modeling_utils").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            model = ProtoSegformerForSemanticSegmentation.from_pretrained(
                complete, num_labels=9, ignore_mismatched_sizes=True
            )
    finally:
        logging.getLogger("transformers.modeling_utils").removeHandler(caplog.handler)
    assert model.prototypes.shape == (9, 4, 32)
    assert "LOAD REPORT" not in caplog.text and "MISMATCH" not in caplog.text
    assert "Fresh prototypes (9, 4, 32) (the checkpoint's are (5, 4, 32))" in caplog.text


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_prototypes_are_an_error_for_inference(complete, tmp_path, value) -> None:
    def poison(weights):
        weights["prototypes"][1, 0, 3] = value

    folder = edited_copy(complete, tmp_path / "model", poison)
    with pytest.raises(CheckpointError, match="holds NaN or inf values in prototypes"):
        validate_checkpoint(folder)
    with pytest.raises(CheckpointError, match="holds NaN or inf values in prototypes"):
        load_model(folder)


def test_weights_that_overflow_on_a_cast_are_an_error(complete, tmp_path) -> None:
    def large(weights):
        weights["projection.conv1.bias"][0] = 1e6  # finite in float32, inf in float16

    folder = edited_copy(complete, tmp_path / "model", large)
    validate_checkpoint(folder)
    assert load_model(folder).projection.conv1.bias[0] == 1e6
    with pytest.raises(CheckpointError, match=r"as torch.float16 holds NaN or inf values in projection.conv1.bias"):
        load_model(folder, dtype=torch.float16)


# ------------------------------------------------------------------------------ config.json vs the weights (issue 18)

ELEVEN = {index: f"class {index}" for index in range(11)}
SKIPPED_IDS = "id2label in config.json must number its 11 classes 0..10 (one per prototype class), but it lacks id(s)"
TWELVE_NAMES = "config.json names 12 classes (id2label) but model.safetensors holds prototypes for 11"


@pytest.fixture(scope="module")
def eleven(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eleven") / "model"
    torch.manual_seed(0)
    config = tiny_config(num_labels=11, id2label=ELEVEN, label2id={v: k for k, v in ELEVEN.items()})
    ProtoSegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 32, "width": 32}, do_resize=False).save_pretrained(folder)
    return folder


def with_labels(source: Path, target: Path, id2label: dict[int, str]) -> Path:
    """A copy of checkpoint `source` whose config.json names the classes `id2label` (as edited by hand)."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["id2label"] = {str(k): v for k, v in id2label.items()}
    config["label2id"] = {v: k for k, v in id2label.items()}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


@pytest.fixture(scope="module")
def mislabelled(eleven, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of 11 prototype classes whose config.json is wrong: ids 0-9 and 12; 12 names; a corrupt header."""
    root = tmp_path_factory.mktemp("mislabelled")
    skipping = {**{index: f"class {index}" for index in range(10)}, 12: "class 12"}
    corrupt = edited_copy(eleven, root / "corrupt", lambda weights: None)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 8 + data[8:])  # header length 2**64 - 1: "too large"
    return {
        "skipped_ids": with_labels(eleven, root / "skipped_ids", skipping),
        "twelve_names": with_labels(eleven, root / "twelve_names", {index: f"c{index}" for index in range(12)}),
        "corrupt": corrupt,
    }


def test_a_config_json_whose_ids_skip_is_refused_for_inference(mislabelled) -> None:
    folder = mislabelled["skipped_ids"]
    with pytest.raises(ValueError, match=re.escape(SKIPPED_IDS)):
        ProtoSegformerForSemanticSegmentation.from_pretrained(folder)
    with pytest.raises(CheckpointError, match=re.escape(f"{folder / 'config.json'}: {SKIPPED_IDS}")):
        validate_checkpoint(folder)  # predict, add_classes and the Hub upload check the folder with it
    with pytest.raises(CheckpointError, match=re.escape(SKIPPED_IDS)):
        load_model(folder)


def test_more_class_names_than_prototype_classes_is_named_in_one_line(mislabelled, caplog) -> None:
    logging.getLogger("transformers.modeling_utils").addHandler(caplog.handler)
    try:
        with pytest.raises(ValueError, match=re.escape(TWELVE_NAMES)) as error:
            ProtoSegformerForSemanticSegmentation.from_pretrained(mislabelled["twelve_names"])
    finally:
        logging.getLogger("transformers.modeling_utils").removeHandler(caplog.handler)
    assert "Make id2label list the checkpoint's 11 classes (ids 0..10" in str(error.value)
    assert "LOAD REPORT" not in caplog.text  # the message says it all


def test_a_corrupt_weights_file_is_named(mislabelled) -> None:
    path = mislabelled["corrupt"] / "model.safetensors"
    with pytest.raises(ValueError, match=rf"^The weights file {re.escape(str(path))} is corrupt or truncated \(.*"):
        ProtoSegformerForSemanticSegmentation.from_pretrained(mislabelled["corrupt"])


@pytest.mark.slow
def test_remote_code_paths_refuse_mislabelled_and_corrupt_checkpoints_in_a_clean_process(mislabelled, tmp_path) -> None:
    handler_dir = tmp_path / "handler"
    handler_dir.mkdir()
    shutil.copyfile(REPO / "proto_segformer" / "endpoint_handler.py", handler_dir / "handler.py")
    shutil.copyfile(REPO / "proto_segformer" / "image_decoding.py", handler_dir / "image_decoding.py")
    folders = {name: str(folder) for name, folder in mislabelled.items()}
    result = run_clean(
        f"""
        import json, sys
        sys.path.insert(0, {str(handler_dir)!r})
        from transformers import AutoModel
        from handler import EndpointHandler
        errors = {{}}
        for case, folder in {folders!r}.items():
            for name, load in (
                ("AutoModel", lambda: AutoModel.from_pretrained(folder, trust_remote_code=True)),
                ("handler", lambda: EndpointHandler(folder)),
            ):
                try:
                    load()
                    errors[case + " " + name] = None
                except Exception as error:
                    errors[case + " " + name] = type(error).__name__ + ": " + str(error)
        print(json.dumps(errors))
        """,
        cwd=tmp_path,
    )
    expected = {
        "skipped_ids": SKIPPED_IDS,
        "twelve_names": TWELVE_NAMES,
        "corrupt": f"The weights file {mislabelled['corrupt'] / 'model.safetensors'} is corrupt or truncated",
    }
    for key, error in result.items():
        assert error is not None and expected[key.split()[0]] in error, (key, error)
        assert "\n" not in error, (key, error)


def test_a_mistyped_local_path_names_the_close_folders_at_once(eleven, tmp_path, monkeypatch) -> None:
    from proto_segformer import ProtoSegformerConfig
    from proto_segformer.local_paths import LocalPathNotFoundError

    shutil.copytree(eleven, tmp_path / "runs" / "demo")
    monkeypatch.chdir(tmp_path)
    did_you_mean = "Did you mean 'runs/demo'?"
    missing = "The model path 'runs/demoo' does not exist (checked locally; it was not looked up on the Hub)."
    with pytest.raises(LocalPathNotFoundError, match=re.escape(f"{missing} {did_you_mean}")):
        ProtoSegformerConfig.from_pretrained("runs/demoo")
    with pytest.raises(LocalPathNotFoundError, match=re.escape(f"{missing} {did_you_mean}")):
        ProtoSegformerForSemanticSegmentation.from_pretrained("runs/demoo")
    with pytest.raises(CheckpointError, match=re.escape(f"folder 'runs/demoo' does not exist. {did_you_mean}")):
        validate_checkpoint("runs/demoo")  # predict's --model


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--inference_chunk_size", "-1"], "inference_chunk_size must be an integer in [1, 2147483648], got -1."),
        (["--decoder_hidden_size", "1000000"], "over the 8 GiB limit; most of it is the decoder"),
    ],
)
def test_train_refuses_sizes_beyond_the_bounds_in_one_line(tmp_path, capsys, flags, message) -> None:
    from proto_segformer.run_training import main

    argv = ["--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--eval_strategy", "no", *flags]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--builtin_num_train", "4", "--builtin_num_validation", "2", "--builtin_image_size", "32"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: Invalid model configuration: ")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "run" / "model.safetensors").exists()
