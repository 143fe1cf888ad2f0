"""Quality comparison: ProtoSeg against its parametric twin, with everything else held equal.

For each data set and seed, the ProtoSeg model (`ProtoSegformerForSemanticSegmentation` for a MiT preset,
`ProtoSegForSemanticSegmentation` for a backbone preset such as resnet-18 or swin-tiny) and its parametric twin
(transformers' `SegformerForSemanticSegmentation` or `UperNetForSemanticSegmentation`: benchmarks/twins.py) are built
from the same config and the same initial encoder / backbone and decoder weights (the parametric model's state_dict is
copied into the ProtoSeg model; only the classifier is dropped and the projection and prototypes stay fresh), and
trained through the same code as `scripts/train.py`: its argument
parser and defaults, `run_training.prepare_data` (data, augmentation), `ProtoSegTrainer` (optimiser, schedule,
loss logging, evaluation) and `MeanIoUMetric` (the project's mean IoU). Every run records a fingerprint of its
initial shared weights and of every training batch, so a comparison can show that both heads saw the same weights,
batches and order.

The functions are small and the entry point is `run_comparison`; `scripts/benchmark_quality.py` is the command line.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.trainer_callback import PrinterCallback

from proto_segformer.prototype_math import l2_normalize, random_unit_prototypes

from .twins import (
    HEADS,
    copy_shared_weights,
    parametric_config,
    shared_parameter_names,
    shared_weights_fingerprint,
    twin_pair,
)

DATASETS = ("scenes", "scenes-large")

# scripts/train.py options of every comparison run: evaluate once at the end, save nothing, quiet.
COMMON_TRAIN_OPTIONS: dict[str, Any] = {
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 50,
    "disable_tqdm": True,
    "report_to": "none",
    "dataloader_pin_memory": False,
}

# Run sizes. `train_args` are scripts/train.py options (on top of its built-in demo defaults) of every run;
# `dataset_train_args` add to them per data set; `seeds` the seeds. The 105-class scenes-large needs many more steps
# than the 10-class scenes before either head separates its classes (measured, mean mIoU of the two heads: 1-2 % after
# 400 steps, 12 % after 2000), so it gets a longer schedule.
MODES: dict[str, dict[str, Any]] = {
    # 2 CPU cores, under 10 minutes for 2 data sets x 2 heads x 3 seeds.
    "quick": {
        "seeds": (0, 1, 2),
        "train_args": {"max_steps": 200, "builtin_num_train": 1000, "builtin_num_validation": 100},
        "dataset_train_args": {"scenes-large": {"max_steps": 400}},
    },
    # 2 CPU cores, under an hour.
    "full": {
        "seeds": (0, 1, 2),
        "train_args": {"max_steps": 800, "builtin_num_train": 2000, "builtin_num_validation": 200},
        "dataset_train_args": {"scenes-large": {"max_steps": 2000}},
    },
    # A GPU (not measured: no GPU was lent so far; expect minutes a run): the full mit-b0 decoder, D and M, 128x128
    # images, schedules long enough for scenes-large-digits (digit shape x colour, which CPU budgets do not reach;
    # add it with --datasets scenes,scenes-large,scenes-large-digits), 5 seeds.
    "large": {
        "seeds": (0, 1, 2, 3, 4),
        "train_args": {
            "max_steps": 4000,
            "per_device_train_batch_size": 16,
            "builtin_num_train": 8000,
            "builtin_num_validation": 500,
            "builtin_image_size": 128,
            "crop_size": 128,
            "decoder_hidden_size": 256,
            "prototype_dim": None,
            "num_prototypes_per_class": 10,
            "dataloader_num_workers": 4,
        },
        "dataset_train_args": {"scenes-large": {"max_steps": 10000}, "scenes-large-digits": {"max_steps": 10000}},
    },
}

# ProtoSeg ablations: scripts/train.py options applied to the ProtoSeg runs only (the parametric baseline is the
# same for every variant). Names are stable: they appear in the JSON.
ABLATIONS: dict[str, dict[str, Any]] = {
    "no-ppc-ppd": {"ppc_weight": 0.0, "ppd_weight": 0.0},
    "momentum-0.99": {"prototype_momentum": 0.99},
    "momentum-0.9": {"prototype_momentum": 0.9},
    "M-1": {"num_prototypes_per_class": 1},
    "M-10": {"num_prototypes_per_class": 10},
    # D = decoder width (the contract's default; the built-in demo uses D = 64 for speed).
    "D-decoder-width": {"prototype_dim": None},
    "init-from-data": {"prototype_init_batches": 8},
    "head-lr-x10": {"head_learning_rate_multiplier": 10.0},
    "temperature-0.1": {"config_overrides": "class_score_normalization=temperature,class_score_temperature=0.1"},
}


class QualityInputError(ValueError):
    """A comparison the user asked for cannot be run (unknown data set, mode, ablation or device)."""


# ------------------------------------------------------------------------------------------------ train.py options


def train_argv(options: Mapping[str, Any]) -> list[str]:
    """{'max_steps': 100, 'use_cpu': True, 'prototype_dim': None} -> ['--max_steps', '100', '--use_cpu', 'true'].

    A value of None is left out (the option keeps its default)."""
    argv: list[str] = []
    for name, value in options.items():
        if value is None:
            continue
        argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def parse_train_arguments(dataset: str, options: Mapping[str, Any]):
    """(ModelArguments, DataTrainingArguments, TrainingArguments) exactly as `scripts/train.py` would parse them for
    the built-in data set `dataset`, with its built-in demo defaults, then `options` on top."""
    from proto_segformer.run_training import BUILTIN_DEMO_DEFAULTS, build_parser

    argv = ["--dataset_name", f"builtin:{dataset}", *train_argv(options)]
    parser = build_parser(argv)
    # train.py applies the demo defaults when no --dataset_name is given; a named built-in set gets the same ones.
    parser.set_defaults(**BUILTIN_DEMO_DEFAULTS)
    reset = {name: None for name, value in options.items() if value is None}
    if reset:
        parser.set_defaults(**reset)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args


def describe_budget(result: Mapping[str, Any]) -> list[str]:
    """One line per data set of a comparison result: the model and the training budget both heads had, as
    scripts/train.py parses the result's options (its built-in demo defaults, then the comparison's options)."""
    if "train_options" not in result:
        return []
    datasets = result.get("datasets") or sorted({run["dataset"] for run in result.get("runs", [])})
    lines = []
    for dataset in datasets:
        options = {**result["train_options"], **result.get("dataset_options", {}).get(dataset, {})}
        model_args, data_args, training_args = parse_train_arguments(dataset, {**options, "output_dir": "unused"})
        dim = model_args.prototype_dim or model_args.decoder_hidden_size
        schedule = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
        lines.append(
            f"{dataset}: {model_args.model_preset} preset (decoder width {model_args.decoder_hidden_size}, ProtoSeg"
            f" D {dim}, M {model_args.num_prototypes_per_class}); both heads: {training_args.max_steps} steps x batch"
            f" {training_args.per_device_train_batch_size}, AdamW lr {training_args.learning_rate:g}"
            f" ({schedule}, {training_args.warmup_steps:g} warm-up steps, decoder lr x"
            f" {model_args.head_learning_rate_multiplier:g}), {data_args.crop_size}x{data_args.crop_size} crops,"
            f" {data_args.builtin_num_train} training / {data_args.builtin_num_validation} validation images,"
            f" scripts/train.py's augmentation"
        )
    return lines


# ---------------------------------------------------------------------------------------------------------- models


def build_model_pair(model_args, id2label: Mapping[int, str], seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Both heads for one seed: the ProtoSeg model as `scripts/train.py` builds it (`model_building.build_model`: a
    ProtoSegformer for a MiT preset, a ProtoSeg model for a backbone preset such as resnet-18 or swin-tiny), its
    parametric twin (`twins.twin_pair`: `SegformerForSemanticSegmentation` or `UperNetForSemanticSegmentation` of the
    same config) whose encoder / backbone + decoder initialisation is copied into the ProtoSeg model, and prototypes
    drawn from a generator seeded with `seed` (so they depend on the seed only)."""
    from proto_segformer.model_building import build_model

    torch.manual_seed(seed)
    protoseg, _ = build_model(
        model_name_or_path=model_args.model_name_or_path,
        model_preset=model_args.model_preset,
        id2label=id2label,
        overrides=model_args.config_fields(),
    )
    parametric = twin_pair(protoseg, seed)
    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        protoseg.prototypes.copy_(random_unit_prototypes(*protoseg.prototypes.shape, generator=generator))
    return parametric, protoseg


