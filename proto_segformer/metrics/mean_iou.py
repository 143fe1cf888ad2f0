# Copyright 2025 The proto_segformer authors. Apache-2.0.
"""Mean Intersection-over-Union (mean IoU) as an `evaluate` metric module, plus a streaming confusion matrix.

Self-contained (numpy, plus torch when given torch tensors) so that `evaluate.load(<path to this file>)` works
offline. It returns the same keys and values as the Hub's `mean_iou` metric (evaluate-metric/mean_iou), with the
same definitions:

- pixels whose (mapped, reduced) reference is `ignore_index` are left out, and only those (any integer, negative
  ones included: with `ignore_index=-1` a reference of -2 is not ignored);
- a reference value outside [0, num_labels) that is not `ignore_index` (negative or too large) adds nothing to any
  class's reference area, but the prediction at that pixel still counts in its class's predicted area (the Hub
  metric's histogram behaviour); predictions outside [0, num_labels) count nowhere;
- `label_map` {old: new} is applied to the references, one pair after the other ({1: 3, 3: 4} takes 1 to 4), before
  `reduce_labels`; negative keys and values are applied like any other;
- `reduce_labels`: reference 0 becomes 255, every other value v becomes v - 1 (255 stays 255, -1 becomes -2);
- numpy arrays and torch tensors (on any device) give the same values;
- per class: IoU = |P n R| / |P u R|, accuracy = |P n R| / |R|; a class with an empty union (IoU) or an empty
  reference (accuracy) gets nan, and `mean_iou` / `mean_accuracy` are nan-means over classes;
  `overall_accuracy` = sum |P n R| / sum |R|;
- `nan_to_num`, when given, replaces nan in every returned value.

Instead of concatenating predictions, it accumulates a (num_labels + 1) x (num_labels + 1) confusion matrix: the
extra row / column holds out-of-range references / predictions. `ConfusionMatrix` does this batch by batch (memory
independent of the number of images) on numpy arrays or torch tensors (on their device).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Mean IoU is the area of overlap between the predicted segmentation and the ground truth divided by the area of union
between them, averaged over classes. Same keys, definitions and arguments as the Hub's `mean_iou` metric; computed
through a confusion matrix, so it is fast and its memory does not depend on the image size.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): predicted segmentation maps, each (height, width) of class indices.
    references (`List[ndarray]`): ground-truth maps of the same shapes.
    num_labels (`int`): number of classes.
    ignore_index (`int`): reference value to leave out (e.g. 255).
    nan_to_num (`int`, *optional*): replace nan values by this number.
    label_map (`dict`, *optional*): old reference id -> new id, applied before `reduce_labels`.
    reduce_labels (`bool`, defaults to `False`): reference 0 becomes 255 and every other value is decreased by one.
Returns:
    `mean_iou`, `mean_accuracy`, `overall_accuracy` (floats), `per_category_iou`, `per_category_accuracy`
    (arrays of shape (num_labels,)).
Examples:
    >>> metric = evaluate.load("proto_segformer/metrics/mean_iou.py")
    >>> metric.compute(predictions=[np.array([[0, 1], [1, 1]])], references=[np.array([[0, 1], [255, 0]])],
    ...                num_labels=2, ignore_index=255)["mean_iou"]
    0.5
"""

_CITATION = """
@software{MMSegmentation_Contributors_OpenMMLab_Semantic_Segmentation_2020,
  author = {MMSegmentation Contributors},
  license = {Apache-2.0},
  title = {{OpenMMLab Semantic Segmentation Toolbox and Benchmark}},
  url = {https://github.com/open-mmlab/mmsegmentation},
  year = {2020}
}
"""


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def map_reference_values(values: np.ndarray, label_map: Mapping[int, int] | None, reduce_labels: bool) -> np.ndarray:
    """The Hub metric's reference transform, on a copy of integer `values` (int64): each `label_map` pair in turn
    (old -> new), then `reduce_labels` (0 -> 255, then every value minus one, then 254 -> 255). Negative values and
    keys are mapped like any other."""
    mapped = np.array(values, dtype=np.int64)
    for old, new in (label_map or {}).items():  # one pair after the other, like the Hub metric
        mapped[mapped == int(old)] = int(new)
    if reduce_labels:
        mapped[mapped == 0] = 255
        mapped -= 1
        mapped[mapped == 254] = 255
    return mapped


# Reference values are mapped through a table over their range [min, max] when it has at most this many entries (or
# no more than the map has pixels), else through their distinct values.
_TABLE_SIZE = 1 << 16


