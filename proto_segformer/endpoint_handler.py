"""Hugging Face Inference Endpoints custom handler for a ProtoSegformer repository (copied there as `handler.py`).

Self-contained on purpose: on an Endpoint the `proto_segformer` package is not installed, so the model is loaded
through transformers with `trust_remote_code=True` from the code files stored next to the weights.

Request: `{"inputs": <image>}` where the image is raw bytes (what Endpoints pass for an `image/*` request body), a
base64 string (optionally a `data:` URI, as sent in a JSON body), or a PIL image.
Response: the image-segmentation pipeline format, one entry per class present:
`[{"label": str, "score": float, "mask": <PNG, base64>}]` where the mask is a single-channel PNG of the image's
size, 255 on the class's pixels and 0 elsewhere, and the score is the mean softmax probability of the class over
those pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation


def decode_image(inputs: Any) -> Image.Image:
    """An RGB PIL image from bytes, a base64 string (or `data:image/...;base64,` URI) or a PIL image."""
    if isinstance(inputs, Image.Image):
        return inputs.convert("RGB")
    if isinstance(inputs, str):
        text = inputs.split(",", 1)[1] if inputs.startswith("data:") else inputs
        try:
            inputs = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ValueError("'inputs' is a string but not valid base64 image data.") from error
    if isinstance(inputs, (bytes, bytearray, memoryview)):
        try:
            image = Image.open(io.BytesIO(bytes(inputs)))
            image.load()
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"'inputs' could not be decoded as an image ({error}).") from error
        return ImageOps.exif_transpose(image).convert("RGB")
    raise ValueError(f"'inputs' must be image bytes, a base64 string or a PIL image, got {type(inputs).__name__}.")


def mask_to_base64_png(mask: np.ndarray) -> str:
    """A (H, W) bool mask as a base64 single-channel PNG (255 inside)."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class EndpointHandler:
    """Inference Endpoints entry point: `EndpointHandler(path)(data) -> [{label, score, mask}]`."""

    def __init__(self, path: str = "") -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForSemanticSegmentation.from_pretrained(path, trust_remote_code=True)
        self.model.to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}

    @torch.no_grad()
    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError("The request must be a JSON object with the image under 'inputs'.")
        image = decode_image(data["inputs"])
        pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.device)
        logits = self.model(pixel_values=pixel_values).logits.float()
        size = (image.height, image.width)
        probabilities = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0].softmax(dim=0)
        confidence, label_map = probabilities.max(dim=0)
        label_map, confidence = label_map.cpu().numpy(), confidence.cpu().numpy()
        results = []
        for class_index in np.unique(label_map):
            mask = label_map == class_index
            results.append(
                {
                    "label": self.id2label.get(int(class_index), str(int(class_index))),
                    "score": round(float(confidence[mask].mean()), 4),
                    "mask": mask_to_base64_png(mask),
                }
            )
        return sorted(results, key=lambda entry: -entry["score"])
