"""Per-class segmentation metrics of a confusion matrix, with mmsegmentation's `IoUMetric` definitions.

Per class c, with I the pixels labelled c and predicted c, L the pixels labelled c, P the pixels predicted c (among
the pixels not ignored):

- IoU = I / (P + L - I), Acc = recall = I / L, precision = I / P, Dice = 2 I / (P + L),
- F-score = (1 + beta^2) precision recall / (beta^2 precision + recall), beta = 1;
- aAcc = sum I / sum L; mIoU, mAcc, mDice, mFscore, mPrecision, mRecall are nan-means over classes.

A 0/0 is nan and left out of the means, as in mmsegmentation (and the Hub's mean_iou for IoU and accuracy): a class
absent from the labels has nan accuracy and recall, and nan IoU unless it was predicted somewhere (then its IoU is 0
and counts in mIoU, as in mmsegmentation and the Hub's mean_iou); a class never predicted has nan precision.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .mean_iou import ConfusionMatrix

# mean metric name -> per-class metric name
MEAN_METRICS = {
    "mIoU": "iou",
    "mAcc": "accuracy",
    "mDice": "dice",
    "mFscore": "fscore",
    "mPrecision": "precision",
    "mRecall": "recall",
}
PER_CLASS_METRICS = ("iou", "accuracy", "dice", "fscore", "precision", "recall")


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def class_metrics(matrix: ConfusionMatrix, beta: float = 1.0) -> dict[str, Any]:
    """{"aAcc", "mIoU", "mAcc", "mDice", "mFscore", "mPrecision", "mRecall": float, "per_class": {name: (K,) float64
    array for each of PER_CLASS_METRICS, "label_pixels", "predicted_pixels": (K,) int64}} of the counts so far."""
    intersect, union, predicted, labelled = matrix.areas()
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = intersect / predicted
        recall = intersect / labelled
        per_class = {
            "iou": intersect / union,
            "accuracy": recall,
            "dice": 2 * intersect / (predicted + labelled),
            "fscore": (1 + beta**2) * precision * recall / (beta**2 * precision + recall),
            "precision": precision,
            "recall": recall,
        }
        overall = float(intersect.sum() / labelled.sum()) if labelled.sum() else float("nan")
    result: dict[str, Any] = {"aAcc": overall}
    result.update({name: _nanmean(per_class[key]) for name, key in MEAN_METRICS.items()})
    per_class["label_pixels"] = labelled.astype(np.int64)
    per_class["predicted_pixels"] = predicted.astype(np.int64)
    result["per_class"] = per_class
    return result
