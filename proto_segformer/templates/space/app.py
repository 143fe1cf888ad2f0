"""Try a ProtoSegformer model in the browser: a Gradio app for a Hugging Face Space.

Self-contained on purpose: a Space does not have the `proto_segformer` package, so the model is loaded through
transformers with `trust_remote_code=True` from the code files stored in the model repository.

For an uploaded image the app shows the segmentation overlay with a legend of the classes present and the
prototype assignment map: which of the predicted class's M prototypes each pixel matched (the class colour, darker
for prototype 0 and lighter for prototype M-1; class boundaries in white).

Images are decoded by `image_decoding.py` (a byte-identical copy of `proto_segformer/image_decoding.py` beside this
file), as in training and `predict`: an uploaded file gives the model the pixels it gave in training.

Settings (environment variables): PROTOSEG_MODEL, the model repository id or a local folder (default: the model this
Space was written for); PROTOSEG_MAX_PIXELS, the largest image segmented at full size (default 1,048,576 =
1024 x 1024): larger images are downscaled to it first, so the work per request is bounded.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

import gradio as gr
import numpy as np
import torch
import torch.nn.functional as F
from image_decoding import to_rgb_image  # proto_segformer's image decoder, a byte-identical copy beside this file
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

DEFAULT_MODEL = "<namespace>/<model>"  # written in by proto_segformer.space
DEFAULT_MAX_PIXELS = 1024 * 1024
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# Gradio hands the upload over in its own mode (None): a 16-bit, float or transparent image reaches `bounded`
# undecoded, so it is decoded by `image_decoding` as in training (Gradio's default "RGB" would clip it first).
INPUT_IMAGE_MODE = None


def max_pixels_setting() -> int:
    """$PROTOSEG_MAX_PIXELS, or `DEFAULT_MAX_PIXELS`; a clear error for anything but a positive whole number."""
    text = os.environ.get("PROTOSEG_MAX_PIXELS", "").strip()
    try:
        value = int(text.replace("_", "")) if text else DEFAULT_MAX_PIXELS
    except ValueError as error:
        raise ValueError(f"PROTOSEG_MAX_PIXELS must be a whole number of pixels, got {text!r}.") from error
    if value < 1:
        raise ValueError(f"PROTOSEG_MAX_PIXELS must be a positive number of pixels, got {value}.")
    return value


def label_colormap(num_classes: int) -> np.ndarray:
    """(max(num_classes, 256), 3) uint8: the PASCAL VOC colours (as imgviz and proto_segformer use), then random."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, red, green, blue = index, 0, 0, 0
        for shift in range(8):
            red |= ((value >> 0) & 1) << (7 - shift)
            green |= ((value >> 1) & 1) << (7 - shift)
            blue |= ((value >> 2) & 1) << (7 - shift)
            value >>= 3
        colours[index] = (red, green, blue)
    if num_classes > 256:
        extra = np.random.default_rng(0).integers(0, 256, size=(num_classes - 256, 3), dtype=np.uint8)
        colours = np.concatenate([colours, extra])
    return colours


