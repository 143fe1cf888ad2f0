"""Try a ProtoSegformer model in the browser: a Gradio app for a Hugging Face Space.

Self-contained on purpose: a Space does not have the `proto_segformer` package, so the model is loaded through
transformers with `trust_remote_code=True` from the code files stored in the model repository.

For an uploaded image the app shows the segmentation overlay with a legend of the classes present and the
prototype assignment map: which of the predicted class's M prototypes each pixel matched (the class colour, darker
for prototype 0 and lighter for prototype M-1; class boundaries in white). Small results are enlarged (nearest
neighbour, whole pixels) to at least `MIN_DISPLAY_SIDE` pixels so that they can be read; captions stand above the
pictures, never on them.

A click on a pixel of either picture explains it: the class, the cosine similarity of the pixel to the prototype that
won, known / unknown when the model is calibrated, and the training patches nearest to that prototype (from
`prototype_patches.safetensors` of the model repository, written by the package's `visualize_prototypes.py
--patches_output`; a file made for other prototypes or another network is refused as stale, checked by fingerprints
computed as `proto_segformer.explanations` computes them).

Images are decoded by `image_decoding.py` (a byte-identical copy of `proto_segformer/image_decoding.py` beside this
file), as in training and `predict`: an uploaded file gives the model the pixels it gave in training.

"Mark unknown pixels" (a toggle, off by default) paints the pixels whose largest similarity to any prototype is
below the model's calibrated `unknown_threshold` in the neutral ignore colour and lists them as "unknown" in the
legend: the rule of proto_segformer's `--reject_unknown`. A model without a calibrated threshold says so.

Settings (environment variables): PROTOSEG_MODEL, the model repository id or a local folder (default: the model this
Space was written for); PROTOSEG_MAX_PIXELS, the largest image segmented at full size (default 1,048,576 =
1024 x 1024): larger images are downscaled to it first, so the work per request is bounded.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
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


# Case-based explanations: the patches file and its fingerprints, as proto_segformer.explanations writes and checks
# them (a copy: this file cannot import the package; a test checks that both give the same fingerprints).
PATCHES_FILE = "prototype_patches.safetensors"
PATCHES_FORMAT = "proto_segformer.prototype_patches/1"


def prototype_fingerprints(prototypes: torch.Tensor) -> list[str]:
    """Per prototype of (K, M, D), row-major: the first 16 hex digits of the SHA-256 of its float32 values."""
    values = prototypes.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in values.reshape(-1, values.shape[-1])]


def network_fingerprint(model: torch.nn.Module) -> str:
    """The first 16 hex digits of the SHA-256 of every state-dict entry but the prototypes (names sorted)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name == "prototypes" or name.endswith(".prototypes"):
            continue
        floating = tensor.is_floating_point()
        values = tensor.detach().to("cpu", torch.float32 if floating else torch.int64).contiguous().numpy()
        digest.update(name.encode())
        digest.update(values.astype("<f4" if floating else "<i8", copy=False).tobytes())
    return digest.hexdigest()[:16]


def find_patches_file(model_id: str) -> Path | None:
    """The model's patches file: in a local model folder, or downloaded from its repository; None without one."""
    if Path(model_id).is_dir():
        path = Path(model_id) / PATCHES_FILE
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model_id, PATCHES_FILE))
    except Exception:  # the repository has none (or the Hub cannot be reached): clicks show no patches, and say why
        return None


