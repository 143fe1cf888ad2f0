"""Export a trained ProtoSegformer to ONNX, with its configs, for ONNX Runtime.

    python scripts/export_onnx.py --model runs/demo --output_dir runs/demo-onnx

Writes model.onnx (input pixel_values (B, 3, H, W) float32, output logits (B, K, H/4, W/4); batch, height and width
dynamic, height and width >= 61), config.json (id2label) and preprocessor_config.json into --output_dir, atomically;
an existing folder is replaced only if an earlier export wrote it. Run it with
`python scripts/predict.py --backend onnxruntime --model runs/demo-onnx ...`. Needs `pip install ".[onnx]"`.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from proto_segformer.cli import exit_if_write_failure, parse, run_main
from proto_segformer.preflight import check_failed

# What the export does and how long it takes (README, Export section: measured on the demo model).
EXPORTING = (
    "Exporting {model}: torch.export traces the model, then torch.onnx converts the program to ONNX (the demo's"
    " mit-b0: about 45 s of CPU time, 2-4 min on a busy 2-core machine) ..."
)


@dataclass
class ExportArguments:
    model: str = field(metadata={"help": "Checkpoint folder (training output or checkpoint-*, or an assembled repo)."})
    output_dir: str = field(metadata={"help": "Folder for model.onnx and the configs (new, empty or an export)."})


def check_paths(args: ExportArguments) -> None:
    """The model folder and the output folder (with room for about the model's size), before torch loads."""
    from proto_segformer.output_folders import check_output_folder, folder_weights_bytes
    from proto_segformer.preflight import check_model_folder

    check_model_folder(args.model)
    check_output_folder(args.output_dir, "--output_dir", need_bytes=folder_weights_bytes(args.model))


def main(argv: list[str] | None = None) -> int:
    (args,) = parse(ExportArguments, argv, description=__doc__)
    if check_failed(check_paths, args):
        return 2

    from proto_segformer.checkpoint import CheckpointError, load_image_processor, load_model, validate_checkpoint
    from proto_segformer.export import ExportError, write_onnx_folder

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    started = time.monotonic()
    try:
        checkpoint = validate_checkpoint(args.model)  # read and checked once
        model = load_model(checkpoint)
        print(EXPORTING.format(model=args.model), flush=True)
        crop = checkpoint.training_crop  # kept: predict's sliding window is the training crop
        processor = load_image_processor(checkpoint)
        folder = write_onnx_folder(model, processor, args.output_dir, training_crop=crop[0] if crop else None)
    except (CheckpointError, ExportError, ImportError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # the export is assembled aside and moved into place when complete
        exit_if_write_failure(error, args.output_dir, "the ONNX export", f"{args.output_dir} is unchanged.")
        raise
    minutes, seconds = divmod(round(time.monotonic() - started), 60)
    print(f"Wrote {folder}/model.onnx with config.json and preprocessor_config.json in {minutes} min {seconds} s.")
    return 0


if __name__ == "__main__":
    run_main(main, interrupted="interrupted; the output folder is unchanged.")