def learnable_parameters(model: torch.nn.Module) -> int:
    """Number of parameters the optimiser trains (buffers such as the prototypes do not count)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- batch fingerprints


class BatchFingerprint:
    """sha1 digests of batches (pixel values and labels), in order, and one fingerprint over all of them."""

    def __init__(self) -> None:
        self.digests: list[str] = []

    def update(self, batch: Mapping[str, torch.Tensor]) -> None:
        digest = hashlib.sha1()
        for key in ("pixel_values", "labels"):
            digest.update(batch[key].detach().cpu().contiguous().numpy().tobytes())
        self.digests.append(digest.hexdigest())

    def fingerprint(self) -> str:
        """One sha1 over all batch digests, in order."""
        return hashlib.sha1("".join(self.digests).encode()).hexdigest()


def fingerprinting_trainer_class():
    """`ProtoSegTrainer` that also records a `BatchFingerprint` of the batches its optimisation steps train on
    (after any prototype initialisation; whatever the number of dataloader workers). Training is unchanged."""
    from proto_segformer.trainer import ProtoSegTrainer

    class FingerprintingTrainer(ProtoSegTrainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.batch_fingerprint = BatchFingerprint()

        def training_step(self, model, inputs, *args, **kwargs):
            self.batch_fingerprint.update(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

    return FingerprintingTrainer


# --------------------------------------------------------------------------------------------- prototype diagnosis


@torch.no_grad()
def prototype_usage(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], min_share: float = 0.01
) -> dict[str, float]:
    """How many of each class's M prototypes the labelled pixels of `batches` use (the nearest of its own class's).

    Returns `used_per_class` (mean over classes with pixels of the number of prototypes that are nearest for at least
    `min_share` of the class's pixels), `min_used_per_class`, `effective_per_class` (mean of exp(entropy) of the
    usage distribution) and `classes_seen`. With M = 1 every value is 1. A collapsed class uses 1 of its M.
    """
    was_training = model.training
    model.eval()
    num_classes, num_prototypes, _ = model.prototypes.shape
    counts = torch.zeros(num_classes * num_prototypes, dtype=torch.float64)
    device = model.prototypes.device
    ignore_index = model.config.semantic_loss_ignore_index
    for batch in batches:
        embeddings, _ = model.embed_pixels(batch["pixel_values"].to(device))
        _, dim, height, width = embeddings.shape
        labels = F.interpolate(batch["labels"][:, None].float().to(device), size=(height, width), mode="nearest")
        labels = labels.long().view(-1)
        keep = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
        pixels = embeddings.permute(0, 2, 3, 1).reshape(-1, dim)[keep]
        classes = labels[keep]
        own = torch.einsum("nd,nmd->nm", pixels.float(), model.prototypes[classes].float())
        counts += torch.bincount(classes * num_prototypes + own.argmax(1), minlength=counts.numel()).double().cpu()
    model.train(was_training)
    counts = counts.view(num_classes, num_prototypes)
    totals = counts.sum(1)
    seen = totals > 0
    if not seen.any():
        return {"used_per_class": 0.0, "min_used_per_class": 0.0, "effective_per_class": 0.0, "classes_seen": 0}
    shares = counts[seen] / totals[seen, None]
    used = (shares >= min_share).sum(1).double()
    entropy = -(shares * shares.clamp_min(1e-12).log()).sum(1)
    return {
        "used_per_class": float(used.mean()),
        "min_used_per_class": float(used.min()),
        "effective_per_class": float(entropy.exp().mean()),
        "classes_seen": int(seen.sum()),
    }


def prototype_geometry(prototypes: torch.Tensor, initial: torch.Tensor) -> dict[str, float]:
    """Prototypes (K, M, D) after training against their initial values: `cosine_to_init` (mean cos(p, p_0): 1 means
    they never moved), `within_class_cosine` (mean cosine between distinct prototypes of one class; near 1 is a
    collapse) and `between_class_cosine` (mean cosine between the class means of different classes)."""
    prototypes = l2_normalize(prototypes.float())
    initial = l2_normalize(initial.float())
    num_classes, num_prototypes, _ = prototypes.shape
    cosine_to_init = (prototypes * initial).sum(-1).mean()
    if num_prototypes > 1:
        gram = prototypes @ prototypes.transpose(1, 2)
        off_diagonal = ~torch.eye(num_prototypes, dtype=torch.bool)
        within = gram[:, off_diagonal].mean()
    else:
        within = torch.tensor(float("nan"))
    means = l2_normalize(prototypes.mean(1))
    class_gram = means @ means.t()
    between = class_gram[~torch.eye(num_classes, dtype=torch.bool)].mean()
    return {
        "cosine_to_init": float(cosine_to_init),
        "within_class_cosine": float(within),
        "between_class_cosine": float(between),
    }


# ------------------------------------------------------------------------------------------------------- one run


@dataclass
class RunSpec:
    """One training run of a comparison."""

    dataset: str
    head: str  # "parametric" or "protoseg"
    seed: int
    variant: str = "default"  # the ProtoSeg ablation ("default" for the contract's model)
    options: dict[str, Any] = field(default_factory=dict)  # scripts/train.py options of this run


def class_pixel_counts(split, label_column: str, num_labels: int) -> np.ndarray:
    """(K,) number of labelled pixels of each class in a `datasets` split (255 and out-of-range left out)."""
    counts = np.zeros(num_labels, dtype=np.int64)
    for label in split[label_column]:
        values = np.asarray(label).ravel()
        counts += np.bincount(values[values < num_labels], minlength=num_labels)[:num_labels]
    return counts


def rare_class_mean_iou(per_class_iou: Mapping[int, float], train_counts: np.ndarray, fraction: float = 0.5) -> float:
    """Mean IoU over the `fraction` of item classes (index > 0) with the fewest training pixels (nan IoUs left out)."""
    items = [k for k in range(1, len(train_counts)) if not math.isnan(per_class_iou.get(k, float("nan")))]
    if not items:
        return float("nan")
    items.sort(key=lambda k: (train_counts[k], k))
    rare = items[: max(1, int(round(len(items) * fraction)))]
    return float(np.mean([per_class_iou[k] for k in rare]))


def train_and_evaluate(
    model: torch.nn.Module,
    spec: RunSpec,
    model_args,
    training_args,
    data,
    train_counts: np.ndarray | None = None,
) -> dict[str, Any]:
    """Train `model` with `ProtoSegTrainer` on `data` (a `run_training.PreparedData`) and evaluate it with
    `MeanIoUMetric`; returns the run's record (metrics, time, parameters, fingerprints, prototype diagnosis)."""
    from proto_segformer.data.transforms import pad_collate
    from proto_segformer.trainer_metrics import MeanIoUMetric

    is_protoseg = spec.head == "protoseg"
    metric = MeanIoUMetric(data.id2label, per_category_limit=10**6)
    record: dict[str, Any] = {
        "dataset": spec.dataset,
        "head": spec.head,
        "variant": spec.variant,
        "seed": spec.seed,
        "learnable_parameters": learnable_parameters(model),
        "initial_shared_weights": shared_weights_fingerprint(model, spec.head),
    }
    initial_prototypes = model.prototypes.detach().clone() if is_protoseg else None
    trainer = fingerprinting_trainer_class()(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=pad_collate,
        compute_metrics=metric,
        head_learning_rate_multiplier=model_args.head_learning_rate_multiplier,
        prototype_init_batches=model_args.prototype_init_batches if is_protoseg else 0,
        prototype_init_max_pixels=model_args.prototype_init_max_pixels,
    )
    if training_args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)
    start, cpu_start = time.perf_counter(), time.process_time()
    train_result = trainer.train()
    record["train_seconds"] = time.perf_counter() - start
    # CPU time of this process (all its threads): about the wall time the run would take on idle cores.
    record["train_cpu_seconds"] = time.process_time() - cpu_start
    record["train_runtime"] = float(train_result.metrics.get("train_runtime", record["train_seconds"]))
    record["train_steps"] = int(train_result.global_step)
    record["train_loss"] = float(train_result.training_loss)
    record["batches"] = trainer.batch_fingerprint.fingerprint()
    record["num_batches"] = len(trainer.batch_fingerprint.digests)
    record["last_log"] = next((dict(e) for e in reversed(trainer.state.log_history) if "loss" in e), {})
    record["eval_history"] = [
        [e["step"], e["eval_mean_iou"]] for e in trainer.state.log_history if "eval_mean_iou" in e
    ]
    start = time.perf_counter()
    metrics = trainer.evaluate()
    record["eval_seconds"] = time.perf_counter() - start
    record["mean_iou"] = float(metrics["eval_mean_iou"])
    record["mean_accuracy"] = float(metrics["eval_mean_accuracy"])
    record["pixel_accuracy"] = float(metrics["eval_overall_accuracy"])
    per_class = {k: float(metrics.get(f"eval_iou_{name}", float("nan"))) for k, name in data.id2label.items()}
    record["per_class_iou"] = [per_class[k] for k in sorted(per_class)]
    items = [v for k, v in per_class.items() if k != 0 and not math.isnan(v)]
    record["item_mean_iou"] = float(np.mean(items)) if items else float("nan")  # background (index 0) left out
    if train_counts is not None:
        record["rare_half_mean_iou"] = rare_class_mean_iou(per_class, train_counts)
    if is_protoseg:
        loader = torch.utils.data.DataLoader(data.validation, batch_size=25, collate_fn=pad_collate)
        record["prototypes"] = {
            **prototype_usage(model, loader),
            **prototype_geometry(model.prototypes.detach().cpu(), initial_prototypes.cpu()),
        }
    return record


