"""Speed of the packaged mean IoU against a plain per-image numpy implementation.

500 maps of 512x512 with 150 classes (ADE20K-sized), 5% of the reference pixels ignored (255):

- "plain numpy, per image": the Hub `mean_iou` algorithm (mmsegmentation's): per image, np.histogram of the
  intersection, the prediction and the reference, then sums (the reference the tests check against);
- "ConfusionMatrix (numpy), per image": `proto_segformer.metrics.ConfusionMatrix.update` image by image;
- "ConfusionMatrix (torch), batches of 10": the same on torch tensors (what the Trainer path does on device);
- "evaluate.load(...).compute": the `evaluate` module end to end (its Arrow storage of the inputs dominates); timed
  on the first `--evaluate_images` maps and scaled to 500.

    python scripts/benchmark_metric.py [--images 500] [--size 512] [--classes 150]

Timings depend on the machine and its load; the script prints both.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from proto_segformer.metrics import ConfusionMatrix, load_mean_iou

from .arguments import MetricArguments


def plain_numpy_mean_iou(predictions, references, num_labels: int, ignore_index: int) -> dict:
    """The Hub metric's per-image histogram algorithm."""
    totals = np.zeros((3, num_labels))
    for prediction, reference in zip(predictions, references):
        mask = reference != ignore_index
        prediction, reference = prediction[mask], reference[mask]
        intersect = prediction[prediction == reference]
        bins = {"bins": num_labels, "range": (0, num_labels - 1)}
        totals += [
            np.histogram(intersect, **bins)[0],
            np.histogram(prediction, **bins)[0],
            np.histogram(reference, **bins)[0],
        ]
    intersect, area_prediction, area_reference = totals
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / (area_prediction + area_reference - intersect)
    return {"mean_iou": np.nanmean(iou), "per_category_iou": iou}


def make_maps(count: int, size: int, num_labels: int, seed: int = 0):
    """References made of 32x32 blocks of random classes; predictions = references with 30% of pixels changed."""
    rng = np.random.default_rng(seed)
    predictions = np.empty((count, size, size), np.uint8)
    references = np.empty((count, size, size), np.uint8)
    for i in range(count):
        blocks = rng.integers(0, num_labels, (size // 32, size // 32), dtype=np.uint8)
        reference = np.kron(blocks, np.ones((32, 32), np.uint8))
        prediction = reference.copy()
        noise = rng.random((size, size)) < 0.3
        prediction[noise] = rng.integers(0, num_labels, int(noise.sum()), dtype=np.uint8)
        reference[rng.random((size, size)) < 0.05] = 255
        predictions[i], references[i] = prediction, reference
    return predictions, references


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def run(args: MetricArguments) -> None:
    predictions, references = make_maps(args.images, args.size, args.classes)
    print(
        f"{args.images} maps of {args.size}x{args.size}, {args.classes} classes; torch threads:"
        f" {torch.get_num_threads()}; load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )

    plain, plain_seconds = timed(lambda: plain_numpy_mean_iou(predictions, references, args.classes, 255))

    def numpy_matrix():
        matrix = ConfusionMatrix(args.classes, 255)
        for prediction, reference in zip(predictions, references):
            matrix.update(prediction, reference)
        return matrix.compute()

    def torch_matrix():
        matrix = ConfusionMatrix(args.classes, 255)
        for start in range(0, args.images, 10):
            matrix.update(
                torch.from_numpy(predictions[start : start + 10]), torch.from_numpy(references[start : start + 10])
            )
        return matrix.compute()

    ours_numpy, numpy_seconds = timed(numpy_matrix)
    ours_torch, torch_seconds = timed(torch_matrix)
    for result in (ours_numpy, ours_torch):
        np.testing.assert_allclose(result["per_category_iou"], plain["per_category_iou"])

    count = min(args.evaluate_images, args.images)
    metric = load_mean_iou()
    evaluated, evaluate_seconds = timed(
        lambda: metric.compute(
            predictions=list(predictions[:count]),
            references=list(references[:count]),
            num_labels=args.classes,
            ignore_index=255,
        )
    )
    subset = plain_numpy_mean_iou(predictions[:count], references[:count], args.classes, 255)
    np.testing.assert_allclose(evaluated["per_category_iou"], subset["per_category_iou"])
    scaled = evaluate_seconds * args.images / count

    rows = [
        ("plain numpy (Hub algorithm), per image", plain_seconds),
        ("ConfusionMatrix (numpy), per image", numpy_seconds),
        ("ConfusionMatrix (torch), batches of 10", torch_seconds),
        (f"evaluate.load(...).compute, {count} maps x {args.images // max(count, 1)}", scaled),
    ]
    print(f"{'implementation':48s} {'seconds':>9s} {'ms/image':>9s} {'vs plain':>9s}")
    for name, seconds in rows:
        print(f"{name:48s} {seconds:9.2f} {1000 * seconds / args.images:9.1f} {plain_seconds / seconds:8.1f}x")
    print(f"mean IoU: {plain['mean_iou']:.6f} (all implementations agree)")
