"""Add classes to a saved ProtoSegformer from a folder of labelled support images, and save the result safely.

The logic behind `scripts/add_classes.py`. Support folder layout (files matched by name without extension):

    SUPPORT_DIR/images/<stem>.jpg|.jpeg|.png|.bmp|.webp   the support images
    SUPPORT_DIR/masks/<stem>.png                          single-channel masks at image resolution:
                                                          value i + 1 = the i-th of `names`, 0 = leave out

The support images are prepared as the model sees images at inference: with the model folder's image processor
(preprocessor_config.json) when there is one (its resize, rescale and normalisation; masks resized by nearest
neighbour), otherwise normalised with the ImageNet mean/std at their own size or at `image_size`.

Saving: the extended model, its image processor and a model card that lists the added classes (and how they were
added) are written into a staging folder beside `output_dir` and put in place in one step, so a crash or `kill -9`
leaves either the old folder or the new one. Writing over an existing model (`output_dir` = `model_dir`, or any
folder that is not empty) needs `overwrite_model=True`; every file of that folder that the new model does not
replace (checkpoints, results, notes) is kept.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .class_editing import DEFAULT_MIN_CELL_FRACTION, normalize_names
from .explanations import PATCHES_FILE
from .folder_writer import fault_point, write_folder
from .safe_files import is_within

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MASK_MODES = ("L", "P", "I", "I;16")
# Weight files of a previous model in the folder: superseded by the new model's weights, never kept beside them.
WEIGHT_FILE_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")
# Files of the old model's card: the new card replaces them (the old prototype statistics describe other prototypes).
SUPERSEDED = ("README.md", "model_card_inputs.json", "prototype_stats.json")


class AddClassesError(ValueError):
    """A problem with the inputs of `add_classes_from_folder` (folders, names, support files)."""


@dataclass
class AddClassesSettings:
    """How the support images become prototypes (recorded in the model card)."""

    image_size: int | None = None
    min_cell_fraction: float = DEFAULT_MIN_CELL_FRACTION
    max_pixels_per_class: int = 20000
    seed: int = 0


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


def open_support_file(path: Path):
    """The PIL image of a support file, loaded; an unreadable file is an `AddClassesError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = str(error).replace(str(path), "<file>")
        raise AddClassesError(f"{path} is not a readable image ({type(error).__name__}: {reason}).") from error
    return image


def read_support(pairs: list[tuple[Path, Path]]) -> tuple[list[Any], list[Any]]:
    """The RGB PIL images and the masks of `pairs`; masks must be single-channel.

    Images go through `image_decoding.to_rgb_array`, the decoder training, `predict`, the endpoint and the Space use
    (EXIF orientation applied, transparency on white, 16-bit and float samples scaled by their range); a mask that
    fits its image only as stored, not as shown, is refused (`image_decoding.check_label_orientation`)."""
    from .image_decoding import check_label_orientation, to_rgb_image

    images, masks = [], []
    for image_path, mask_path in pairs:
        mask = open_support_file(mask_path)
        if mask.mode not in MASK_MODES:
            raise ValueError(f"{mask_path} has mode {mask.mode!r}; masks must be single-channel (L, P or I) PNGs.")
        image = open_support_file(image_path)
        try:
            check_label_orientation(image, (mask.size[1], mask.size[0]))
            images.append(to_rgb_image(image))
        except ValueError as error:
            raise AddClassesError(f"{image_path}: {error}.") from error
        masks.append(mask)
    return images, masks


def load_processor(model_dir: str | Path):
    """The model folder's image processor, or None when it has no preprocessor_config.json."""
    if not (Path(model_dir) / "preprocessor_config.json").exists():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(model_dir)


def check_input_sizes(pairs, images, sizes, minimum: int) -> None:
    """An `AddClassesError` naming the first support image whose model input (height, width) in `sizes` is below
    `minimum`, the encoder's smallest input (`model.min_input_size`, the limit `predict` reports too)."""
    for (image_path, _), image, (height, width) in zip(pairs, images, sizes):
        if min(height, width) < minimum:
            seen = "" if (height, width) == (image.size[1], image.size[0]) else " as the model sees it"
            raise AddClassesError(
                f"{image_path} is too small: {height}x{width} (height x width){seen}; this model needs at least"
                f" {minimum}x{minimum} pixels (its encoder's smallest input). Use a larger support image or"
                f" --image_size {minimum} or more."
            )


def add_support(model, processor, images, masks, pairs, names, settings: AddClassesSettings) -> dict[str, int]:
    """Prepare the support images like at inference and add the classes to `model`; returns {name: id}."""
    options = {
        "min_cell_fraction": settings.min_cell_fraction,
        "max_pixels_per_class": settings.max_pixels_per_class,
        "seed": settings.seed,
    }
    minimum = int(getattr(model, "min_input_size", 4))
    try:
        if processor is not None and settings.image_size is None:
            for (image_path, _), image, mask in zip(pairs, images, masks):
                if image.size != mask.size:
                    raise ValueError(f"{image_path.name} is {image.size} (w, h) but its mask is {mask.size}.")
            processed = [
                processor(images=image, segmentation_maps=mask, do_reduce_labels=False, return_tensors="pt")
                for image, mask in zip(images, masks)
            ]
            pixel_values = [batch["pixel_values"][0] for batch in processed]
            labels = [batch["labels"][0] for batch in processed]
            check_input_sizes(pairs, images, [tuple(p.shape[-2:]) for p in pixel_values], minimum)
            return model.add_classes(pixel_values, labels, names, **options)
        size = None if settings.image_size is None else (settings.image_size, settings.image_size)
        sizes = [size or (image.size[1], image.size[0]) for image in images]
        check_input_sizes(pairs, images, sizes, minimum)
        return model.add_classes(images, masks, names, image_size=size, **options)
    except AddClassesError:
        raise
    except ValueError as error:
        order = ", ".join(image_path.stem for image_path, _ in pairs[:10])
        raise ValueError(f"{error} (images[i]/masks[i] are the support files in name order: {order})") from error


def check_output_dir(model_dir: Path, output_dir: Path, overwrite_model: bool) -> None:
    """Refuse, before any work, an output folder that would replace a model without `overwrite_model`."""
    if output_dir.exists() and not output_dir.is_dir():
        raise AddClassesError(f"--output_dir {output_dir} is a file; choose a folder.")
    if overwrite_model:
        return
    if output_dir.resolve() == model_dir.resolve():
        raise AddClassesError(
            f"--output_dir is the input model {model_dir}: pass --overwrite_model to replace it (done in one step;"
            " its other files are kept), or choose another --output_dir."
        )
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise AddClassesError(
            f"--output_dir {output_dir} is not empty: choose a new folder, or pass --overwrite_model to replace the"
            " model in it (its other files are kept)."
        )
    if is_within(output_dir, model_dir):
        raise AddClassesError(
            f"--output_dir {output_dir} lies inside the input model {model_dir}; choose a folder beside it."
        )


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def carry_over(old: Path, staging: Path) -> list[str]:
    """Put a hard link (a copy where links fail) in `staging` of every file of the folder `old` that the new model
    does not replace (checkpoints, results, notes), and its sub-folders; returns their relative paths. Left out:
    what the new model wrote, old weight files and the old card's files (`SUPERSEDED`), which the new card rewrites
    (a linked file is never written to: that would change the old folder too)."""
    carried = []
    for path in sorted(old.rglob("*")):
        relative = path.relative_to(old)
        target = staging / relative
        if len(relative.parts) == 1 and (
            target.exists() or path.name in SUPERSEDED or any(path.match(p) for p in WEIGHT_FILE_PATTERNS)
        ):
            continue
        if not (staging / relative.parts[0]).is_dir() and len(relative.parts) > 1:
            continue  # inside a folder that was left out
        if path.is_symlink():
            os.symlink(os.readlink(path), target)
        elif path.is_dir():
            target.mkdir()
        else:
            _link_or_copy(path, target)
        carried.append(relative.as_posix())
    return carried


def save_model_atomically(model, processor, output_dir: Path, write_card) -> None:
    """Save `model` (and `processor`, and the card `write_card(folder)`) into `output_dir` in one step
    (`folder_writer.write_folder`).

    Everything is written into a staging folder beside `output_dir`; files of an existing `output_dir` that the new
    model does not replace are linked in; then the two folders are exchanged (one atomic rename on Linux) and the
    previous folder's files are removed (those carried over and its top-level files, which the new model replaces:
    the user named the folder). A crash before the exchange leaves `output_dir` as it was (and a hidden
    `.<name>.saving-*` folder beside it, safe to delete); after it, the new model.
    """

    replaced: list[str] = []  # the previous folder's files that the new folder replaces or holds a link to

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        fault_point("add-classes:after-weights")
        if processor is not None:
            processor.save_pretrained(staging)
        if output_dir.is_dir():
            replaced.extend(p.name for p in output_dir.iterdir() if p.is_file() or p.is_symlink())
            replaced.extend(carry_over(output_dir, staging))
        write_card(staging)  # after carry_over: it may read the old results files, never writes a linked file

    write_folder(output_dir, fill, purpose="saving", replaceable=replaced)


def class_addition_record(
    model_dir: Path, names: list[str], new_ids: dict[str, int], shots: int, settings: AddClassesSettings
) -> dict[str, Any]:
    """What the model card says about one `add_classes` run."""
    record = {"names": list(names), "class_ids": dict(new_ids), "shots": shots, "source_model": str(model_dir)}
    record.update({k: v for k, v in asdict(settings).items() if v is not None})
    return record


def source_card_inputs(model_dir: Path) -> dict[str, Any]:
    """The card inputs of the source model (its model_card_inputs.json, else what its card's metadata says)."""
    from .hub import card_defaults
    from .model_card import read_card_inputs

    return read_card_inputs(model_dir) or card_defaults(model_dir)


def add_classes_from_folder(
    model_dir: str | Path,
    support_dir: str | Path,
    names: list[str],
    output_dir: str | Path,
    *,
    settings: AddClassesSettings | None = None,
    overwrite_model: bool = False,
) -> dict[str, int]:
    """Add the classes `names`, learnt from the support folder, to the model in `model_dir`; save the extended model
    with its image processor and a model card into `output_dir` (see the module docstring); return {name: id}.

    Checks come first (names, output folder, support files), then the model is loaded and extended in memory, then
    saved in one step: on any error, and after a crash at any moment, `model_dir` and `output_dir` are as they were.
    """
    from .checkpoint import load_model, validate_checkpoint
    from .model_card import TRAINING_ARGS_FILE, write_model_card

    settings = settings or AddClassesSettings()
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    names = normalize_names(names)  # before any file is read: a newline or an empty name is refused here
    check_output_dir(model_dir, output_dir, overwrite_model)
    pairs = support_pairs(support_dir)
    images, masks = read_support(pairs)
    model = load_model(validate_checkpoint(model_dir))  # the folder read and checked once
    processor = load_processor(model_dir)
    new_ids = add_support(model, processor, images, masks, pairs, names, settings)

    inputs = source_card_inputs(model_dir)
    additions = [
        *inputs.pop("class_additions", []),
        class_addition_record(model_dir, names, new_ids, len(pairs), settings),
    ]
    training_args = model_dir / TRAINING_ARGS_FILE
    # The old classes' training patches (case-based explanations) stay right: their prototypes are unchanged, and
    # the file matches prototypes by fingerprint (`explanations.PatchLookup`); the new classes have none.
    patches = model_dir / PATCHES_FILE

    def write_card(folder: Path) -> None:
        from .hub import copy_optional  # a link leading out of model_dir is skipped with a warning

        if training_args.is_file() and not (folder / TRAINING_ARGS_FILE).exists():
            copy_optional(training_args, folder / TRAINING_ARGS_FILE, model_dir)  # how the network was trained
        if patches.is_file() and not (folder / PATCHES_FILE).exists():
            copy_optional(patches, folder / PATCHES_FILE, model_dir)
        write_model_card(folder, class_additions=additions, **inputs)

    save_model_atomically(model, processor, output_dir.resolve(), write_card)  # a link: replace what it points to
    return new_ids
