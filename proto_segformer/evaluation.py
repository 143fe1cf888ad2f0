"""Evaluate a trained model on a data set split, as `scripts/evaluate_model.py` does: whole-image or sliding-window
inference, optional test-time augmentation (`test_time_augmentation.py`), mmsegmentation's `IoUMetric` numbers
(`metrics.class_metrics`) and a report (table, JSON, CSV, pictures).

- Data: any `--dataset_name` train.py reads (`data.loading`), the labels prepared as training's evaluation prepares
  them (`SegmentationDataset` with train=False: the same checks, `reduce_labels`, ignore index), images decoded by
  the one decoder. `reduce_labels` defaults to the model's image processor's `do_reduce_labels` (train.py saves it).
- Memory is flat: one batch of images at a time, its label maps counted into one `ConfusionMatrix` and dropped; no
  logits are kept beyond an image (two (K, H, W) score maps with test-time augmentation).
- Plain evaluation (scale 1.0, no flip, "whole" mode) is `Segmenter.predict`, the label maps of `predict.py`; with
  the model's own processor (full size, as train.py saves it) the numbers are those of the training's evaluation.
- Bad input is one line before any work (`EvaluationError` / `DataError`): classes that do not match the model's
  `id2label` (by count or name), a split that does not exist, scales that are not positive, an output file that
  evaluation did not write.

The model-card link: `EVALUATION_FILE` written into the model folder (`--output_dir` = the model folder) is read by
`model_card.py`, whose card then carries the results in its `model-index` and says how they were measured.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.dataset import SegmentationDataset
from .data.layouts import canonical_split
from .data.loading import (
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN_CANDIDATES,
    DataError,
    check_split,
    ensure_validation_split,
    id2label_from_dataset,
    id2label_from_features,
    load_dataset_any,
    parse_builtin_name,
    read_id2label_file,
    resolve_column,
)
from .metrics import ConfusionMatrix
from .metrics.class_metrics import MEAN_METRICS, PER_CLASS_METRICS, class_metrics
from .model_card import EVALUATION_FILE
from .safe_files import atomic_write, atomic_write_text, read_manifest, write_manifest
from .test_time_augmentation import TestTimeAugmentation, augmented_label_map

logger = logging.getLogger(__name__)

PER_CLASS_FILE = "evaluation_per_class.csv"
CONFUSION_PICTURE = "evaluation_confusion.png"
IOU_PICTURE = "evaluation_iou.png"
OUTPUT_FILES = (EVALUATION_FILE, PER_CLASS_FILE, CONFUSION_PICTURE, IOU_PICTURE)
MANIFEST = ".proto_segformer_evaluation.json"
EVALUATION_MODES = ("whole", "slide")


class EvaluationError(ValueError):
    """A request evaluation cannot honour (classes, split, output files), with a message that names the fix."""


# ---------------------------------------------------------------------------------------------------------- the data


@dataclass
class EvaluationData:
    """The samples to evaluate (`dataset.load(i)` -> (PIL image, (H, W) int64 label)), named for the report."""

    dataset: SegmentationDataset
    dataset_label: str
    split: str


def check_class_names(data_id2label: dict[int, str] | None, model_id2label: dict[int, str], source: str) -> None:
    """`EvaluationError` when the data names classes other than the model's (another count, or another name for an
    id); nothing to check when the data names none (its label values are checked against the model's K)."""
    if not data_id2label:
        return
    data = {int(k): str(v) for k, v in data_id2label.items()}
    model = {int(k): str(v) for k, v in model_id2label.items()}
    if len(data) != len(model):
        raise EvaluationError(
            f"The data set {source} has {len(data)} classes but the model has {len(model)}: evaluate the model on"
            " data with its classes (or give the classes the model was trained with, --id2label)."
        )
    differ = [i for i in sorted(model) if data.get(i) != model[i]]
    if differ:
        shown = "; ".join(f"{i}: {data.get(i)!r} in the data, {model[i]!r} in the model" for i in differ[:3])
        raise EvaluationError(
            f"The data set {source} names its classes differently from the model ({len(differ)} of {len(model)}"
            f" differ; {shown}): evaluate on data with the model's classes in the same order."
        )


def _select_split(dataset, split: str, train_val_split: float | None, seed: int):
    """The split named `split` (aliases such as "val" accepted); "validation" of a data set without one is held out
    of train as train.py holds it out (same `train_val_split` and seed)."""
    wanted = canonical_split(split)
    if wanted in dataset:
        return dataset[wanted], wanted
    if wanted == "validation" and "train" in dataset and train_val_split:
        logger.warning(
            "The data set has no validation split: evaluating on the %.0f %% of train that train.py holds out"
            " (--train_val_split %g, --seed %d).",
            100 * train_val_split,
            train_val_split,
            seed,
        )
        return ensure_validation_split(dataset, train_val_split, seed)["validation"], wanted
    raise EvaluationError(
        f"The data set has no split {split!r}; its splits are {sorted(dataset)}. Pass --split with one of them."
    )


def load_evaluation_data(
    dataset_name: str | None,
    split: str,
    *,
    model_id2label: dict[int, str],
    ignore_index: int,
    reduce_labels: bool,
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    id2label: dict[int, str] | None = None,
    builtin_image_size: int = 64,
    builtin_num_validation: int = 200,
    builtin_seed: int = 0,
    train_val_split: float | None = 0.15,
    seed: int = 42,
    max_samples: int | None = None,
    check_samples: int | None = 200,
    cache_dir: str | None = None,
) -> EvaluationData:
    """The split to evaluate, checked before any work: its classes against the model's (`check_class_names`), then
    the first `check_samples` samples (files, sizes, label values in [0, K) or `ignore_index`; None: all)."""
    builtin = parse_builtin_name(dataset_name)
    if builtin is not None:
        if id2label is not None:
            raise EvaluationError("--id2label cannot rename the classes of a built-in data set.")
        from .data.builtin import build_builtin_dataset

        wanted = canonical_split(split)
        try:
            dataset, data_id2label = build_builtin_dataset(
                builtin,
                # The validation split does not depend on num_train: build one training image unless it is asked for.
                num_train=2000 if wanted == "train" else 1,
                num_validation=builtin_num_validation,
                image_size=builtin_image_size,
                seed=builtin_seed,
            )
        except (ValueError, FileNotFoundError) as error:
            raise DataError(f"builtin:{builtin}: {error}") from error
        image_column, label_column, dataset_label = "image", "label", f"builtin:{builtin}"
        samples, split = _select_split(dataset, split, None, seed)
    else:
        dataset = load_dataset_any(dataset_name, dataset_config_name, cache_dir=cache_dir)
        samples, split = _select_split(dataset, split, train_val_split, seed)
        columns = samples.column_names
        image_column = resolve_column(columns, image_column, IMAGE_COLUMN_CANDIDATES, "image", "--image_column_name")
        label_column = resolve_column(columns, label_column, LABEL_COLUMN_CANDIDATES, "label", "--label_column_name")
        data_id2label = id2label or id2label_from_features(samples.features, label_column)
        if data_id2label is None and "train" in dataset:
            data_id2label = id2label_from_dataset(dataset, dataset_name, label_column)
        dataset_label = dataset_name
    check_class_names(data_id2label, model_id2label, dataset_label)
    if max_samples is not None:
        samples = samples.select(range(min(max_samples, len(samples))))
    limit = None if check_samples is None or check_samples < 0 else check_samples
    check_split(samples, split, image_column, label_column, len(model_id2label), ignore_index, reduce_labels, limit)
    wrapped = SegmentationDataset(
        samples,
        image_column,
        label_column,
        len(model_id2label),
        train=False,
        reduce_labels=reduce_labels,
        ignore_index=ignore_index,
        split_name=split,
    )
    return EvaluationData(wrapped, dataset_label, split)


# ------------------------------------------------------------------------------------------------------ evaluation


@dataclass
class EvaluationResult:
    """The confusion matrix of a split and how it was obtained."""

    matrix: ConfusionMatrix
    num_images: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    # With rejection of unknown pixels: the labelled (known) pixels counted and those rejected as unknown.
    known_pixels: int = 0
    rejected_known_pixels: int | None = None

    @property
    def rejected_known_fraction(self) -> float | None:
        if self.rejected_known_pixels is None:
            return None
        return self.rejected_known_pixels / self.known_pixels if self.known_pixels else float("nan")

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else float("nan")


def evaluate_segmenter(
    segmenter,
    data: EvaluationData,
    augmentation: TestTimeAugmentation | None = None,
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> EvaluationResult:
    """Run `segmenter` (a `Segmenter`) over every sample of `data` and count its label maps into a confusion matrix,
    batch by batch. `augmentation`: test-time views (None or plain: `Segmenter.predict`). With the segmenter's
    rejection of unknown pixels (`InferenceOptions.reject_unknown`), a rejected labelled pixel counts as missed (its
    prediction is the ignore value, no class), and the result counts the labelled pixels rejected."""
    from tqdm.auto import tqdm

    from .segmenter import as_rgb_array

    augmentation = augmentation or TestTimeAugmentation()
    rejecting = getattr(segmenter, "rejection", None) is not None
    if rejecting and not augmentation.plain:
        raise EvaluationError("--reject_unknown works without test-time augmentation: drop --scales/--flip.")
    known_pixels = rejected = 0
    model_config = segmenter.model.config
    matrix = ConfusionMatrix(len(segmenter.id2label), int(model_config.semantic_loss_ignore_index))
    count = len(data.dataset)
    start = time.perf_counter()
    with tqdm(
        total=count, desc=f"Evaluating {data.dataset_label} {data.split}", unit="image", disable=not progress
    ) as bar:
        for first in range(0, count, batch_size):
            samples = [data.dataset.load(index) for index in range(first, min(first + batch_size, count))]
            images = [image for image, _ in samples]
            if augmentation.plain:
                predictions = segmenter.predict(images)
                maps = [prediction.label_map for prediction in predictions]
            else:
                maps = [augmented_label_map(segmenter, as_rgb_array(image), augmentation) for image in images]
            for index, (label_map, (_, label)) in enumerate(zip(maps, samples)):
                matrix.update(label_map, label)
                if rejecting:
                    known = matrix.known_mask(label)
                    known_pixels += int(known.sum())
                    rejected += int((predictions[index].unknown_map & known).sum())
            bar.update(len(samples))
    seconds = time.perf_counter() - start
    return EvaluationResult(
        matrix, count, seconds, known_pixels=known_pixels, rejected_known_pixels=rejected if rejecting else None
    )


# ---------------------------------------------------------------------------------------------------------- report


def _number(value: float) -> float | None:
    """A JSON number, or null for nan."""
    return None if value is None or math.isnan(float(value)) else float(value)


def evaluation_report(result: EvaluationResult, id2label: dict[int, str]) -> dict[str, Any]:
    """The JSON report: settings, summary metrics (fractions in [0, 1]), per-class rows, the confusion matrix
    (reference rows, predicted columns, pixels; ignored pixels left out)."""
    metrics = class_metrics(result.matrix)
    per_class = metrics["per_class"]
    rows = []
    for index in range(result.matrix.num_labels):
        row: dict[str, Any] = {"id": index, "name": id2label[index]}
        row.update({name: _number(per_class[name][index]) for name in PER_CLASS_METRICS})
        row["label_pixels"] = int(per_class["label_pixels"][index])
        row["predicted_pixels"] = int(per_class["predicted_pixels"][index])
        row["absent"] = row["label_pixels"] == 0
        rows.append(row)
    k = result.matrix.num_labels
    return {
        **result.settings,
        "num_images": result.num_images,
        "seconds": round(result.seconds, 3),
        "images_per_second": _number(round(result.images_per_second, 3)),
        "metrics": {name: _number(metrics[name]) for name in ("aAcc", *MEAN_METRICS)},
        "absent_classes": [row["name"] for row in rows if row["absent"]],
        "per_class": rows,
        "confusion_matrix": result.matrix.matrix[:k, :k].tolist(),
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(report: dict[str, Any]) -> str:
    """The per-class table and the summary, in percent as mmsegmentation prints them."""
    names = [row["name"] for row in report["per_class"]]
    width = max(5, *(len(name) for name in names))
    header = ["Class".ljust(width), "IoU", "Acc", "Dice", "Fscore", "Precision", "Recall", "label px", "pred px"]
    widths = [width, 7, 7, 7, 7, 9, 7, 11, 11]
    lines = ["  ".join(h.rjust(w) if i else h for i, (h, w) in enumerate(zip(header, widths)))]
    for row in report["per_class"]:
        values = [_percent(row[name]) for name in PER_CLASS_METRICS]
        cells = [row["name"].ljust(width), *values, str(row["label_pixels"]), str(row["predicted_pixels"])]
        line = "  ".join(c.rjust(w) if i else c for i, (c, w) in enumerate(zip(cells, widths)))
        lines.append(line + ("  (absent from the split)" if row["absent"] else ""))
    summary = "  ".join(f"{name} {_percent(value)}" for name, value in report["metrics"].items())
    lines.append(summary)
    absent = report["absent_classes"]
    if absent:
        lines.append(
            f"{len(absent)} class(es) absent from the split (no labelled pixel; left out of mAcc and of mIoU unless"
            f" predicted): {', '.join(absent[:10])}{', ...' if len(absent) > 10 else ''}"
        )
    return "\n".join(lines)


def per_class_csv(report: dict[str, Any]) -> str:
    """The per-class rows as CSV (fractions; empty cells for nan)."""
    buffer = io.StringIO()
    columns = ["id", "name", *PER_CLASS_METRICS, "label_pixels", "predicted_pixels", "absent"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in report["per_class"]:
        writer.writerow({name: "" if row[name] is None else row[name] for name in columns})
    return buffer.getvalue()


def check_output_files(output_dir: str | Path) -> None:
    """`EvaluationError` when `output_dir` holds a file of an evaluation's name that no evaluation wrote (not listed
    in its `MANIFEST`): it would be replaced. Checked before any work."""
    folder = Path(output_dir)
    listed = set(read_manifest(folder / MANIFEST) or [])
    foreign = [name for name in OUTPUT_FILES if (folder / name).exists() and name not in listed]
    if foreign:
        raise EvaluationError(
            f"{folder} holds {', '.join(foreign)}, not written by an evaluation: choose another --output_dir, or move"
            " or delete them."
        )


def write_report(
    output_dir: str | Path, report: dict[str, Any], matrix: ConfusionMatrix, id2label: dict[int, str], top: int = 20
) -> list[Path]:
    """Write `OUTPUT_FILES` into `output_dir` (created if needed), each atomically, the JSON last, and list them in
    `MANIFEST`; nothing else in the folder is touched."""
    from .evaluation_pictures import confusion_chart, iou_chart

    folder = Path(output_dir)
    check_output_files(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder / MANIFEST, OUTPUT_FILES, "evaluate_model")  # listed before they appear
    atomic_write_text(folder / PER_CLASS_FILE, per_class_csv(report))
    atomic_write(folder / IOU_PICTURE, lambda path: iou_chart(report).save(path, format="PNG"))
    picture = confusion_chart(matrix, id2label, top=top)
    atomic_write(folder / CONFUSION_PICTURE, lambda path: picture.save(path, format="PNG"))
    atomic_write_text(folder / EVALUATION_FILE, json.dumps(report, indent=1) + "\n")
    return [folder / name for name in OUTPUT_FILES]


def augmentation_text(report: dict[str, Any]) -> str:
    augmentation = report.get("augmentation", "none")
    return "no test-time augmentation" if augmentation == "none" else f"test-time augmentation: {augmentation}"


def summary_line(report: dict[str, Any]) -> str:
    """One line: what was evaluated, the headline numbers and the speed."""
    metrics = report["metrics"]
    return (
        f"{report.get('dataset', '?')} {report.get('split', '?')}: {report['num_images']} images, mIoU"
        f" {_percent(metrics['mIoU'])}, mAcc {_percent(metrics['mAcc'])}, aAcc {_percent(metrics['aAcc'])}"
        f" ({report.get('mode', '?')} mode, {augmentation_text(report)});"
        f" {report['seconds']:.1f} s, {report['images_per_second']:.2f} images/s on {report.get('device', '?')}"
    ) + _rejection_text(report)


def _rejection_text(report: dict[str, Any]) -> str:
    """ "; unknown rejection (max_similarity < t) took X % of the labelled pixels", or "" without rejection."""
    rejection = report.get("unknown_rejection")
    if not rejection:
        return ""
    return (
        f"; unknown rejection (max_similarity < {rejection['threshold']:.4f}) took"
        f" {_percent(rejection['rejected_known_fraction'])} % of the {rejection['known_pixels']:,} labelled pixels"
    )


# ------------------------------------------------------------------------------------------------- the whole command


def resolve_model_folder(name: str) -> str:
    """A local model folder as it is; a Hub id downloaded (or taken from the cache) with `snapshot_download`, after
    `paths.check_source` answered in one line for an unreachable Hub."""
    if Path(os.path.expanduser(name)).exists():
        return os.path.expanduser(name)
    from huggingface_hub import snapshot_download

    from .paths import check_source

    check_source(name)
    return snapshot_download(name)


def prepare_evaluation(args: Any, options) -> tuple[Any, EvaluationData, Any, bool, int]:
    """(checkpoint, data, segmenter, reduce_labels, ignore_index) for `args` (`EvaluateArguments`, or any arguments
    with its data and model fields, as scripts/calibrate_unknown.py's): the model's classes and ignore index read
    first, the data loaded and checked against them, then the model loaded into a `Segmenter` with `options`."""
    from .checkpoint import load_image_processor, validate_checkpoint
    from .segmenter import Segmenter
    from .training_crop import training_crop_size

    checkpoint = validate_checkpoint(resolve_model_folder(args.model))
    id2label = checkpoint.id2label
    ignore_index = checkpoint.config.get("semantic_loss_ignore_index")
    if ignore_index is None:
        raise EvaluationError(f"{checkpoint.folder}/config.json has no semantic_loss_ignore_index (the label to skip).")
    processor = load_image_processor(checkpoint)
    reduce_labels = args.reduce_labels
    if reduce_labels is None:
        reduce_labels = bool(getattr(processor, "do_reduce_labels", False))
    data = load_evaluation_data(
        args.dataset_name,
        args.split,
        model_id2label=id2label,
        ignore_index=int(ignore_index),
        reduce_labels=reduce_labels,
        dataset_config_name=args.dataset_config_name,
        image_column=args.image_column_name,
        id2label=read_id2label_file(args.id2label) if args.id2label else None,
        label_column=args.label_column_name,
        builtin_image_size=args.builtin_image_size or training_crop_size(checkpoint.folder) or 64,
        builtin_num_validation=args.builtin_num_validation,
        builtin_seed=args.builtin_seed,
        train_val_split=args.train_val_split,
        seed=args.seed,
        max_samples=args.max_samples,
        check_samples=args.check_samples,
    )
    segmenter = Segmenter.from_pretrained(checkpoint, device=args.device, options=options)
    return checkpoint, data, segmenter, reduce_labels, int(ignore_index)


def evaluate_model_folder(args: Any) -> tuple[EvaluationResult, dict[int, str]]:
    """What `scripts/evaluate_model.py` runs, from its arguments (`EvaluateArguments`): the model's classes and
    ignore index read first, the data loaded and checked against them, then the model loaded and run."""
    from .segmenter import InferenceOptions

    augmentation = TestTimeAugmentation(tuple(args.scales), args.flip)
    if args.mode not in EVALUATION_MODES:
        raise EvaluationError(f"--mode must be one of {', '.join(EVALUATION_MODES)}, got {args.mode!r}.")
    square = lambda side: (side, side) if side else None  # noqa: E731
    # Every inference switch is an `InferenceOptions` field read by `Segmenter` (--reject_unknown too): evaluation
    # passes its flags here and counts whatever label maps the segmenter gives.
    reject = bool(getattr(args, "reject_unknown", False))
    options = InferenceOptions(
        mode=args.mode,
        crop_size=square(args.crop_size),
        stride=square(args.stride),
        batch_size=args.batch_size,
        reject_unknown=reject,
        unknown_threshold=getattr(args, "unknown_threshold", None),
    )
    if reject and not augmentation.plain:
        raise EvaluationError("--reject_unknown works without test-time augmentation: drop --scales/--flip.")
    checkpoint, data, segmenter, reduce_labels, ignore_index = prepare_evaluation(args, options)
    result = evaluate_segmenter(
        segmenter, data, augmentation, batch_size=args.batch_size, progress=not args.no_progress
    )
    id2label = checkpoint.id2label
    result.settings = {
        "evaluated_with": "scripts/evaluate_model.py",
        "model": str(args.model),
        "dataset": data.dataset_label,
        "split": data.split,
        "num_classes": len(id2label),
        "mode": args.mode,
        **({"crop_size": list(segmenter.crop), "stride": list(segmenter.stride)} if args.mode == "slide" else {}),
        "scales": list(augmentation.scales),
        "flip": augmentation.flip,
        "augmentation": "none" if augmentation.plain else augmentation.description(),
        "reduce_labels": reduce_labels,
        "ignore_index": int(ignore_index),
        "device": str(segmenter.model.device),
    }
    if segmenter.rejection is not None:
        result.settings["unknown_rejection"] = {
            "threshold": segmenter.rejection.threshold,
            "calibration": getattr(segmenter.model.config, "unknown_calibration", None),
            "known_pixels": result.known_pixels,
            "rejected_known_pixels": result.rejected_known_pixels,
            "rejected_known_fraction": _number(result.rejected_known_fraction),
        }
    return result, id2label
