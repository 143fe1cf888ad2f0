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
from proto_segformer.evaluation_arguments import LabelledDataArguments, check_labelled_data_arguments
from proto_segformer.preflight import check_failed


@dataclass
class CalibrateArguments(LabelledDataArguments):
    accepted_fraction: float = field(
        default=0.95, metadata={"help": "Fraction of the labelled pixels the threshold accepts, in (0, 1]."}
    )


def check_arguments(args: CalibrateArguments) -> None:
    """Paths and options, before torch loads."""
    from proto_segformer.unknown import check_accepted_fraction

    check_accepted_fraction(args.accepted_fraction)
    check_labelled_data_arguments(args)


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
