"""SegFormer's training recipe and full-size evaluation, as functions of (PIL image, PIL label) pairs.

Training (as in SegFormer / mmsegmentation): random resize by a ratio in [0.5, 2.0] of a base short side, random
crop to `crop_size` (retrying so that no class covers more than `cat_max_ratio` of the crop), padding to the crop
size with the ignore index, horizontal flip, photometric distortion (brightness, contrast, saturation, hue), then
normalisation. Evaluation: no resize (full size), normalisation only; the collator pads a batch to a common size
with the ignore index, so padded pixels never count.

All randomness comes from a `numpy.random.Generator` passed in, so a sample's augmentation is a function of
(seed, epoch, index): runs are reproducible, and resuming from a checkpoint replays the same augmentations.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import SegformerConfig

from ..image_decoding import exif_orientation, has_transparency, to_rgb_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The ignore index of a config that does not set one (SegformerConfig's `semantic_loss_ignore_index` default): the
# default of the functions here; a training run passes its model's `config.semantic_loss_ignore_index`.
DEFAULT_IGNORE_INDEX: int = inspect.signature(SegformerConfig.__init__).parameters["semantic_loss_ignore_index"].default


@dataclass
class AugmentationConfig:
    """Parameters of the SegFormer training augmentation.

    Attributes:
        crop_size: (height, width) of the training crops.
        base_size: short side the image is scaled to before the random ratio; None = the crop's short side.
        min_scale, max_scale: range of the random resize ratio.
        cat_max_ratio: a crop is re-drawn (up to 10 times) while one class covers more than this fraction of its
            labelled pixels; 1.0 disables.
        flip_probability: probability of a horizontal flip.
        photometric_distortion: apply random brightness / contrast / saturation / hue changes.
        brightness_delta: brightness shift range (+-, on 0..255).
        contrast_range, saturation_range: multiplicative ranges.
        hue_delta: hue shift range (+-, in degrees / 2 as in OpenCV's 0..180 hue; 0 disables hue changes).
        ignore_index: label of padded pixels.
    """

    crop_size: tuple[int, int] = (512, 512)
    base_size: int | None = None
    min_scale: float = 0.5
    max_scale: float = 2.0
    cat_max_ratio: float = 0.75
    flip_probability: float = 0.5
    photometric_distortion: bool = True
    brightness_delta: float = 32.0
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: float = 18.0
    ignore_index: int = DEFAULT_IGNORE_INDEX

    def __post_init__(self) -> None:
        if min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}.")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"Need 0 < min_scale <= max_scale, got {self.min_scale} and {self.max_scale}.")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must lie in (0, 1], got {self.cat_max_ratio}.")


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image of any PIL image or image array, by `image_decoding.to_rgb_array` (the one decoder of the
    package: EXIF orientation applied, transparency on white, 16-bit and float samples scaled by their range)."""
    if isinstance(image, Image.Image) and image.mode == "RGB" and not has_transparency(image):
        if exif_orientation(image) == 1:
            return image  # already what the decoder gives
    return to_rgb_image(image)


def label_to_array(label: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W) int64 class indices from a label image ("L", "P", "I", "I;16") or array (a 3-channel label is an
    error: class maps have one channel)."""
    if isinstance(label, Image.Image):
        if label.mode in ("RGB", "RGBA"):
            raise ValueError(
                f"the label image has mode {label.mode} (colours); a segmentation label must be a single-channel"
                " image of class indices (mode L, P or I)."
            )
        array = np.asarray(label)
    else:
        array = np.asarray(label)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"a label map must be 2-D (height, width), got shape {array.shape}.")
    return array.astype(np.int64, copy=False)


def reduce_label_array(label: np.ndarray, ignore_index: int = DEFAULT_IGNORE_INDEX) -> np.ndarray:
    """ADE20K-style reduction: 0 ("other") becomes the ignore index, every other class shifts down by one.

    A value of ignore_index + 1 would shift onto the ignore index and vanish from training: a `ValueError`."""
    if (label == ignore_index + 1).any():
        raise ValueError(
            f"the label holds the value {ignore_index + 1}, which reduce_labels would shift onto the ignore index"
            f" {ignore_index} (its pixels would be ignored without notice). Reduced labels are 0 ('other', ignored)"
            f" and 1..K; map {ignore_index + 1} to a class or to 0, or do not reduce the labels."
        )
    reduced = label - 1
    reduced[label == 0] = ignore_index
    reduced[label == ignore_index] = ignore_index
    return reduced


def random_resize(
    image: Image.Image, label: np.ndarray, rng: np.random.Generator, config: AugmentationConfig
) -> tuple[Image.Image, np.ndarray]:
    """Scale so the short side is base_size * ratio, ratio ~ U[min_scale, max_scale] (bilinear / nearest)."""
    base = config.base_size if config.base_size is not None else min(config.crop_size)
    ratio = rng.uniform(config.min_scale, config.max_scale)
    width, height = image.size
    scale = base * ratio / min(width, height)
    new_size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    if new_size == image.size:
        return image, label
    image = image.resize(new_size, Image.Resampling.BILINEAR)
    label_image = Image.fromarray(label.astype(np.int32), mode="I").resize(new_size, Image.Resampling.NEAREST)
    return image, np.asarray(label_image).astype(np.int64)


def random_crop(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, config: AugmentationConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Crop (at most crop_size) at a random place, retrying up to 10 times while one class dominates."""
    crop_height, crop_width = config.crop_size
    height, width = label.shape
    top = left = 0
    for _ in range(10):
        top = int(rng.integers(0, max(height - crop_height, 0) + 1))
        left = int(rng.integers(0, max(width - crop_width, 0) + 1))
        if config.cat_max_ratio >= 1.0:
            break
        window = label[top : top + crop_height, left : left + crop_width]
        counts = np.bincount(window[window != config.ignore_index].ravel())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < config.cat_max_ratio:
            break
    return (
        image[top : top + crop_height, left : left + crop_width],
        label[top : top + crop_height, left : left + crop_width],
    )


def pad_to(
    image: np.ndarray, label: np.ndarray, size: tuple[int, int], ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pad image (H, W, 3) with 0 and label (H, W) with `ignore_index` at the bottom / right to `size`."""
    height, width = label.shape
    pad_height, pad_width = max(size[0] - height, 0), max(size[1] - width, 0)
    if pad_height == 0 and pad_width == 0:
        return image, label
    image = np.pad(image, ((0, pad_height), (0, pad_width), (0, 0)))
    label = np.pad(label, ((0, pad_height), (0, pad_width)), constant_values=ignore_index)
    return image, label


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 255] -> HSV with H in degrees [0, 360), S and V in [0, 1]."""
    rgb = rgb / 255.0
    maximum = rgb.max(axis=-1)
    minimum = rgb.min(axis=-1)
    delta = maximum - minimum
    safe = np.where(delta > 0, delta, 1.0)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(
        maximum == red,
        ((green - blue) / safe) % 6.0,
        np.where(maximum == green, (blue - red) / safe + 2.0, (red - green) / safe + 4.0),
    )
    hue = np.where(delta > 0, hue * 60.0, 0.0)
    saturation = np.where(maximum > 0, delta / np.where(maximum > 0, maximum, 1.0), 0.0)
    return np.stack([hue, saturation, maximum], axis=-1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of `_rgb_to_hsv`: returns RGB in [0, 255]."""
    hue, saturation, value = hsv[..., 0] % 360.0, hsv[..., 1], hsv[..., 2]
    chroma = value * saturation
    sector = hue / 60.0
    x = chroma * (1.0 - np.abs(sector % 2.0 - 1.0))
    zero = np.zeros_like(hue)
    index = np.floor(sector).astype(np.int64) % 6
    choices_r = [chroma, x, zero, zero, x, chroma]
    choices_g = [x, chroma, chroma, x, zero, zero]
    choices_b = [zero, zero, x, chroma, chroma, x]
    red = np.choose(index, choices_r)
    green = np.choose(index, choices_g)
    blue = np.choose(index, choices_b)
    offset = value - chroma
    return np.stack([red + offset, green + offset, blue + offset], axis=-1) * 255.0


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, config: AugmentationConfig) -> np.ndarray:
    """mmsegmentation's PhotoMetricDistortion on (H, W, 3) float RGB in [0, 255]; each change with probability 0.5:
    brightness shift, contrast scale (before or after the colour changes), saturation scale, hue shift."""
    image = image.astype(np.float32)
    if rng.random() < 0.5:
        image = np.clip(image + rng.uniform(-config.brightness_delta, config.brightness_delta), 0, 255)
    contrast_first = rng.random() < 0.5

    def contrast(x: np.ndarray) -> np.ndarray:
        if rng.random() < 0.5:
            return np.clip(x * rng.uniform(*config.contrast_range), 0, 255)
        return x

    if contrast_first:
        image = contrast(image)
    change_saturation = rng.random() < 0.5
    saturation = rng.uniform(*config.saturation_range)
    change_hue = config.hue_delta > 0 and rng.random() < 0.5
    hue_shift = rng.uniform(-config.hue_delta, config.hue_delta) * 2.0  # OpenCV hue units (0..180) to degrees
    if change_saturation or change_hue:
        hsv = _rgb_to_hsv(image)
        if change_saturation:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 1)
        if change_hue:
            hsv[..., 0] = (hsv[..., 0] + hue_shift) % 360.0
        image = np.clip(_hsv_to_rgb(hsv), 0, 255).astype(np.float32)
    if not contrast_first:
        image = contrast(image)
    return image


def normalize(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(H, W, 3) RGB in [0, 255] -> (3, H, W) float32 tensor normalised with mean / std (of [0, 1] values)."""
    array = (np.asarray(image, dtype=np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def train_transform(
    image: Image.Image,
    label: np.ndarray,
    rng: np.random.Generator,
    config: AugmentationConfig,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> dict[str, torch.Tensor]:
    """One training sample: {"pixel_values": (3, h, w) float32, "labels": (h, w) int64}, (h, w) = crop_size."""
    image, label = random_resize(to_rgb(image), label, rng, config)
    array, label = random_crop(np.asarray(image), label, rng, config)
    if rng.random() < config.flip_probability:
        array, label = array[:, ::-1], label[:, ::-1]
    if config.photometric_distortion:
        array = photometric_distortion(array, rng, config)
    array, label = pad_to(np.asarray(array), np.asarray(label), config.crop_size, config.ignore_index)
    return {"pixel_values": normalize(array, mean, std), "labels": torch.from_numpy(np.ascontiguousarray(label))}


def eval_transform(
    image: Image.Image, label: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> dict[str, torch.Tensor]:
    """Full-size evaluation sample: normalisation only, no resize."""
    array = np.asarray(to_rgb(image))
    return {"pixel_values": normalize(array, mean, std), "labels": torch.from_numpy(np.ascontiguousarray(label))}


def pad_collate(
    features: list[dict[str, torch.Tensor]],
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    multiple: int = 1,
    min_size: int = 32,
) -> dict:
    """Stack samples, padding pixel_values with 0 and labels with `ignore_index` (bottom / right) to the batch's
    largest size (at least `min_size`, the smallest input SegFormer's spatial-reduction attention accepts; rounded
    up to `multiple`). Same-size samples of at least `min_size` (training crops) are stacked as they are.

    Padding changes what the encoder sees near the padded border; per_device_eval_batch_size 1 evaluates every
    image exactly at its own size (when it is at least `min_size`)."""
    sizes = {tuple(f["pixel_values"].shape[-2:]) for f in features}
    if len(sizes) == 1 and min(next(iter(sizes))) >= min_size:
        return {
            "pixel_values": torch.stack([f["pixel_values"] for f in features]),
            "labels": torch.stack([f["labels"] for f in features]),
        }
    height = max(min_size, *(size[0] for size in sizes))
    width = max(min_size, *(size[1] for size in sizes))
    height, width = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    pixel_values = torch.zeros(len(features), 3, height, width)
    labels = torch.full((len(features), height, width), ignore_index, dtype=torch.long)
    for i, feature in enumerate(features):
        h, w = feature["pixel_values"].shape[-2:]
        pixel_values[i, :, :h, :w] = feature["pixel_values"]
        labels[i, :h, :w] = feature["labels"]
    return {"pixel_values": pixel_values, "labels": labels}