class ConfusionMatrix:
    """Streaming confusion matrix for semantic segmentation.

    `matrix[r, p]` counts pixels with reference r and prediction p; index `num_labels` collects out-of-range
    values. Update with any number of (prediction, reference) batches of equal shapes (e.g. (B, H, W) or (H, W)),
    numpy or torch (counted on the tensors' device); memory is O(num_labels^2).
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int = 255,
        label_map: Mapping[int, int] | None = None,
        reduce_labels: bool = False,
    ) -> None:
        if int(num_labels) < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
        self.num_labels = int(num_labels)
        self.ignore_index = int(ignore_index)
        self.label_map = dict(label_map) if label_map else None
        self.reduce_labels = bool(reduce_labels)
        self._matrix = np.zeros((self.num_labels + 1, self.num_labels + 1), dtype=np.int64)
        self._joint8: np.ndarray | None = None  # pending 8-bit (reference, prediction) value-pair counts

    @property
    def matrix(self) -> np.ndarray:
        """(K + 1, K + 1) counts, reference by prediction; index K collects out-of-range values."""
        if self._joint8 is not None:
            self._matrix += self.fold_joint_counts(self._joint8)
            self._joint8 = None
        return self._matrix

    @matrix.setter
    def matrix(self, value: np.ndarray) -> None:
        self._matrix, self._joint8 = value, None

    def reset(self) -> None:
        self._matrix[...] = 0
        self._joint8 = None

    def update(self, predictions: Any, references: Any) -> ConfusionMatrix:
        """Add a batch: `predictions` and `references` of the same shape, integer class indices."""
        if tuple(predictions.shape) != tuple(references.shape):
            raise ValueError(
                f"predictions and references must have the same shape, got {tuple(predictions.shape)} and"
                f" {tuple(references.shape)}."
            )
        if _is_torch(predictions) or _is_torch(references):
            import torch

            predictions = torch.as_tensor(predictions)
            references = torch.as_tensor(references, device=predictions.device)
            if predictions.device.type == "cpu":  # numpy's bincount is several times faster than torch's on CPU
                return self.update(predictions.numpy(), references.cpu().numpy())
            self._matrix += self._torch_counts(predictions, references)
            return self
        self._matrix += self._numpy_counts(np.asarray(predictions), np.asarray(references))
        return self

    def known_mask(self, references: Any) -> np.ndarray:
        """(shape of `references`) bool: the reference pixels counted in a class's row (a class in [0, K) after the
        mapping; not the ignore index)."""
        mapped = map_reference_values(np.asarray(references), self.label_map, self.reduce_labels)
        return (mapped >= 0) & (mapped < self.num_labels) & (mapped != self.ignore_index)

    def _bins(self) -> tuple[int, int]:
        size = self.num_labels + 1
        return size, size * size

    def _reference_rows(self, values: np.ndarray) -> np.ndarray:
        """Row offset (row * (K + 1)) of each reference value after the Hub's mapping: its class; K for a value
        outside [0, K) (in no reference area, its prediction still counts); the spill-over bin for `ignore_index`."""
        size, spill = self._bins()
        mapped = map_reference_values(values, self.label_map, self.reduce_labels)
        rows = np.where((mapped < 0) | (mapped >= self.num_labels), self.num_labels, mapped) * size
        return np.where(mapped == self.ignore_index, spill, rows)

    def _rows_of(self, references: Any) -> Any:
        """`_reference_rows` of every element of an int64 array or tensor (on its device), through a table over the
        values' range, or over their distinct values when that range is much larger than the map."""
        count = references.numel() if _is_torch(references) else references.size
        if count == 0:
            return references
        low, high = int(references.min()), int(references.max())
        if _is_torch(references):
            import torch

            if high - low < max(_TABLE_SIZE, count):
                table = self._reference_rows(np.arange(low, high + 1, dtype=np.int64))
                return torch.as_tensor(table, device=references.device)[references - low]
            values, inverse = torch.unique(references, return_inverse=True)
            return torch.as_tensor(self._reference_rows(values.cpu().numpy()), device=references.device)[inverse]
        if high - low < max(_TABLE_SIZE, count):
            return self._reference_rows(np.arange(low, high + 1, dtype=np.int64))[references - low]
        values, inverse = np.unique(references, return_inverse=True)
        return self._reference_rows(values)[inverse.reshape(references.shape)]

    def fold_joint_counts(self, joint: np.ndarray) -> np.ndarray:
        """(K + 1, K + 1) class counts from joint counts (V, V) of (reference value, prediction value) pairs."""
        size, spill = self._bins()
        values = np.arange(joint.shape[0], dtype=np.int64)
        codes = (self._reference_rows(values)[:, None] + np.minimum(values, self.num_labels)[None, :]).ravel()
        counts = np.bincount(codes, weights=joint.ravel().astype(np.float64), minlength=spill + size)
        return np.rint(counts[:spill]).astype(np.int64).reshape(size, size)

    def _numpy_counts(self, predictions: np.ndarray, references: np.ndarray) -> np.ndarray:
        size, spill = self._bins()
        if predictions.dtype.itemsize == 1 and references.dtype.itemsize == 1 and predictions.dtype.kind in "ub":
            if references.dtype.kind in "ub":
                # 8-bit maps: count (reference, prediction) value pairs (65536 bins), then fold them into classes.
                codes = references.astype(np.int32) * 256 + predictions
                joint = np.bincount(codes.ravel(), minlength=256 * 256).reshape(256, 256)
                self._joint8 = joint if self._joint8 is None else self._joint8 + joint
                return np.zeros((size, size), dtype=np.int64)
        small = predictions.dtype.kind in "ub" and references.dtype.kind in "ub"
        small = small and predictions.dtype.itemsize <= 2 and references.dtype.itemsize <= 2
        if small:
            # Look-up tables over every possible value: no masking, no wide temporaries.
            reference_rows = self._reference_rows(np.arange(np.iinfo(references.dtype).max + 1, dtype=np.int64))
            prediction_columns = np.minimum(np.arange(np.iinfo(predictions.dtype).max + 1), self.num_labels)
            dtype = np.int32
            codes = reference_rows.astype(dtype)[references] + prediction_columns.astype(dtype)[predictions]
        else:
            reference_rows = self._rows_of(references.astype(np.int64, copy=False))
            predictions = predictions.astype(np.int64, copy=False)
            columns = np.where((predictions < 0) | (predictions >= self.num_labels), self.num_labels, predictions)
            codes = reference_rows + columns
        counts = np.bincount(codes.ravel(), minlength=spill + size)
        return counts[:spill].reshape(size, size)

    def _torch_counts(self, predictions, references) -> np.ndarray:
        import torch

        size, spill = self._bins()
        rows = self._rows_of(references.long())
        predictions = predictions.long()
        columns = torch.where((predictions < 0) | (predictions >= self.num_labels), self.num_labels, predictions)
        counts = torch.bincount((rows + columns).reshape(-1), minlength=spill + size)
        return counts[:spill].cpu().numpy().reshape(size, size)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another accumulator's counts (e.g. from another process)."""
        self.matrix += other.matrix
        return self

    def areas(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-class (num_labels,) areas: intersection, union, predicted, reference (float64)."""
        matrix = self.matrix.astype(np.float64)
        k = self.num_labels
        intersect = np.diag(matrix)[:k]
        area_reference = matrix[:k, :].sum(axis=1)
        area_prediction = matrix[:, :k].sum(axis=0)
        return intersect, area_prediction + area_reference - intersect, area_prediction, area_reference

    def compute(self, nan_to_num: float | None = None) -> dict[str, Any]:
        """The Hub `mean_iou` result dict from the counts so far."""
        return metrics_from_areas(*self.areas(), nan_to_num=nan_to_num)


def metrics_from_areas(
    intersect: np.ndarray,
    union: np.ndarray,
    area_prediction: np.ndarray,
    area_reference: np.ndarray,
    nan_to_num: float | None = None,
) -> dict[str, Any]:
    """mean_iou, mean_accuracy, overall_accuracy, per_category_iou, per_category_accuracy from per-class areas."""
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union
        accuracy = intersect / area_reference
        overall = intersect.sum() / area_reference.sum()
        # nanmean of an all-nan vector is nan (the Hub metric warns; stay quiet and return nan).
        mean_iou = np.nanmean(iou) if np.any(~np.isnan(iou)) else np.float64("nan")
        mean_accuracy = np.nanmean(accuracy) if np.any(~np.isnan(accuracy)) else np.float64("nan")
    metrics = {
        "mean_iou": mean_iou,
        "mean_accuracy": mean_accuracy,
        "overall_accuracy": overall,
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }
    if nan_to_num is not None:
        metrics = {name: np.nan_to_num(value, nan=nan_to_num) for name, value in metrics.items()}
    return metrics


def mean_iou(
    results: Iterable[Any],
    gt_seg_maps: Iterable[Any],
    num_labels: int,
    ignore_index: int,
    nan_to_num: float | None = None,
    label_map: Mapping[int, int] | None = None,
    reduce_labels: bool = False,
) -> dict[str, Any]:
    """The Hub metric's function: per-image maps (any shapes, pairwise equal) -> the metrics dict."""
    matrix = ConfusionMatrix(num_labels, ignore_index, label_map, reduce_labels)
    for prediction, reference in zip(results, gt_seg_maps, strict=True):
        matrix.update(np.asarray(prediction), np.asarray(reference))
    return matrix.compute(nan_to_num=nan_to_num)


class JointValueHistogram:
    """Counts of (reference value, prediction value) pairs over [0, V)^2, V <= `max_values`: enough to compute
    the metric later for any num_labels, ignore_index, label_map and reduce_labels (which are only known at
    `compute` time in the `evaluate` API), with memory independent of the number and size of the images. Pairs of
    maps with values outside [0, max_values) are kept as they are (exact, but memory grows)."""

    def __init__(self, max_values: int = 1024) -> None:
        self.max_values = max_values
        self.size = 0
        self.counts = np.zeros((0, 0), dtype=np.int64)
        self.kept: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, prediction: Any, reference: Any) -> None:
        if _is_torch(prediction):
            prediction = prediction.detach().cpu().numpy()
        if _is_torch(reference):
            reference = reference.detach().cpu().numpy()
        prediction, reference = np.asarray(prediction), np.asarray(reference)
        if prediction.shape != reference.shape:
            raise ValueError(
                f"prediction and reference must have the same shape, got {prediction.shape} and {reference.shape}."
            )
        if prediction.size == 0:
            return
        low = min(int(prediction.min()), int(reference.min()))
        high = max(int(prediction.max()), int(reference.max()))
        if low < 0 or high >= self.max_values:
            self.kept.append((prediction, reference))
            return
        if high >= self.size:
            size = max(256, 1 << int(high).bit_length())
            grown = np.zeros((size, size), dtype=np.int64)
            grown[: self.size, : self.size] = self.counts
            self.counts, self.size = grown, size
        codes = reference.astype(np.int32, copy=False) * self.size + prediction.astype(np.int32, copy=False)
        self.counts += np.bincount(codes.ravel(), minlength=self.size * self.size).reshape(self.size, self.size)

    def confusion(
        self, num_labels: int, ignore_index: int, label_map: Mapping[int, int] | None, reduce_labels: bool
    ) -> ConfusionMatrix:
        """The class confusion matrix these counts give under the metric's arguments."""
        matrix = ConfusionMatrix(num_labels, ignore_index, label_map, reduce_labels)
        if self.size:
            matrix.matrix += matrix.fold_joint_counts(self.counts)
        for prediction, reference in self.kept:
            matrix.update(prediction, reference)
        return matrix


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    """The Hub `mean_iou` metric. In a single process, `add`/`add_batch` stream the maps into a joint histogram of
    (reference, prediction) values instead of storing them, so memory does not grow with the data set and
    `compute` is fast; with several processes (`num_process > 1`) the standard `evaluate` storage is used."""

    def _streaming(self) -> bool:
        return self.num_process == 1

    def _histogram(self) -> JointValueHistogram:
        if getattr(self, "_joint", None) is None:
            self._joint = JointValueHistogram()
        return self._joint

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predicted and reference maps (lists of (H, W) arrays)."""
        if not self._streaming():
            return super().add_batch(predictions=predictions, references=references, **kwargs)
        if predictions is None or references is None:
            raise ValueError("add_batch needs both predictions and references.")
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions and {len(references)} references.")
        histogram = self._histogram()
        for prediction, reference in zip(predictions, references):
            histogram.add(prediction, reference)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one predicted and one reference map ((H, W) arrays)."""
        if not self._streaming():
            return super().add(prediction=prediction, reference=reference, **kwargs)
        self._histogram().add(prediction, reference)

    def compute(self, *, predictions=None, references=None, **kwargs) -> dict[str, Any] | None:
        """The metrics of everything added (and of `predictions` / `references` if given); then start afresh."""
        if not self._streaming():
            return super().compute(predictions=predictions, references=references, **kwargs)
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references)
        missing = [name for name in ("num_labels", "ignore_index") if name not in kwargs]
        if missing:
            raise TypeError(f"compute() missing required argument(s): {', '.join(missing)}.")
        histogram, self._joint = self._histogram(), None
        matrix = histogram.confusion(
            int(kwargs["num_labels"]),
            int(kwargs["ignore_index"]),
            kwargs.get("label_map"),
            bool(kwargs.get("reduce_labels", False)),
        )
        return matrix.compute(nan_to_num=kwargs.get("nan_to_num"))

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
            reference_urls=[
                "https://github.com/open-mmlab/mmsegmentation/blob/71c201b1813267d78764f306a297ca717827c4bf/mmseg/core/evaluation/metrics.py"
            ],
        )

    def _compute(
        self,
        predictions: list[Any],
        references: list[Any],
        num_labels: int,
        ignore_index: int,
        nan_to_num: float | None = None,
        label_map: Mapping[int, int] | None = None,
        reduce_labels: bool = False,
    ) -> dict[str, Any]:
        return mean_iou(
            results=predictions,
            gt_seg_maps=references,
            num_labels=num_labels,
            ignore_index=ignore_index,
            nan_to_num=nan_to_num,
            label_map=label_map,
            reduce_labels=reduce_labels,
        )