# ----------------------------------------------------------------------------------------------------- summaries


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); nan values are left out."""
    finite = [float(v) for v in values if not math.isnan(float(v))]
    if not finite:
        return float("nan"), float("nan")
    return float(statistics.fmean(finite)), float(statistics.stdev(finite)) if len(finite) > 1 else 0.0


SUMMARY_FIELDS = (
    "mean_iou",
    "item_mean_iou",
    "pixel_accuracy",
    "mean_accuracy",
    "rare_half_mean_iou",
    "train_seconds",
    "train_cpu_seconds",
)


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, head, variant): mean and std over seeds of every metric, learnable parameters."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["head"], run["variant"]), []).append(run)
    rows = []
    for (dataset, head, variant), members in groups.items():
        row: dict[str, Any] = {
            "dataset": dataset,
            "head": head,
            "variant": variant,
            "seeds": sorted(r["seed"] for r in members),
            "learnable_parameters": members[0]["learnable_parameters"],
        }
        for name in SUMMARY_FIELDS:
            if all(name in r for r in members):
                row[f"{name}_mean"], row[f"{name}_std"] = mean_and_std([r[name] for r in members])
        if head == "protoseg":
            for name in ("used_per_class", "effective_per_class", "cosine_to_init", "within_class_cosine"):
                row[f"prototypes_{name}"] = mean_and_std([r["prototypes"][name] for r in members])[0]
        rows.append(row)
    return rows


# Two-sided 5 % critical values of Student's t by degrees of freedom (more: the normal's 1.96).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def compare(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """ProtoSeg (each variant) minus parametric, per data set, paired by seed (same weights, batches and order).

    Each row: `delta_mean_iou` (mean over seeds of the paired difference) and its std, the larger of the two heads'
    seed stds (`seed_spread`), `paired_t` (mean / (std / sqrt(n))), `same_batches` and `same_initial_weights` (every
    pair saw identical batches in the same order and started from identical encoder+decoder weights), and a
    `verdict`: "ahead" / "behind" when |delta| exceeds the seed spread and the paired t-test rejects a zero mean
    difference (two-sided, 5 %), else "equal within noise".
    """
    baseline = {(r["dataset"], r["seed"]): r for r in runs if r["head"] == "parametric"}
    groups: dict[tuple[str, str], list[tuple[Mapping, Mapping]]] = {}
    for run in runs:
        if run["head"] != "protoseg" or (run["dataset"], run["seed"]) not in baseline:
            continue
        groups.setdefault((run["dataset"], run["variant"]), []).append((baseline[(run["dataset"], run["seed"])], run))
    rows = []
    for (dataset, variant), pairs in groups.items():
        deltas = [p["mean_iou"] - b["mean_iou"] for b, p in pairs]
        delta, delta_std = mean_and_std(deltas)
        spread = max(
            mean_and_std([b["mean_iou"] for b, _ in pairs])[1], mean_and_std([p["mean_iou"] for _, p in pairs])[1]
        )
        n = len(deltas)
        if n > 1 and delta_std > 0:
            t = delta / (delta_std / math.sqrt(n))
        else:
            t = math.copysign(math.inf, delta) if n > 1 and delta != 0 else float("nan")
        significant = n > 1 and abs(t) > T_975.get(n - 1, 1.96)
        if abs(delta) > spread and significant:
            verdict = "ahead" if delta > 0 else "behind"
        else:
            verdict = "equal within noise"
        row = {
            "dataset": dataset,
            "variant": variant,
            "seeds": sorted(p["seed"] for _, p in pairs),
            "delta_mean_iou": delta,
            "delta_mean_iou_std": delta_std,
            "seed_spread": spread,
            "paired_t": t,
            "verdict": verdict,
            "same_batches": all(b["batches"] == p["batches"] for b, p in pairs),
            "same_initial_weights": all(b["initial_shared_weights"] == p["initial_shared_weights"] for b, p in pairs),
        }
        if all("rare_half_mean_iou" in r for pair in pairs for r in pair):
            row["delta_rare_half_mean_iou"] = mean_and_std(
                [p["rare_half_mean_iou"] - b["rare_half_mean_iou"] for b, p in pairs]
            )[0]
        rows.append(row)
    return rows


def _pm(row: Mapping[str, Any], name: str, scale: float = 100.0, digits: int = 1) -> str:
    mean, std = row.get(f"{name}_mean"), row.get(f"{name}_std")
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def format_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """The summary as a markdown table (IoU and accuracies in %, mean ± std over seeds)."""
    lines = [
        "| data set | head | variant | seeds | mIoU (%) | item mIoU (%) | rare-half mIoU (%) | pixel acc. (%)"
        " | train wall (s) | train CPU (s) | learnable params | prototypes used / class | prototype cos to init |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        used = row.get("prototypes_used_per_class")
        moved = row.get("prototypes_cosine_to_init")
        lines.append(
            f"| {row['dataset']} | {row['head']} | {row['variant']} | {len(row['seeds'])}"
            f" | {_pm(row, 'mean_iou')} | {_pm(row, 'item_mean_iou')} | {_pm(row, 'rare_half_mean_iou')}"
            f" | {_pm(row, 'pixel_accuracy')}"
            f" | {_pm(row, 'train_seconds', 1.0, 0)} | {_pm(row, 'train_cpu_seconds', 1.0, 0)}"
            f" | {row['learnable_parameters']:,}"
            f" | {'-' if used is None else f'{used:.1f}'} | {'-' if moved is None else f'{moved:.2f}'} |"
        )
    return "\n".join(lines)


def format_comparison(rows: Sequence[Mapping[str, Any]]) -> str:
    """The paired comparison as a markdown table (mIoU points)."""
    lines = [
        "| data set | ProtoSeg variant | Δ mIoU vs parametric (points) | seed spread | paired t | verdict"
        " | same batches | same init |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dataset']} | {row['variant']} | {row['delta_mean_iou'] * 100:+.1f} ±"
            f" {row['delta_mean_iou_std'] * 100:.1f} | {row['seed_spread'] * 100:.1f} | {row['paired_t']:.1f}"
            f" | {row['verdict']} | {row['same_batches']} | {row['same_initial_weights']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- the driver


@dataclass
class ComparisonSettings:
    """What to compare.

    Attributes:
        datasets: built-in data set names.
        seeds: seeds (each gives both heads the same initial weights, batches and augmentation).
        train_options: scripts/train.py options shared by every run (on top of its built-in demo defaults).
        variants: ProtoSeg variant name -> extra scripts/train.py options for the ProtoSeg runs ("default": none).
        mode: a label for the JSON.
        dataset_options: data set name -> scripts/train.py options for every run on that data set, on top of
            `train_options` (e.g. a longer schedule for the 100-class set).
    """

    datasets: Sequence[str] = DATASETS
    seeds: Sequence[int] = (0, 1, 2)
    train_options: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": {}})
    mode: str = "custom"
    dataset_options: dict[str, dict[str, Any]] = field(default_factory=dict)


def check_settings(settings: ComparisonSettings) -> None:
    """Clear errors for settings that cannot run."""
    from proto_segformer.data.builtin import BUILTIN_DATASETS

    bad = [d for d in settings.datasets if d not in BUILTIN_DATASETS]
    if bad:
        raise QualityInputError(f"Unknown data set(s) {bad}; choose from {', '.join(BUILTIN_DATASETS)}.")
    if not settings.datasets:
        raise QualityInputError("No data set to compare on.")
    if not settings.seeds:
        raise QualityInputError("No seed given: the comparison needs at least one (three for a spread).")
    if len(set(settings.seeds)) != len(settings.seeds):
        raise QualityInputError(f"Seeds repeat: {list(settings.seeds)}.")
    if not settings.variants:
        raise QualityInputError("No ProtoSeg variant to run.")


def machine_description() -> dict[str, Any]:
    """Where the numbers were taken."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Job:
    """One run to do: a head (and ProtoSeg variant) on a data set with a seed, with its scripts/train.py options."""

    dataset: str
    head: str
    variant: str
    seed: int
    shared_options: dict[str, Any]  # every run of the data set (they define the prepared data)
    extra_options: dict[str, Any]  # this variant's options


