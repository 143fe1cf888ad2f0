"""Benchmark: add classes to a trained model from 1, 5 and 20 labelled images, without training.

Protocol
1. Data: the built-in "scenes" set (handwritten digits pasted on real photo crops; 10 digit classes + background;
   each digit in its own colour family, so colour and shape tell the class), or "scenes-shape" (random colours:
   shape only; `--dataset scenes-shape`, best with larger digits, e.g. `--item_scale 0.5 0.8`, which models trained
   from scratch on a CPU learn in minutes). The held-out digit classes (default: digits 7, 8, 9) are ignored (label
   255) in the training split, and the models are trained on the remaining classes only (background + 7 digits).
   Light augmentation (flips; `--augment_scale`, `--photometric_distortion` turn on the SegFormer recipe).
2. Two models trained the same way (same data, augmentation, steps, optimiser, seed, encoder/decoder size, from
   scratch): ProtoSeg (`ProtoSegTrainer`, the package's trainer, prototypes initialised from data) and the parametric
   SegformerForSemanticSegmentation (transformers' `Trainer` with the same TrainingArguments; SegFormer computes its
   own CE loss).
3. Support sets: scenes built from the training pool of digit samples (a separate seed; never the validation
   digit samples) with full labels. For each held-out class and each repeat, k images showing the class
   (k = 1, 5, 20; the 1-shot set is inside the 5-shot set, inside the 20-shot set); its mask marks only that class.
4. Adding the classes:
   - ProtoSeg: `model.add_classes(...)`: embed the support pixels, cluster into M prototypes, append. No gradient.
   - Parametric: the only cheap option: a new classifier row per class, fitted on the same support cells with the
     encoder and decoder frozen (the old rows untouched): full-batch Adam on the new rows (weights and bias) only,
     minimising, for each new class i, the mean over its support cells of -log p_i plus the mean over the other
     cells of the same images of -log(1 - p_i), where p is the softmax over all (old + new) logits. The other cells
     are the negatives the user's masks give implicitly (ProtoSeg does not need them).
   Both use the same support cells: embedding cells (H/4 x W/4) at least `min_cell_fraction` covered by the class.
5. Evaluation on the validation split (all 11 classes labelled, full size): IoU of each new class, the mIoU of
   all 11 classes (before adding, the new classes count with IoU 0), and the mIoU of the old classes before and
   after adding ("all pixels": the held-out pixels count as their true class, so old classes gain when the new
   classes take back pixels they had absorbed; "old pixels only": held-out pixels ignored, which isolates the
   damage the new classes do to the old ones).

Example:

    PYTHONPATH=. python scripts/benchmark_add_classes.py --quick      # < 10 minutes on 2 CPU cores
    PYTHONPATH=. python scripts/benchmark_add_classes.py              # the full run (about 20 minutes)

Trained models are saved in --output_dir; --reuse_models evaluates them again without training. torch runs on one
thread by default (--num_threads): on a CPU shared with other jobs two threads were up to 50x slower per step.
Timings (add time) are wall-clock seconds on whatever machine runs it: noisy on a shared machine.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    SegformerConfig,
    SegformerForSemanticSegmentation,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer.class_editing import embedding_grid_size, pil_to_pixel_values, support_cell_labels
from proto_segformer.configuration_proto_segformer import mit_preset
from proto_segformer.data import IGNORE_INDEX, build_builtin_dataset
from proto_segformer.data.dataset import SegmentationDataset
from proto_segformer.data.transforms import AugmentationConfig, pad_collate
from proto_segformer.model_building import build_model
from proto_segformer.trainer import ProtoSegTrainer

from .arguments import AddClassesBenchmarkArguments

logger = logging.getLogger("benchmark_add_classes")

# ----------------------------------------------------------------------------------------------------------- data


def class_layout(id2label: dict[int, str], held_out: list[int]) -> tuple[np.ndarray, dict[int, str], dict[int, str]]:
    """Lookup table original id -> final id (255 stays 255), the old classes' id2label and the final id2label.

    Old classes keep their order and take ids 0..K_old-1; the held-out classes follow in the given order, which is
    the order `add_classes` gives them.
    """
    unknown = [c for c in held_out if c not in id2label or c == 0]
    if unknown or len(set(held_out)) != len(held_out):
        raise ValueError(f"held_out must be distinct item class ids of {id2label}, got {held_out}.")
    old = [c for c in sorted(id2label) if c not in held_out]
    order = old + list(held_out)
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for new, original in enumerate(order):
        table[original] = new
    return table, {i: id2label[c] for i, c in enumerate(old)}, {i: id2label[c] for i, c in enumerate(order)}


def remap_labels(split: datasets.Dataset, table: np.ndarray) -> datasets.Dataset:
    """The split with every label pixel v replaced by table[v]."""

    def remap(batch):
        return {"label": [Image.fromarray(table[np.asarray(label)], mode="L") for label in batch["label"]]}

    return split.map(remap, batched=True, batch_size=64, features=split.features)


def draw_supports(
    pool: datasets.Dataset, classes: list[int], shots: int, repeats: int, min_pixels: int, seed: int
) -> dict[int, list[list[int]]]:
    """For each original class id: `repeats` lists of `shots` pool indices of images showing >= min_pixels of it."""
    labels = [np.asarray(label) for label in pool["label"]]
    draws = {}
    for class_id in classes:
        candidates = [i for i, label in enumerate(labels) if int((label == class_id).sum()) >= min_pixels]
        if len(candidates) < shots:
            raise ValueError(
                f"Only {len(candidates)} pool images show class {class_id}; raise --support_pool (need {shots})."
            )
        rng = np.random.default_rng([seed, class_id])
        draws[class_id] = [list(rng.permutation(candidates)[:shots]) for _ in range(repeats)]
    return draws


def support_set(
    pool: datasets.Dataset, draws: dict[int, list[list[int]]], held_out: list[int], shots: int, repeat: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """pixel_values (3, S, S) and masks (S, S) (value i + 1 = held_out[i], 0 = left out) of one support draw."""
    images, masks = [], []
    for position, class_id in enumerate(held_out):
        for index in draws[class_id][repeat][:shots]:
            row = pool[int(index)]
            label = torch.as_tensor(np.array(row["label"])).long()
            images.append(pil_to_pixel_values(row["image"]))
            masks.append((label == class_id).long() * (position + 1))
    return images, masks


# ------------------------------------------------------------------------------------------------------- training


def training_arguments(args: AddClassesBenchmarkArguments, output_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=0.01,
        lr_scheduler_type="polynomial",
        warmup_steps=max(1, args.max_steps // 20),
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        disable_tqdm=True,
    )


def model_fields(args: AddClassesBenchmarkArguments) -> dict:
    return {
        "hidden_sizes": list(args.hidden_sizes),
        "depths": list(args.depths),
        "decoder_hidden_size": args.decoder_hidden_size,
    }


def train_protoseg(args, train_dataset, id2label, output_dir: Path):
    torch.manual_seed(args.seed)
    model, _ = build_model(
        model_name_or_path=None, model_preset="mit-b0", id2label=id2label, overrides=model_fields(args)
    )
    trainer = ProtoSegTrainer(
        model=model,
        args=training_arguments(args, output_dir),
        train_dataset=train_dataset,
        data_collator=pad_collate,
        prototype_init_batches=4,
    )
    trainer.train()
    return trainer.model.eval()


def train_parametric(args, train_dataset, id2label, output_dir: Path):
    torch.manual_seed(args.seed)
    config = SegformerConfig(
        **{**mit_preset("mit-b0"), **model_fields(args)},
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    trainer = Trainer(
        model=SegformerForSemanticSegmentation(config),
        args=training_arguments(args, output_dir),
        train_dataset=train_dataset,
        data_collator=pad_collate,
    )
    trainer.train()
    return trainer.model.eval()


# ----------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def confusion_matrix(model, batches, num_classes: int) -> torch.Tensor:
    """(K, K) counts of (true, predicted) pixels over validation batches; logits bilinearly upsampled to labels."""
    model.eval()
    counts = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for batch in batches:
        logits = model(pixel_values=batch["pixel_values"]).logits
        logits = F.interpolate(logits.float(), size=batch["labels"].shape[-2:], mode="bilinear", align_corners=False)
        predictions, labels = logits.argmax(dim=1).reshape(-1), batch["labels"].reshape(-1)
        valid = labels != IGNORE_INDEX
        flat = labels[valid] * num_classes + predictions[valid]
        counts += torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)
    return counts


def class_iou(counts: torch.Tensor) -> torch.Tensor:
    """(K,) IoU per class from a confusion matrix (NaN for classes absent from both labels and predictions)."""
    counts = counts.double()
    intersection = counts.diagonal()
    union = counts.sum(0) + counts.sum(1) - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.full_like(union, float("nan")))


def summarise(counts: torch.Tensor, num_old: int) -> dict:
    """New classes' IoU, and old classes' mIoU on all pixels and on old-class pixels only."""
    iou = class_iou(counts)
    old_only = counts.clone()
    old_only[num_old:] = 0  # drop the pixels whose true class is a held-out one
    return {
        "new_iou": [float(v) for v in iou[num_old:]],
        "new_miou": float(iou[num_old:].nanmean()),
        "old_miou_all_pixels": float(iou[:num_old].nanmean()),
        "old_miou_old_pixels": float(class_iou(old_only)[:num_old].nanmean()),
        "all_miou": float(iou.nanmean()),
    }


# ------------------------------------------------------------------------------------------- parametric new rows


@torch.no_grad()
def decoder_features(model: SegformerForSemanticSegmentation, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) input of SegFormer's classifier (fused decoder features), eval mode."""
    captured = []
    hook = model.decode_head.classifier.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    try:
        model.eval()(pixel_values=pixel_values)
    finally:
        hook.remove()
    return captured[0]


