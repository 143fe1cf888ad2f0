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
neighbour), otherwise normalised with the ImageNet mean/std at their own size or at --image_size. The extended model
(and the image processor) are written to --output_dir; they load like any other checkpoint.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from proto_segformer.cli import parse

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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


def support_pairs(support_dir: str | Path) -> list[tuple[Path, Path]]:
    """(image path, mask path) pairs of a support folder, sorted by name; errors on missing or unmatched files."""
    root = Path(support_dir)
    image_dir, mask_dir = root / "images", root / "masks"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: the support folder needs images/ and masks/.")
    images = {path.stem: path for path in image_dir.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES}
    masks = {path.stem: path for path in mask_dir.iterdir() if path.suffix.lower() == ".png"}
    if not images:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}.")
    without_mask = sorted(set(images) - set(masks))
    without_image = sorted(set(masks) - set(images))
    if without_mask or without_image:
        raise ValueError(
            f"Unmatched support files: images without a mask {without_mask[:10]}, masks without an image"
            f" {without_image[:10]} (files are matched by name without extension)."
        )
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def load_processor(model_dir: str | Path):
    """The model folder's image processor, or None when it has no preprocessor_config.json."""
    if not (Path(model_dir) / "preprocessor_config.json").exists():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(model_dir)


def main(args: AddClassesArguments) -> dict[str, int]:
    from PIL import Image

    from proto_segformer import ProtoSegformerForSemanticSegmentation

    pairs = support_pairs(args.support_dir)
    images = [Image.open(image_path).convert("RGB") for image_path, _ in pairs]
    masks = [Image.open(mask_path) for _, mask_path in pairs]
    for (_, mask_path), mask in zip(pairs, masks):
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{mask_path} has mode {mask.mode!r}; masks must be single-channel (L, P or I) PNGs.")
    model = ProtoSegformerForSemanticSegmentation.from_pretrained(args.model_dir)
    processor = load_processor(args.model_dir)
    try:
        new_ids = add_support(model, processor, images, masks, pairs, args)
    except ValueError as error:
        order = ", ".join(image_path.stem for image_path, _ in pairs[:10])
        raise ValueError(f"{error} (images[i]/masks[i] are the support files in name order: {order})") from error
    model.save_pretrained(args.output_dir)
    if processor is not None:
        processor.save_pretrained(args.output_dir)
    print(json.dumps({"output_dir": args.output_dir, "new_class_ids": new_ids, "num_labels": model.config.num_labels}))
    return new_ids


def add_support(model, processor, images, masks, pairs, args: AddClassesArguments) -> dict[str, int]:
    """Prepare the support images like at inference and add the classes to `model`; returns {name: id}."""
    options = {"max_pixels_per_class": args.max_pixels_per_class, "seed": args.seed}
    if args.min_cell_fraction is not None:
        options["min_cell_fraction"] = args.min_cell_fraction
    if processor is not None and args.image_size is None:
        for (image_path, _), image, mask in zip(pairs, images, masks):
            if image.size != mask.size:
                raise ValueError(f"{image_path.name} is {image.size} (w, h) but its mask is {mask.size}.")
        processed = [
            processor(images=image, segmentation_maps=mask, do_reduce_labels=False, return_tensors="pt")
            for image, mask in zip(images, masks)
        ]
        pixel_values = [batch["pixel_values"][0] for batch in processed]
        labels = [batch["labels"][0] for batch in processed]
        return model.add_classes(pixel_values, labels, args.names, **options)
    size = None if args.image_size is None else (args.image_size, args.image_size)
    return model.add_classes(images, masks, args.names, image_size=size, **options)


if __name__ == "__main__":
    (arguments,) = parse(AddClassesArguments, description=__doc__)
    try:
        main(arguments)
    except (FileNotFoundError, ValueError, OSError) as error:  # user input: one paragraph, no stack trace
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