def plan_jobs(settings: ComparisonSettings) -> list[Job]:
    """Every run, grouped by data set and seed; within a seed the parametric baseline and each ProtoSeg variant,
    the baseline first on even seeds and last on odd ones (drifting machine load then favours neither head)."""
    jobs = []
    for dataset in settings.datasets:
        shared = {**COMMON_TRAIN_OPTIONS, **settings.train_options, **settings.dataset_options.get(dataset, {})}
        for index, seed in enumerate(settings.seeds):
            group = [Job(dataset, "parametric", "default", seed, shared, {})] + [
                Job(dataset, "protoseg", name, seed, shared, dict(options))
                for name, options in settings.variants.items()
            ]
            jobs += group[1:] + group[:1] if index % 2 == 1 else group
    return jobs


_PREPARED: dict[str, tuple[Any, np.ndarray]] = {}


def prepared_data(dataset: str, shared_options: Mapping[str, Any], work_dir: Path):
    """(`run_training.PreparedData`, training pixels per class) of a data set, built once per process."""
    from proto_segformer.run_training import prepare_data

    key = repr((dataset, sorted(shared_options.items())))
    if key not in _PREPARED:
        model_args, data_args, training_args = parse_train_arguments(
            dataset, {**shared_options, "output_dir": str(work_dir / "prepare")}
        )
        data = prepare_data(model_args, data_args, training_args)
        counts = class_pixel_counts(data.train.split, data.train.label_column, len(data.id2label))
        _PREPARED[key] = (data, counts)
    return _PREPARED[key]


