"""Evaluation (`proto_segformer.evaluation`, `scripts/evaluate_model.py`): the same numbers as the training's
evaluation and as the Hub's mean_iou, mmsegmentation's metric definitions, test-time augmentation, bad input, the
report files."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from train_helpers import REPO, clean_env
from transformers import SegformerImageProcessorPil, TrainingArguments

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer.data import build_builtin_dataset
from proto_segformer.data.transforms import pad_collate
from proto_segformer.evaluation import (
    EVALUATION_FILE,
    MANIFEST,
    OUTPUT_FILES,
    PER_CLASS_FILE,
    EvaluationError,
    check_class_names,
    evaluate_segmenter,
    evaluation_report,
    format_table,
    load_evaluation_data,
    write_report,
)
from proto_segformer.metrics import ConfusionMatrix, load_mean_iou
from proto_segformer.metrics.class_metrics import class_metrics
from proto_segformer.segmenter import InferenceOptions, Segmenter
from proto_segformer.test_time_augmentation import TestTimeAugmentation, augmented_label_map, view_scores
from proto_segformer.trainer import ProtoSegTrainer
from proto_segformer.trainer_metrics import MeanIoUMetric

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
NUM_VALIDATION = 6


@pytest.fixture(scope="module")
def scenes_id2label() -> dict[int, str]:
    return build_builtin_dataset("scenes", num_train=1, num_validation=NUM_VALIDATION, image_size=SIZE)[1]


@pytest.fixture(scope="module")
def model_folder(scenes_id2label, tmp_path_factory) -> Path:
    """A tiny model on the scenes classes, saved as train.py saves one (full-size processor, crop recorded)."""
    torch.manual_seed(0)
    config = tiny_config(num_labels=len(scenes_id2label), id2label=scenes_id2label)
    config.label2id = {name: index for index, name in scenes_id2label.items()}
    folder = tmp_path_factory.mktemp("model")
    ProtoSegformerForSemanticSegmentation(config).eval().save_pretrained(folder)
    SegformerImageProcessorPil(do_resize=False).save_pretrained(folder)
    (folder / "training_args.json").write_text(json.dumps({"crop_size": SIZE}))
    return folder


@pytest.fixture(scope="module")
def segmenter(model_folder) -> Segmenter:
    return Segmenter.from_pretrained(model_folder, options=InferenceOptions(mode="whole", batch_size=3))


@pytest.fixture(scope="module")
def data(segmenter):
    return load_evaluation_data(
        "scenes",
        "validation",
        model_id2label=segmenter.id2label,
        ignore_index=segmenter.model.config.semantic_loss_ignore_index,
        reduce_labels=False,
        builtin_image_size=SIZE,
        builtin_num_validation=NUM_VALIDATION,
    )


@pytest.fixture(scope="module")
def result(segmenter, data):
    return evaluate_segmenter(segmenter, data, batch_size=3, progress=False)


def test_plain_evaluation_equals_the_training_evaluation(segmenter, data, result, tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=3,
        batch_eval_metrics=True,
        remove_unused_columns=False,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = ProtoSegTrainer(
        model=segmenter.model,
        args=args,
        eval_dataset=data.dataset,
        data_collator=partial(pad_collate, ignore_index=segmenter.model.config.semantic_loss_ignore_index),
        compute_metrics=MeanIoUMetric(segmenter.id2label),
    )
    trained = trainer.evaluate()
    report = evaluation_report(result, segmenter.id2label)
    assert report["num_images"] == NUM_VALIDATION
    predicted = sum(row["predicted_pixels"] > 0 for row in report["per_class"])
    assert predicted >= 2  # not a constant prediction: the comparison means something
    # The same pixels (one decoder, the same normalisation bits), the same batches and the same kernels: the same
    # predictions, so the numbers agree to the float formatting of the two reports, not within a tolerance of pixels.
    assert report["metrics"]["mIoU"] == pytest.approx(trained["eval_mean_iou"])
    assert report["metrics"]["mAcc"] == pytest.approx(trained["eval_mean_accuracy"])
    assert report["metrics"]["aAcc"] == pytest.approx(trained["eval_overall_accuracy"])
    for row in report["per_class"]:
        expected = trained[f"eval_iou_{row['name']}"]
        if math.isnan(expected):
            assert row["iou"] is None
        else:
            assert row["iou"] == pytest.approx(expected)


def test_evaluation_equals_the_hub_mean_iou_on_the_same_predictions(segmenter, data, result):
    images, labels = zip(*(data.dataset.load(i) for i in range(len(data.dataset))))
    predictions = [p.label_map for p in segmenter.predict(list(images))]
    hub = load_mean_iou().compute(
        predictions=predictions,
        references=list(labels),
        num_labels=len(segmenter.id2label),
        ignore_index=segmenter.model.config.semantic_loss_ignore_index,
    )
    report = evaluation_report(result, segmenter.id2label)
    assert report["metrics"]["mIoU"] == pytest.approx(hub["mean_iou"], rel=1e-12)
    assert report["metrics"]["mAcc"] == pytest.approx(hub["mean_accuracy"], rel=1e-12)
    assert report["metrics"]["aAcc"] == pytest.approx(hub["overall_accuracy"], rel=1e-12)
    ious = np.array([np.nan if row["iou"] is None else row["iou"] for row in report["per_class"]])
    np.testing.assert_allclose(ious, hub["per_category_iou"], rtol=1e-12)
    assert report["seconds"] > 0 and report["images_per_second"] > 0


def test_class_metrics_follow_mmsegmentation_iou_metric():
    # reference rows, predicted columns: class 0 labelled 4 times (3 right, 1 as class 1); class 1 labelled 3 times
    # (2 right, 1 as class 2); class 2 never labelled but predicted once; class 3 neither labelled nor predicted.
    matrix = ConfusionMatrix(4, ignore_index=255)
    matrix.matrix[:4, :4] = [[3, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    metrics = class_metrics(matrix)
    per_class = metrics["per_class"]
    # class 0: I 3, L 4, P 3 -> IoU 3/4, Acc 3/4, precision 1, Dice 6/7, F1 2*1*.75/1.75
    assert per_class["iou"][0] == pytest.approx(0.75)
    assert per_class["dice"][0] == pytest.approx(6 / 7)
    assert per_class["precision"][0] == pytest.approx(1.0)
    assert per_class["fscore"][0] == pytest.approx(1.5 / 1.75)
    # class 1: I 2, L 3, P 3 -> IoU 2/4, precision 2/3, recall 2/3, Dice 4/6
    assert per_class["iou"][1] == pytest.approx(0.5)
    assert per_class["recall"][1] == pytest.approx(2 / 3)
    assert per_class["dice"][1] == pytest.approx(2 / 3)
    # class 2: absent from the labels but predicted once: IoU 0 (counted), accuracy nan, precision 0
    assert per_class["iou"][2] == 0.0 and math.isnan(per_class["accuracy"][2]) and per_class["precision"][2] == 0
    # class 3: absent and never predicted: nan everywhere, left out of every mean
    assert all(math.isnan(per_class[name][3]) for name in ("iou", "accuracy", "dice", "fscore", "precision"))
    assert metrics["mIoU"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert metrics["mAcc"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert metrics["aAcc"] == pytest.approx(5 / 7)
    assert metrics["mPrecision"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert list(per_class["label_pixels"]) == [4, 3, 0, 0]
    assert list(per_class["predicted_pixels"]) == [3, 3, 1, 0]


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_augmentation_with_scale_one_and_no_flip_is_plain_prediction(model_folder, mode):
    options = InferenceOptions(mode=mode, crop_size=(32, 32), stride=(16, 16), batch_size=2)
    segmenter = Segmenter.from_pretrained(model_folder, options=options)
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    plain = segmenter.predict([image])[0].label_map
    augmented = augmented_label_map(segmenter, image, TestTimeAugmentation((1.0,), flip=False))
    np.testing.assert_array_equal(augmented, plain)


def test_flip_on_a_symmetric_image_averages_both_views(segmenter):
    half = np.random.default_rng(1).integers(0, 256, (48, 24, 3), dtype=np.uint8)
    image = np.concatenate([half, half[:, ::-1]], axis=1)  # left-right symmetric
    label_map = augmented_label_map(segmenter, image, TestTimeAugmentation((1.0,), flip=True))
    np.testing.assert_array_equal(label_map, label_map[:, ::-1])  # the mean of a view and its mirror is symmetric
    probabilities = view_scores(segmenter, image, 1.0, False).softmax(dim=0)
    expected = ((probabilities + probabilities.flip(-1)) / 2).argmax(dim=0).numpy()
    np.testing.assert_array_equal(label_map, expected)
    plain = segmenter.predict([image])[0].label_map
    assert not np.array_equal(plain, plain[:, ::-1])  # the model alone is not symmetric: the flip did something


def test_scales_average_softmax_probabilities_at_image_size(segmenter):
    image = np.random.default_rng(2).integers(0, 256, (36, 44, 3), dtype=np.uint8)
    augmentation = TestTimeAugmentation((0.5, 1.5), flip=False)
    label_map = augmented_label_map(segmenter, image, augmentation)
    small, large = (view_scores(segmenter, image, scale, False) for scale in (0.5, 1.5))
    assert small.shape == large.shape == (len(segmenter.id2label), 36, 44)
    expected = ((small.softmax(0) + large.softmax(0)) / 2).argmax(0).numpy()
    np.testing.assert_array_equal(label_map, expected)


@pytest.mark.parametrize("scales", [(0.0,), (-1.0, 1.0), (float("nan"),), ()])
def test_scales_must_be_positive(scales):
    with pytest.raises(ValueError, match="--scales"):
        TestTimeAugmentation(scales)


def test_classes_that_do_not_match_the_model_are_refused():
    model = {0: "background", 1: "cat", 2: "dog"}
    with pytest.raises(EvaluationError, match="has 2 classes but the model has 3"):
        check_class_names({0: "background", 1: "cat"}, model, "data")
    with pytest.raises(EvaluationError, match="1: 'dog' in the data, 'cat' in the model"):
        check_class_names({0: "background", 1: "dog", 2: "cat"}, model, "data")
    check_class_names(None, model, "data")  # names unknown: label values are checked instead
    check_class_names(dict(model), model, "data")


def test_a_split_that_does_not_exist_is_refused(segmenter):
    with pytest.raises(EvaluationError, match=r"no split 'test'; its splits are \['train', 'validation'\]"):
        load_evaluation_data(
            "scenes",
            "test",
            model_id2label=segmenter.id2label,
            ignore_index=255,
            reduce_labels=False,
            builtin_image_size=SIZE,
            builtin_num_validation=NUM_VALIDATION,
        )


def test_a_model_with_other_classes_is_refused_before_any_work(segmenter):
    other = {i: f"class_{i}" for i in range(len(segmenter.id2label))}
    with pytest.raises(EvaluationError, match="names its classes differently"):
        load_evaluation_data(
            "scenes",
            "validation",
            model_id2label=other,
            ignore_index=255,
            reduce_labels=False,
            builtin_image_size=SIZE,
            builtin_num_validation=NUM_VALIDATION,
        )


def test_report_files_are_written_and_foreign_files_kept(result, segmenter, tmp_path):
    report = evaluation_report(result, segmenter.id2label)
    report.update(dataset="builtin:scenes", split="validation")
    written = write_report(tmp_path, report, result.matrix, segmenter.id2label, top=5)
    assert sorted(p.name for p in written) == sorted(OUTPUT_FILES)
    saved = json.loads((tmp_path / EVALUATION_FILE).read_text())
    assert saved["metrics"]["mIoU"] == pytest.approx(report["metrics"]["mIoU"])
    assert len(saved["confusion_matrix"]) == len(segmenter.id2label)
    rows = (tmp_path / PER_CLASS_FILE).read_text().splitlines()
    assert rows[0].startswith("id,name,iou,accuracy,dice,fscore,precision,recall")
    assert len(rows) == 1 + len(segmenter.id2label)
    assert set(json.loads((tmp_path / MANIFEST).read_text())["files"]) == set(OUTPUT_FILES)
    write_report(tmp_path, report, result.matrix, segmenter.id2label)  # its own files: replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / PER_CLASS_FILE).write_text("mine")
    with pytest.raises(EvaluationError, match="not written by an evaluation"):
        write_report(other, report, result.matrix, segmenter.id2label)
    assert (other / PER_CLASS_FILE).read_text() == "mine" and not (other / EVALUATION_FILE).exists()


def test_table_marks_absent_classes(result, segmenter):
    report = evaluation_report(result, segmenter.id2label)
    table = format_table(report)
    assert "mIoU" in table and "aAcc" in table and "mFscore" in table
    for row in report["per_class"]:
        assert (f"{row['name']}" in table) and (row["absent"] == (row["label_pixels"] == 0))


def load_script():
    spec = importlib.util.spec_from_file_location("script_evaluate_model", REPO / "scripts" / "evaluate_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate_model.py"), *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=REPO,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scales", "0"], "--scales must be positive"),
        (["--split", "test"], "no split 'test'"),
        (["--dataset_name", "scenes-large"], "has 106 classes but the model has 11"),
    ],
)
def test_script_refuses_bad_input_in_one_line(model_folder, tmp_path, extra, message):
    module = load_script()
    output = tmp_path / "out"
    args = ["--model", str(model_folder), "--dataset_name", "scenes", "--builtin_num_validation", "6", "--no_progress"]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = module.main([*args, "--output_dir", str(output), *extra])
    assert code == 2
    lines = stderr.getvalue().strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("error: ")
    assert not output.exists()


@pytest.mark.slow
def test_script_evaluates_with_slide_and_augmentation(model_folder, tmp_path):
    output = tmp_path / "eval"
    done = script(
        "--model",
        str(model_folder),
        "--dataset_name",
        "scenes",
        "--builtin_num_validation",
        "6",
        "--mode",
        "slide",
        "--scales",
        "0.75",
        "1.0",
        "--flip",
        "--output_dir",
        str(output),
        "--no_progress",
    )
    assert done.returncode == 0, done.stderr
    assert "images/s" in done.stdout and "mIoU" in done.stdout
    report = json.loads((output / EVALUATION_FILE).read_text())
    assert report["mode"] == "slide" and report["scales"] == [0.75, 1.0] and report["flip"] is True
    assert report["num_images"] == 6 and report["crop_size"] == [SIZE, SIZE]
    assert all((output / name).is_file() for name in OUTPUT_FILES)


def test_the_model_card_carries_an_evaluation_written_into_the_model_folder(model_folder, result, tmp_path):
    from proto_segformer.hub import assemble_repository
    from proto_segformer.model_card import render_model_card

    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    id2label = {int(k): v for k, v in json.loads((folder / "config.json").read_text())["id2label"].items()}
    report = evaluation_report(result, id2label)
    report.update(dataset="builtin:scenes", split="validation", mode="slide", scales=[0.5, 1.0], flip=True)
    report.update(crop_size=[32, 32], stride=[20, 20])
    write_report(folder, report, result.matrix, id2label)
    card = render_model_card(folder, dataset_name="scenes")
    entries = [r for r in card.data.eval_results if r.metric_type == "mean_iou"]
    assert len(entries) == 1  # the evaluation replaces the training's validation numbers on the same data
    assert entries[0].metric_value == pytest.approx(report["metrics"]["mIoU"], abs=1e-6)
    assert entries[0].metric_args == {"mode": "slide", "scales": [0.5, 1.0], "flip": True}
    assert entries[0].dataset_name == "builtin:scenes" and entries[0].dataset_split == "validation"
    text = str(card)
    assert "Measured with `scripts/evaluate_model.py` on `builtin:scenes` (split `validation`, 6 images)" in text
    assert "sliding windows of 32x32 pixels, stride 20x20" in text and "scales 0.5, 1 and horizontal flip" in text
    repository = assemble_repository(folder, tmp_path / "repo")
    assert EVALUATION_FILE in repository
    assert "mean_iou" in (tmp_path / "repo" / "README.md").read_text()

    # measured on other classes (renamed since): left off the card
    config = json.loads((folder / "config.json").read_text())
    config["id2label"]["1"] = "renamed"
    (folder / "config.json").write_text(json.dumps(config))
    assert "Measured with" not in str(render_model_card(folder, dataset_name="scenes"))


def test_an_uncached_hub_id_offline_is_one_line(model_folder):
    module = load_script()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.MonkeyPatch.context() as patch:
        patch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        code = module.main(["--model", "nobody/no-such-model", "--dataset_name", "scenes", "--no_progress"])
    assert code == 2
    lines = stderr.getvalue().strip().splitlines()
    assert len(lines) == 1 and "nobody/no-such-model" in lines[0] and "HF_HUB_OFFLINE" in lines[0], lines


def test_an_ade20k_style_folder_with_reduced_labels(segmenter, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    labels = []
    for index in range(3):
        image = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
        label = rng.integers(0, len(segmenter.id2label) + 1, (40, 36), dtype=np.uint8)  # 0: "other", 1..K: classes
        for kind, array in (("images", image), ("annotations", label)):
            (tmp_path / kind / "validation").mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(tmp_path / kind / "validation" / f"sample{index}.png")
        labels.append(label)
    options = {"model_id2label": segmenter.id2label, "ignore_index": 255}
    with pytest.raises(Exception, match="--reduce_labels"):  # 1-based labels without the flag: the fix is named
        load_evaluation_data(str(tmp_path), "validation", reduce_labels=False, **options)
    data = load_evaluation_data(str(tmp_path), "val", reduce_labels=True, **options)
    assert data.split == "validation" and len(data.dataset) == 3
    result = evaluate_segmenter(segmenter, data, batch_size=2, progress=False)
    counted = result.matrix.areas()[3]  # labelled pixels per class
    expected = np.bincount(np.concatenate([label.ravel() for label in labels]), minlength=12)[1:]
    np.testing.assert_array_equal(counted, expected)  # label v counts for class v - 1; 0 is ignored
    with pytest.raises(EvaluationError, match=r"no split 'test'; its splits are \['validation'\]"):
        load_evaluation_data(str(tmp_path), "test", reduce_labels=True, **options)
