"""Hugging Face Inference Endpoints custom handler for a ProtoSegformer repository (copied there as `handler.py`).

Self-contained on purpose: on an Endpoint the `proto_segformer` package is not installed, so the model is loaded
through transformers with `trust_remote_code=True` from the code files stored next to the weights. Loading fails
with an error naming the tensor when the weights lack `prototypes` or hold NaN or inf.

Request: `{"inputs": <image>}` where the image is raw bytes (what Endpoints pass for an `image/*` request body), a
base64 string (standard alphabet; line breaks and other whitespace, as written by coreutils `base64` or MIME, are
ignored; optionally a `data:` URI, as sent in a JSON body), or a PIL image.
Response: the image-segmentation pipeline format, one entry per class present:
`[{"label": str, "score": float, "mask": <PNG, base64>}]` where the mask is a single-channel PNG of the image's
size (as shown: EXIF orientation applied), 255 on the class's pixels and 0 elsewhere, and the score is the mean
softmax probability of the class over those pixels.

Unknown pixels, off by default: `{"inputs": ..., "parameters": {"reject_unknown": true}}` (or the constructor's
`reject_unknown=True`, or the environment variable PROTOSEG_REJECT_UNKNOWN=1 for every request) gives the pixels whose
`max_similarity` (the largest similarity to any prototype) is below the model's calibrated `unknown_threshold` one
segment labelled "unknown", last (its score: the mean max_similarity of its pixels), taken out of the class segments:
the same rule as the package's `segmenter.UnknownRejection`. A model without a calibrated threshold answers such a
request with a ValueError naming scripts/calibrate_unknown.py.

Pixels come from `image_decoding.py` (a byte-identical copy of `proto_segformer/image_decoding.py` is stored beside
`handler.py`), the decoder training and `predict` use: an image file gives the endpoint the pixels it gave training.

Work per request is bounded: an image of more than `max_pixels` pixels (default 4,194,304 = 2048 x 2048; the
constructor's `max_pixels` or the environment variable PROTOSEG_MAX_PIXELS) is refused from its header, before it is
decoded; only common raster formats are read (PNG, JPEG, WebP, BMP, GIF, TIFF). Every request the handler cannot
serve is a `ValueError` with a message that says why.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

try:  # inside the proto_segformer package
    from .image_decoding import to_rgb_image
except ImportError:  # handler.py in a Hub repository: the byte-identical copy of image_decoding.py beside it
    from image_decoding import to_rgb_image

DEFAULT_MAX_PIXELS = 2048 * 2048
# Raster formats PIL decodes by itself; others (EPS through Ghostscript, for one) are refused before any decoding.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG includes multi-picture (MPO) files
MAX_PIXELS_VARIABLE = "PROTOSEG_MAX_PIXELS"
REJECT_UNKNOWN_VARIABLE = "PROTOSEG_REJECT_UNKNOWN"
UNKNOWN_LABEL = "unknown"
OBJECT_REPR = re.compile(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>")  # e.g. PIL's "<_io.BytesIO object at 0x...>"


def max_pixels_setting(max_pixels: int | None = None) -> int:
    """The pixel cap: `max_pixels` if given, else $PROTOSEG_MAX_PIXELS, else `DEFAULT_MAX_PIXELS`."""
    if max_pixels is None:
        text = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
        try:
            max_pixels = int(text.replace("_", "")) if text else DEFAULT_MAX_PIXELS
        except ValueError as error:
            raise ValueError(f"{MAX_PIXELS_VARIABLE} must be a whole number of pixels, got {text!r}.") from error
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive number of pixels, got {max_pixels}.")
    return int(max_pixels)


def check_image_size(width: int, height: int, max_pixels: int) -> None:
    """`ValueError` when a `width` x `height` image has more than `max_pixels` pixels."""
    if width * height > max_pixels:
        raise ValueError(
            f"The image is {width}x{height} = {width * height:,} pixels, above this endpoint's limit of"
            f" {max_pixels:,} pixels: downscale it before sending (the limit is the handler's max_pixels, or the"
            f" environment variable {MAX_PIXELS_VARIABLE})."
        )


def describe_error(error: Exception) -> str:
    """What went wrong in decoding, in words: no object reprs (PIL names the buffer it could not read)."""
    if isinstance(error, UnidentifiedImageError):
        return f"the data is not an image in a format this endpoint reads ({', '.join(IMAGE_FORMATS)}), or is cut short"
    text = OBJECT_REPR.sub("", str(error)).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def base64_bytes(text: str) -> bytes:
    """The bytes of a standard base64 string (whitespace and line breaks ignored; a `data:...;base64,` prefix too)."""
    if text.startswith("data:"):
        text = text.split(",", 1)[1] if "," in text else ""
    text = "".join(text.split())
    if not text:
        raise ValueError("'inputs' is an empty string; send the image as bytes or as base64 text.")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"'inputs' is a string but not valid base64 image data ({error}).") from error


def decode_image(inputs: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB PIL image from bytes, a base64 string (or `data:image/...;base64,` URI) or a PIL image.

    The size is checked against `max_pixels` from the image header, before decoding; any failure to decode is a
    `ValueError` that says what is wrong. The pixels come from `image_decoding.to_rgb_array`, the decoder training
    and `predict` use (EXIF orientation applied, transparency on white, 16-bit and float samples scaled by their
    range), so the endpoint sees an image file as the model saw it in training."""
    if isinstance(inputs, str):
        inputs = base64_bytes(inputs)
    if isinstance(inputs, (bytes, bytearray, memoryview)):
        if len(inputs) == 0:
            raise ValueError("'inputs' holds no bytes; send the image file's bytes.")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(bytes(inputs)), formats=IMAGE_FORMATS)  # reads the header only
        except Image.DecompressionBombError as error:  # Pillow's own limit, checked from the header as well
            raise ValueError(
                f"The image is too large to decode ({error}); this endpoint's limit is {max_pixels:,} pixels:"
                " downscale it before sending."
            ) from error
        except Exception as error:  # noqa: BLE001 - PIL raises many types for bytes that are not an image
            raise ValueError(f"'inputs' could not be decoded as an image ({describe_error(error)}).") from error
    elif isinstance(inputs, Image.Image):
        image = inputs
    else:
        raise ValueError(f"'inputs' must be image bytes, a base64 string or a PIL image, got {type(inputs).__name__}.")
    check_image_size(image.width, image.height, max_pixels)
    try:
        image.load()
        return to_rgb_image(image)
    except Exception as error:  # noqa: BLE001 - truncated data, corrupt EXIF, unsupported modes, ...
        raise ValueError(f"'inputs' could not be decoded as an image ({describe_error(error)}).") from error


