"""The checkpoint module: a model folder read and checked once (`validate_checkpoint` -> `ModelFolder`), and every
command that loads a model (predict, push_to_hub, add_classes, export) running each check once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config
from PIL import Image
from transformers import SegformerImageProcessorPil

from proto_segformer import ProtoSegformerForSemanticSegmentation, prediction_files
from proto_segformer import checkpoint as checkpoint_module
from proto_segformer.checkpoint import (
    CheckpointError,
    ModelFolder,
    load_image_processor,
    load_model,
    validate_checkpoint,
)

LABELS = {0: "background", 1: "cat", 2: "dog"}

pytestmark = pytest.mark.usefixtures("one_thread")


def save_model(folder: Path, crop: int | None = 48) -> Path:
    torch.manual_seed(0)
    config = tiny_config(num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    ProtoSegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 32, "width": 32}, do_resize=False).save_pretrained(folder)
    if crop is not None:
        (folder / "training_args.json").write_text(json.dumps({"crop_size": crop}))
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("run") / "model")


class Counter:
    """Wraps a function of a module and counts its calls."""

    def __init__(self, monkeypatch, module, name: str) -> None:
        self.calls = 0
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


@pytest.fixture
def counts(monkeypatch) -> dict[str, Counter]:
    """Calls of the file scan for NaN/inf, of the config reader, and of the scan of a loaded model."""
    return {
        "scan": Counter(monkeypatch, checkpoint_module, "non_finite_weights"),
        "config": Counter(monkeypatch, checkpoint_module, "read_config"),
        "model_scan": Counter(monkeypatch, ProtoSegformerForSemanticSegmentation, "non_finite_tensors"),
        "prepare": Counter(monkeypatch, prediction_files, "prepare_outputs"),
    }


def test_a_model_folder_is_read_once_into_one_object(model_folder):
    folder = validate_checkpoint(model_folder)
    assert isinstance(folder, ModelFolder)
    assert folder.folder == model_folder
    assert folder.config["id2label"] == {str(k): v for k, v in LABELS.items()}
    assert folder.id2label == LABELS
    assert folder.weight_files == (model_folder / "model.safetensors",)
    assert folder.prototype_shape == tuple(folder.tensor_shapes["prototypes"])
    assert folder.prototype_shape[0] == 3
    assert folder.processor_folder == model_folder
    assert folder.training_crop == ((48, 48), model_folder / "training_args.json")


def test_a_checkpoint_folder_takes_the_processor_of_its_run(model_folder, tmp_path):
    run = tmp_path / "run"
    save_model(run / "checkpoint-10", crop=None)
    (run / "checkpoint-10" / "preprocessor_config.json").rename(run / "preprocessor_config.json")
    (run / "training_args.json").write_text(json.dumps({"crop_size": [40, 56]}))
    folder = validate_checkpoint(run / "checkpoint-10")
    assert folder.processor_folder == run
    assert folder.training_crop == ((40, 56), run / "training_args.json")
    assert load_image_processor(folder).do_resize is False  # the run's processor, not SegFormer's default


def test_loading_from_the_object_runs_no_check_again(model_folder, counts):
    folder = validate_checkpoint(model_folder)
    assert counts["scan"].calls == 1 and counts["config"].calls == 1
    model = load_model(folder)
    load_image_processor(folder)
    assert isinstance(model, ProtoSegformerForSemanticSegmentation) and not model.training
    assert counts["scan"].calls == 1 and counts["config"].calls == 1
    assert counts["model_scan"].calls == 0  # the saved values were scanned in the file; no cast, no second scan


def test_a_cast_that_overflows_is_still_refused(model_folder, tmp_path, counts):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "big"
    save_model(target)
    weights = load_file(target / "model.safetensors")
    weights["projection.conv2.weight"][0, 0] = 1e6  # finite in float32, inf in float16
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    folder = validate_checkpoint(target)
    with pytest.raises(CheckpointError, match="projection.conv2.weight"):
        load_model(folder, dtype=torch.float16)
    assert counts["scan"].calls == 1 and counts["model_scan"].calls == 1


def test_predict_runs_each_check_once(model_folder, tmp_path, counts):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import predict
    finally:
        sys.path.pop(0)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "photo.png")
    code = predict.main(
        ["--model", str(model_folder), "--inputs", str(tmp_path / "photo.png"), "--output_dir", str(tmp_path / "out"),
         "--no_progress"]
    )  # fmt: skip
    assert code == 0
    assert (tmp_path / "out" / "photo_label.png").is_file()
    assert {name: counter.calls for name, counter in counts.items()} == {
        "scan": 1,
        "config": 1,
        "model_scan": 0,
        "prepare": 1,
    }


def test_push_to_hub_assembly_runs_the_scan_once(model_folder, tmp_path, counts):
    from proto_segformer.hub import assemble_repository

    assemble_repository(model_folder, tmp_path / "repo", repo_id="alice/tiny", dataset_name="scenes")
    assert counts["scan"].calls == 1 and counts["config"].calls == 1
    assert counts["model_scan"].calls == 0


def test_add_classes_runs_the_scan_once(model_folder, tmp_path, counts):
    from proto_segformer.add_classes import AddClassesSettings, add_classes_from_folder

    support = tmp_path / "support"
    (support / "images").mkdir(parents=True)
    (support / "masks").mkdir()
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    Image.fromarray(image).save(support / "images" / "a.png")
    Image.fromarray(mask).save(support / "masks" / "a.png")
    add_classes_from_folder(model_folder, support, ["bird"], tmp_path / "plus", settings=AddClassesSettings())
    assert counts["scan"].calls == 1
    assert counts["model_scan"].calls == 0


def test_training_does_not_import_the_segmenter_or_pictures():
    code = (
        "import sys, proto_segformer.training\n"
        "loaded = sorted(m for m in sys.modules if m in {'proto_segformer.segmenter', 'proto_segformer.pictures',"
        " 'proto_segformer.prediction_files'})\n"
        "print(loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
