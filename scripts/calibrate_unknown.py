"""Calibrate a trained model's unknown-pixel threshold on labelled data, and store it in its config.json.

    python scripts/calibrate_unknown.py --model runs/demo --dataset_name scenes
    python scripts/calibrate_unknown.py --model runs/ade --dataset_name path/to/ade_like_folder --split validation \
        --accepted_fraction 0.95 --mode slide

Runs the model over the split exactly as predict does (same resizing, sliding windows, upsampling) and counts the
unknown score `max_similarity` (the largest cosine similarity of a pixel to any prototype) of every labelled pixel in
a fine histogram (flat memory); the threshold accepts --accepted_fraction of them (default 95 %). It is written into
the model folder's config.json (`unknown_threshold`, and `unknown_calibration`: split, fraction, pixel count, date),
replacing that file in one step; nothing else is touched, and on any error nothing is written. Then
`predict.py --reject_unknown`, `evaluate_model.py --reject_unknown`, the endpoint handler and the Space can reject
unknown pixels. train.py calibrates on its validation split at the end of training by itself.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from proto_segformer.cli import exit_if_write_failure, parse, run_main
from proto_segformer.preflight import check_failed


@dataclass
class CalibrateArguments:
    model: str = field(metadata={"help": "Local model folder (training output, checkpoint-*, assembled repo)."})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Any data train.py reads: a built-in name (scenes, voc, ...; builtin:<name>), a Hub id, a"
            " save_to_disk folder, a parquet folder or an ADE20K-style folder. Default: builtin:scenes."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub data set configuration."})
    split: str = field(default="validation", metadata={"help": "The labelled split to calibrate on."})
    accepted_fraction: float = field(
        default=0.95, metadata={"help": "Fraction of the labelled pixels the threshold accepts, in (0, 1]."}
    )
    mode: str = field(
        default="whole",
        metadata={"help": "whole (the image processor's resize) or slide (as predict).", "choices": ["whole", "slide"]},
    )
    batch_size: int = field(default=4, metadata={"help": "Images (whole mode) or windows (slide) per forward pass."})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or auto."})
    crop_size: int | None = field(default=None, metadata={"help": "Sliding window side (default: the training crop)."})
    stride: int | None = field(default=None, metadata={"help": "Sliding window step (default: 2/3 of the crop)."})
    reduce_labels: bool | None = field(
        default=None, metadata={"help": "Labels start at 1 (0 = ignore). Default: as the model's image processor."}
    )
    id2label: str | None = field(default=None, metadata={"help": "json file with the data's class names."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (default: found by name)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (default: found by name)."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N samples."})
    check_samples: int = field(default=200, metadata={"help": "Samples checked before the run (-1: all)."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Held-out fraction of train when the data has no validation split."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of that hold-out (train.py's --seed)."})
    builtin_image_size: int | None = field(default=None, metadata={"help": "Built-in data: image side."})
    builtin_num_validation: int = field(default=200, metadata={"help": "Built-in data: validation images."})
    builtin_seed: int = field(default=0, metadata={"help": "Built-in data: seed of the generated images."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})


def check_arguments(args: CalibrateArguments) -> None:
    """Paths and options, before torch loads."""
    from proto_segformer.preflight import check_dataset_name, check_existing, check_model_folder
    from proto_segformer.unknown import check_accepted_fraction

    check_accepted_fraction(args.accepted_fraction)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}.")
    check_model_folder(args.model)
    check_dataset_name(args.dataset_name)
    if args.id2label is not None:
        check_existing(args.id2label, "--id2label", kind="file")


def main(argv: list[str] | None = None) -> int:
    (args,) = parse(CalibrateArguments, argv, description=__doc__)
    if check_failed(check_arguments, args):
        return 2

    import torch

    from proto_segformer.checkpoint import CheckpointError
    from proto_segformer.unknown import describe_calibration
    from proto_segformer.unknown_calibration import calibrate_model_folder

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        config, path = calibrate_model_folder(args)
    except (CheckpointError, ValueError, OSError, ImportError) as error:
        if isinstance(error, OSError):
            exit_if_write_failure(error, args.model, "config.json", "The model folder is unchanged.")
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Calibrated: {describe_calibration(config)}. Written to {path}.")
    return 0


if __name__ == "__main__":
    run_main(main, interrupted="interrupted; nothing was written.")
