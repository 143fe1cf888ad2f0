"""Add, remove and rename classes of a trained ProtoSeg model without training.

A ProtoSeg class is a set of M non-learnable prototypes, not a row of learnable weights. A new class is therefore
learnt by embedding a few labelled support images with the frozen network and clustering the embeddings of the new
class's pixels into M prototypes, with the same Sinkhorn-equipartition clustering the training step uses
(`prototype_math.cluster_prototypes`). The new prototypes are appended to the buffer; every existing prototype and every
learnable weight stays bit-identical.

Conventions (see `add_classes_to_model` for the details):

- `images`: `pixel_values` (N, 3, H, W) float (already normalised, used as given), or a list of PIL images, which are
  converted to RGB, optionally resized to `image_size` (bilinear, PIL), rescaled by 1/255 and normalised with the
  ImageNet mean and std, i.e. what `SegformerImageProcessor` does.
- `masks`: (N, H, W) integers at image resolution (a tensor, or a list of tensors, arrays or PIL images, one per
  image). Value i + 1 marks the pixels of `names[i]`; 0 marks pixels to leave out. When PIL images are resized, their
  masks are resized with nearest-neighbour sampling to the same size.
- Embeddings live on the h x w = H/4 x W/4 grid. A grid cell is a support pixel of class c when at least
  `min_cell_fraction` (default 0.75, i.e. 12 of the 16 image pixels of a 4x4 cell) of its image pixels carry c: cells
  on a class boundary, or half left out, do not count, so the prototypes see only embeddings well inside the class.

The model's `add_classes`, `remove_classes` and `rename_class` methods call this module from the installed package:
it is not remote code (running and training the model do not need it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling, to_numpy_array
from transformers.utils import logging

from .configuration_proto_segformer import class_name_problem
from .image_decoding import check_label_orientation, displayed_size, to_rgb_image
from .prototype_math import cluster_prototypes
from .sampling import per_class_sample

logger = logging.get_logger(__name__)

DEFAULT_MIN_CELL_FRACTION = 0.75


# ----------------------------------------------------------------------------------------------------------------
# Names and label maps


def normalize_names(names: str | Sequence[str], what: str = "names") -> list[str]:
    """A list of class names from one name or a sequence of names; errors on empty or non-string names and on names
    with control characters (a newline, a tab: `class_name_problem`)."""
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, Sequence) or isinstance(names, (bytes, bytearray)):
        raise TypeError(f"{what} must be a list of strings, got {type(names).__name__}.")
    names = list(names)
    if not names:
        raise ValueError(f"{what} is empty: give at least one class name.")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{what} must be strings, got {name!r} of type {type(name).__name__}.")
        if not name.strip():
            raise ValueError(f"{what} contains an empty class name {name!r}.")
        problem = class_name_problem(name)
        if problem is not None:
            raise ValueError(f"{what} contains the class name {name!r}, which {problem}: names must be one-line text.")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"{what} contains {duplicated} more than once.")
    return names


def class_names(config: Any, num_classes: int) -> list[str]:
    """The K class names of a config in id order; errors if `id2label` does not cover ids 0..K-1 exactly."""
    id2label = {int(key): value for key, value in (config.id2label or {}).items()}
    if sorted(id2label) != list(range(num_classes)):
        raise ValueError(
            f"The model is inconsistent: config.id2label has ids {sorted(id2label)[:10]}... but the prototype buffer"
            f" holds {num_classes} classes; id2label must map exactly 0..{num_classes - 1}."
        )
    return [id2label[index] for index in range(num_classes)]


def label_maps(names: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    """`id2label` and `label2id` for classes named `names` in id order."""
    return {index: name for index, name in enumerate(names)}, {name: index for index, name in enumerate(names)}


def check_new_names(existing: Sequence[str], names: Sequence[str]) -> None:
    """Error if any of `names` already names a class of the model."""
    taken = [name for name in names if name in existing]
    if taken:
        raise ValueError(
            f"The model already has classes named {taken} (ids {[list(existing).index(name) for name in taken]})."
            " Choose new names, or rename/remove the existing classes first."
        )


def class_ids(existing: Sequence[str], names: Sequence[str]) -> list[int]:
    """The ids of `names` among the model's class names; errors on unknown or ambiguous names."""
    existing = list(existing)
    unknown = [name for name in names if name not in existing]
    if unknown:
        shown = existing[:20] + (["..."] if len(existing) > 20 else [])
        raise ValueError(f"Unknown class names {unknown}; the model's classes are {shown}.")
    ambiguous = [name for name in names if existing.count(name) > 1]
    if ambiguous:
        raise ValueError(f"Class names {ambiguous} name several classes of the model (config.id2label); ambiguous.")
    return [existing.index(name) for name in names]


