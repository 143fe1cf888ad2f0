"""Unknown pixels: the score, its calibration on known pixels, and the rejection switch's checks.

The score is the model's `max_similarity` (`output_max_similarity=True`): the largest cosine similarity of a pixel's
embedding to any prototype, computed with the logits (`prototype_math.max_similarity`). A pixel far from every
prototype is unlike anything the model was trained on. The threshold is chosen on labelled data so that a stated
fraction of the known (labelled) pixels is accepted (default 95 %), by a streaming quantile: a histogram of the
scores on a fixed grid over [-1, 1] (flat memory, however many pixels), and stored in `config.unknown_threshold`
with how it was obtained in `config.unknown_calibration`.

Where it is used: `segmenter.InferenceOptions(reject_unknown=True)` (predict, evaluate, the endpoint handler, the
Space), the end of training (`run_training`), `scripts/calibrate_unknown.py`, `class_editing.add_classes_to_model`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .configuration_proto_segformer import check_unknown_threshold

logger = logging.getLogger(__name__)

DEFAULT_ACCEPTED_FRACTION = 0.95
# Histogram bins over [-1, 1]: a bin is 1e-4 wide, far finer than the scores' spread (flat 160 KB of counts).
HISTOGRAM_BINS = 20_000
CALIBRATION_COMMAND = "python scripts/calibrate_unknown.py --model MODEL_FOLDER --dataset_name DATA"
# Value and name of the rejected pixels in label maps and segment lists.
UNKNOWN_NAME = "unknown"


class CalibrationError(ValueError):
    """The calibration cannot be done as asked (no known pixels, a fraction outside (0, 1], ...)."""


def check_accepted_fraction(fraction: float) -> float:
    value = float(fraction)
    if not 0.0 < value <= 1.0:
        raise CalibrationError(f"The accepted fraction of known pixels must lie in (0, 1], got {fraction}.")
    return value


class ScoreHistogram:
    """Counts of scores in [-1, 1] on `bins` equal bins: a streaming quantile with flat memory.

    `threshold(fraction)` is the lower edge of the bin where the `fraction` of the counted scores at or above it is
    first reached, so at least `fraction` of the counted pixels have a score >= the threshold (the accepted ones);
    it errs by at most one bin width (1e-4) towards accepting more.
    """

    def __init__(self, bins: int = HISTOGRAM_BINS) -> None:
        self.bins = int(bins)
        self.counts = np.zeros(self.bins, dtype=np.int64)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def update(self, scores: torch.Tensor | np.ndarray) -> None:
        values = torch.as_tensor(scores).detach().reshape(-1).double().cpu()
        if values.numel() == 0:
            return
        if not torch.isfinite(values).all():
            raise CalibrationError("max_similarity holds NaN or inf values: the model or its inputs are broken.")
        index = ((values.clamp(-1.0, 1.0) + 1.0) * (self.bins / 2.0)).floor().long().clamp_(0, self.bins - 1)
        self.counts += torch.bincount(index, minlength=self.bins).numpy()

    def threshold(self, fraction: float) -> float:
        fraction = check_accepted_fraction(fraction)
        total = self.total
        if total == 0:
            raise CalibrationError("No known pixels to calibrate on (every label is the ignore value or unknown).")
        at_or_above = np.cumsum(self.counts[::-1])[::-1]  # pixels in this bin or higher
        needed = math.ceil(fraction * total - 1e-9)
        last = int(np.nonzero(at_or_above >= needed)[0][-1])
        return float(-1.0 + 2.0 * last / self.bins)

    def accepted_fraction(self, threshold: float) -> float:
        """Fraction of the counted scores in bins at or above the bin of `threshold`."""
        index = min(self.bins - 1, max(0, int(math.floor((threshold + 1.0) * self.bins / 2.0))))
        return float(self.counts[index:].sum() / max(1, self.total))


@torch.no_grad()
def score_histogram(model, batches: Iterable[Mapping[str, torch.Tensor]], ignore_index: int) -> ScoreHistogram:
    """The histogram of `max_similarity` over the known pixels (label != `ignore_index`) of `batches` of
    {"pixel_values": (B, 3, H, W), "labels": (B, H, W)}: the scores (B, H/4, W/4) upsampled bilinearly to the labels'
    size, as predict upsamples them."""
    histogram = ScoreHistogram()
    model.eval()
    for batch in batches:
        pixel_values = batch["pixel_values"].to(model.device, model.dtype)
        labels = batch["labels"].to(model.device)
        scores = model(pixel_values=pixel_values, output_max_similarity=True).max_similarity
        scores = upsample_scores(scores, tuple(labels.shape[-2:]))
        histogram.update(scores[labels != ignore_index])
    return histogram


def upsample_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) scores -> (B, H, W), bilinear like the logits (align_corners=False), float32."""
    return F.interpolate(scores[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def calibrate(
    model,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    split: str,
    source: str,
    fraction: float = DEFAULT_ACCEPTED_FRACTION,
) -> dict[str, Any]:
    """Choose `config.unknown_threshold` so that `fraction` of the known pixels of `batches` are accepted and store it
    with its record in `model.config` (nothing is changed on an error). Returns the record."""
    fraction = check_accepted_fraction(fraction)
    histogram = score_histogram(model, batches, model.config.semantic_loss_ignore_index)
    return store_calibration(model.config, histogram, fraction, split=split, source=source)


def calibrate_segmenter(
    segmenter,
    samples: Iterable[tuple[Any, Any]],
    known_mask: Callable[[Any], np.ndarray],
    *,
    split: str,
    source: str,
    fraction: float = DEFAULT_ACCEPTED_FRACTION,
    batch_size: int = 4,
) -> dict[str, Any]:
    """`calibrate` through a `Segmenter` (built with `InferenceOptions(unknown_scores=True)`): the scores exactly as
    predict thresholds them (same resizing, sliding windows and upsampling). `samples`: (image, label) pairs;
    `known_mask(label)`: the labelled pixels to count (e.g. `ConfusionMatrix.known_mask`). Sets the threshold in
    `segmenter.model.config` (nothing on an error) and returns its record."""
    fraction = check_accepted_fraction(fraction)
    if not segmenter.scores:
        raise ValueError("calibrate_segmenter needs a Segmenter built with InferenceOptions(unknown_scores=True).")
    histogram = ScoreHistogram()

    def count(batch: list[tuple[Any, Any]]) -> None:
        for prediction, (_, label) in zip(segmenter.predict([image for image, _ in batch]), batch):
            histogram.update(prediction.max_similarity[known_mask(label)])

    batch: list[tuple[Any, Any]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            count(batch)
            batch = []
    if batch:
        count(batch)
    return store_calibration(segmenter.model.config, histogram, fraction, split=split, source=source)


def store_calibration(config, histogram: ScoreHistogram, fraction: float, *, split: str, source: str) -> dict:
    """Set `config.unknown_threshold` to the histogram's threshold for `fraction` and `config.unknown_calibration` to
    its record (returned); a histogram of no pixels is a CalibrationError and changes nothing."""
    model_config = config
    threshold = histogram.threshold(fraction)
    record = {
        "score": "max_similarity",
        "source": source,
        "split": split,
        "accepted_fraction": fraction,
        "measured_accepted_fraction": round(histogram.accepted_fraction(threshold), 6),
        "known_pixels": histogram.total,
        "num_labels": int(model_config.num_labels),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    model_config.unknown_threshold = check_unknown_threshold(threshold)
    model_config.unknown_calibration = record
    return record


def recalibrated_for_added_classes(config, support_scores: torch.Tensor, names: list[str]) -> tuple[float, dict]:
    """(threshold, record) after `add_classes` of `names`: the old classes' pixels keep at least the accepted fraction
    (a max over more prototypes only grows), and the threshold is lowered, if needed, so that the same fraction of
    the new classes' support pixels (`support_scores`, their max_similarity to the extended prototypes) is accepted
    too. The record notes the classes added since the calibration on data."""
    record = dict(getattr(config, "unknown_calibration", None) or {})
    fraction = float(record.get("accepted_fraction", DEFAULT_ACCEPTED_FRACTION))
    histogram = ScoreHistogram()
    histogram.update(support_scores)
    before = float(config.unknown_threshold)
    support_threshold = histogram.threshold(fraction)
    threshold = min(before, support_threshold)
    record["classes_added_since"] = [*record.get("classes_added_since", []), *names]
    record["recalibrated_by_add_classes"] = {
        "threshold_before": before,
        "support_threshold": support_threshold,
        "support_pixels": histogram.total,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    logger.info(
        "unknown_threshold %.4f -> %.4f: %.0f %% of the support pixels of %s accepted (the calibrated classes keep"
        " theirs); calibrate on data holding the new classes for a threshold measured on them: %s",
        before,
        threshold,
        100 * fraction,
        ", ".join(names),
        CALIBRATION_COMMAND,
    )
    return check_unknown_threshold(threshold), record


def required_threshold(config, threshold: float | None = None) -> float:
    """The threshold rejection uses: `threshold` if given (checked), else `config.unknown_threshold`; a model saved
    before calibration existed (or never calibrated) is one ValueError naming the calibration command."""
    if threshold is not None:
        return check_unknown_threshold(threshold)
    stored = getattr(config, "unknown_threshold", None)
    if stored is None:
        raise ValueError(
            "Rejecting unknown pixels needs a calibrated threshold, and this model has none (no unknown_threshold in"
            " its config.json: saved before calibration existed, or never calibrated). Calibrate it:"
            f" {CALIBRATION_COMMAND}"
        )
    return check_unknown_threshold(stored)


def describe_calibration(config) -> str:
    """One line: the threshold and how it was obtained (for logs and reports)."""
    threshold = getattr(config, "unknown_threshold", None)
    if threshold is None:
        return "not calibrated"
    record = getattr(config, "unknown_calibration", None) or {}
    parts = [f"max_similarity >= {threshold:.4f}"]
    if record:
        parts.append(
            f"accepts {100 * float(record.get('accepted_fraction', 0)):.0f} % of {record.get('known_pixels', 0):,}"
            f" known pixels of {record.get('source', '?')} ({record.get('split', '?')}), {record.get('date', '?')}"
        )
    if record.get("classes_added_since"):
        parts.append(f"classes added since: {', '.join(record['classes_added_since'])}")
    return "; ".join(parts)
