"""Predict label maps, colour overlays and (optionally) prototype assignment maps for images, globs or folders.

    python scripts/predict.py --model runs/scenes --inputs photos/ "more/*.jpg" --output_dir predictions \
        --prototype_maps --device cpu --batch_size 4

For each image: <name>_label.png (palette PNG, value = class index), <name>_overlay.jpg (classes over the image,
with a legend; with --reject_unknown, pixels unlike anything the model was trained on get 255 in the label PNG and
a light neutral "unknown" colour in the overlay and its legend) and with --prototype_maps <name>_prototype.png
(value = index of the predicted class's prototype the pixel matched; 16-bit for more than 256 prototypes) and
<name>_prototype_overlay.jpg (with a legend of the shades).
Every output has its image's size. Images larger than the sliding window go through sliding-window inference (--mode
auto); the window is the crop the model was trained on (see --crop_size). Images smaller than the encoder accepts
are padded and the result cropped back. Files that are not readable images, or that fail, are skipped with their
reason and counted at the end; the run goes on.
With --backend onnxruntime, --model is a folder written by scripts/export_onnx.py (label maps and overlays only, on
the CPU; prototype maps need the PyTorch backend). Outputs never replace an input, a file that an earlier prediction
did not write, or one changed since (the output folder's .proto_segformer_predictions.json lists what prediction
wrote there with each file's SHA-256): the run then stops before writing anything and names the files.
With --explain_pixel X,Y or --explain_class NAME, each image also gets <name>_explanation.png and .json: the class and
the prototype that won at that pixel (or for that class: the prototype most of its pixels matched), the cosine
similarity, and the training patches of that prototype from the model's prototype_patches.safetensors (written by
scripts/visualize_prototypes.py --patches_output; a stale file is refused with the command that writes it again).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from proto_segformer.cli import exit_if_write_failure, parse, run_main
from proto_segformer.preflight import check_failed


@dataclass
class PredictArguments:
    model: str = field(metadata={"help": "Checkpoint folder (training output or checkpoint-*, or an assembled repo)."})
    inputs: list[str] = field(metadata={"help": "Image files, folders and/or glob patterns (quote globs)."})
    output_dir: str = field(metadata={"help": "Folder for the outputs (created if needed)."})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or auto."})
    backend: str = field(
        default="pytorch",
        metadata={
            "help": "pytorch (a checkpoint folder) or onnxruntime (a folder from scripts/export_onnx.py; CPU).",
            "choices": ["pytorch", "onnxruntime"],
        },
    )
    batch_size: int = field(default=4, metadata={"help": "Images (whole mode) or windows (slide mode) per forward."})
    mode: str = field(
        default="auto",
        metadata={
            "help": "auto (slide when larger than the crop), whole (resize) or slide.",
            "choices": ["auto", "whole", "slide"],
        },
    )
    crop_size: int | None = field(
        default=None,
        metadata={
            "help": "Sliding window side. Default: the training crop: crop_size recorded in the model's"
            " model_card_inputs.json or training_args.json (train.py writes it), else the image processor's size if"
            " it resizes, else 512 (train.py's default crop; a warning says so)."
        },
    )
    stride: int | None = field(default=None, metadata={"help": "Sliding window step (default: 2/3 of the crop)."})
    prototype_maps: bool = field(default=False, metadata={"help": "Also write prototype assignment maps."})
    similarity_dtype: str | None = field(
        default=None,
        metadata={
            "help": "bfloat16: the head's similarity in bf16 (faster on bf16 matrix units; README). Default: float32."
        },
    )
    explain_pixel: str | None = field(
        default=None,
        metadata={
            "help": "X,Y: explain this pixel (column, row from the top-left) of every image (needs the patches)."
        },
    )
    explain_class: str | None = field(
        default=None, metadata={"help": "Explain this class of every image: the prototype that won for its pixels."}
    )
    patches: str | None = field(
        default=None,
        metadata={
            "help": "The prototype patches file for explanations (default: <model>/prototype_patches.safetensors)."
        },
    )
    reject_unknown: bool = field(
        default=False,
        metadata={
            "help": "Label pixels far from every prototype (max_similarity below the model's calibrated"
            " unknown_threshold) as unknown: the ignore value 255 in the label PNG, grey in the overlay and its legend."
            " Needs a calibrated model (scripts/calibrate_unknown.py)."
        },
    )
    unknown_threshold: float | None = field(
        default=None, metadata={"help": "With --reject_unknown: this threshold in [-1, 1] instead of the model's."}
    )
    recursive: bool = field(default=False, metadata={"help": "Descend into sub-folders of input folders."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bar."})


def check_paths(args: PredictArguments) -> None:
    """The model folder, the inputs and the output folder, before torch loads."""
    from proto_segformer.output_folders import check_output_folder
    from proto_segformer.preflight import check_input_paths, check_model_folder

    check_model_folder(args.model)
    check_input_paths(args.inputs)
    check_output_folder(args.output_dir, "--output_dir")
    if args.explain_pixel is not None or args.explain_class is not None:
        from pathlib import Path

        from proto_segformer.explanations import PATCHES_FILE, REWRITE_HINT, parse_pixel
        from proto_segformer.preflight import PathError

        if args.explain_pixel is not None and args.explain_class is not None:
            raise PathError("Give --explain_pixel or --explain_class, not both.")
        if args.backend != "pytorch":
            raise PathError("Explanations need the PyTorch backend (the embeddings and prototypes); drop --backend.")
        try:
            if args.explain_pixel is not None:
                parse_pixel(args.explain_pixel)
        except ValueError as error:
            raise PathError(str(error)) from None
        patches = Path(args.patches or Path(args.model) / PATCHES_FILE)
        if not patches.is_file():
            raise PathError(f"Explanations need the prototype patches: {patches} is not a file; {REWRITE_HINT}.")


def main(argv: list[str] | None = None) -> int:
    (args,) = parse(PredictArguments, argv, description=__doc__)
    if check_failed(check_paths, args):
        return 2

    import torch

    from proto_segformer.checkpoint import CheckpointError
    from proto_segformer.explanations import PATCHES_FILE, Explainer
    from proto_segformer.prediction_files import collect_inputs, predict_files, prepare_outputs
    from proto_segformer.segmenter import InferenceOptions, Segmenter

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        square = lambda side: (side, side) if side else None  # noqa: E731
        options = InferenceOptions(
            mode=args.mode,
            crop_size=square(args.crop_size),
            stride=square(args.stride),
            batch_size=args.batch_size,
            prototype_maps=args.prototype_maps,
            similarity_dtype=args.similarity_dtype,
            reject_unknown=args.reject_unknown,
            unknown_threshold=args.unknown_threshold,
        )
        paths = collect_inputs(args.inputs, recursive=args.recursive)
        if not paths:
            print("error: no input files found.", file=sys.stderr)
            return 2
        explain = args.explain_pixel is not None or args.explain_class is not None
        plan = prepare_outputs(paths, args.output_dir, args.prototype_maps, explain)  # once, before the model loads
        segmenter = Segmenter.from_pretrained(args.model, device=args.device, options=options, backend=args.backend)
        explainer = None
        if explain:  # the class name and the patches file checked before any image is predicted
            patches = args.patches or f"{args.model}/{PATCHES_FILE}"
            explainer = Explainer.for_segmenter(segmenter, patches, args.explain_pixel, args.explain_class)
    except (CheckpointError, FileNotFoundError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        summary = predict_files(
            segmenter, paths, args.output_dir, progress=not args.no_progress, plan=plan, explainer=explainer
        )
    except Exception as error:
        intact = "The outputs written before are complete (each file is written whole); free some space and run the"
        exit_if_write_failure(error, args.output_dir, "the predictions", f"{intact} same command again.")
        raise
    print(
        f"Predicted {len(summary.written)} image(s) into {args.output_dir} in {summary.seconds:.1f} s"
        f" ({summary.images_per_second:.2f} images/s on {args.device})."
    )
    if summary.skipped:
        print(f"Skipped {len(summary.skipped)} file(s):")
        for path, reason in summary.skipped:
            print(f"  {path}: {reason}")
    return 0 if summary.written else 1


if __name__ == "__main__":
    run_main(main, interrupted="interrupted; the outputs written so far are complete, each file whole.")