def fit_new_rows(
    model: SegformerForSemanticSegmentation,
    images: list[torch.Tensor],
    masks: list[torch.Tensor],
    names: list[str],
    args: AddClassesBenchmarkArguments,
) -> SegformerForSemanticSegmentation:
    """A copy of `model` with one new classifier row per name, fitted on the support cells (see the module doc)."""
    num_old = model.config.num_labels
    grid = embedding_grid_size(*masks[0].shape, model.config.patch_sizes[0], model.config.strides[0])
    features = decoder_features(model, torch.stack(images))  # (N, C, h, w)
    cells = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    classifier = model.decode_head.classifier
    with torch.no_grad():
        old_logits = F.conv2d(features, classifier.weight, classifier.bias).permute(0, 2, 3, 1).reshape(-1, num_old)
    support_cells = torch.stack([support_cell_labels(m, grid, len(names), args.min_cell_fraction) for m in masks])
    positives, negatives = [], []
    for position in range(len(names)):
        shown = torch.stack([(m == position + 1).any() for m in masks])  # images of this class's support
        fraction = torch.stack(
            [F.adaptive_avg_pool2d((m == position + 1).float()[None, None], grid)[0, 0] for m in masks]
        )
        positives.append((support_cells == position).reshape(-1))
        negatives.append(((fraction == 0) & shown[:, None, None]).reshape(-1))
    weight = torch.zeros(len(names), cells.shape[1], requires_grad=True)
    bias = torch.zeros(len(names), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=args.row_fit_learning_rate)
    for _ in range(args.row_fit_steps):
        log_probabilities = torch.cat([old_logits, cells @ weight.t() + bias], dim=1).log_softmax(dim=1)
        loss = args.row_fit_weight_decay * weight.pow(2).sum()
        for position in range(len(names)):
            log_p = log_probabilities[:, num_old + position]
            log_not_p = torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))
            loss = loss - log_p[positives[position]].mean() - log_not_p[negatives[position]].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    extended = copy.deepcopy(model)
    new_classifier = torch.nn.Conv2d(classifier.in_channels, num_old + len(names), kernel_size=1)
    with torch.no_grad():
        new_classifier.weight.copy_(torch.cat([classifier.weight, weight.detach()[:, :, None, None]]))
        new_classifier.bias.copy_(torch.cat([classifier.bias, bias.detach()]))
    extended.decode_head.classifier = new_classifier
    id2label = {**model.config.id2label, **{num_old + i: name for i, name in enumerate(names)}}
    extended.config.id2label, extended.config.label2id = id2label, {v: k for k, v in id2label.items()}
    return extended


