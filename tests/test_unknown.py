"""Unknown pixels (issue 24): the score from the head's own pass on every kernel path, its streaming calibration,
the one rejection switch (segmenter, predict, evaluate, endpoint handler, overlays), add_classes' recalibration and
the one-line errors (a threshold outside [-1, 1], no labelled pixels, a model never calibrated)."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from PIL import Image
from transformers import SegformerImageProcessorPil

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer.configuration_proto_segformer import ProtoSegformerConfig
from proto_segformer.data.builtin import build_builtin_dataset
from proto_segformer.endpoint_handler import EndpointHandler
from proto_segformer.pictures import UNKNOWN_COLOUR, colour_overlay
from proto_segformer.prototype_kernels import inference_logits
from proto_segformer.prototype_math import class_scores, max_similarity
from proto_segformer.segmenter import InferenceOptions, Segmenter
from proto_segformer.unknown import (
    CalibrationError,
    ScoreHistogram,
    calibrate,
    recalibrated_for_added_classes,
    required_threshold,
    upsample_scores,
)

REPO = Path(__file__).resolve().parent.parent
SIZE = 64
pytestmark = pytest.mark.usefixtures("one_thread")


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(
        torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1 if len(shape) == 3 else 1
    )


# ------------------------------------------------------------------------------------------------------- the score


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("tracing", [True, False])
@pytest.mark.parametrize("indices", [True, False])
def test_every_head_path_gives_the_reference_max_similarity_with_unchanged_logits(fast, tracing, indices):
    embeddings, prototypes = unit(2, 16, 5, 7, seed=0), unit(6, 3, 16, seed=1)
    reference = class_scores(embeddings, prototypes).amax(dim=1)
    plain = inference_logits(embeddings, prototypes, fast=fast, tracing=tracing, prototype_indices=indices)
    result = inference_logits(
        embeddings, prototypes, fast=fast, tracing=tracing, prototype_indices=indices, with_max_similarity=True
    )
    assert len(result) == (3 if indices else 2)
    assert result[-1].shape == (2, 5, 7)
    torch.testing.assert_close(result[-1], reference, atol=1e-6, rtol=0)
    plain_logits = plain[0] if indices else plain
    assert torch.equal(result[0], plain_logits)  # the same pass: the logits are the same bits
    assert (result[-1] >= -1 - 1e-6).all() and (result[-1] <= 1 + 1e-6).all()


def test_model_returns_max_similarity_from_its_embeddings_with_and_without_labels(tiny_model):
    pixel_values = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    tiny_model.eval()
    with torch.no_grad():
        output = tiny_model(pixel_values, output_max_similarity=True, output_pixel_embeddings=True)
        plain = tiny_model(pixel_values)
        labelled = tiny_model(pixel_values, labels=torch.zeros(2, 64, 48, dtype=torch.long), output_max_similarity=True)
    expected = max_similarity(class_scores(output.pixel_embeddings, tiny_model.prototypes), dim=1)
    assert output.max_similarity.shape == (2, 16, 12) == output.logits.shape[:1] + output.logits.shape[2:]
    torch.testing.assert_close(output.max_similarity, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(labelled.max_similarity, expected, atol=1e-5, rtol=0)
    assert plain.max_similarity is None and torch.equal(plain.logits, output.logits)


# ------------------------------------------------------------------------------------------------- calibration


def test_histogram_threshold_accepts_the_asked_fraction_within_one_bin():
    scores = torch.linspace(-0.3, 0.9, 100_001)
    histogram = ScoreHistogram()
    for part in scores.split(7_777):  # streamed in pieces: the same counts as at once
        histogram.update(part)
    assert histogram.total == scores.numel()
    for fraction in (0.5, 0.95, 1.0):
        threshold = histogram.threshold(fraction)
        accepted = float((scores >= threshold).double().mean())
        assert fraction <= accepted <= fraction + 2e-4 + 1e-9
        assert histogram.counts.nbytes == ScoreHistogram().counts.nbytes  # flat memory


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1])
def test_a_fraction_outside_0_1_is_refused(fraction):
    histogram = ScoreHistogram()
    histogram.update(torch.zeros(4))
    with pytest.raises(CalibrationError, match=r"must lie in \(0, 1\]"):
        histogram.threshold(fraction)


def test_calibration_without_known_pixels_is_one_error_and_changes_nothing(tiny_model):
    batches = [{"pixel_values": torch.randn(1, 3, 64, 64), "labels": torch.full((1, 64, 64), 255)}]
    with pytest.raises(CalibrationError, match="No known pixels"):
        calibrate(tiny_model, batches, split="validation", source="test")
    assert tiny_model.config.unknown_threshold is None and tiny_model.config.unknown_calibration is None


def test_calibration_stores_threshold_and_record_that_survive_save_and_load(tiny_model, tmp_path):
    generator = torch.Generator().manual_seed(1)
    batches = [
        {"pixel_values": torch.randn(2, 3, 64, 64, generator=generator), "labels": torch.zeros(2, 64, 64).long()}
    ]
    record = calibrate(tiny_model, batches, split="validation", source="random", fraction=0.9)
    assert record["known_pixels"] == 2 * 64 * 64 and record["accepted_fraction"] == 0.9 and record["date"]
    with torch.no_grad():
        scores = upsample_scores(
            tiny_model(batches[0]["pixel_values"], output_max_similarity=True).max_similarity, (64, 64)
        )
    assert 0.9 <= float((scores >= tiny_model.config.unknown_threshold).double().mean()) <= 0.91
    tiny_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["unknown_threshold"] == tiny_model.config.unknown_threshold
    assert saved["unknown_calibration"]["split"] == "validation"
    assert ProtoSegformerConfig.from_pretrained(tmp_path).unknown_threshold == tiny_model.config.unknown_threshold


@pytest.mark.parametrize("value", [1.5, -2, "high", True, float("nan")])
def test_a_threshold_outside_the_score_range_is_one_line(value):
    with pytest.raises(ValueError, match=r"unknown_threshold must be a number in \[-1, 1\]"):
        tiny_config(unknown_threshold=value)
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        InferenceOptions(reject_unknown=True, unknown_threshold=value)


def test_a_model_saved_before_calibration_names_the_calibration_command(tiny_model):
    with pytest.raises(ValueError, match="scripts/calibrate_unknown.py"):
        required_threshold(tiny_model.config)
    with pytest.raises(ValueError, match="scripts/calibrate_unknown.py"):
        Segmenter(tiny_model, SegformerImageProcessorPil(do_resize=False), InferenceOptions(reject_unknown=True))
    with pytest.raises(ValueError, match="without rejection"):
        InferenceOptions(unknown_threshold=0.5)


# --------------------------------------------------------------------------------------------------- rejection


@pytest.fixture(scope="module")
def scenes():
    return build_builtin_dataset("scenes", num_train=1, num_validation=6, image_size=SIZE)


@pytest.fixture(scope="module")
def model_folder(scenes, tmp_path_factory) -> Path:
    """A tiny untrained model on the scenes classes, saved as train.py saves one, never calibrated."""
    _, id2label = scenes
    torch.manual_seed(0)
    config = tiny_config(num_labels=len(id2label), id2label=id2label)
    config.label2id = {name: index for index, name in id2label.items()}
    folder = tmp_path_factory.mktemp("model")
    ProtoSegformerForSemanticSegmentation(config).eval().save_pretrained(folder)
    SegformerImageProcessorPil(do_resize=False).save_pretrained(folder)
    (folder / "training_args.json").write_text(json.dumps({"crop_size": SIZE}))
    return folder


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_script(name: str, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = load_script(name).main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def calibrated_folder(model_folder, tmp_path_factory) -> Path:
    """`model_folder` copied and calibrated by scripts/calibrate_unknown.py on the scenes validation split."""
    import shutil

    folder = tmp_path_factory.mktemp("calibrated") / "model"
    shutil.copytree(model_folder, folder)
    code, printed, errors = run_script(
        "calibrate_unknown",
        [
            "--model",
            str(folder),
            "--dataset_name",
            "scenes",
            "--builtin_num_validation",
            "6",
            "--accepted_fraction",
            "0.8",
        ],
    )
    assert code == 0, errors
    assert "Calibrated: max_similarity >=" in printed and "80 % of 24,576 known pixels" in printed
    return folder


def test_calibrate_script_writes_only_the_two_fields_and_they_accept_the_fraction(calibrated_folder, model_folder):
    before = json.loads((model_folder / "config.json").read_text())
    after = json.loads((calibrated_folder / "config.json").read_text())
    assert {k for k in after if after[k] != before.get(k)} == {"unknown_threshold", "unknown_calibration"}
    assert after["unknown_calibration"]["known_pixels"] == 6 * SIZE * SIZE
    assert after["unknown_calibration"]["split"] == "validation"
    segmenter = Segmenter.from_pretrained(
        calibrated_folder, options=InferenceOptions(mode="whole", unknown_scores=True)
    )
    data, _ = build_builtin_dataset("scenes", num_train=1, num_validation=6, image_size=SIZE)
    scores = np.concatenate([p.max_similarity.ravel() for p in segmenter.predict(list(data["validation"]["image"]))])
    assert 0.8 <= float((scores >= after["unknown_threshold"]).mean()) <= 0.81


def test_calibrate_script_refuses_a_split_without_labelled_pixels_and_writes_nothing(model_folder, monkeypatch):
    from proto_segformer.metrics import ConfusionMatrix

    before = (model_folder / "config.json").read_bytes()
    monkeypatch.setattr(ConfusionMatrix, "known_mask", lambda self, label: np.zeros(np.shape(label), dtype=bool))
    code, _, errors = run_script(
        "calibrate_unknown", ["--model", str(model_folder), "--dataset_name", "scenes", "--builtin_num_validation", "2"]
    )
    assert code == 2 and errors.strip().splitlines()[-1].startswith("error: No known pixels")
    assert (model_folder / "config.json").read_bytes() == before


def test_rejection_gives_ignore_labels_below_the_threshold_in_whole_and_slide_mode(calibrated_folder, scenes):
    data, _ = scenes
    images = [np.asarray(image) for image in data["validation"]["image"][:2]]
    big = np.concatenate([images[0], images[1]], axis=1)  # 64 x 128: sliding windows
    plain = Segmenter.from_pretrained(calibrated_folder, options=InferenceOptions(mode="auto"))
    rejecting = Segmenter.from_pretrained(calibrated_folder, options=InferenceOptions(mode="auto", reject_unknown=True))
    threshold = rejecting.rejection.threshold
    for before, after in zip(plain.predict([*images, big]), rejecting.predict([*images, big])):
        assert before.unknown_map is None and after.unknown_map.shape == after.label_map.shape
        assert np.array_equal(after.unknown_map, after.max_similarity < threshold)
        assert (after.label_map[after.unknown_map] == 255).all()
        assert np.array_equal(after.label_map[~after.unknown_map], before.label_map[~after.unknown_map])
    assert any(p.unknown_map.any() for p in rejecting.predict(images))  # 20 % of the pixels are below the threshold


def test_predict_script_marks_unknown_pixels_in_the_label_png_and_the_overlay(calibrated_folder, scenes, tmp_path):
    data, _ = scenes
    inputs = tmp_path / "in"
    inputs.mkdir()
    data["validation"]["image"][0].save(inputs / "scene.png")
    code, _, errors = run_script(
        "predict",
        [
            "--model",
            str(calibrated_folder),
            "--inputs",
            str(inputs),
            "--output_dir",
            str(tmp_path / "out"),
            "--reject_unknown",
            "--no_progress",
        ],
    )
    assert code == 0, errors
    label = np.asarray(Image.open(tmp_path / "out" / "scene_label.png"))
    assert (label == 255).any() and (label != 255).any()
    code, _, errors = run_script(
        "predict",
        [
            "--model",
            str(calibrated_folder),
            "--inputs",
            str(inputs),
            "--output_dir",
            str(tmp_path / "o2"),
            "--reject_unknown",
            "--unknown_threshold",
            "2",
        ],
    )
    assert code == 2 and "in [-1, 1]" in errors and not (tmp_path / "o2" / "scene_label.png").exists()


def test_predict_on_a_model_never_calibrated_is_one_line_naming_the_command(model_folder, scenes, tmp_path):
    data, _ = scenes
    inputs = tmp_path / "in"
    inputs.mkdir()
    data["validation"]["image"][0].save(inputs / "scene.png")
    code, _, errors = run_script(
        "predict",
        [
            "--model",
            str(model_folder),
            "--inputs",
            str(inputs),
            "--output_dir",
            str(tmp_path / "out"),
            "--reject_unknown",
        ],
    )
    last = errors.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and "scripts/calibrate_unknown.py" in last
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_overlay_paints_unknown_pixels_neutral_and_lists_them_in_the_legend():
    image = np.full((40, 60, 3), 30, dtype=np.uint8)
    label_map = np.zeros((40, 60), dtype=np.int64)
    label_map[:, 30:] = 1
    unknown = np.zeros_like(label_map, dtype=bool)
    unknown[:10, :10] = True
    label_map[unknown] = 255
    plain = colour_overlay(image, label_map, {0: "a", 1: "b"}, legend=False, unknown_map=unknown)
    expected = np.round(0.5 * np.asarray(UNKNOWN_COLOUR) + 0.5 * 30).astype(np.uint8)
    assert (plain[:10, :10] == expected).all()
    with_legend = colour_overlay(image, label_map, {0: "a", 1: "b"}, unknown_map=unknown)
    without = colour_overlay(image, label_map, {0: "a", 1: "b"}, unknown_map=np.zeros_like(unknown))
    assert with_legend.shape != without.shape or not np.array_equal(with_legend, without)  # one more legend row


def test_evaluate_script_reports_the_rejected_fraction_of_labelled_pixels(calibrated_folder, tmp_path):
    code, printed, errors = run_script(
        "evaluate_model",
        [
            "--model",
            str(calibrated_folder),
            "--dataset_name",
            "scenes",
            "--builtin_num_validation",
            "6",
            "--reject_unknown",
            "--no_progress",
            "--output_dir",
            str(tmp_path / "eval"),
        ],
    )
    assert code == 0, errors
    report = json.loads((tmp_path / "eval" / "evaluation_results.json").read_text())
    rejection = report["unknown_rejection"]
    assert rejection["known_pixels"] == 6 * SIZE * SIZE
    assert 0.19 <= rejection["rejected_known_fraction"] <= 0.2  # calibrated to accept 80 % of the same pixels
    assert "unknown rejection (max_similarity <" in printed
    code, _, errors = run_script(
        "evaluate_model",
        [
            "--model",
            str(calibrated_folder),
            "--dataset_name",
            "scenes",
            "--builtin_num_validation",
            "6",
            "--reject_unknown",
            "--flip",
        ],
    )
    assert code == 2 and "without test-time augmentation" in errors


def test_endpoint_handler_gives_an_unknown_segment_only_when_asked(calibrated_folder, model_folder, scenes):
    data, _ = scenes
    buffer = io.BytesIO()
    data["validation"]["image"][0].save(buffer, format="PNG")
    handler = EndpointHandler(str(calibrated_folder))
    plain = handler({"inputs": buffer.getvalue()})
    rejected = handler({"inputs": buffer.getvalue(), "parameters": {"reject_unknown": True}})
    assert "unknown" not in [entry["label"] for entry in plain]
    assert rejected[-1]["label"] == "unknown"
    masks = [np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["mask"])))) > 0 for entry in rejected]
    assert (np.sum(masks, axis=0) == 1).all()  # every pixel in exactly one segment
    segmenter = Segmenter.from_pretrained(
        calibrated_folder, options=InferenceOptions(mode="whole", reject_unknown=True)
    )
    (prediction,) = segmenter.predict([data["validation"]["image"][0]])
    assert np.array_equal(masks[-1], prediction.unknown_map)  # the same rule as the package's
    with pytest.raises(ValueError, match="'parameters.reject_unknown' must be true or false"):
        handler({"inputs": buffer.getvalue(), "parameters": {"reject_unknown": "yes"}})
    with pytest.raises(ValueError, match="scripts/calibrate_unknown.py"):
        EndpointHandler(str(model_folder))({"inputs": buffer.getvalue(), "parameters": {"reject_unknown": True}})


# ---------------------------------------------------------------------------------------------------- add_classes


def test_add_classes_lowers_the_threshold_to_accept_the_new_support_pixels(tiny_model):
    tiny_model.config.unknown_threshold = 0.9
    tiny_model.config.unknown_calibration = {"accepted_fraction": 0.95, "split": "validation", "known_pixels": 10}
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    masks = torch.zeros(2, 64, 64, dtype=torch.long)
    masks[:, 8:40, 8:40] = 1
    tiny_model.add_classes(images, masks, ["novel"])
    record = tiny_model.config.unknown_calibration
    assert record["classes_added_since"] == ["novel"]
    assert tiny_model.config.unknown_threshold == min(0.9, record["recalibrated_by_add_classes"]["support_threshold"])
    assert record["split"] == "validation"  # the calibration on data is kept


def test_recalibration_never_raises_the_threshold():
    config = tiny_config(unknown_threshold=-0.5, unknown_calibration={"accepted_fraction": 0.95})
    threshold, record = recalibrated_for_added_classes(config, torch.full((100,), 0.8), ["x"])
    assert threshold == -0.5 and record["classes_added_since"] == ["x"]


# ------------------------------------------------------------------------------------------------ the benchmark


def test_open_set_metrics_on_known_cases():
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.unknown import open_set_metrics
    finally:
        sys.path.remove(str(REPO))
    unknown = np.array([1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    perfect = open_set_metrics(np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.1, 0.0, 0.2]), unknown)
    assert perfect == {"auroc": 1.0, "ap": 1.0, "fpr95": 0.0}
    # One unknown pixel scored below two known ones: the 95 % TPR threshold accepts those two as unknown too.
    mixed = open_set_metrics(np.array([0.9, 0.25, 0.1, 0.3, 0.4, 0.1, 0.0, 0.2]), unknown)
    assert mixed["fpr95"] == pytest.approx(2 / 6) and mixed["auroc"] == pytest.approx(10 / 12)
    with pytest.raises(ValueError, match="both unknown and known"):
        open_set_metrics(np.zeros(3), np.zeros(3, dtype=bool))


def test_benchmark_results_of_several_seeds_merge_into_one_summary(tmp_path):
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.unknown import format_table, merge_results
    finally:
        sys.path.remove(str(REPO))

    def run(head, seed, ap):
        names = (
            ("max_similarity", "margin", "spread", "knn", "msp")
            if head == "protoseg"
            else ("msp", "max_logit", "energy")
        )
        return {
            "head": head,
            "seed": seed,
            "mean_iou": 0.5,
            "scores": {n: {"auroc": 0.9, "ap": ap, "fpr95": 0.2} for n in names},
        }

    settings = {"mode": "default", "num_unknown": 2, "known_classes": 9, "train_images": 600, "train_options": {}}
    paths = []
    for seed, ap in ((0, 0.4), (1, 0.6)):
        result = {**settings, "machine": {}, "load_average": [1, 2, 3], "wall_seconds": 10.0 + seed}
        result["runs"] = [run("protoseg", seed, ap), run("parametric", seed, ap / 2)]
        paths.append(tmp_path / f"seed{seed}.json")
        paths[-1].write_text(json.dumps(result))
    merged = merge_results([str(p) for p in paths])
    assert merged["seeds"] == [0, 1] and merged["wall_seconds"] == 11.0
    row = next(r for r in merged["summary"] if r["head"] == "protoseg" and r["score"] == "max_similarity")
    assert row["ap"][0] == pytest.approx(0.5) and row["ap"][1] == pytest.approx(0.1414, abs=1e-4)
    assert (
        "| ProtoSeg | **max_similarity** (default) | 90.0 ± 0.0 | 50.0 ± 14.1 | 20.0 ± 0.0 | 50.0 ± 0.0 |"
        in format_table(merged["summary"])
    )
    with pytest.raises(ValueError, match="repeat seeds"):
        merge_results([str(paths[0]), str(paths[0])])


def test_the_second_model_class_returns_the_same_unknown_score():
    """ProtoSegForSemanticSegmentation (any backbone) shares the head: max_similarity from its embeddings."""
    from protoseg_helpers import tiny_protoseg_config

    from proto_segformer.modeling_protoseg import ProtoSegForSemanticSegmentation

    torch.manual_seed(0)
    model = ProtoSegForSemanticSegmentation(tiny_protoseg_config("resnet")).eval()
    with torch.no_grad():
        output = model(torch.randn(1, 3, 64, 64), output_max_similarity=True, output_pixel_embeddings=True)
    expected = max_similarity(class_scores(output.pixel_embeddings, model.prototypes), dim=1)
    assert output.max_similarity.shape == expected.shape == output.logits.shape[:1] + output.logits.shape[2:]
    torch.testing.assert_close(output.max_similarity, expected, atol=1e-5, rtol=0)
