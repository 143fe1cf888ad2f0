"""Metrics shipped with proto_segformer: mean IoU as an offline `evaluate` module and a streaming confusion matrix."""

from __future__ import annotations

from pathlib import Path

from .mean_iou import ConfusionMatrix, mean_iou, metrics_from_areas

MEAN_IOU_PATH = str(Path(__file__).with_name("mean_iou.py"))


def load_mean_iou(**kwargs):
    """`evaluate.load` of the packaged mean IoU module (no network): same keys and values as the Hub's mean_iou."""
    import evaluate

    return evaluate.load(MEAN_IOU_PATH, **kwargs)


__all__ = ["MEAN_IOU_PATH", "ConfusionMatrix", "load_mean_iou", "mean_iou", "metrics_from_areas"]
