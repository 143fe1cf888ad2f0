"""Mean IoU for the Trainer: each evaluation sample is reduced to per-class areas inside the evaluation step
(`segmentation_areas`, counted by the one pixel counter `metrics.ConfusionMatrix`), and `MeanIoUMetric` sums them
as `compute_metrics`: memory does not grow with the data set, and the values are the Hub `mean_iou` metric's.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .metrics import ConfusionMatrix, metrics_from_areas


def segmentation_areas(predictions: torch.Tensor, labels: torch.Tensor, num_labels: int, ignore_index: int):
    """Per-sample areas (B, 3, K) int64 of predicted and reference maps (B, H, W): intersection, predicted area,
    reference area of each class, from each sample's `metrics.ConfusionMatrix`.

    Same definitions as the Hub `mean_iou` metric: pixels labelled `ignore_index` are left out; a reference value
    outside [0, K) counts in no reference area, while the prediction at that pixel still counts.
    """
    counter = ConfusionMatrix(num_labels, ignore_index)
    areas = np.zeros((predictions.shape[0], 3, num_labels), dtype=np.int64)
    for index, (prediction, label) in enumerate(zip(predictions, labels)):
        counter.reset()
        intersection, _, predicted, reference = counter.update(prediction, label).areas()
        areas[index] = np.stack([intersection, predicted, reference])  # float64 counts: exact integers
    return torch.from_numpy(areas).to(labels.device)


class MeanIoUMetric:
    """`compute_metrics` for the Trainer: sums per-sample areas batch by batch (`batch_eval_metrics=True`) or all at
    once, and returns mean_iou, mean_accuracy, overall_accuracy (and per-class iou_<name> / accuracy_<name> when
    there are at most `per_category_limit` classes).
    """

    def __init__(self, id2label: Mapping[int, str], per_category_limit: int = 32) -> None:
        self.id2label = {int(k): v for k, v in id2label.items()}
        self.num_labels = len(self.id2label)
        self.per_category_limit = per_category_limit
        self.areas = np.zeros((3, self.num_labels), dtype=np.float64)

    def __call__(self, eval_prediction, compute_result: bool = True) -> dict[str, float] | None:
        areas = eval_prediction.predictions
        if isinstance(areas, tuple | list):
            areas = areas[0]
        if isinstance(areas, torch.Tensor):
            areas = areas.detach().cpu().numpy()
        areas = np.asarray(areas, dtype=np.float64)
        if areas.ndim != 3 or areas.shape[1:] != (3, self.num_labels):
            raise ValueError(
                f"MeanIoUMetric expects per-sample areas of shape (N, 3, {self.num_labels}) from ProtoSegTrainer's"
                f" evaluation, got {areas.shape}."
            )
        self.areas += areas.sum(axis=0)
        if not compute_result:
            return None
        intersection, predicted, reference = self.areas
        result = metrics_from_areas(intersection, predicted + reference - intersection, predicted, reference)
        self.areas[...] = 0.0
        metrics = {name: float(result[name]) for name in ("mean_iou", "mean_accuracy", "overall_accuracy")}
        if self.num_labels <= self.per_category_limit:
            for index, name in self.id2label.items():
                metrics[f"iou_{name}"] = float(result["per_category_iou"][index])
                metrics[f"accuracy_{name}"] = float(result["per_category_accuracy"][index])
        return metrics