# ----------------------------------------------------------------------------------------------------------------
# Support images and masks


def _is_pil_image(value: Any) -> bool:
    return hasattr(value, "convert") and hasattr(value, "getbands") and hasattr(value, "size")


def pil_to_pixel_values(image: Any, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """(3, H, W) float32 pixel values of a PIL image, as `SegformerImageProcessor` makes them.

    RGB pixels by `image_decoding.to_rgb_array` (the decoder training and predict use: EXIF orientation applied,
    transparency on white, 16-bit and float samples scaled by their range), optional bilinear resize to `image_size`
    = (height, width), rescale by 1/255, then normalisation with the ImageNet mean and std.
    """
    image = to_rgb_image(image)
    if image_size is not None:
        image = image.resize((image_size[1], image_size[0]), resample=PILImageResampling.BILINEAR)
    array = torch.as_tensor(to_numpy_array(image)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float32)[:, None, None]
    return (array - mean) / std


def mask_to_tensor(mask: Any, index: int) -> torch.Tensor:
    """(H, W) int64 tensor of one mask given as a tensor, an array or a PIL image (bool masks: True = 1)."""
    if _is_pil_image(mask):
        if mask.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(
                f"masks[{index}] is a PIL image of mode {mask.mode!r}; use a single-channel mode (L, P, I) whose"
                " values are class numbers (i + 1 for names[i], 0 = leave out)."
            )
        mask = to_numpy_array(mask)
    try:
        tensor = torch.as_tensor(mask)
    except (TypeError, RuntimeError, ValueError) as error:
        raise TypeError(f"masks[{index}] must be a tensor, array or PIL image, got {type(mask).__name__}.") from error
    if tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(
            f"masks[{index}] must hold integer class numbers, got dtype {tensor.dtype}; convert with .long()."
        )
    if tensor.ndim != 2:
        raise ValueError(f"masks[{index}] must have shape (height, width), got {tuple(tensor.shape)}.")
    return tensor.long()


def image_to_pixel_values(image: Any, index: int, num_channels: int) -> torch.Tensor:
    """(C, H, W) float pixel values from one pixel-values tensor (used as given) or one PIL image (normalised)."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"images[{index}] must be a PIL image or a float pixel-values tensor (3, H, W), got {type(image).__name__}."
        )
    if image.ndim != 3 or image.shape[0] != num_channels:
        raise ValueError(f"images[{index}] must have shape ({num_channels}, height, width), got {tuple(image.shape)}.")
    if not image.is_floating_point():
        raise TypeError(
            f"images[{index}] has dtype {image.dtype}; pixel values must be floating point and normalised."
            " Pass PIL images to have them normalised like SegformerImageProcessor."
        )
    if not torch.isfinite(image).all():
        raise ValueError(f"images[{index}] contains NaN or inf values.")
    return image


def _as_list(values: Any, what: str) -> list[Any]:
    if isinstance(values, torch.Tensor):
        return list(values.unbind(0)) if values.ndim >= 1 else [values]
    if isinstance(values, (list, tuple)):
        return list(values)
    if hasattr(values, "shape") and hasattr(values, "__getitem__") and not _is_pil_image(values):
        return [values[index] for index in range(values.shape[0])]
    raise TypeError(f"{what} must be a tensor with a leading batch dimension or a list, got {type(values).__name__}.")


def prepare_support(
    images: Any,
    masks: Any,
    num_names: int,
    num_channels: int = 3,
    image_size: tuple[int, int] | None = None,
    min_size: int = 4,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validated (pixel_values (C, H, W) float, mask (H, W) int64) pairs of the support set.

    PIL images are normalised (and with `image_size` resized, their masks too, by nearest neighbour); pixel-values
    tensors are used as given. Errors on different counts, sizes that differ between an image (as shown: EXIF
    orientation applied) and its mask, inputs smaller than `min_size` (the encoder's smallest input, the model's
    `min_input_size`) and mask values outside [0, num_names].
    """
    if isinstance(images, torch.Tensor) and images.ndim != 4:
        raise ValueError(
            f"images given as a tensor must be pixel_values of shape (N, {num_channels}, H, W),"
            f" got {tuple(images.shape)}."
        )
    if isinstance(masks, torch.Tensor) and masks.ndim != 3:
        raise ValueError(f"masks given as a tensor must have shape (N, H, W), got {tuple(masks.shape)}.")
    image_list = [images] if _is_pil_image(images) else _as_list(images, "images")
    mask_list = [masks] if _is_pil_image(masks) else _as_list(masks, "masks")
    if not image_list:
        raise ValueError("images is empty: give at least one support image.")
    if len(image_list) != len(mask_list):
        raise ValueError(f"Got {len(image_list)} images but {len(mask_list)} masks; give one mask per image.")
    if image_size is not None:
        if len(image_size) != 2 or min(int(size) for size in image_size) < 4:
            raise ValueError(f"image_size must be (height, width) with both >= 4, got {image_size}.")
        image_size = (int(image_size[0]), int(image_size[1]))
        if not any(_is_pil_image(image) for image in image_list):
            raise ValueError("image_size resizes PIL images; pixel-values tensors are used as given. Drop image_size.")

    pairs = []
    for index, (image, mask) in enumerate(zip(image_list, mask_list)):
        mask = mask_to_tensor(mask, index)
        if _is_pil_image(image):
            try:
                check_label_orientation(image, tuple(mask.shape))
                width, height = displayed_size(image)
                pixel_values = pil_to_pixel_values(image, image_size)
            except ValueError as error:
                raise ValueError(f"images[{index}]: {error}.") from error
            size = (height, width)
        else:
            pixel_values = image_to_pixel_values(image, index, num_channels)
            size = tuple(pixel_values.shape[1:])
        if tuple(mask.shape) != size:
            raise ValueError(
                f"images[{index}] is {size[0]}x{size[1]} (height x width) but masks[{index}] is"
                f" {mask.shape[0]}x{mask.shape[1]}; masks must be at image resolution."
            )
        if min(pixel_values.shape[1:]) < min_size:
            resized = " after resizing to image_size" if tuple(pixel_values.shape[1:]) != size else ""
            raise ValueError(
                f"images[{index}] is too small: {pixel_values.shape[1]}x{pixel_values.shape[2]} (height x"
                f" width){resized}; this model's encoder needs at least {min_size}x{min_size} pixels. Give larger"
                f" images, or an image_size of at least {min_size}."
            )
        bad = (mask < 0) | (mask > num_names)
        if bad.any():
            values = torch.unique(mask[bad]).tolist()[:10]
            raise ValueError(
                f"masks[{index}] contains values {values} outside [0, {num_names}]: value i + 1 marks names[i] and 0"
                f" marks pixels to leave out ({num_names} names given)."
            )
        if tuple(pixel_values.shape[1:]) != tuple(mask.shape):  # a PIL image resized to image_size
            mask = F.interpolate(mask[None, None].float(), size=pixel_values.shape[1:], mode="nearest-exact")
            mask = mask[0, 0].long()
        pairs.append((pixel_values, mask))
    return pairs


def embedding_grid_size(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int]:
    """(h, w) of the embedding map: the size after SegFormer's first overlapping patch embedding (padding k // 2)."""
    padding = patch_size // 2
    return (height + 2 * padding - patch_size) // stride + 1, (width + 2 * padding - patch_size) // stride + 1


def support_grid_size(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the model's embedding map for a (height, width) input: SegFormer's arithmetic
    (`embedding_grid_size`), or the model's own `embedding_grid_size` (a backbone's, found by running it)."""
    config = model.config
    if getattr(config, "patch_sizes", None) and getattr(config, "strides", None):
        return embedding_grid_size(height, width, config.patch_sizes[0], config.strides[0])
    return tuple(model.embedding_grid_size(height, width))


def support_cell_labels(mask: torch.Tensor, grid_size: tuple[int, int], num_names: int, min_fraction: float):
    """(h, w) int64 class of each embedding cell in [0, num_names), or -1 for cells that do not count.

    The mask (H, W) (value i + 1 = names[i], 0 = left out) is pooled by area onto the h x w grid (adaptive average
    pooling of the one-hot mask: exactly the 4x4 blocks when H and W are multiples of 4). A cell counts for class i
    when the fraction of its pixels carrying i + 1 is at least `min_fraction` (> 0.5, so at most one class wins).
    """
    one_hot = F.one_hot(mask, num_names + 1).permute(2, 0, 1)[1:].float()
    fractions = F.adaptive_avg_pool2d(one_hot[None], grid_size)[0]
    best_fraction, best_class = fractions.max(dim=0)
    return torch.where(best_fraction >= min_fraction - 1e-6, best_class, torch.full_like(best_class, -1))


def check_support_coverage(
    masks: Sequence[torch.Tensor], cells: Sequence[torch.Tensor], names: Sequence[str], min_fraction: float
) -> torch.Tensor:
    """(C,) number of support cells of each new class; errors naming a class without any pixel or any cell."""
    pixel_counts = sum(torch.bincount(mask.reshape(-1), minlength=len(names) + 1)[1:] for mask in masks)
    cell_counts = sum(torch.bincount(cell[cell >= 0].reshape(-1), minlength=len(names)) for cell in cells)
    missing = [name for name, count in zip(names, pixel_counts.tolist()) if count == 0]
    if missing:
        raise ValueError(
            f"The masks contain no pixel of the new classes {missing}: mark each class i with value i + 1"
            " (0 = leave out) in at least one mask."
        )
    too_small = [
        f"{name!r} ({pixels} pixels)"
        for name, pixels, count in zip(names, pixel_counts.tolist(), cell_counts.tolist())
        if count == 0
    ]
    if too_small:
        raise ValueError(
            f"No 4x4 embedding cell is at least {min_fraction:.0%} covered by the new classes {', '.join(too_small)}:"
            " their regions are too thin or too small for the H/4 x W/4 embedding grid. Give larger regions or"
            " larger images, or lower min_cell_fraction (> 0.5)."
        )
    return cell_counts


# ----------------------------------------------------------------------------------------------------------------
# Embedding and clustering


def _batches(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> list[list[int]]:
    """Consecutive indices of pairs grouped into batches of equal image size, at most `batch_size` each."""
    groups: list[list[int]] = []
    for index, (pixel_values, _) in enumerate(pairs):
        if groups and len(groups[-1]) < batch_size and pairs[groups[-1][0]][0].shape == pixel_values.shape:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def embed_support_pixels(
    model: nn.Module,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cells: Sequence[torch.Tensor],
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (P, D) float32 and classes (P,) of the support cells (class >= 0) of all images.

    Runs `model.embed_pixels` in eval mode without gradient (no dropout, no BatchNorm statistics update, no
    prototype update) and restores every submodule's training flag afterwards, also on error.
    """
    parameter = next(model.parameters())
    modes = [(module, module.training) for module in model.modules()]
    embeddings, classes = [], []
    try:
        model.eval()
        with torch.no_grad():
            for group in _batches(pairs, batch_size):
                pixel_values = torch.stack([pairs[index][0] for index in group])
                pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
                unit_embeddings, _ = model.embed_pixels(pixel_values)
                labels = torch.stack([cells[index] for index in group]).to(parameter.device)
                if unit_embeddings.shape[2:] != labels.shape[1:]:
                    raise RuntimeError(
                        f"Embedding grid {tuple(unit_embeddings.shape[2:])} differs from the expected"
                        f" {tuple(labels.shape[1:])}; the model's patch embedding is not SegFormer's."
                    )
                keep = labels >= 0
                embeddings.append(unit_embeddings.permute(0, 2, 3, 1)[keep].float())
                classes.append(labels[keep])
    finally:
        for module, mode in modes:
            module.training = mode
    return torch.cat(embeddings), torch.cat(classes)


def subsample_per_class(
    classes: torch.Tensor, num_classes: int, max_per_class: int | None, generator: torch.Generator
) -> torch.Tensor:
    """(P',) indices, in increasing order, keeping at most `max_per_class` uniformly drawn entries of each class
    (all when None): `sampling.per_class_sample`."""
    return torch.sort(per_class_sample(classes, num_classes, max_per_class, generator)).values


def cluster_support_prototypes(
    embeddings: torch.Tensor,
    classes: torch.Tensor,
    num_classes: int,
    num_prototypes: int,
    epsilon: float,
    sinkhorn_iterations: int,
    rounds: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(C, M, D) unit prototypes of the new classes from their support embeddings (P, D) and classes (P,).

    Sinkhorn-equipartition spherical k-means (`cluster_prototypes`), the clustering of the training step. A class
    with fewer than M support cells repeats some of its embeddings as prototypes (harmless for the max over m).
    """
    prototypes, present = cluster_prototypes(
        embeddings, classes, num_classes, num_prototypes, epsilon, sinkhorn_iterations, rounds, generator
    )
    if not bool(present.all()):
        raise RuntimeError("Internal error: a new class has no support embedding after the coverage check.")
    return prototypes


# ----------------------------------------------------------------------------------------------------------------
# Model edits


def _replace_classes(model: nn.Module, prototypes: torch.Tensor, names: Sequence[str]) -> None:
    """Install a (K', M, D) prototype buffer (persistent) and the matching config label maps, in one step."""
    id2label, label2id = label_maps(names)
    model.register_buffer("prototypes", prototypes.contiguous(), persistent=True)
    model.config.id2label = id2label
    model.config.label2id = label2id


def add_classes_to_model(
    model: nn.Module,
    images: Any,
    masks: Any,
    names: str | Sequence[str],
    *,
    image_size: tuple[int, int] | None = None,
    min_cell_fraction: float = DEFAULT_MIN_CELL_FRACTION,
    batch_size: int = 8,
    max_pixels_per_class: int | None = 20000,
    clustering_rounds: int = 10,
    seed: int = 0,
) -> dict[str, int]:
    """Learn new classes from labelled support images without training; returns {name: new class id}.

    Args:
        model: a `ProtoSegformerForSemanticSegmentation` (K classes, prototypes (K, M, D)).
        images: pixel_values (N, 3, H, W) float (used as given), or a list of N PIL images / (3, H, W) tensors.
            PIL images are converted to RGB, resized to `image_size` if given (bilinear), rescaled by 1/255 and
            normalised with the ImageNet mean/std (SegformerImageProcessor's defaults). For the best match with
            inference, give the support images at the resolution the model sees at inference.
        masks: (N, H, W) integers at image resolution (tensor, or list of tensors/arrays/PIL "L"/"P"/"I" images):
            value i + 1 marks pixels of `names[i]`, 0 pixels to leave out. Resized with images by nearest neighbour.
        names: the C new class names (new ids K .. K + C - 1, in this order).
        image_size: (height, width) to resize PIL images (and their masks) to.
        min_cell_fraction: an H/4 x W/4 embedding cell is a support pixel of class i when at least this fraction of
            its image pixels carry i + 1 (in (0.5, 1]; 1.0 keeps only cells entirely inside the class).
        batch_size: images embedded at once.
        max_pixels_per_class: support cells per class kept for clustering (a uniform sample); None keeps all.
        clustering_rounds: k-means rounds of the Sinkhorn clustering.
        seed: seeds the clustering's initial picks and the subsampling (a private generator: global RNG untouched).

    The model is changed only if everything succeeds: prototypes (K + C, M, D) with the first K rows
    bit-identical, config.id2label / label2id (and so num_labels) extended; weights and BatchNorm statistics are
    untouched and every module's training flag is restored.
    """
    names = normalize_names(names)
    prototypes = model.prototypes
    num_classes, num_prototypes, _ = prototypes.shape
    existing = class_names(model.config, num_classes)
    check_new_names(existing, names)
    if not 0.5 < float(min_cell_fraction) <= 1.0:
        raise ValueError(f"min_cell_fraction must lie in (0.5, 1], got {min_cell_fraction}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if max_pixels_per_class is not None and int(max_pixels_per_class) < 1:
        raise ValueError(f"max_pixels_per_class must be >= 1 or None, got {max_pixels_per_class}.")
    ignore_index = model.config.semantic_loss_ignore_index
    if ignore_index is not None and num_classes <= ignore_index < num_classes + len(names):
        raise ValueError(
            f"Adding {len(names)} classes to {num_classes} would give a class the id {ignore_index}, which is"
            " config.semantic_loss_ignore_index; set another ignore index first."
        )

    config = model.config
    min_size = int(getattr(model, "min_input_size", 4))  # the smallest input the encoder accepts
    pairs = prepare_support(images, masks, len(names), config.num_channels, image_size, min_size)
    cells = [
        support_cell_labels(
            mask,
            support_grid_size(model, *mask.shape),
            len(names),
            float(min_cell_fraction),
        )
        for _, mask in pairs
    ]
    cell_counts = check_support_coverage([mask for _, mask in pairs], cells, names, float(min_cell_fraction))
    few = [f"{name!r} ({count})" for name, count in zip(names, cell_counts.tolist()) if count < num_prototypes]
    if few:
        logger.warning(
            f"New classes {few} have fewer support cells than the {num_prototypes} prototypes per class; some of"
            " their prototypes repeat. More or larger support regions give better prototypes."
        )

    embeddings, classes = embed_support_pixels(model, pairs, cells, int(batch_size))
    generator = torch.Generator().manual_seed(int(seed))
    keep = subsample_per_class(classes, len(names), max_pixels_per_class, generator)
    new_prototypes = cluster_support_prototypes(
        embeddings[keep],
        classes[keep],
        len(names),
        num_prototypes,
        config.sinkhorn_epsilon,
        config.sinkhorn_iterations,
        int(clustering_rounds),
        generator,
    )
    extended = torch.cat([prototypes.detach(), new_prototypes.to(device=prototypes.device, dtype=prototypes.dtype)])
    calibration = None
    if getattr(config, "unknown_threshold", None) is not None:
        from .unknown import recalibrated_for_added_classes

        support = embeddings[keep].to(extended.dtype) @ extended.reshape(-1, extended.shape[-1]).t()
        calibration = recalibrated_for_added_classes(config, support.amax(dim=1), names)
    _replace_classes(model, extended, existing + names)
    if calibration is not None:  # after the classes: nothing changed on an error
        config.unknown_threshold, config.unknown_calibration = calibration
    return {name: num_classes + index for index, name in enumerate(names)}


def remove_classes_from_model(model: nn.Module, names: str | Sequence[str]) -> dict[int, int]:
    """Drop classes and their prototypes; returns {old id: new id} of the classes that remain.

    The remaining classes keep their order, so every class id after a removed class shifts down by the number of
    removed classes before it (labels and saved predictions made with the old ids need remapping). At least two
    classes must remain. Errors on unknown names; the model is unchanged on error.
    """
    names = normalize_names(names)
    num_classes = model.prototypes.shape[0]
    existing = class_names(model.config, num_classes)
    removed = set(class_ids(existing, names))
    kept = [index for index in range(num_classes) if index not in removed]
    if len(kept) < 2:
        raise ValueError(
            f"Removing {names} would leave {len(kept)} class(es); a ProtoSeg model needs at least 2 classes."
        )
    index = torch.tensor(kept, device=model.prototypes.device)
    _replace_classes(model, model.prototypes.detach().index_select(0, index), [existing[old] for old in kept])
    return {old: new for new, old in enumerate(kept)}


def rename_class_of_model(model: nn.Module, old: str, new: str) -> int:
    """Rename class `old` to `new` (prototypes untouched); returns its id. Errors on unknown `old` or taken `new`."""
    (old,) = normalize_names([old], "old")
    (new,) = normalize_names([new], "new")
    existing = class_names(model.config, model.prototypes.shape[0])
    (index,) = class_ids(existing, [old])
    check_new_names(existing, [new])
    renamed = list(existing)
    renamed[index] = new
    id2label, label2id = label_maps(renamed)
    model.config.id2label = id2label
    model.config.label2id = label2id
    return index