# ----------------------------------------------------------------------------------------------------------- main


def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def run(args: AddClassesBenchmarkArguments) -> dict:
    started = time.time()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.dataset not in ("scenes", "scenes-shape"):
        raise ValueError(f"--dataset must be 'scenes' or 'scenes-shape', got {args.dataset!r}.")
    data, id2label = build_builtin_dataset(
        args.dataset,
        num_train=args.num_train,
        num_validation=args.num_validation,
        image_size=args.image_size,
        seed=args.seed,
        ignore_classes=list(args.held_out),
        item_scale=tuple(args.item_scale) or None,
    )
    pool, _ = build_builtin_dataset(
        args.dataset,
        num_train=args.support_pool,
        num_validation=1,
        image_size=args.image_size,
        seed=args.seed + 1,
        item_scale=tuple(args.item_scale) or None,
    )
    pool = pool["train"]
    table, old_id2label, final_id2label = class_layout(id2label, list(args.held_out))
    num_old, num_total = len(old_id2label), len(final_id2label)
    names = [id2label[c] for c in args.held_out]
    train_split = remap_labels(data["train"], table)
    validation_split = remap_labels(data["validation"], table)
    augmentation = AugmentationConfig(
        crop_size=(args.image_size, args.image_size),
        base_size=args.image_size,
        min_scale=args.augment_scale[0],
        max_scale=args.augment_scale[1],
        photometric_distortion=args.photometric_distortion,
    )
    train_dataset = SegmentationDataset(
        train_split, "image", "label", num_old, train=True, augmentation=augmentation, seed=args.seed
    )
    validation_dataset = SegmentationDataset(validation_split, "image", "label", num_total, train=False)
    loader = torch.utils.data.DataLoader(validation_dataset, batch_size=32, collate_fn=pad_collate)
    validation_batches = list(loader)
    draws = draw_supports(pool, list(args.held_out), max(args.shots), args.repeats, args.min_support_pixels, args.seed)
    logger.info("data ready in %.0f s", time.time() - started)

    results = {"arguments": asdict(args), "old_classes": old_id2label, "new_classes": names, "methods": {}}
    trained = {}
    for method, train in (("protoseg", train_protoseg), ("parametric", train_parametric)):
        folder = output_dir / method
        if args.reuse_models and (folder / "model.safetensors").exists():
            model_class = (
                ProtoSegformerForSemanticSegmentation if method == "protoseg" else SegformerForSemanticSegmentation
            )
            trained[method] = model_class.from_pretrained(folder).eval()
            logger.info("%s loaded from %s", method, folder)
            continue
        begin = time.time()
        trained[method] = train(args, train_dataset, old_id2label, folder)
        results[f"{method}_train_seconds"] = round(time.time() - begin, 1)
        trained[method].save_pretrained(folder)
        logger.info("%s trained in %.0f s", method, time.time() - begin)

    for method, model in trained.items():
        before = summarise(confusion_matrix(model, validation_batches, num_total), num_old)
        entry = {"before": before, "shots": {}}
        for shots in args.shots:
            runs = []
            for repeat in range(args.repeats):
                images, masks = support_set(pool, draws, list(args.held_out), shots, repeat)
                begin = time.time()
                if method == "protoseg":
                    extended = copy.deepcopy(model)
                    extended.add_classes(images, masks, names, min_cell_fraction=args.min_cell_fraction, seed=repeat)
                else:
                    extended = fit_new_rows(model, images, masks, names, args)
                seconds = time.time() - begin
                summary = summarise(confusion_matrix(extended, validation_batches, num_total), num_old)
                runs.append({**summary, "add_seconds": round(seconds, 2)})
            entry["shots"][shots] = {
                "runs": runs,
                "new_miou": mean_std([r["new_miou"] for r in runs]),
                "new_iou": [mean_std([r["new_iou"][i] for r in runs])[0] for i in range(len(names))],
                "old_miou_all_pixels": mean_std([r["old_miou_all_pixels"] for r in runs]),
                "old_miou_old_pixels": mean_std([r["old_miou_old_pixels"] for r in runs]),
                "all_miou": mean_std([r["all_miou"] for r in runs]),
                "add_seconds": mean_std([r["add_seconds"] for r in runs])[0],
            }
        results["methods"][method] = entry
    results["total_seconds"] = round(time.time() - started, 1)
    (output_dir / ("results_quick.json" if args.quick else "results.json")).write_text(json.dumps(results, indent=2))
    print(format_table(results, names))
    return results


