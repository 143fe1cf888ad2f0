"""Calibration of the unknown-pixel threshold for the commands: at the end of train.py and for a model folder
(scripts/calibrate_unknown.py). The score, the histogram and the threshold's rules are `unknown.py`'s; this module
runs them through `Segmenter` (apart from unknown.py, which the segmenter imports)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .metrics import ConfusionMatrix
from .safe_files import atomic_write_text
from .segmenter import InferenceOptions, Segmenter
from .unknown import CALIBRATION_COMMAND, CalibrationError, calibrate_segmenter

logger = logging.getLogger(__name__)


def calibrate_model_folder(args: Any) -> tuple[Any, Path]:
    """What scripts/calibrate_unknown.py runs (`CalibrateArguments`): the data and model as evaluate_model.py loads
    them (`evaluation.prepare_evaluation`), the scores of the split's labelled pixels through the `Segmenter`, the
    threshold written into the model folder's config.json in one step (nothing written on any error). Returns the
    model's config and the path written."""
    from .evaluation import prepare_evaluation

    square = lambda side: (side, side) if side else None  # noqa: E731
    options = InferenceOptions(
        mode=args.mode,
        crop_size=square(args.crop_size),
        stride=square(args.stride),
        batch_size=args.batch_size,
        unknown_scores=True,
    )
    checkpoint, data, segmenter, reduce_labels, ignore_index = prepare_evaluation(args, options)
    config_path = Path(checkpoint.folder) / "config.json"
    if not config_path.is_file():
        raise CalibrationError(f"{checkpoint.folder} has no config.json to store the threshold in.")
    counter = ConfusionMatrix(len(checkpoint.id2label), ignore_index)  # the loaded labels are reduced already
    samples = (data.dataset.load(index) for index in range(len(data.dataset)))
    calibrate_segmenter(
        segmenter,
        samples,
        counter.known_mask,
        split=data.split,
        source=data.dataset_label,
        fraction=args.accepted_fraction,
        batch_size=args.batch_size,
    )
    # Only the two calibration fields change in the folder's config.json (its other fields as they were written).
    saved = json.loads(config_path.read_text())
    saved["unknown_threshold"] = segmenter.model.config.unknown_threshold
    saved["unknown_calibration"] = segmenter.model.config.unknown_calibration
    atomic_write_text(config_path, json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return segmenter.model.config, config_path


def calibrate_after_training(model, processor, validation, crop_size: int, batch_size: int = 4) -> dict | None:
    """The end of train.py: calibrate on the validation split (a `SegmentationDataset`) as predict runs the model
    (`Segmenter` in "auto" mode, the training crop as window), 95 % of its labelled pixels accepted, in
    `model.config` (saved with the model). A split without labelled pixels leaves the model uncalibrated, said in
    one warning. Returns the record, or None."""
    options = InferenceOptions(batch_size=batch_size, unknown_scores=True)
    segmenter = Segmenter(model, processor, options, training_crop=(crop_size, crop_size))
    counter = ConfusionMatrix(int(model.config.num_labels), int(model.config.semantic_loss_ignore_index))
    samples = (validation.load(index) for index in range(len(validation)))
    try:
        return calibrate_segmenter(
            segmenter, samples, counter.known_mask, split="validation", source="the training run's validation split"
        )
    except CalibrationError as error:
        logger.warning("The unknown-pixel threshold was not calibrated: %s Run %s later.", error, CALIBRATION_COMMAND)
        return None
