"""One decoder from an image (PIL image or numpy array) to the RGB pixels that every part of proto_segformer uses.

Training, `predict`, `add_classes`, `model.add_classes`, the pictures, the Inference Endpoints handler and the Gradio
Space all turn images into pixels with `to_rgb_array`, so one image file gives the same (H, W, 3) uint8 pixels
everywhere. Standalone on purpose (PIL and numpy only, no package imports): a byte-identical copy ships next to
`handler.py` in a Hub repository and next to `app.py` in a Space, which run without the package.

The rules:

- EXIF orientation is applied: the image is used as viewers show it (`PIL.ImageOps.exif_transpose`; an orientation
  outside 1..8 counts as 1). A label image is used as stored; it must match the image as shown (see
  `check_label_orientation`).
- Transparency (RGBA, LA, PA, RGBa, La, a palette or a tRNS colour key) is composited over white:
  `round((colour * alpha + 255 * (255 - alpha)) / 255)` on 8-bit values.
- 16-bit samples (PIL modes I;16*, uint16 arrays) are scaled by the dtype's range: `round(v / 257)` maps
  0..65535 onto 0..255 exactly (PNG's rule for reducing 16-bit samples); a dark 16-bit image stays dark.
- 32-bit integer samples (PIL mode "I", e.g. the TIFF `datasets` writes for an int64 array; other integer arrays)
  carry no range of their own: an image whose values all lie in 0..255 is read as 8-bit, one with values up to
  65535 as 16-bit (`round(v / 257)`); negative values or values above 65535 are refused.
- Floating-point samples (PIL mode "F", float arrays): an image whose largest finite value is at most 1 is read as
  0..1 and scaled by 255, any other as 0..255; then clipped to 0..255 and rounded; NaN is 0.
- Boolean samples (PIL mode "1", bool arrays) are 0 or 255; gray levels are repeated into the three channels.
- Palette images go through their palette; CMYK, YCbCr, HSV through PIL's conversion (ICC profiles are not applied).
- Arrays are (H, W) gray, (H, W, 1) gray, (H, W, 2) gray + alpha, (H, W, 3) RGB or (H, W, 4) RGBA.
- A file of several frames (GIF, multi-page TIFF, MPO) gives its first frame.

Every image these rules cannot read is a `ValueError` that says why.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION_TAG = 0x0112
# How a viewer turns the stored pixels of each EXIF orientation (5..8 swap width and height).
ORIENTATION_NAMES = {
    2: "mirrored left-right",
    3: "rotated 180 degrees",
    4: "mirrored top-bottom",
    5: "mirrored and rotated 90 degrees",
    6: "rotated 90 degrees clockwise",
    7: "mirrored and rotated 90 degrees",
    8: "rotated 90 degrees counter-clockwise",
}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
ARRAY_SHAPES = "(H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4)"


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8) of a PIL image; 1 (as stored) when it has none or an invalid one."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception as error:  # noqa: BLE001 - PIL raises many types for a corrupt EXIF block
        raise ValueError(f"its EXIF data cannot be read ({type(error).__name__}: {error})") from error
    return orientation if isinstance(orientation, int) and orientation in range(1, 9) else 1


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of a PIL image as shown, after its EXIF orientation (5..8 swap the two)."""
    width, height = image.size
    return (height, width) if exif_orientation(image) >= 5 else (width, height)


def upright(image: Image.Image) -> Image.Image:
    """The PIL image as viewers show it: its EXIF orientation applied (the image itself when there is none)."""
    if exif_orientation(image) == 1:
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - truncated data, corrupt EXIF
        raise ValueError(f"it cannot be turned upright ({type(error).__name__}: {error})") from error


def sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """uint8 of 16-bit samples (0..65535): round(v / 257)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def integer_to_uint8(values: np.ndarray) -> np.ndarray:
    """uint8 of integer samples without a range of their own (int32 and the like): 0..255 as 8-bit, else up to
    65535 as 16-bit; anything else is a `ValueError`."""
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > 65535:
        raise ValueError(
            f"an image of {values.dtype} samples must hold 8-bit (0..255) or 16-bit (0..65535) values, got"
            f" {low}..{high}; scale it to uint8 or uint16 first"
        )
    return values.astype(np.uint8) if high <= 255 else sixteen_bit_to_uint8(values)


def float_to_uint8(values: np.ndarray) -> np.ndarray:
    """uint8 of float samples: x 255 when the largest finite value is <= 1 (0..1 data), else as 0..255; clipped and
    rounded, NaN -> 0."""
    values = values.astype(np.float64, copy=False)
    finite = values[np.isfinite(values)]
    scale = 255.0 if finite.size == 0 or finite.max() <= 1.0 else 1.0
    values = np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(values, 0, 255).round().astype(np.uint8)


def samples_to_uint8(values: np.ndarray) -> np.ndarray:
    """uint8 of an array's samples by its dtype (see the module rules)."""
    dtype = values.dtype
    if dtype == np.uint8:
        return values
    if dtype == np.bool_:
        return values.astype(np.uint8) * np.uint8(255)
    if dtype.kind == "u" and dtype.itemsize == 2:
        return sixteen_bit_to_uint8(values)
    if dtype.kind == "f":
        return float_to_uint8(values)
    if dtype.kind in "iu":
        return integer_to_uint8(values)
    raise ValueError(f"an image array of dtype {dtype} is not an image; give uint8, uint16, bool or float values")


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 `colour` (H, W, C) composited over white with uint8 `alpha` (H, W)."""
    colour = colour.astype(np.uint32)
    alpha = alpha.astype(np.uint32)[..., None]
    return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 of (H, W) uint8 gray levels."""
    return np.repeat(gray[..., None], 3, axis=2)