def mask_to_base64_png(mask: np.ndarray) -> str:
    """A (H, W) bool mask as a base64 single-channel PNG (255 inside)."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class EndpointHandler:
    """Inference Endpoints entry point: `EndpointHandler(path)(data) -> [{label, score, mask}]`.

    `max_pixels`: the largest image accepted (see the module docstring); None = $PROTOSEG_MAX_PIXELS or 2048 x 2048.
    """

    def __init__(self, path: str = "", max_pixels: int | None = None, reject_unknown: bool | None = None) -> None:
        self.max_pixels = max_pixels_setting(max_pixels)
        if reject_unknown is None:
            reject_unknown = os.environ.get(REJECT_UNKNOWN_VARIABLE, "").strip().lower() in ("1", "true", "yes")
        self.reject_unknown = bool(reject_unknown)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForSemanticSegmentation.from_pretrained(path, trust_remote_code=True)
        self.model.check_finite()  # NaN or inf in the prototypes or any weight: an error naming the tensors
        self.model.to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        if self.reject_unknown:
            self.unknown_threshold()  # a model without a threshold fails at start, not at the first request

    def unknown_threshold(self) -> float:
        """The model's calibrated `unknown_threshold`; a ValueError naming the calibration command if it has none."""
        threshold = getattr(self.model.config, "unknown_threshold", None)
        if threshold is None:
            raise ValueError(
                "reject_unknown needs a calibrated threshold and this model has none (no unknown_threshold in its"
                " config.json). Calibrate it: python scripts/calibrate_unknown.py --model_name_or_path MODEL"
                " --dataset_name DATA, then upload the model again."
            )
        return float(threshold)

    def _reject(self, data: dict[str, Any]) -> bool:
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError("'parameters' must be a JSON object, e.g. {\"reject_unknown\": true}.")
        value = parameters.get("reject_unknown", self.reject_unknown)
        if not isinstance(value, bool):
            raise ValueError(f"'parameters.reject_unknown' must be true or false, got {value!r}.")
        return value

    @torch.no_grad()
    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError("The request must be a JSON object with the image under 'inputs'.")
        reject = self._reject(data)
        threshold = self.unknown_threshold() if reject else None
        image = decode_image(data["inputs"], self.max_pixels)
        pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.device)
        extra = {"output_max_similarity": True} if reject else {}
        outputs = self.model(pixel_values=pixel_values, **extra)
        logits = outputs.logits.float()
        if not torch.isfinite(logits).all():
            raise RuntimeError("The model produced NaN or inf scores for this image; its weights may be broken.")
        size = (image.height, image.width)
        probabilities = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0].softmax(dim=0)
        confidence, label_map = probabilities.max(dim=0)
        label_map, confidence = label_map.cpu().numpy(), confidence.cpu().numpy()
        results, unknown_segment = [], None
        unknown = np.zeros(label_map.shape, dtype=bool)
        if reject:
            nearest = outputs.max_similarity[:, None].float()
            nearest = F.interpolate(nearest, size=size, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
            unknown = nearest < threshold
            if unknown.any():
                unknown_segment = {
                    "label": UNKNOWN_LABEL,
                    "score": round(float(nearest[unknown].mean()), 4),
                    "mask": mask_to_base64_png(unknown),
                }
        for class_index in np.unique(label_map[~unknown]):
            mask = (label_map == class_index) & ~unknown
            results.append(
                {
                    "label": self.id2label.get(int(class_index), str(int(class_index))),
                    "score": round(float(confidence[mask].mean()), 4),
                    "mask": mask_to_base64_png(mask),
                }
            )
        results = sorted(results, key=lambda entry: -entry["score"])
        return results + [unknown_segment] if unknown_segment is not None else results