def format_table(results: dict, names: list[str]) -> str:
    """A markdown table: per method and shot count, new-class IoU and the old classes' mIoU change."""
    lines = [
        f"| method | shots | new mIoU (mean ± std) | {' | '.join(names)} | old mIoU all pixels: before → after |"
        " old mIoU old pixels: before → after | all-class mIoU: before → after | add time (s) |",
        "|---|---|---|" + "---|" * len(names) + "---|---|---|---|",
    ]
    for method, entry in results["methods"].items():
        before = entry["before"]
        for shots, row in entry["shots"].items():
            mean, std = row["new_miou"]
            per_class = " | ".join(f"{100 * v:.1f}" for v in row["new_iou"])
            all_after, old_after = row["old_miou_all_pixels"][0], row["old_miou_old_pixels"][0]
            lines.append(
                f"| {method} | {shots} | {100 * mean:.1f} ± {100 * std:.1f} | {per_class} |"
                f" {100 * before['old_miou_all_pixels']:.1f} → {100 * all_after:.1f}"
                f" ({100 * (all_after - before['old_miou_all_pixels']):+.1f}) |"
                f" {100 * before['old_miou_old_pixels']:.1f} → {100 * old_after:.1f}"
                f" ({100 * (old_after - before['old_miou_old_pixels']):+.1f}) |"
                f" {100 * before['all_miou']:.1f} → {100 * row['all_miou'][0]:.1f} | {row['add_seconds']:.2f} |"
            )
    return "\n".join(lines)


def main(args: AddClassesBenchmarkArguments) -> dict:
    """Logging, threads, then `run`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    hf_logging.set_verbosity_warning()
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    if not math.isfinite(args.min_cell_fraction):
        raise ValueError("min_cell_fraction must be finite.")
    return run(args)
