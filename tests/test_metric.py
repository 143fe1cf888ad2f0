"""The packaged mean IoU: against a direct confusion-matrix computation and the Hub `mean_iou` definitions."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest
import torch

from proto_segformer.label_maps import upsampled_argmax
from proto_segformer.metrics import MEAN_IOU_PATH, ConfusionMatrix, load_mean_iou, mean_iou, metrics_from_areas
from proto_segformer.trainer_metrics import MeanIoUMetric, segmentation_areas


def hub_reference(
    results, gt_seg_maps, num_labels, ignore_index, nan_to_num=None, label_map=None, reduce_labels=False
) -> dict:
    """The Hub metric's documented algorithm (evaluate-metric/mean_iou, from mmsegmentation), image by image with
    np.histogram, written out here as the slow reference (the Hub module cannot be downloaded in tests)."""
    total = np.zeros((4, num_labels), dtype=np.float64)
    for pred_label, label in zip(results, gt_seg_maps):
        label = np.array(label).copy()
        pred_label = np.array(pred_label)
        if label_map is not None:
            for old_id, new_id in label_map.items():
                label[label == old_id] = new_id
        if reduce_labels:
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        mask = np.not_equal(label, ignore_index)
        pred_label = pred_label[mask]
        label = label[mask]
        intersect = pred_label[pred_label == label]
        bins = dict(bins=num_labels, range=(0, num_labels - 1))
        area_intersect = np.histogram(intersect, **bins)[0]
        area_pred_label = np.histogram(pred_label, **bins)[0]
        area_label = np.histogram(label, **bins)[0]
        total += [area_intersect, area_pred_label + area_label - area_intersect, area_pred_label, area_label]
    intersect, union, _, area_label = total
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union
        acc = intersect / area_label
        metrics = {
            "mean_iou": np.nanmean(iou) if not np.all(np.isnan(iou)) else np.nan,
            "mean_accuracy": np.nanmean(acc) if not np.all(np.isnan(acc)) else np.nan,
            "overall_accuracy": intersect.sum() / area_label.sum(),
            "per_category_iou": iou,
            "per_category_accuracy": acc,
        }
    if nan_to_num is not None:
        metrics = {k: np.nan_to_num(v, nan=nan_to_num) for k, v in metrics.items()}
    return metrics


def assert_same(result: dict, expected: dict) -> None:
    assert (
        set(result)
        == set(expected)
        == {
            "mean_iou",
            "mean_accuracy",
            "overall_accuracy",
            "per_category_iou",
            "per_category_accuracy",
        }
    )
    for key in expected:
        np.testing.assert_allclose(np.asarray(result[key], dtype=float), np.asarray(expected[key], dtype=float))


def random_maps(rng, count, num_labels, shapes=((17, 23), (8, 8), (31, 5)), extra_values=(255,)):
    preds, refs = [], []
    for i in range(count):
        shape = shapes[i % len(shapes)]
        preds.append(rng.integers(0, num_labels, size=shape))
        ref = rng.integers(0, num_labels, size=shape)
        ref[rng.random(shape) < 0.1] = rng.choice(extra_values)
        refs.append(ref)
    return preds, refs


def test_evaluate_load_offline_matches_hub_definitions() -> None:
    rng = np.random.default_rng(0)
    preds, refs = random_maps(rng, 6, num_labels=7)
    metric = evaluate.load(MEAN_IOU_PATH)
    result = metric.compute(predictions=preds, references=refs, num_labels=7, ignore_index=255)
    assert_same(result, hub_reference(preds, refs, 7, 255))


def test_add_batch_then_compute() -> None:
    rng = np.random.default_rng(1)
    preds, refs = random_maps(rng, 4, num_labels=5, shapes=((9, 9),))
    metric = load_mean_iou()
    metric.add_batch(predictions=preds[:2], references=refs[:2])
    metric.add_batch(predictions=preds[2:], references=refs[2:])
    assert_same(metric.compute(num_labels=5, ignore_index=255), hub_reference(preds, refs, 5, 255))


def test_absent_class_is_nan_and_nan_to_num() -> None:
    # Class 2 appears in neither predictions nor references: nan IoU and accuracy, left out of the means.
    pred = np.array([[0, 1], [1, 1]])
    ref = np.array([[0, 1], [0, 0]])
    result = mean_iou([pred], [ref], num_labels=3, ignore_index=255)
    assert np.isnan(result["per_category_iou"][2]) and np.isnan(result["per_category_accuracy"][2])
    np.testing.assert_allclose(result["per_category_iou"][:2], [1 / 3, 1 / 3])
    assert result["mean_iou"] == pytest.approx(1 / 3)
    assert result["overall_accuracy"] == pytest.approx(0.5)
    filled = mean_iou([pred], [ref], num_labels=3, ignore_index=255, nan_to_num=0)
    assert filled["per_category_iou"][2] == 0
    assert_same(filled, hub_reference([pred], [ref], 3, 255, nan_to_num=0))


def test_predicted_but_absent_class_has_zero_iou_and_nan_accuracy() -> None:
    pred = np.array([[2, 1]])
    ref = np.array([[0, 1]])
    result = mean_iou([pred], [ref], num_labels=3, ignore_index=255)
    assert result["per_category_iou"][2] == 0.0
    assert np.isnan(result["per_category_accuracy"][2])
    assert_same(result, hub_reference([pred], [ref], 3, 255))


def test_ignore_index_pixels_count_nowhere() -> None:
    pred = np.array([[0, 1, 1]])
    ref = np.array([[0, 255, 1]])
    result = mean_iou([pred], [ref], num_labels=2, ignore_index=255)
    np.testing.assert_allclose(result["per_category_iou"], [1.0, 1.0])
    other = mean_iou([pred], [np.array([[0, 7, 1]])], num_labels=2, ignore_index=7)
    np.testing.assert_allclose(other["per_category_iou"], [1.0, 1.0])


def test_reduce_labels_and_label_map_follow_the_hub_order() -> None:
    rng = np.random.default_rng(2)
    preds, refs = random_maps(rng, 5, num_labels=6, extra_values=(0, 255))
    for kwargs in ({"reduce_labels": True}, {"label_map": {1: 3, 3: 4}}, {"label_map": {2: 0}, "reduce_labels": True}):
        result = mean_iou(preds, refs, num_labels=6, ignore_index=255, **kwargs)
        assert_same(result, hub_reference(preds, refs, 6, 255, **kwargs))
    # reduce_labels: 0 -> ignored, 1 -> class 0, 255 stays ignored.
    pred, ref = np.array([[0, 0, 1]]), np.array([[0, 1, 255]])
    reduced = mean_iou([pred], [ref], num_labels=2, ignore_index=255, reduce_labels=True)
    np.testing.assert_allclose(reduced["per_category_accuracy"], [1.0, np.nan])
    assert reduced["overall_accuracy"] == 1.0


def test_out_of_range_reference_counts_only_its_prediction() -> None:
    # The Hub metric's histograms: reference 9 (>= num_labels, not ignored) adds to no reference area, while the
    # prediction at that pixel (1) still adds to class 1's predicted area (lowering class 1's IoU).
    pred = np.array([[0, 1, 1]])
    ref = np.array([[0, 1, 9]])
    result = mean_iou([pred], [ref], num_labels=2, ignore_index=255)
    np.testing.assert_allclose(result["per_category_iou"], [1.0, 0.5])
    assert_same(result, hub_reference([pred], [ref], 2, 255))


def test_confusion_matrix_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(3)
    num_labels = 9
    preds = rng.integers(0, num_labels, size=(6, 20, 20))
    refs = rng.integers(0, num_labels, size=(6, 20, 20))
    refs[:, :3] = 255
    direct = np.zeros((num_labels, num_labels), dtype=np.int64)
    for p, r in zip(preds.ravel(), refs.ravel()):
        if r != 255:
            direct[r, p] += 1
    matrix = ConfusionMatrix(num_labels)
    matrix.update(preds[:2], refs[:2]).update(torch.from_numpy(preds[2:]), torch.from_numpy(refs[2:]))
    np.testing.assert_array_equal(matrix.matrix[:num_labels, :num_labels], direct)
    iou = np.diag(direct) / (direct.sum(0) + direct.sum(1) - np.diag(direct))
    np.testing.assert_allclose(matrix.compute()["per_category_iou"], iou)
    np.testing.assert_allclose(matrix.compute()["overall_accuracy"], np.trace(direct) / direct.sum())


def test_confusion_matrix_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        ConfusionMatrix(3).update(np.zeros((2, 3)), np.zeros((3, 2)))


def test_trainer_metric_from_logits_matches_the_hub_definition() -> None:
    torch.manual_seed(0)
    num_labels = 4
    logits = torch.randn(3, num_labels, 5, 6)
    labels = torch.randint(0, num_labels, (3, 20, 24))
    labels[0, :4] = 255
    labels[1, 0, 0] = 7  # out of range, not ignored
    predictions = upsampled_argmax(logits, (20, 24), max_values=3 * 3 * 20 * 24)  # 3 classes at a time
    full = torch.nn.functional.interpolate(logits, size=(20, 24), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(predictions, full)
    areas = segmentation_areas(predictions, labels, num_labels, 255)
    metric = MeanIoUMetric({i: f"c{i}" for i in range(num_labels)})

    class Prediction:
        def __init__(self, predictions):
            self.predictions = predictions

    assert metric(Prediction(areas[:1]), compute_result=False) is None
    result = metric(Prediction(areas[1:]), compute_result=True)
    expected = hub_reference(list(predictions.numpy()), list(labels.numpy()), num_labels, 255)
    assert result["mean_iou"] == pytest.approx(expected["mean_iou"])
    assert result["overall_accuracy"] == pytest.approx(expected["overall_accuracy"])
    assert result["iou_c2"] == pytest.approx(expected["per_category_iou"][2])
    # The accumulator resets after computing.
    again = metric(Prediction(areas), compute_result=True)
    assert again["mean_iou"] == pytest.approx(expected["mean_iou"])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_every_input_dtype_and_argument_gives_the_hub_values(dtype) -> None:
    rng = np.random.default_rng(4)
    preds, refs = random_maps(rng, 4, num_labels=6, extra_values=(0, 255, 9))
    preds = [p.astype(dtype) for p in preds]
    refs = [r.astype(dtype) for r in refs]
    for kwargs in ({}, {"reduce_labels": True}, {"label_map": {1: 2, 2: 5}}, {"nan_to_num": -1}):
        expected = hub_reference(preds, refs, 6, 255, **kwargs)
        assert_same(mean_iou(preds, refs, num_labels=6, ignore_index=255, **kwargs), expected)
        metric = load_mean_iou()
        for pred, ref in zip(preds, refs):
            metric.add(prediction=pred, reference=ref)
        assert_same(metric.compute(num_labels=6, ignore_index=255, **kwargs), expected)


def test_streaming_module_memory_does_not_hold_the_maps() -> None:
    metric = load_mean_iou()
    big = np.zeros((64, 64), np.uint8)
    for _ in range(5):
        metric.add_batch(predictions=[big, big], references=[big, big])
    assert metric._joint.kept == [] and metric._joint.counts.shape == (256, 256)
    assert metric.compute(num_labels=2, ignore_index=255)["per_category_iou"][0] == 1.0
    # Values outside the histogram's range are kept and still counted exactly.
    negative = np.array([[-1, 0]])
    result = metric.compute(predictions=[np.array([[0, 0]])], references=[negative], num_labels=2, ignore_index=255)
    np.testing.assert_allclose(result["per_category_iou"], [0.5, np.nan])


# ----------------------------------------------------------------------------------------------------------------
# Negative values: the Hub metric's numpy semantics (`label != ignore_index` masks only that value; label_map and
# reduce_labels apply to negative values like to any other; np.histogram over [0, K - 1] drops values outside it).


def negative_maps(rng, count=4, num_labels=5, dtype=np.int64):
    preds, refs = [], []
    for shape in ((9, 11), (6, 6), (13, 4))[:count]:
        preds.append(rng.integers(-3, num_labels + 2, size=shape).astype(dtype))
        refs.append(rng.choice([-3, -2, -1, 0, 1, 2, 3, 4, 6, 255], size=shape).astype(dtype))
    return preds, refs


NEGATIVE_CASES = [
    {"ignore_index": -1},  # -2 and -3 are not ignored: their predictions count
    {"ignore_index": -2},
    {"ignore_index": 255, "label_map": {-2: 1, -3: -1}},  # negative keys apply
    {"ignore_index": -1, "label_map": {-3: 2, 2: -1}},  # -3 -> 2 -> -1 (one pair after the other): ignored
    {"ignore_index": -2, "reduce_labels": True},  # -1 -> -2: ignored; 0 -> 255 (kept: not the ignore index)
    {"ignore_index": -1, "label_map": {-1: 0, 4: -4}, "reduce_labels": True},  # -1 -> 0 -> 255; 4 -> -4 -> -5
]


@pytest.mark.parametrize(
    ("dtype", "case"),
    [
        (dtype, case)
        for dtype in (np.int8, np.int16, np.int32, np.int64)
        for case in range(len(NEGATIVE_CASES))
        # The Hub metric's `label[label == 0] = 255` overflows int8: it has no value to match there.
        if not (dtype == np.int8 and NEGATIVE_CASES[case].get("reduce_labels"))
    ],
)
def test_negative_values_match_the_hub_metric(dtype, case) -> None:
    kwargs = NEGATIVE_CASES[case]
    preds, refs = negative_maps(np.random.default_rng(10 + case), dtype=dtype)
    expected = hub_reference(preds, refs, 5, **kwargs)
    assert not np.isnan(expected["per_category_iou"]).all()
    assert_same(mean_iou(preds, refs, num_labels=5, **kwargs), expected)
    # The evaluate module (maps with negative values are kept as they are) and the torch branch (on the device).
    metric = load_mean_iou()
    metric.add_batch(predictions=preds, references=refs)
    assert_same(metric.compute(num_labels=5, **kwargs), expected)
    matrix = ConfusionMatrix(5, **kwargs)
    for pred, ref in zip(preds, refs):
        matrix.matrix += matrix._torch_counts(torch.from_numpy(pred), torch.from_numpy(ref))
    assert_same(matrix.compute(), expected)
    cpu = ConfusionMatrix(5, **kwargs)
    for pred, ref in zip(preds, refs):
        cpu.update(torch.from_numpy(pred), torch.from_numpy(ref))
    assert_same(cpu.compute(), expected)


def test_negative_values_by_hand() -> None:
    pred = np.array([[0, 1, 1, -2, 1]])
    ref = np.array([[0, 1, -2, -2, -1]])
    # ignore_index=-1: only the last pixel is left out; the reference -2 counts nowhere but its prediction 1 lowers
    # class 1's IoU (1 / 2), and a prediction of -2 on a reference of -2 counts nowhere.
    result = mean_iou([pred], [ref], num_labels=2, ignore_index=-1)
    np.testing.assert_allclose(result["per_category_iou"], [1.0, 0.5])
    np.testing.assert_allclose(result["per_category_accuracy"], [1.0, 1.0])
    # label_map with a negative key: -2 -> 1, so class 1 gains two reference pixels, one of them predicted.
    mapped = mean_iou([pred], [ref], num_labels=2, ignore_index=-1, label_map={-2: 1})
    np.testing.assert_allclose(mapped["per_category_accuracy"], [1.0, 2 / 3])
    # reduce_labels: -1 -> -2, now the ignore index; 0 -> 255 (not ignored here, out of range); 1 -> 0.
    reduced = mean_iou([pred], [ref], num_labels=2, ignore_index=-2, reduce_labels=True)
    np.testing.assert_allclose(reduced["per_category_accuracy"], [0.0, np.nan])
    for got, kwargs in (
        (result, {"ignore_index": -1}),
        (mapped, {"ignore_index": -1, "label_map": {-2: 1}}),
        (reduced, {"ignore_index": -2, "reduce_labels": True}),
    ):
        assert_same(got, hub_reference([pred], [ref], 2, **kwargs))


def test_trainer_areas_with_negative_labels_match_the_hub_metric() -> None:
    rng = np.random.default_rng(20)
    preds, refs = negative_maps(rng, count=1, num_labels=5)
    predictions = torch.from_numpy(np.stack([preds[0], preds[0][::-1]]))
    labels = torch.from_numpy(np.stack([refs[0], refs[0][:, ::-1]]))
    for ignore_index in (-1, -2, 255):
        areas = segmentation_areas(predictions, labels, 5, ignore_index).sum(0).double().numpy()
        intersect, area_prediction, area_reference = areas
        union = area_prediction + area_reference - intersect
        expected = hub_reference(list(predictions.numpy()), list(labels.numpy()), 5, ignore_index)
        assert_same(metrics_from_areas(intersect, union, area_prediction, area_reference), expected)


def test_references_spread_over_a_huge_range_match_the_hub_metric() -> None:
    # Values 2^40 apart: mapped through their distinct values instead of a table over the range.
    rng = np.random.default_rng(21)
    pred = rng.integers(-1, 4, size=(7, 9))
    ref = rng.choice(np.array([-(2**40), -1, 0, 1, 2, 3, 2**40]), size=(7, 9))
    for kwargs in ({"ignore_index": -(2**40)}, {"ignore_index": 255, "label_map": {2**40: 1}, "reduce_labels": True}):
        expected = hub_reference([pred], [ref], 4, **kwargs)
        assert_same(mean_iou([pred], [ref], num_labels=4, **kwargs), expected)
        matrix = ConfusionMatrix(4, **kwargs)
        matrix.matrix += matrix._torch_counts(torch.from_numpy(pred), torch.from_numpy(ref))
        assert_same(matrix.compute(), expected)