def job_options(job: Job, output_dir: str | Path) -> dict[str, Any]:
    """The scripts/train.py options of a job: shared ones, then the variant's (its `config_overrides` add to the
    shared ones instead of replacing them), then the seed and output folder."""
    options = {**job.shared_options, **job.extra_options, "seed": job.seed, "output_dir": str(output_dir)}
    overrides = [o["config_overrides"] for o in (job.shared_options, job.extra_options) if o.get("config_overrides")]
    if overrides:
        options["config_overrides"] = ",".join(overrides)
    return options


def run_job(job: Job, work_dir: str | Path) -> dict[str, Any]:
    """Build the model pair of the job's seed, train and evaluate the job's head; returns the run's record."""
    work_dir = Path(work_dir)
    data, counts = prepared_data(job.dataset, job.shared_options, work_dir)
    output_dir = work_dir / f"{job.dataset}-{job.head}-{job.variant}-{job.seed}"
    options = job_options(job, output_dir)
    model_args, _, training_args = parse_train_arguments(job.dataset, options)
    data.train.seed = job.seed if training_args.data_seed is None else training_args.data_seed
    data.train.set_epoch(0)
    parametric, protoseg = build_model_pair(model_args, data.id2label, job.seed)
    model = parametric if job.head == "parametric" else protoseg
    spec = RunSpec(job.dataset, job.head, job.seed, job.variant, options)
    try:
        record = train_and_evaluate(model, spec, model_args, training_args, data, counts)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    record["options"] = {k: v for k, v in job.extra_options.items()}
    return record


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _describe(record: Mapping[str, Any]) -> str:
    return (
        f"[{record['dataset']}] seed {record['seed']} {record['head']:10s} {record['variant']:15s}"
        f" mIoU {record['mean_iou'] * 100:5.1f}  pixel acc {record['pixel_accuracy'] * 100:5.1f}"
        f"  train {record['train_seconds']:6.1f} s"
    )


