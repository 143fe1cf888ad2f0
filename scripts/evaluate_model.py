"""Evaluate a trained model on a data set split: mmsegmentation's IoUMetric numbers, per class, with optional
sliding windows and test-time augmentation (scales and flip).

    python scripts/evaluate_model.py --model runs/demo --dataset_name scenes --output_dir runs/demo
    python scripts/evaluate_model.py --model runs/ade --dataset_name path/to/ade_like_folder --mode slide \
        --scales 0.5 0.75 1.0 1.25 1.5 1.75 --flip --output_dir runs/ade-eval

Prints the per-class table (IoU, Acc, Dice, F-score, precision, recall, pixel counts) and the summary (aAcc, mIoU,
mAcc, mDice, mFscore, mPrecision, mRecall, images/s). With --output_dir it writes evaluation_results.json,
evaluation_per_class.csv, evaluation_confusion.png (the most confused class pairs) and evaluation_iou.png (IoU per
class). Written into the model folder, evaluation_results.json goes onto the model card (model-index) when
push_to_hub.py publishes the model. The script is not named evaluate.py: that would shadow the `evaluate` library
for every script in this folder.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from proto_segformer.cli import exit_if_write_failure, parse, run_main
from proto_segformer.preflight import check_failed


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "Model folder (training output, checkpoint-*, assembled repo) or Hub id."})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Any data train.py reads: a built-in name (scenes, voc, ...; builtin:<name>), a Hub id, a"
            " save_to_disk folder, a parquet folder or an ADE20K-style folder. Default: builtin:scenes."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub data set configuration."})
    split: str = field(default="validation", metadata={"help": "The split to evaluate (train, validation, test)."})
    mode: str = field(
        default="whole",
        metadata={
            "help": "whole (each image as the image processor gives it: full size as train.py evaluates) or slide"
            " (sliding windows of the training crop, mmsegmentation's slide mode).",
            "choices": ["whole", "slide"],
        },
    )
    scales: list[float] = field(
        default_factory=lambda: [1.0],
        metadata={"help": "Test-time resize ratios, e.g. 0.5 0.75 1.0 1.25 1.5 1.75 (softmax scores averaged)."},
    )
    flip: bool = field(default=False, metadata={"help": "Test-time augmentation: add each scale's flipped view."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Folder for the JSON, CSV and pictures (the model folder: onto its card)."}
    )
    batch_size: int = field(default=4, metadata={"help": "Images (whole mode) or windows (slide) per forward pass."})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or auto."})
    crop_size: int | None = field(
        default=None, metadata={"help": "Sliding window side (default: the training crop recorded with the model)."}
    )
    stride: int | None = field(default=None, metadata={"help": "Sliding window step (default: 2/3 of the crop)."})
    reduce_labels: bool | None = field(
        default=None,
        metadata={"help": "ADE20K labels (0 ignored, others - 1). Default: as the model's image processor says."},
    )
    id2label: str | None = field(
        default=None,
        metadata={
            "help": "json file with the data's class names, when the data set holds none (checked against the model's)."
        },
    )
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (default: found by name)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (default: found by name)."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N samples."})
    check_samples: int = field(
        default=200, metadata={"help": "Samples checked before evaluating (files, sizes, label values); -1: all."}
    )
    train_val_split: float = field(
        default=0.15, metadata={"help": "A data set without validation split: the part of train held out, as train.py."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of that hold-out (train.py's --seed)."})
    builtin_image_size: int | None = field(
        default=None, metadata={"help": "Built-in data: image side (default: the model's training crop, else 64)."}
    )
    builtin_num_validation: int = field(default=200, metadata={"help": "Built-in data: validation images."})
    builtin_seed: int = field(default=0, metadata={"help": "Built-in data: seed of the generated images."})
    reject_unknown: bool = field(
        default=False,
        metadata={
            "help": "Reject pixels far from every prototype (max_similarity below the model's calibrated threshold) as"
            " unknown: they count as missed, and the report says what fraction of the labelled pixels was rejected."
        },
    )
    unknown_threshold: float | None = field(
        default=None, metadata={"help": "With --reject_unknown: this threshold in [-1, 1] instead of the model's."}
    )
    top_confusions: int = field(default=20, metadata={"help": "Pairs shown in evaluation_confusion.png."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bar."})


def check_arguments(args: EvaluateArguments) -> None:
    """Paths, options and output files, before torch loads."""
    import os

    from proto_segformer.output_folders import check_output_folder
    from proto_segformer.preflight import check_dataset_name, check_existing, check_model_folder
    from proto_segformer.test_time_augmentation import check_scales

    check_scales(args.scales)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}.")
    if os.path.exists(os.path.expanduser(args.model)) or "/" not in args.model or args.model.startswith("."):
        check_model_folder(args.model)
    check_dataset_name(args.dataset_name)
    if args.id2label is not None:
        check_existing(args.id2label, "--id2label", kind="file")
    if args.output_dir is not None:
        from proto_segformer.evaluation import check_output_files

        check_output_folder(args.output_dir, "--output_dir")
        check_output_files(args.output_dir)


def main(argv: list[str] | None = None) -> int:
    (args,) = parse(EvaluateArguments, argv, description=__doc__)
    if check_failed(check_arguments, args):
        return 2

    import torch

    from proto_segformer.checkpoint import CheckpointError
    from proto_segformer.evaluation import (
        evaluate_model_folder,
        evaluation_report,
        format_table,
        summary_line,
        write_report,
    )

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        result, id2label = evaluate_model_folder(args)
    except (CheckpointError, ValueError, OSError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = evaluation_report(result, id2label)
    print(format_table(report))
    print(summary_line(report))
    if args.output_dir is not None:
        try:
            write_report(args.output_dir, report, result.matrix, id2label, top=args.top_confusions)
        except Exception as error:
            exit_if_write_failure(error, args.output_dir, "the evaluation report", "Nothing else was changed.")
            raise
        print(f"Report: {args.output_dir} (evaluation_results.json, evaluation_per_class.csv, pictures)")
    return 0


if __name__ == "__main__":
    run_main(main, interrupted="interrupted; nothing was written.")