class PrototypePatches:
    """The training patches of the model's prototypes, matched by fingerprint; `status` says why there are none."""

    def __init__(self, path: Path | None, model) -> None:
        self.table: dict[str, list[dict]] = {}
        self.fingerprints = prototype_fingerprints(model.prototypes)
        self.num_prototypes = int(model.prototypes.shape[1])
        self.status = ""
        if path is None:
            self.status = f"this model has no {PATCHES_FILE} (the package's visualize_prototypes.py --patches_output)"
            return
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != PATCHES_FORMAT:
                    raise ValueError(f"format {metadata.get('format')!r}")
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            records = json.loads(metadata["entries"])
        except Exception as error:
            self.status = f"{PATCHES_FILE} cannot be read ({type(error).__name__}: {error})"
            return
        if metadata.get("network") != network_fingerprint(model):
            self.status = f"{PATCHES_FILE} is stale: it was made with another network (trained further since?)"
            return
        data, offsets = tensors["jpeg_bytes"].tobytes(), tensors["jpeg_offsets"]
        for i, record in enumerate(records):
            entry = {
                "rank": int(tensors["ranks"][i]),
                "similarity": float(tensors["similarities"][i]),
                "source": str(record["source"]),
                "jpeg": data[int(offsets[i]) : int(offsets[i + 1])],
            }
            self.table.setdefault(str(record["fingerprint"]), []).append(entry)
        for entries in self.table.values():
            entries.sort(key=lambda entry: entry["rank"])
        if not any(fingerprint in self.table for fingerprint in self.fingerprints):
            self.table = {}
            self.status = f"{PATCHES_FILE} is stale: none of its prototypes is one of this model's"

    def entries(self, k: int, m: int) -> list[dict]:
        return self.table.get(self.fingerprints[k * self.num_prototypes + m], [])


def calibrated_threshold(config) -> float | None:
    """The calibrated similarity below which a pixel is unknown, when the model records one."""
    value = getattr(config, "unknown_threshold", None)
    return float(value) if isinstance(value, (int, float)) else None


def explanation_html(
    x: int,
    y: int,
    name: str,
    k: int,
    m: int,
    similarity: float,
    threshold: float | None,
    known: bool | None,
    patches: PrototypePatches,
) -> str:
    """What a click shows: the pixel's class, its similarity to the prototype that won, known / unknown (`known`:
    None for a model without a calibrated `threshold`), and the training patches of that prototype (or why there
    are none)."""
    if known is None:
        verdict = "no unknown threshold (the model is not calibrated)"
        state = "uncalibrated"
    else:
        state = "known" if known else "unknown"
        verdict = f"<b>{state}</b> (calibrated threshold {threshold:.3f} on the largest similarity to any prototype)"
    entries = patches.entries(k, m)
    if entries:
        figures = "".join(
            f'<figure class="patch" style="display:inline-block;margin:0 6px 0 0;text-align:center">'
            f'<img src="data:image/jpeg;base64,{base64.b64encode(e["jpeg"]).decode()}"'
            f' title="{html.escape(e["source"])}" style="width:96px;height:96px;image-rendering:pixelated">'
            f'<figcaption style="font-size:0.8em">sim {e["similarity"]:.3f}<br>{html.escape(e["source"])}'
            "</figcaption></figure>"
            for e in entries
        )
        shown = f"<div>Training patches nearest to prototype {m} (the ring marks the matched pixel):</div>{figures}"
    else:
        reason = patches.status or f"{PATCHES_FILE} holds no patches of this prototype (a class added later?)"
        shown = f'<div class="no-patches">No training patches: {html.escape(reason)}.</div>'
    return (
        f'<div class="explanation" data-x="{x}" data-y="{y}" data-class="{html.escape(name)}" data-prototype="{m}"'
        f' data-similarity="{similarity:.4f}" data-state="{state}">'
        f"<p>Pixel ({x}, {y}): <b>{html.escape(name)}</b>, prototype {m}, similarity <b>{similarity:.3f}</b>;"
        f" {verdict}.</p>{shown}</div>"
    )


CLICK_HINT = "<p><i>Click on a pixel of a result to see why it got its class.</i></p>"

# Class colours: a copy of proto_segformer.palette (this file cannot import the package; a test checks that both
# give the same colours). Class 0 black, then greedy farthest points in OKLab over a 32-level RGB grid of lightness
# 0.40-0.92, away from white, mid grey and the ignore colour; integer arithmetic, so the same on every machine.
IGNORE_COLOUR = (224, 224, 192)
RESERVED_COLOURS = ((255, 255, 255), (128, 128, 128), IGNORE_COLOUR)
PALETTE_LEVELS, PALETTE_LIGHTNESS, PALETTE_QUANTUM = 32, (0.40, 0.92), 10_000
# Results whose longer side is shorter than this are enlarged (whole pixels, nearest neighbour) for display.
MIN_DISPLAY_SIDE = 384