def bounded(image: Image.Image, max_pixels: int) -> Image.Image:
    """The RGB image by `image_decoding.to_rgb_array` (as training and `predict` decode it: upright, transparency on
    white, 16-bit and float samples scaled by their range), downscaled (aspect kept) to at most `max_pixels` pixels."""
    try:
        image = to_rgb_image(image)
    except ValueError as error:
        raise gr.Error(f"This image cannot be read: {error}.") from error
    if image.width * image.height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (image.width * image.height))
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def class_boundaries(label_map: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another class."""
    edges = np.zeros(label_map.shape, dtype=bool)
    edges[:, :-1] |= label_map[:, :-1] != label_map[:, 1:]
    edges[:-1, :] |= label_map[:-1, :] != label_map[1:, :]
    return edges


def overlay_picture(image: np.ndarray, label_map: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8: the class colours blended over the image."""
    blended = alpha * colours[label_map].astype(np.float32) + (1 - alpha) * image.astype(np.float32)
    return blended.round().astype(np.uint8)


def prototype_picture(
    image: np.ndarray, label_map: np.ndarray, prototype_map: np.ndarray, num_prototypes: int, colours: np.ndarray
) -> np.ndarray:
    """(H, W, 3) uint8: each pixel in its class colour shaded by its prototype (0 darkest, M-1 lightest; near-black
    colours lifted to grey first), blended over the image, class boundaries in white."""
    base = colours[label_map].astype(np.float32)
    base = np.where(base.max(axis=-1, keepdims=True) < 60, 128.0, base)
    level = prototype_map.astype(np.float32)[..., None] / max(1, num_prototypes - 1) - 0.5
    amount = np.abs(level) * 1.5
    shaded = base * (1 - amount) + np.where(level > 0, 255.0, 0.0) * amount
    blended = (0.7 * shaded + 0.3 * image.astype(np.float32)).round().clip(0, 255).astype(np.uint8)
    blended[class_boundaries(label_map)] = 255
    return blended


def legend_html(label_map: np.ndarray, prototype_map: np.ndarray, id2label: dict[int, str], colours) -> str:
    """An HTML list of the classes present (most pixels first): colour, name, share of the image and the prototypes
    their pixels matched."""
    ids, counts = np.unique(label_map, return_counts=True)
    rows = []
    for class_id, count in sorted(zip(ids.tolist(), counts.tolist()), key=lambda item: -item[1]):
        red, green, blue = (int(c) for c in colours[class_id])
        used = np.unique(prototype_map[label_map == class_id]).tolist()
        name = html.escape(str(id2label.get(class_id, class_id)))
        rows.append(
            f'<li class="legend-entry" data-class="{name}"><span style="display:inline-block;width:1em;height:1em;'
            f'background:rgb({red},{green},{blue});border:1px solid #888;vertical-align:middle"></span> '
            f'<b class="legend-name">{name}</b>: {100 * count / label_map.size:.1f}% of the image; prototypes'
            f" matched: {', '.join(map(str, used))}</li>"
        )
    return '<ul class="legend" style="list-style:none;padding-left:0">' + "".join(rows) + "</ul>"


class Segmenter:
    """The model and its image processor; `__call__(image)` -> (overlay, prototype map, legend HTML)."""

    def __init__(self, model_id: str, max_pixels: int) -> None:
        self.model = AutoModelForSemanticSegmentation.from_pretrained(model_id, trust_remote_code=True).eval()
        self.model.check_finite()  # NaN or inf in the prototypes or any weight: an error naming the tensors
        self.processor = AutoImageProcessor.from_pretrained(model_id)
        self.id2label = {int(k): str(v) for k, v in self.model.config.id2label.items()}
        self.max_pixels = max_pixels
        self.colours = label_colormap(len(self.id2label))

    @torch.no_grad()
    def label_and_prototype_maps(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) class index and (H, W) index of the predicted class's nearest prototype, at the image's size."""
        pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"]
        outputs = self.model(pixel_values=pixel_values, output_pixel_embeddings=True)
        logits, embeddings = outputs.logits.float(), outputs.pixel_embeddings[0].float()  # (1, K, h, w), (D, h, w)
        if not torch.isfinite(logits).all():
            raise gr.Error("The model produced NaN or inf scores for this image; its weights may be broken.")
        size = (image.height, image.width)
        label_map = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0].argmax(dim=0)
        scores = torch.einsum("kmd,dhw->kmhw", self.model.prototypes.float(), embeddings)
        nearest = scores.argmax(dim=1)  # (K, h, w): each class's nearest prototype on the 1/4 grid
        rows = torch.arange(size[0]) * nearest.shape[1] // size[0]
        columns = torch.arange(size[1]) * nearest.shape[2] // size[1]
        prototype_map = nearest[label_map, rows[:, None], columns[None, :]]
        return label_map.numpy(), prototype_map.numpy()

    def __call__(self, image: Image.Image | None) -> tuple[np.ndarray, np.ndarray, str]:
        if image is None:
            raise gr.Error("Upload an image (or pick an example) first.")
        image = bounded(image, self.max_pixels)
        label_map, prototype_map = self.label_and_prototype_maps(image)
        array = np.asarray(image)
        num_prototypes = self.model.prototypes.shape[1]
        return (
            overlay_picture(array, label_map, self.colours),
            prototype_picture(array, label_map, prototype_map, num_prototypes, self.colours),
            legend_html(label_map, prototype_map, self.id2label, self.colours),
        )


def build_demo(model_id: str | None = None, max_pixels: int | None = None) -> gr.Blocks:
    model_id = model_id or os.environ.get("PROTOSEG_MODEL") or DEFAULT_MODEL
    segmenter = Segmenter(model_id, max_pixels or max_pixels_setting())
    num_classes, num_prototypes = segmenter.model.prototypes.shape[:2]
    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    with gr.Blocks(title=f"ProtoSegformer: {model_id}") as demo:
        gr.Markdown(
            f"# ProtoSegformer: `{model_id}`\n"
            f"Semantic segmentation by nearest prototype ({num_classes} classes x {num_prototypes} prototypes,"
            " [ProtoSeg](https://arxiv.org/abs/2203.15102) on SegFormer). Upload an image and press **Segment**."
            f" Images above {segmenter.max_pixels:,} pixels are downscaled first."
        )
        with gr.Row():
            image = gr.Image(type="pil", image_mode=INPUT_IMAGE_MODE, label="Image", elem_id="input-image")
            legend = gr.HTML(label="Classes", elem_id="legend")
        button = gr.Button("Segment", variant="primary", elem_id="segment")
        with gr.Row():
            overlay = gr.Image(label="Segmentation", elem_id="overlay", format="png", interactive=False)
            prototypes = gr.Image(
                label=f"Prototype assignment (which of the class's {num_prototypes} prototypes each pixel matched:"
                " darker = lower index)",
                elem_id="prototype-map",
                format="png",
                interactive=False,
            )
        if examples:
            gr.Examples(examples=[[path] for path in examples], inputs=image, cache_examples=False)
        button.click(segmenter, inputs=image, outputs=[overlay, prototypes, legend])
    return demo


if __name__ == "__main__":
    build_demo().launch()
