"""Add classes to a trained ProtoSegformer model from a folder of labelled images, without training.

Folder layout (files matched by name without extension):

    SUPPORT_DIR/images/<stem>.jpg|.jpeg|.png|.bmp|.webp   the support images
    SUPPORT_DIR/masks/<stem>.png                          single-channel masks at image resolution:
                                                          value i + 1 = the i-th of --names, 0 = leave out

Example:

    python scripts/add_classes.py --model_dir runs/scenes --support_dir support/ \
        --names "digit 7" "digit 8" --output_dir runs/scenes-plus

The support images are prepared as the model sees images at inference: with the model folder's image processor
(preprocessor_config.json) when there is one (its resize, rescale and normalisation; masks resized by nearest
neighbour), otherwise normalised with the ImageNet mean/std at their own size or at --image_size. The extended model,
the image processor and a model card listing the added classes are written to --output_dir in one step (a crash
leaves the old folder or the new one); replacing an existing model (--output_dir = --model_dir) needs
--overwrite_model. The logic lives in proto_segformer/add_classes.py.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from proto_segformer.cli import exit_if_write_failure, exit_interrupted, parse
from proto_segformer.preflight import check_failed


@dataclass
class AddClassesArguments:
    model_dir: str = field(metadata={"help": "Folder of the trained model (save_pretrained output)."})
    support_dir: str = field(metadata={"help": "Folder with images/ and masks/ subfolders (see the module doc)."})
    names: list[str] = field(metadata={"help": "New class names; mask value i + 1 marks names[i].", "nargs": "+"})
    output_dir: str = field(metadata={"help": "Where to save the extended model."})
    image_size: int | None = field(
        default=None,
        metadata={"help": "Resize support images to this square size; default: the model folder's image processor."},
    )
    min_cell_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of a 4x4 cell's pixels that must carry a class for the cell to count"
            " (default: the library's DEFAULT_MIN_CELL_FRACTION, 0.75)."
        },
    )
    max_pixels_per_class: int = field(default=20000, metadata={"help": "Support cells per class used (a sample)."})
    seed: int = field(default=0, metadata={"help": "Seed of the clustering."})
    overwrite_model: bool = field(
        default=False,
        metadata={"help": "Allow replacing the model in --output_dir (e.g. = --model_dir); its other files are kept."},
    )


def check_paths(args: AddClassesArguments) -> None:
    """The model and support folders and the output folder (with room for the model), before torch loads."""
    from proto_segformer.output_folders import check_output_folder, folder_weights_bytes
    from proto_segformer.preflight import check_model_folder

    check_model_folder(args.model_dir, "--model_dir")
    check_model_folder(args.support_dir, "--support_dir")
    check_output_folder(args.output_dir, "--output_dir", need_bytes=folder_weights_bytes(args.model_dir))


def main(args: AddClassesArguments) -> dict[str, int]:
    from proto_segformer.add_classes import AddClassesSettings, add_classes_from_folder

    fraction = {} if args.min_cell_fraction is None else {"min_cell_fraction": args.min_cell_fraction}
    settings = AddClassesSettings(
        image_size=args.image_size,
        **fraction,
        max_pixels_per_class=args.max_pixels_per_class,
        seed=args.seed,
    )
    new_ids = add_classes_from_folder(
        args.model_dir,
        args.support_dir,
        args.names,
        args.output_dir,
        settings=settings,
        overwrite_model=args.overwrite_model,
    )
    print(json.dumps({"output_dir": args.output_dir, "new_class_ids": new_ids}))
    return new_ids


def run(argv: list[str] | None = None) -> int:
    """The command line: checks, then `main`; every failure a user can cause is one line (exit 2, 1 for a failed
    write, 130 for Ctrl-C)."""
    (arguments,) = parse(AddClassesArguments, argv, description=__doc__)
    if check_failed(check_paths, arguments):
        return 2
    try:
        from proto_segformer.add_classes import AddClassesError
        from proto_segformer.checkpoint import CheckpointError

        try:
            main(arguments)
        except Exception as error:  # the model is written aside and moved into place in one step
            exit_if_write_failure(
                error, arguments.output_dir, "the extended model", "The existing files are unchanged."
            )
            if not isinstance(error, (AddClassesError, CheckpointError, OSError, ValueError)):
                raise
            print(f"error: {error}", file=sys.stderr)  # user input: one line, no stack trace
            return 2
    except KeyboardInterrupt:
        exit_interrupted("interrupted; the existing files are unchanged.")
    return 0


if __name__ == "__main__":
    sys.exit(run())