def reusable_runs(settings: ComparisonSettings, earlier: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The runs of an earlier result (a benchmark_quality JSON) that this comparison would repeat exactly: same data
    set, head, variant, seed, shared options and variant options. Raises if the earlier result was made with other
    shared options (its runs would not be comparable)."""
    try:
        same_options = earlier["train_options"] == settings.train_options and all(
            earlier.get("dataset_options", {}).get(d, {}) == settings.dataset_options.get(d, {})
            for d in settings.datasets
        )
        runs = list(earlier["runs"])
    except (KeyError, TypeError) as error:
        raise QualityInputError(f"The earlier result is not a benchmark_quality result ({error}).") from error
    if not same_options:
        raise QualityInputError(
            "The earlier result was made with other training options"
            f" ({earlier.get('train_options')}, {earlier.get('dataset_options', {})}) than this comparison"
            f" ({settings.train_options}, {settings.dataset_options}): its runs cannot be reused."
        )
    wanted = {(j.dataset, j.head, j.variant, j.seed): j.extra_options for j in plan_jobs(settings)}
    return [
        dict(run)
        for run in runs
        if (key := (run["dataset"], run["head"], run["variant"], run["seed"])) in wanted
        and run.get("options", {}) == wanted[key]
    ]


def run_comparison(
    settings: ComparisonSettings,
    work_dir: str | Path | None = None,
    workers: int = 1,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    reuse: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Train and evaluate every (data set, seed, head / ProtoSeg variant); returns the JSON-ready result.

    Args:
        settings: what to compare.
        work_dir: scratch folder for the Trainer (a temporary one by default; nothing is kept).
        workers: runs at a time (1: in this process; more: that many spawned processes, each preparing every data
            set once). Jobs are handed out in `plan_jobs` order, so the two heads of a seed run side by side.
        threads: torch threads per run (default: torch's current setting with 1 worker, 1 with several; on a
            busy machine one thread per process is much faster than several for these small models).
        log: called with one line per finished run.
        reuse: finished runs (from `reusable_runs`) that are taken as they are instead of being trained again.
    """
    check_settings(settings)
    if workers < 1:
        raise QualityInputError(f"workers must be >= 1, got {workers}.")
    own_dir = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="quality_")) if own_dir else Path(work_dir)
    done = {(r["dataset"], r["head"], r["variant"], r["seed"]) for r in reuse}
    jobs = [j for j in plan_jobs(settings) if (j.dataset, j.head, j.variant, j.seed) not in done]
    runs: list[dict[str, Any]] = [{**r, "reused": True} for r in reuse]
    for run in runs:
        log(_describe(run) + "  (reused)")
    started = time.perf_counter()
    try:
        if workers == 1:
            if threads is not None:
                torch.set_num_threads(threads)
            for job in jobs:
                runs.append(run_job(job, root))
                log(_describe(runs[-1]))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                workers, mp_context=context, initializer=_worker_init, initargs=(threads or 1,)
            ) as pool:
                futures = [pool.submit(run_job, job, root) for job in jobs]
                for future in futures:
                    runs.append(future.result())
                    log(_describe(runs[-1]))
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "mode": settings.mode,
        "machine": machine_description(),
        "workers": workers,
        "threads_per_run": threads if threads is not None else (torch.get_num_threads() if workers == 1 else 1),
        "datasets": list(settings.datasets),
        "seeds": list(settings.seeds),
        "train_options": settings.train_options,
        "dataset_options": settings.dataset_options,
        "variants": settings.variants,
        "wall_seconds": time.perf_counter() - started,
        "summary": summarize(runs),
        "comparison": compare(runs),
        "runs": runs,
    }


__all__ = [
    "ABLATIONS",
    "DATASETS",
    "HEADS",
    "MODES",
    "ComparisonSettings",
    "BatchFingerprint",
    "Job",
    "job_options",
    "QualityInputError",
    "RunSpec",
    "build_model_pair",
    "check_settings",
    "class_pixel_counts",
    "compare",
    "copy_shared_weights",
    "describe_budget",
    "format_comparison",
    "fingerprinting_trainer_class",
    "format_table",
    "learnable_parameters",
    "parametric_config",
    "parse_train_arguments",
    "plan_jobs",
    "prototype_geometry",
    "prototype_usage",
    "rare_class_mean_iou",
    "reusable_runs",
    "run_comparison",
    "run_job",
    "shared_parameter_names",
    "shared_weights_fingerprint",
    "summarize",
    "train_and_evaluate",
]