def quantized_oklab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) int64 OKLab coordinates (units of 1 / PALETTE_QUANTUM) of (..., 3) uint8 sRGB colours."""
    value = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(value <= 0.04045, value / 12.92, ((value + 0.055) / 1.055) ** 2.4)
    r, g, b = linear[..., 0], linear[..., 1], linear[..., 2]
    l_ = np.cbrt(0.4122214708 * r + 0.5363325363 * g + 0.0514459929 * b)
    m_ = np.cbrt(0.2119034982 * r + 0.6806995451 * g + 0.1073969566 * b)
    s_ = np.cbrt(0.0883024619 * r + 0.2817188376 * g + 0.6299787005 * b)
    lab = np.stack(
        (
            0.2104542553 * l_ + 0.7936177850 * m_ - 0.0040720468 * s_,
            1.9779984951 * l_ - 2.4285922050 * m_ + 0.4505937099 * s_,
            0.0259040371 * l_ + 0.7827717662 * m_ - 0.8086757660 * s_,
        ),
        axis=-1,
    )
    return np.rint(lab * PALETTE_QUANTUM).astype(np.int64)


def class_colours(count: int) -> np.ndarray:
    """(count, 3) uint8 colours of classes 0 .. count-1 (the same as proto_segformer.palette.class_colours)."""
    levels = (np.arange(PALETTE_LEVELS) * 255 * 2 + (PALETTE_LEVELS - 1)) // (2 * (PALETTE_LEVELS - 1))
    red, green, blue = np.meshgrid(levels, levels, levels, indexing="ij")
    candidates = np.stack((red.ravel(), green.ravel(), blue.ravel()), axis=1).astype(np.uint8)
    points = quantized_oklab(candidates)
    low, high = (round(bound * PALETTE_QUANTUM) for bound in PALETTE_LIGHTNESS)
    keep = (points[:, 0] >= low) & (points[:, 0] <= high)
    candidates, points = candidates[keep], points[keep]
    columns = [np.ascontiguousarray(points[:, axis]) for axis in range(3)]

    def squared_distances(point: np.ndarray) -> np.ndarray:
        return sum((column - int(value)) ** 2 for column, value in zip(columns, point))

    taken = [np.zeros(3, dtype=np.uint8)]
    nearest = np.full(len(candidates), np.iinfo(np.int64).max, dtype=np.int64)
    for colour in ((0, 0, 0), *RESERVED_COLOURS):
        nearest = np.minimum(nearest, squared_distances(quantized_oklab(np.asarray(colour, dtype=np.uint8))))
    while len(taken) < count:
        index = int(np.argmax(nearest))
        if nearest[index] == 0:
            taken += taken[: count - len(taken)]
            break
        taken.append(candidates[index])
        nearest = np.minimum(nearest, squared_distances(points[index]))
    return np.stack(taken[:count]) if count else np.zeros((0, 3), dtype=np.uint8)


def label_colormap(num_classes: int) -> np.ndarray:
    """(max(num_classes, 256), 3) uint8: the class colours (as proto_segformer's label PNGs and overlays use them);
    entry 255 is the ignore colour when there are at most 255 classes."""
    colours = class_colours(max(num_classes, 256))
    if num_classes <= 255:
        colours[255] = IGNORE_COLOUR
    return colours


def for_display(picture: np.ndarray, min_side: int = MIN_DISPLAY_SIDE) -> np.ndarray:
    """`picture` (H, W, 3) enlarged by a whole factor (nearest neighbour: every pixel a crisp block) until its
    longer side is at least `min_side`; a larger picture is returned as it is."""
    longer = max(picture.shape[:2])
    if longer >= min_side:
        return picture
    factor = math.ceil(min_side / longer)
    return np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)


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


def shade_table(colours: np.ndarray, num_prototypes: int) -> np.ndarray:
    """(n, M, 3) uint8 shades of n class colours for prototypes 0 .. M-1: prototype 0 darkest, M-1 lightest (up to
    75% towards black / white), the middle one the class colour; near-black colours lifted to grey first."""
    base = colours.astype(np.float32)
    base = np.where(base.max(axis=-1, keepdims=True) < 60, 128.0, base)[:, None, :]
    level = np.arange(num_prototypes, dtype=np.float32)[None, :, None] / max(1, num_prototypes - 1) - 0.5
    amount = np.abs(level) * 1.5
    return (base * (1 - amount) + np.where(level > 0, 255.0, 0.0) * amount).round().clip(0, 255).astype(np.uint8)


def prototype_picture(
    image: np.ndarray, label_map: np.ndarray, prototype_map: np.ndarray, num_prototypes: int, colours: np.ndarray
) -> np.ndarray:
    """(H, W, 3) uint8: each pixel in its class colour shaded by its prototype (`shade_table`), blended over the
    image, class boundaries in white."""
    count = int(label_map.max()) + 1
    shaded = shade_table(colours[:count], num_prototypes)[label_map, prototype_map].astype(np.float32)
    blended = (0.7 * shaded + 0.3 * image.astype(np.float32)).round().clip(0, 255).astype(np.uint8)
    blended[class_boundaries(label_map)] = 255
    return blended


def swatch(colour, title: str = "") -> str:
    """An inline square of one colour."""
    red, green, blue = (int(c) for c in colour)
    return (
        f'<span title="{html.escape(title)}" style="display:inline-block;width:1em;height:1em;'
        f'background:rgb({red},{green},{blue});border:1px solid #888;vertical-align:middle"></span>'
    )


def shade_strip(shades: np.ndarray, max_cells: int = 24) -> str:
    """The shades of one class (prototype 0 at the left), at most `max_cells` cells (evenly spaced samples)."""
    count = len(shades)
    picks = np.unique(np.linspace(0, count - 1, min(count, max_cells)).round().astype(int))
    cells = "".join(
        f'<span title="prototype {m}" style="display:inline-block;width:0.7em;height:1em;'
        f'background:rgb({shades[m][0]},{shades[m][1]},{shades[m][2]})"></span>'
        for m in picks.tolist()
    )
    return f'<span class="shades" style="border:1px solid #888;display:inline-block;line-height:0">{cells}</span>'


def legend_html(
    label_map: np.ndarray,
    prototype_map: np.ndarray,
    id2label: dict[int, str],
    colours,
    num_prototypes: int | None = None,
) -> str:
    """An HTML list of the classes present (most pixels first): colour, name, share of the image, the class's
    shades in the prototype map (prototype 0 .. M-1, left to right; M default: the largest index matched + 1) and
    the prototypes their pixels matched."""
    ids, counts = np.unique(label_map, return_counts=True)
    num_prototypes = num_prototypes or int(prototype_map.max()) + 1
    rows = []
    for class_id, count in sorted(zip(ids.tolist(), counts.tolist()), key=lambda item: -item[1]):
        used = np.unique(prototype_map[label_map == class_id]).tolist()
        name = html.escape(str(id2label.get(class_id, class_id)))
        shades = shade_table(np.asarray(colours[class_id : class_id + 1]), num_prototypes)[0]
        rows.append(
            f'<li class="legend-entry" data-class="{name}">{swatch(colours[class_id], name)} '
            f'<b class="legend-name">{name}</b>: {100 * count / label_map.size:.1f}% of the image;'
            f" prototype shades {shade_strip(shades)}; prototypes matched: {', '.join(map(str, used))}</li>"
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
        self.patches = PrototypePatches(find_patches_file(model_id), self.model)

    def unknown_threshold(self) -> float:
        """The model's calibrated threshold on max_similarity; a gr.Error naming the calibration command if none."""
        threshold = calibrated_threshold(self.model.config)
        if threshold is None:
            raise gr.Error(
                "This model has no calibrated unknown_threshold: calibrate it with python scripts/calibrate_unknown.py"
                " --model MODEL_FOLDER --dataset_name DATA and upload it again."
            )
        return threshold

    def label_and_prototype_maps(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) class index and (H, W) index of the predicted class's nearest prototype, at the image's size."""
        label_map, prototype_map, _ = self.maps(image)
        return label_map, prototype_map

    def maps(
        self, image: Image.Image, reject_unknown: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(H, W) class index and (H, W) index of the predicted class's nearest prototype, at the image's size, and
        with `reject_unknown` the (H, W) mask of the pixels below the model's unknown threshold (else None)."""
        return self.maps_and_similarity(image, reject_unknown)[:3]

    @torch.no_grad()
    def maps_and_similarity(
        self, image: Image.Image, reject_unknown: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """`maps` and the (H, W) cosine similarity of each pixel's embedding to the prototype that won there (on the
        1/4 grid, taken as the prototype map takes it): what a click shows.

        An input smaller than the encoder accepts (a small image and a processor that does not resize) is padded
        with the mean colour and the result cropped back."""
        array = np.asarray(image.convert("RGB"))
        # Channels-last said explicitly: a 3-pixel-high image would otherwise be taken for channels-first.
        pixel_values = self.processor(images=array, input_data_format="channels_last", return_tensors="pt")[
            "pixel_values"
        ]
        input_h, input_w = pixel_values.shape[2:]
        minimum = int(getattr(self.model, "min_input_size", 1))
        padded_h, padded_w = max(input_h, minimum), max(input_w, minimum)
        pixel_values = F.pad(pixel_values, (0, padded_w - input_w, 0, padded_h - input_h))
        threshold = self.unknown_threshold() if reject_unknown else None
        extra = {"output_max_similarity": True} if reject_unknown else {}
        outputs = self.model(pixel_values=pixel_values, output_pixel_embeddings=True, **extra)
        logits, embeddings = outputs.logits.float(), outputs.pixel_embeddings[0].float()  # (1, K, h, w), (D, h, w)
        if not torch.isfinite(logits).all():
            raise gr.Error("The model produced NaN or inf scores for this image; its weights may be broken.")
        size = (image.height, image.width)
        # The logits cover the padded input: in image pixels, the image scaled by padded / input size.
        scaled = (round(size[0] * padded_h / input_h), round(size[1] * padded_w / input_w))
        upsampled = F.interpolate(logits, size=scaled, mode="bilinear", align_corners=False)
        label_map = upsampled[0, :, : size[0], : size[1]].argmax(dim=0)
        scores = torch.einsum("kmd,dhw->kmhw", self.model.prototypes.float(), embeddings)
        best, nearest = scores.max(dim=1)  # (K, h, w): each class's nearest prototype on the 1/4 grid, its cosine
        rows = torch.arange(size[0]) * nearest.shape[1] // scaled[0]
        columns = torch.arange(size[1]) * nearest.shape[2] // scaled[1]
        prototype_map = nearest[label_map, rows[:, None], columns[None, :]]
        similarity_map = best[label_map, rows[:, None], columns[None, :]]
        unknown = None
        if reject_unknown:
            scores = F.interpolate(outputs.max_similarity[:, None].float(), size=scaled, mode="bilinear")
            unknown = (scores[0, 0, : size[0], : size[1]] < threshold).numpy()
        return label_map.numpy(), prototype_map.numpy(), unknown, similarity_map.numpy()

    def pictures(self, image: Image.Image, reject_unknown: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
        """(overlay, prototype map, legend HTML) of an image at its (bounded) size; with `reject_unknown` the
        unknown pixels are in the neutral ignore colour in the overlay and listed as "unknown" in the legend."""
        return self.results(image, reject_unknown)[:3]

    def results(self, image: Image.Image, reject_unknown: bool = False) -> tuple[np.ndarray, np.ndarray, str, dict]:
        """`pictures` and the maps a click reads (`explain`): label, prototype, similarity and unknown maps."""
        image = bounded(image, self.max_pixels)
        label_map, prototype_map, unknown, similarity_map = self.maps_and_similarity(image, reject_unknown)
        array = np.asarray(image)
        num_prototypes = int(self.model.prototypes.shape[1])
        overlay = overlay_picture(array, label_map, self.colours)
        legend = legend_html(label_map, prototype_map, self.id2label, self.colours, num_prototypes)
        if unknown is not None and unknown.any():
            overlay[unknown] = overlay_picture(array, np.full_like(label_map, 255), self.colours)[unknown]
            legend = legend.replace(
                "</ul>",
                f'<li class="legend-entry" data-class="unknown">{swatch(IGNORE_COLOUR, "unknown")}'
                f' <b class="legend-name">unknown</b>: {100 * unknown.mean():.1f}% of the image, below the'
                " calibrated similarity threshold</li></ul>",
            )
        return (
            overlay,
            prototype_picture(array, label_map, prototype_map, num_prototypes, self.colours),
            legend,
            {"label": label_map, "prototype": prototype_map, "similarity": similarity_map, "unknown": unknown},
        )

    def __call__(self, image: Image.Image | None, reject_unknown: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
        """What the page shows: the pictures enlarged for display (`for_display`) and the legend."""
        return self.segment(image, reject_unknown)[:3]

    def segment(
        self, image: Image.Image | None, reject_unknown: bool = False
    ) -> tuple[np.ndarray, np.ndarray, str, dict, str]:
        """`__call__`, the maps a click reads (with the display's enlargement factor) and a cleared explanation."""
        if image is None:
            raise gr.Error("Upload an image (or pick an example) first.")
        overlay, prototypes, legend, maps = self.results(image, reject_unknown)
        shown = for_display(overlay)
        maps["factor"] = shown.shape[0] // overlay.shape[0]
        return shown, for_display(prototypes), legend, maps, CLICK_HINT

    def explain(self, maps: dict | None, event: gr.SelectData) -> str:
        """What a click at `event.index` (x, y on the shown, enlarged picture) shows (`explanation_html`): known /
        unknown as the rejection marked it when it was on, else by the model's calibrated threshold."""
        if not maps:
            raise gr.Error("Segment an image first, then click on a pixel of a result.")
        factor = int(maps.get("factor", 1))
        height, width = maps["label"].shape
        x, y = (int(v) // factor for v in event.index[:2])
        if not (0 <= x < width and 0 <= y < height):
            raise gr.Error(f"The click at {event.index} is outside the image ({width}x{height} pixels).")
        k, m = int(maps["label"][y, x]), int(maps["prototype"][y, x])
        similarity = float(maps["similarity"][y, x])
        threshold = calibrated_threshold(self.model.config)
        if maps.get("unknown") is not None:
            known = not bool(maps["unknown"][y, x])
        else:
            known = None if threshold is None else similarity >= threshold
        name = self.id2label.get(k, str(k))
        return explanation_html(x, y, name, k, m, similarity, threshold, known, self.patches)


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
        reject = gr.Checkbox(
            value=False,
            label="Mark unknown pixels (far from every prototype: below the model's calibrated threshold)",
            elem_id="reject-unknown",
        )
        button = gr.Button("Segment", variant="primary", elem_id="segment")
        # Captions stand above the pictures (gr.Image's own label is drawn over the picture's top-left corner), with
        # the same height, so that both pictures start on one line; the legend above explains the shades.
        with gr.Row():
            with gr.Column():
                gr.Markdown(
                    "**Segmentation**: the class colours over the image", elem_id="overlay-caption", min_height="3.5em"
                )
                overlay = gr.Image(show_label=False, elem_id="overlay", format="png", interactive=False)
            with gr.Column():
                gr.Markdown(
                    f"**Prototype map**: the prototype each pixel matched, as a shade of its class colour: dark ="
                    f" prototype 0 ... light = prototype {num_prototypes - 1}; class boundaries in white",
                    elem_id="prototype-caption",
                    min_height="3.5em",
                )
                prototypes = gr.Image(show_label=False, elem_id="prototype-map", format="png", interactive=False)
        explanation = gr.HTML(CLICK_HINT, elem_id="explanation")  # what a click on a pixel of a result shows
        if examples:
            gr.Examples(examples=[[path] for path in examples], inputs=image, cache_examples=False)
        maps = gr.State(None)
        button.click(
            segmenter.segment, inputs=[image, reject], outputs=[overlay, prototypes, legend, maps, explanation]
        )
        overlay.select(segmenter.explain, inputs=maps, outputs=explanation)
        prototypes.select(segmenter.explain, inputs=maps, outputs=explanation)
    return demo


if __name__ == "__main__":
    build_demo().launch()
