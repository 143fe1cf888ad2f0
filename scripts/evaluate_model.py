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
from proto_segformer.evaluation_arguments import LabelledDataArguments, check_labelled_data_arguments
from proto_segformer.preflight import check_failed


@dataclass
class EvaluateArguments(LabelledDataArguments):
    scales: list[float] = field(
        default_factory=lambda: [1.0],
        metadata={"help": "Test-time resize ratios, e.g. 0.5 0.75 1.0 1.25 1.5 1.75 (softmax scores averaged)."},
    )
    flip: bool = field(default=False, metadata={"help": "Test-time augmentation: add each scale's flipped view."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Folder for the JSON, CSV and pictures (the model folder: onto its card)."}
    )
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
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bar."})


def check_arguments(args: EvaluateArguments) -> None:
    """Paths, options and output files, before torch loads."""
    from proto_segformer.output_folders import check_output_folder
    from proto_segformer.test_time_augmentation import check_scales

    check_scales(args.scales)
    check_labelled_data_arguments(args, hub_ids=True)
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