def has_transparency(image: Image.Image) -> bool:
    """Whether a PIL image carries transparency: an alpha band, a transparent palette entry or a tRNS colour key."""
    if image.mode in ALPHA_MODES:
        return True
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of a PIL image as stored (no EXIF orientation): see the module rules."""
    mode = image.mode
    if has_transparency(image):
        rgba = np.asarray(image.convert("RGBA"))
        return over_white(rgba[..., :3], rgba[..., 3])
    if mode == "RGB":
        return np.asarray(image)
    if mode in SIXTEEN_BIT_MODES:
        return gray_to_rgb(sixteen_bit_to_uint8(np.asarray(image)))
    if mode == "I":
        return gray_to_rgb(integer_to_uint8(np.asarray(image)))
    if mode == "F":
        return gray_to_rgb(float_to_uint8(np.asarray(image)))
    if mode in ("1", "L"):
        return gray_to_rgb(np.asarray(image.convert("L")))
    try:
        return np.asarray(image.convert("RGB"))
    except (ValueError, OSError) as error:
        raise ValueError(f"images of PIL mode {mode!r} cannot be converted to RGB ({error})") from error


def array_to_rgb_array(array: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 of an image array: see the module rules."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (2, 3, 4)):
        raise ValueError(f"an image array must have shape {ARRAY_SHAPES}, got {array.shape}")
    if array.size == 0:
        raise ValueError(f"the image array is empty (shape {array.shape})")
    values = samples_to_uint8(array)
    if values.ndim == 2:
        return gray_to_rgb(values)
    if values.shape[2] == 2:
        return over_white(gray_to_rgb(values[..., 0]), values[..., 1])
    if values.shape[2] == 4:
        return over_white(values[..., :3], values[..., 3])
    return np.ascontiguousarray(values)


def to_rgb_array(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of a PIL image (EXIF orientation applied) or a numpy array (see the module rules).

    Raises `ValueError` saying why when the image cannot be read by these rules.
    """
    if isinstance(image, Image.Image):
        return pil_to_rgb_array(upright(image))
    if isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        return array_to_rgb_array(np.asarray(image))
    raise ValueError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


def to_rgb_image(image: Any) -> Image.Image:
    """`to_rgb_array(image)` as an RGB PIL image."""
    return Image.fromarray(to_rgb_array(image), mode="RGB")


def check_label_orientation(image: Image.Image, label_size: tuple[int, int]) -> None:
    """`ValueError` when a label of `label_size` (height, width) fits `image` only as stored, not as shown.

    Images are used as shown (EXIF orientation applied, as viewers, `predict` and most annotation tools show them),
    so a label must match the shown image. A label that matches only the stored, unturned size of an image with EXIF
    orientation 5..8 was drawn on the unturned pixels: using the turned image with it would misalign every pixel, so
    it is refused. (Orientations 2..4, and 5..8 of a square image, keep the size: their labels are taken as drawn on
    the shown image.) Sizes that fit neither way are left to the caller's size check.
    """
    orientation = exif_orientation(image)
    stored = (image.size[1], image.size[0])
    shown = (stored[1], stored[0]) if orientation >= 5 else stored
    if tuple(label_size) == shown or tuple(label_size) != stored:
        return
    raise ValueError(
        f"the image carries EXIF orientation {orientation} ({ORIENTATION_NAMES[orientation]} when shown) and is"
        f" {shown[0]}x{shown[1]} (height x width) as shown, but its label is {stored[0]}x{stored[1]}, the size of"
        " the unturned pixels as stored: the label was drawn without the orientation. Images are used as shown;"
        " turn the label the same way, or remove the image's EXIF orientation tag (e.g. `exiftool -Orientation="
        " -overwrite_original FILE`) to use it as stored"
    )
