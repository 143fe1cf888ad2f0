"""Draw the prototype atlas of a trained ProtoSegformer and measure unused / near-duplicate prototypes.

    python scripts/visualize_prototypes.py --model runs/scenes --dataset scenes --num_images 64 \
        --output runs/scenes/prototype_atlas.png

One PNG grid: a row per class, a column per prototype, each cell the image patch(es) whose pixel of that class is
nearest to the prototype, captioned with the prototype's share of its class's pixels ("unused" in red when it is
never the nearest). Also writes the statistics as JSON (default: prototype_stats.json next to the picture), which
the model card reads when it sits in the model folder (--stats_output <model>/prototype_stats.json).

With --patches_output <model>/prototype_patches.safetensors it also stores, for case-based explanations, the
--patches_per_prototype best patches of every prototype (small JPEGs, their sources and similarities, fingerprints of
the prototypes and network: proto_segformer/explanations.py), from training images (the train split, unless --split
says otherwise): predict --explain_pixel / --explain_class and the Space show them beside a decision; push_to_hub
ships the file.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from proto_segformer.cli import exit_if_write_failure, parse, run_main
from proto_segformer.preflight import check_failed


@dataclass
class AtlasArguments:
    model: str = field(metadata={"help": "Checkpoint folder (training output or checkpoint-*)."})
    output: str = field(default="prototype_atlas.png", metadata={"help": "Path of the atlas PNG."})
    dataset: str = field(
        default="scenes",
        metadata={
            "help": "Built-in data set name (scenes, voc, ...; or builtin:<name>), or a folder saved with datasets'"
            " save_to_disk (image/label)."
        },
    )
    split: str | None = field(
        default=None,
        metadata={
            "help": "Split of the data set (default: train with --patches_output, whose patches explain decisions by"
            " training images; validation otherwise)."
        },
    )
    num_images: int = field(default=64, metadata={"help": "Images used (the first N of the split)."})
    image_size: int | None = field(
        default=None,
        metadata={"help": "Built-in data: image side (default: the model's training crop; 64 if none is recorded)."},
    )
    images: list[str] = field(
        default_factory=list, metadata={"help": "Unlabelled images/folders/globs instead of a data set."}
    )
    top_n: int = field(default=1, metadata={"help": "Patches per prototype (from different images)."})
    patch_size: int = field(default=64, metadata={"help": "Displayed patch side in pixels."})
    max_classes: int | None = field(default=None, metadata={"help": "Only the first N classes (rows)."})
    stats_output: str | None = field(default=None, metadata={"help": "JSON statistics path."})
    patches_output: str | None = field(
        default=None,
        metadata={
            "help": "Also store each prototype's best patches here, for explanations (e.g."
            " <model>/prototype_patches.safetensors; from the train split unless --split says otherwise)."
        },
    )
    patches_per_prototype: int = field(default=3, metadata={"help": "Patches stored per prototype (--patches_output)."})
    batch_size: int = field(default=4, metadata={"help": "Images per forward pass."})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or auto."})
    seed: int = field(default=0, metadata={"help": "Seed of the built-in data."})


# The built-in data's own image side (scripts/train.py --builtin_image_size), for a model that records no crop.
BUILTIN_IMAGE_SIZE = 64


def builtin_image_size(args: AtlasArguments) -> int:
    """--image_size, else the crop the model was trained on: a model trained on 64-pixel scenes sees 64-pixel
    scenes (its saved processor does not resize, and its `size` of 512 is not the training crop)."""
    from proto_segformer.training_crop import training_crop_size

    return args.image_size or training_crop_size(args.model) or BUILTIN_IMAGE_SIZE


def load_samples(args: AtlasArguments):
    """(samples, description, sources) for the atlas: `sources` names each sample (a file name, or the data set's
    split and row)."""
    from proto_segformer.prediction_files import collect_inputs, read_image
    from proto_segformer.visualization import DatasetSamples

    if args.images:
        images, names = [], []
        for path in collect_inputs(args.images):
            try:
                images.append((read_image(path), None))
                names.append(path.name)
            except OSError as error:
                logging.warning("Skipping %s: %s", path, error)
        count = len(images[: args.num_images])
        return DatasetSamples(images[:count]), f"{count} unlabelled images", names[:count]
    if Path(args.dataset).is_dir():
        import datasets

        data = datasets.load_from_disk(args.dataset)
        data = data[args.split] if isinstance(data, datasets.DatasetDict) else data
        data = data.select(range(min(args.num_images, len(data))))
        names = [f"{Path(args.dataset).name} {args.split}[{index}]" for index in range(len(data))]
        return DatasetSamples(data), f"{len(data)} images of {args.dataset} ({args.split})", names
    from proto_segformer.data import build_builtin_dataset
    from proto_segformer.preflight import builtin_dataset

    size = builtin_image_size(args)
    data, _ = build_builtin_dataset(
        builtin_dataset(args.dataset) or args.dataset,
        num_train=args.num_images if args.split == "train" else 1,
        num_validation=args.num_images,
        image_size=size,
        seed=args.seed,
    )
    split = data[args.split].select(range(min(args.num_images, len(data[args.split]))))
    description = f"{len(split)} {args.split} images ({size}x{size}) of the built-in '{args.dataset}' data"
    names = [f"built-in {args.dataset} {args.split}[{index}] (seed {args.seed})" for index in range(len(split))]
    return DatasetSamples(split), description, names


def stats_path(args: AtlasArguments) -> Path:
    return Path(args.stats_output) if args.stats_output else Path(args.output).with_name("prototype_stats.json")


def check_paths(args: AtlasArguments) -> None:
    """The model folder, the images or data set, and the folders of the outputs, before torch loads."""
    from proto_segformer.output_folders import check_output_folder
    from proto_segformer.preflight import PathError, check_dataset_folder, check_input_paths, check_model_folder

    check_model_folder(args.model)
    if args.images:
        check_input_paths(args.images, "--images")
    else:
        check_dataset_folder(args.dataset, "--dataset")
    if Path(args.output).is_dir():
        raise PathError(f"--output {args.output} is a folder; give the path of the PNG to write.")
    check_output_folder(Path(args.output).parent, "--output")
    check_output_folder(stats_path(args).parent, "--stats_output")
    if args.patches_output is not None:
        if Path(args.patches_output).is_dir():
            raise PathError(f"--patches_output {args.patches_output} is a folder; give the path of the file to write.")
        check_output_folder(Path(args.patches_output).parent, "--patches_output")
    if args.patches_per_prototype < 1:
        raise PathError(f"--patches_per_prototype must be at least 1, got {args.patches_per_prototype}.")


def main(argv: list[str] | None = None) -> int:
    (args,) = parse(AtlasArguments, argv, description=__doc__)
    if args.split is None:
        args.split = "train" if args.patches_output is not None else "validation"
    if check_failed(check_paths, args):
        return 2

    from PIL import Image

    from proto_segformer.checkpoint import CheckpointError, load_image_processor, load_model, validate_checkpoint
    from proto_segformer.explanations import collect_prototype_patches, write_prototype_patches
    from proto_segformer.safe_files import atomic_write, atomic_write_text
    from proto_segformer.segmenter import resolve_device
    from proto_segformer.visualization import build_prototype_atlas

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        checkpoint = validate_checkpoint(args.model)  # read and checked once
        model = load_model(checkpoint, device=resolve_device(args.device))
        processor = load_image_processor(checkpoint)
        samples, description, sources = load_samples(args)
        num_classes = model.prototypes.shape[0]
        classes = list(range(min(num_classes, args.max_classes))) if args.max_classes else None
        result = build_prototype_atlas(
            model,
            processor,
            samples,
            top_n=args.top_n,
            patch_size=args.patch_size,
            batch_size=args.batch_size,
            classes=classes,
            data_description=description,
            progress=True,
        )
        patches = None
        if args.patches_output is not None:
            patches = collect_prototype_patches(
                model,
                result.matches,
                samples,
                sources,
                {int(k): str(v) for k, v in model.config.id2label.items()},
                top_n=args.patches_per_prototype,
                data_description=description,
            )
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output, stats_file = Path(args.output), stats_path(args)
    try:
        for path in (output, stats_file):
            path.parent.mkdir(parents=True, exist_ok=True)
        image_format = Image.registered_extensions().get(output.suffix.lower(), "PNG")
        atomic_write(output, lambda temporary: result.image.save(temporary, format=image_format, optimize=True))
        atomic_write_text(stats_file, json.dumps(result.statistics, indent=2) + "\n")
        if patches is not None:
            write_prototype_patches(args.patches_output, patches)
    except Exception as error:  # each file is written aside and renamed into place
        exit_if_write_failure(error, str(output.parent), "the atlas", "Files there before are unchanged.")
        raise
    stats, usage = result.statistics, result.statistics["usage"]
    print(f"Atlas: {output} ({result.image.width}x{result.image.height}); statistics: {stats_file}")
    print(
        f"{stats['num_classes']} classes x {stats['num_prototypes_per_class']} prototypes on {description}:"
        f" unused {usage['unused_count']}, near-duplicates (cosine > {stats['near_duplicate_threshold']})"
        f" {len(stats['near_duplicates'])}, mean effective prototypes per class {usage['mean_effective_prototypes']}."
    )
    if patches is not None:
        size = Path(args.patches_output).stat().st_size
        print(
            f"Patches for explanations: {args.patches_output} ({len(patches.entries)} patches of"
            f" {len({e.fingerprint for e in patches.entries})} prototypes, {size / 1024:.0f} KiB)."
        )
    return 0


if __name__ == "__main__":
    run_main(main)
