"""The prototype atlas and prototype statistics of a trained ProtoSegformer.

Atlas: for every class k (a row) and each of its M prototypes (a column), the image patches, over a data set,
centred on the pixel of class k that is most similar to that prototype (at most one patch per image). Under each
patch: the share of class k's pixels whose nearest prototype (among class k's M) is this one ("usage").

Statistics: unused prototypes (no pixel of their class has them as nearest prototype), near-duplicates (two
prototypes of the same class with cosine similarity above a threshold, 0.95 by default) and the effective number of
prototypes per class (exp of the entropy of the usage shares: M when usage is uniform, 1 when one prototype takes
all). The official ProtoSeg release's prototypes collapse (near-duplicates, one prototype per class doing the work);
these numbers show whether a checkpoint's do.

Shapes: K classes, M prototypes per class, D embedding width, (h, w) = the embedding grid (input / 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .image_decoding import to_rgb_array

NEAR_DUPLICATE_COSINE = 0.95


# ------------------------------------------------------------------------------------------------------ statistics


def near_duplicate_pairs(
    prototypes: torch.Tensor, threshold: float = NEAR_DUPLICATE_COSINE
) -> list[tuple[int, int, int, float]]:
    """(class, m1, m2, cosine) for every pair m1 < m2 of prototypes (K, M, D) of one class with cosine > threshold."""
    unit = F.normalize(prototypes.float(), dim=-1)
    cosine = unit @ unit.transpose(1, 2)  # (K, M, M)
    upper = torch.triu(torch.ones_like(cosine[0], dtype=torch.bool), diagonal=1)
    hits = (cosine > threshold) & upper
    return [(int(k), int(a), int(b), float(cosine[k, a, b])) for k, a, b in hits.nonzero().tolist()]


def within_class_cosines(prototypes: torch.Tensor) -> np.ndarray:
    """(K, M*(M-1)/2) cosine similarities of all within-class prototype pairs."""
    unit = F.normalize(prototypes.float(), dim=-1)
    cosine = unit @ unit.transpose(1, 2)
    rows, cols = torch.triu_indices(cosine.shape[1], cosine.shape[2], offset=1)
    return cosine[:, rows, cols].cpu().numpy()


def effective_prototypes(usage: np.ndarray) -> np.ndarray:
    """(K,) exp(entropy) of each class's usage shares (K, M) of pixel counts; nan for a class with no pixels."""
    usage = np.asarray(usage, dtype=np.float64)
    totals = usage.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = usage / totals
        entropy = -np.where(shares > 0, shares * np.log(shares), 0.0).sum(axis=1)
    return np.where(totals[:, 0] > 0, np.exp(entropy), np.nan)


def prototype_statistics(
    prototypes: torch.Tensor,
    id2label: dict[int, str] | None = None,
    usage: np.ndarray | None = None,
    threshold: float = NEAR_DUPLICATE_COSINE,
    data_description: str | None = None,
) -> dict[str, Any]:
    """JSON-ready statistics of prototypes (K, M, D) and, when given, their usage counts (K, M) on a data set.

    Keys: num_classes, num_prototypes_per_class, near_duplicate_threshold, near_duplicates (list of {class,
    prototypes, cosine}), within_class_cosine {max, mean}, and with `usage`: usage {data, pixels, classes_seen,
    unused (list of {class, prototype}), unused_count, rarely_used_count (< 1% of their class's pixels),
    effective_prototypes_per_class {class: value}, mean_effective_prototypes}.
    """
    num_classes, num_prototypes, _ = prototypes.shape
    names = {int(k): str(v) for k, v in (id2label or {}).items()}
    name = lambda k: names.get(k, str(k))  # noqa: E731
    pairs = near_duplicate_pairs(prototypes, threshold)
    cosines = within_class_cosines(prototypes) if num_prototypes > 1 else np.zeros((num_classes, 0))
    stats: dict[str, Any] = {
        "num_classes": int(num_classes),
        "num_prototypes_per_class": int(num_prototypes),
        "near_duplicate_threshold": threshold,
        "near_duplicates": [{"class": name(k), "prototypes": [a, b], "cosine": round(c, 4)} for k, a, b, c in pairs],
        "within_class_cosine": {
            "max": round(float(cosines.max()), 4) if cosines.size else None,
            "mean": round(float(cosines.mean()), 4) if cosines.size else None,
        },
    }
    if usage is not None:
        usage = np.asarray(usage, dtype=np.int64)
        seen = usage.sum(axis=1) > 0
        unused = [(int(k), int(m)) for k, m in zip(*np.nonzero((usage == 0) & seen[:, None]))]
        shares = usage / np.maximum(usage.sum(axis=1, keepdims=True), 1)
        effective = effective_prototypes(usage)
        stats["usage"] = {
            "data": data_description,
            "pixels": int(usage.sum()),
            "classes_seen": int(seen.sum()),
            "unused": [{"class": name(k), "prototype": m} for k, m in unused],
            "unused_count": len(unused),
            "rarely_used_count": int(((shares < 0.01) & seen[:, None]).sum()),
            "effective_prototypes_per_class": {
                name(k): round(float(effective[k]), 2) for k in range(num_classes) if seen[k]
            },
            "mean_effective_prototypes": round(float(np.nanmean(effective)), 2) if seen.any() else None,
        }
    return stats


# ------------------------------------------------------------------------------------------------- data for atlas


class DatasetSamples(Sequence):
    """Random access (image (H, W, 3) uint8, label (H, W) int or None) over a `datasets.Dataset` or a list."""

    def __init__(self, data: Any, image_column: str = "image", label_column: str | None = "label") -> None:
        self.data = data
        self.image_column = image_column
        self.label_column = label_column

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:  # type: ignore[override]
        row = self.data[index]
        if isinstance(row, tuple):
            image, label = row
        else:
            image = row[self.image_column]
            label = row.get(self.label_column) if self.label_column else None
        image = to_rgb_array(image)  # the package's one decoder, as training and predict read images
        label = None if label is None else np.asarray(label).astype(np.int64)
        return image, label


@dataclass
class PrototypeMatches:
    """What `match_prototypes` collects over a data set.

    usage: (K, M) int64, pixels of class k whose nearest prototype of class k is m.
    scores: (N_images, K, M) float32 best similarity of prototype (k, m) to a pixel of class k in each image
        (-inf where the image has no pixel of class k).
    positions: (N_images, K, M, 2) int64 (row, col) of that pixel on the image's embedding grid.
    grid_sizes: (N_images, 2) (h, w) of each image's embedding grid; input_sizes: (N_images, 2) (H, W) of each
        network input (the processor's size, or the image's own size for a processor that does not resize).
    """

    usage: np.ndarray
    scores: np.ndarray
    positions: np.ndarray
    grid_sizes: np.ndarray
    input_sizes: np.ndarray
    labelled: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the first image's embedding grid (all images share it when the processor resizes)."""
        return tuple(int(v) for v in self.grid_sizes[0])

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the first image's network input."""
        return tuple(int(v) for v in self.input_sizes[0])

    def best(self, top_n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(K, M, top_n) image indices and scores of the best matches, best first (score -inf: no match)."""
        count = min(top_n, self.scores.shape[0])
        order = np.argsort(-self.scores, axis=0, kind="stable")[:count]  # (n, K, M)
        scores = np.take_along_axis(self.scores, order, axis=0)
        return np.moveaxis(order, 0, -1), np.moveaxis(scores, 0, -1)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) label map to `size` = (h, w)."""
    tensor = torch.from_numpy(label.astype(np.int64))[None, None].float()
    return F.interpolate(tensor, size=size, mode="nearest")[0, 0].long().numpy()


def match_image(
    embeddings: torch.Tensor,
    classes: torch.Tensor,
    prototypes: torch.Tensor,
    usage: np.ndarray,
    scores: np.ndarray,
    positions: np.ndarray,
) -> None:
    """Add one image to the running matches, in place.

    embeddings (D, h, w) unit; classes (h, w) class per grid pixel (values outside [0, K) are left out);
    usage (K, M) counts; scores (K, M) and positions (K, M, 2) of this image's best pixel per prototype.
    """
    num_classes, num_prototypes, _ = prototypes.shape
    width = embeddings.shape[2]
    pixels = embeddings.reshape(embeddings.shape[0], -1).t()  # (h*w, D)
    flat_classes = classes.reshape(-1)
    for k in torch.unique(flat_classes).tolist():  # the classes present in one image
        if not 0 <= k < num_classes:
            continue
        where = (flat_classes == k).nonzero().squeeze(1)
        similarities = pixels[where] @ prototypes[k].t()  # (n_k, M)
        usage[k] += np.bincount(similarities.argmax(dim=1).cpu().numpy(), minlength=num_prototypes)
        best_score, best_pixel = similarities.max(dim=0)
        flat_index = where[best_pixel].cpu().numpy()
        scores[k] = best_score.cpu().numpy()
        positions[k, :, 0] = flat_index // width
        positions[k, :, 1] = flat_index % width


@torch.no_grad()
def match_prototypes(
    model, processor, samples: Sequence, batch_size: int = 4, progress: bool = False
) -> PrototypeMatches:
    """Run `model` over `samples` (image, label-or-None) resized by `processor` and match pixels to prototypes.

    A pixel counts for the class of its label (resized to the embedding grid; values >= K, e.g. 255, are left out),
    or, for unlabelled samples, for its predicted class.
    """
    from tqdm.auto import tqdm

    prototypes = model.prototypes.detach().float()
    num_classes, num_prototypes, _ = prototypes.shape
    device = prototypes.device
    dtype = next(model.parameters()).dtype
    total = len(samples)
    usage = np.zeros((num_classes, num_prototypes), dtype=np.int64)
    scores = np.full((total, num_classes, num_prototypes), -np.inf, dtype=np.float32)
    positions = np.zeros((total, num_classes, num_prototypes, 2), dtype=np.int64)
    grid_sizes = np.zeros((total, 2), dtype=np.int64)
    input_sizes = np.zeros((total, 2), dtype=np.int64)
    labelled = True
    resizes = bool(getattr(processor, "do_resize", True))
    bar = tqdm(total=total, desc="matching prototypes", unit="img", disable=not progress)
    for start in range(0, total, batch_size):
        batch = [(i, *samples[i]) for i in range(start, min(total, start + batch_size))]
        # Without resizing only images of one size can share a forward pass.
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray, np.ndarray | None]]] = {}
        for entry in batch:
            groups.setdefault(() if resizes else entry[1].shape, []).append(entry)
        for group in groups.values():
            pixel_values = processor(images=[image for _, image, _ in group], return_tensors="pt")["pixel_values"]
            output = model(pixel_values=pixel_values.to(device=device, dtype=dtype), output_pixel_embeddings=True)
            embeddings = output.pixel_embeddings.float()
            grid_size = tuple(embeddings.shape[2:])
            for offset, (index, _, label) in enumerate(group):
                input_sizes[index] = pixel_values.shape[2:]
                grid_sizes[index] = grid_size
                if label is None:
                    labelled = False
                    classes = output.logits[offset].argmax(dim=0)
                else:
                    if getattr(processor, "do_reduce_labels", False):  # 0 (background) -> ignore, k -> k - 1
                        label = np.where(label == 0, 255, label - 1)
                    classes = torch.from_numpy(resize_label(label, grid_size)).to(device)
                match_image(embeddings[offset], classes, prototypes, usage, scores[index], positions[index])
        bar.update(len(batch))
    bar.close()
    return PrototypeMatches(usage, scores, positions, grid_sizes, input_sizes, labelled)


# ---------------------------------------------------------------------------------------------------- atlas picture


def crop_patch(image: np.ndarray, centre: tuple[int, int], size: int) -> np.ndarray:
    """(size, size, 3) patch of `image` centred at (row, col), padded with grey beyond the borders."""
    half = size // 2
    padded = np.pad(image, ((half, half), (half, half), (0, 0)), constant_values=128)
    row, col = centre
    return padded[row : row + size, col : col + size]


def network_view(image: np.ndarray, input_size: Sequence[int]) -> np.ndarray:
    """`image` (H, W, 3) as the network saw it: resized (bilinear) to `input_size` (height, width) if it differs."""
    size = (int(input_size[1]), int(input_size[0]))
    picture = Image.fromarray(image)
    return np.asarray(picture if picture.size == size else picture.resize(size, Image.BILINEAR))


def match_patch(
    matches: PrototypeMatches, view: np.ndarray, index: int, k: int, m: int, patch_size: int, context: float = 0.25
) -> Image.Image:
    """The patch of image `index` (`view`: as the network saw it, `network_view`) around its pixel most similar to
    prototype m of class k: a square of `context` times the shorter input side, shown at `patch_size` pixels, the
    pixel ringed (`mark_centre`)."""
    grid_row, grid_col = matches.positions[index, k, m]
    (input_h, input_w), (grid_h, grid_w) = matches.input_sizes[index], matches.grid_sizes[index]
    centre = (int((grid_row + 0.5) * input_h / grid_h), int((grid_col + 0.5) * input_w / grid_w))
    crop = max(8, int(round(min(input_h, input_w) * context)))
    patch = Image.fromarray(crop_patch(view, centre, crop)).resize((patch_size, patch_size), Image.BILINEAR)
    return mark_centre(patch)


def mark_centre(
    patch: Image.Image, colour: tuple[int, int, int] = (255, 255, 0), radius: int | None = None
) -> Image.Image:
    """Draw a small ring (yellow, black-edged) at the centre of a patch: the matched pixel. Default radius: a twelfth
    of the patch, at least 3 pixels."""
    draw = ImageDraw.Draw(patch)
    cx, cy = patch.width // 2, patch.height // 2
    radius = radius or max(3, patch.width // 12)
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=(0, 0, 0), width=3)
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=colour, width=1)
    return patch


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


# The atlas's key, under the grid: what the marks mean.
ATLAS_KEY = (
    "ring: the pixel most similar to the prototype (each patch is centred on it, in the image as the model saw it)",
    "% under a patch: share of the class's pixels whose nearest prototype (of the class's) it is",
    "red frame: unused prototype (no pixel of its class is nearest to it); grey: no match in the data",
    "swatch beside a class name: the class colour of label PNGs and overlays",
)


def wrap_text(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """`text` broken at spaces into lines at most `width` pixels wide (a longer word stands alone)."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        if lines and measure.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def fit_text(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """`text`, cut short with "..." if it is wider than `width` pixels."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if measure.textlength(text, font=font) <= width:
        return text
    while text and measure.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def draw_atlas_key(width: int, font: ImageFont.ImageFont, patch_size: int, line_height: int = 14) -> Image.Image:
    """The atlas's key (`ATLAS_KEY`) as a white strip `width` pixels wide: a sample ring (as drawn on patches of
    `patch_size`), then the wrapped lines."""
    radius = max(3, patch_size // 12)
    ring = 2 * radius + 8
    text_left = 4 + ring + 6
    indent = 10  # continuation lines of an entry are indented
    lines: list[tuple[int, str]] = []
    for entry in ATLAS_KEY:
        wrapped = wrap_text(entry, font, max(60, width - text_left - indent - 4))
        lines += [(0 if index == 0 else indent, line) for index, line in enumerate(wrapped)]
    key = Image.new("RGB", (width, max(ring + 8, 6 + len(lines) * line_height)), (255, 255, 255))
    sample = Image.new("RGB", (ring, ring), (150, 150, 150))
    key.paste(mark_centre(sample, radius=radius), (4, 4))
    draw = ImageDraw.Draw(key)
    for index, (offset, line) in enumerate(lines):
        draw.text((text_left + offset, 4 + index * line_height), line, fill=(40, 40, 40), font=font)
    draw.line((0, 0, width - 1, 0), fill=(200, 200, 200))
    return key


def render_atlas(
    matches: PrototypeMatches,
    samples: Sequence,
    id2label: dict[int, str],
    top_n: int = 1,
    patch_size: int = 64,
    context: float = 0.25,
    classes: Sequence[int] | None = None,
) -> Image.Image:
    """One PNG-ready grid: a row per class (`classes`, default: those with pixels in the data), a column per
    prototype, `top_n` patches per cell, and a key under it (`ATLAS_KEY`).

    Each patch covers a square of `context` times the shorter side of the resized input (the model's view) around the
    matched pixel (ringed) and is shown at `patch_size` pixels. Under each cell: the prototype's usage share within
    its class; unused prototypes get a red frame, cells without any pixel of the class are left grey. Each class
    name has a swatch of its colour (`palette.class_colours`, as in label PNGs and overlays).
    """
    from .palette import class_colours

    num_classes, num_prototypes = matches.usage.shape
    if classes is None:  # the classes present in the data (all of them if none is)
        classes = [k for k in range(num_classes) if matches.usage[k].sum() > 0] or list(range(num_classes))
    classes = list(classes)
    colours = class_colours(max(num_classes, max(classes, default=0) + 1))
    best_images, best_scores = matches.best(top_n)
    shares = matches.usage / np.maximum(matches.usage.sum(axis=1, keepdims=True), 1)
    font, small = _font(12), _font(10)
    label_width, header, caption, gap, swatch = 110, 18, 14, 4, 12
    cell_w, cell_h = top_n * patch_size + (top_n - 1) * 2, patch_size + caption
    width = label_width + num_prototypes * (cell_w + gap)
    grid_height = header + len(classes) * (cell_h + gap)
    key = draw_atlas_key(width, small, patch_size)
    atlas = Image.new("RGB", (width, grid_height + key.height), (255, 255, 255))
    atlas.paste(key, (0, grid_height))
    draw = ImageDraw.Draw(atlas)
    for m in range(num_prototypes):
        draw.text((label_width + m * (cell_w + gap) + cell_w // 2 - 8, 2), f"p{m}", fill=(0, 0, 0), font=font)
    cache: dict[int, np.ndarray] = {}

    def resized(index: int) -> np.ndarray:
        if index not in cache:
            cache[index] = network_view(samples[index][0], matches.input_sizes[index])
        return cache[index]

    for row, k in enumerate(classes):
        top = header + row * (cell_h + gap)
        middle = top + patch_size // 2
        draw.rectangle(
            (4, middle - swatch // 2, 4 + swatch - 1, middle + swatch // 2 - 1),
            fill=tuple(int(c) for c in colours[k]),
            outline=(128, 128, 128),
        )
        name = fit_text(str(id2label.get(k, k)), font, label_width - swatch - 14)
        draw.text((8 + swatch, middle - 7), name, fill=(0, 0, 0), font=font)
        seen = matches.usage[k].sum() > 0
        for m in range(num_prototypes):
            left = label_width + m * (cell_w + gap)
            for rank in range(min(top_n, best_images.shape[-1])):
                x = left + rank * (patch_size + 2)
                if not np.isfinite(best_scores[k, m, rank]):
                    draw.rectangle((x, top, x + patch_size - 1, top + patch_size - 1), fill=(225, 225, 225))
                    continue
                index = int(best_images[k, m, rank])
                atlas.paste(match_patch(matches, resized(index), index, k, m, patch_size, context), (x, top))
            unused = seen and matches.usage[k, m] == 0
            if unused:
                draw.rectangle(
                    (left - 2, top - 2, left + cell_w + 1, top + patch_size + 1), outline=(220, 0, 0), width=2
                )
            text = "unused" if unused else (f"{100 * shares[k, m]:.0f}%" if seen else "-")
            draw.text((left + 2, top + patch_size + 1), text, fill=(200, 0, 0) if unused else (60, 60, 60), font=small)
    return atlas


@dataclass
class AtlasResult:
    """The atlas picture, the matches it was drawn from, and `prototype_statistics` of the model on the data."""

    image: Image.Image
    matches: PrototypeMatches
    statistics: dict[str, Any]


def build_prototype_atlas(
    model,
    processor,
    samples: Sequence,
    id2label: dict[int, str] | None = None,
    *,
    top_n: int = 1,
    patch_size: int = 64,
    batch_size: int = 4,
    classes: Sequence[int] | None = None,
    threshold: float = NEAR_DUPLICATE_COSINE,
    data_description: str | None = None,
    progress: bool = False,
) -> AtlasResult:
    """Match `samples` to the prototypes of `model` and draw the atlas (see the module docstring)."""
    if len(samples) == 0:
        raise ValueError("The prototype atlas needs at least one image.")
    id2label = id2label or {int(k): v for k, v in model.config.id2label.items()}
    matches = match_prototypes(model, processor, samples, batch_size=batch_size, progress=progress)
    image = render_atlas(matches, samples, id2label, top_n=top_n, patch_size=patch_size, classes=classes)
    statistics = prototype_statistics(
        model.prototypes.detach().cpu(), id2label, matches.usage, threshold, data_description
    )
    statistics["usage"]["labelled"] = matches.labelled
    return AtlasResult(image, matches, statistics)


# ------------------------------------------------------------------------------------------------------ legend

# The most of an image an in-picture legend may cover; a larger legend goes beside the image instead.
LEGEND_MAX_FRACTION = 0.2


# The widest a strip of shades (one colour per prototype) gets in a legend, in font sizes; more shades are sampled.
MAX_STRIP_WIDTH = 8


def legend_picture(
    items: Sequence[tuple[str, Sequence[int] | np.ndarray]], font_size: int, title: str | None = None
) -> np.ndarray:
    """(h, w, 3) uint8: an optional title line, then one row per (name, colour): a swatch and the name, black on
    white. A colour is one RGB triple (a square swatch) or an (n, 3) array of shades (a strip, left to right, of
    n cells of at least half a font size, at most `MAX_STRIP_WIDTH` font sizes wide: beyond that the strip shows
    evenly spaced samples of the shades)."""
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, row = max(2, font_size // 4), font_size + max(2, font_size // 4)
    swatches = [np.asarray(colour, dtype=np.uint8).reshape(-1, 3) for _, colour in items]
    cell = max(2, font_size // 2)
    swatch_width = max([font_size] + [min(len(s) * cell, MAX_STRIP_WIDTH * font_size) for s in swatches if len(s) > 1])
    texts = [name for name, _ in items] + ([title] if title else [])
    text_width = max(int(measure.textlength(text, font=font)) for text in texts)
    top_rows = 1 if title else 0
    width = max(pad + swatch_width + pad + text_width + pad, pad + text_width + pad)
    height = pad + row * (len(items) + top_rows)
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    for index, ((name, _), swatch) in enumerate(zip(items, swatches)):
        top = pad + (index + top_rows) * row
        if len(swatch) == 1:
            draw.rectangle((pad, top, pad + font_size - 1, top + font_size - 1), fill=tuple(int(c) for c in swatch[0]))
        else:
            strip_width = min(len(swatch) * cell, MAX_STRIP_WIDTH * font_size)
            columns = (np.arange(strip_width) * len(swatch)) // strip_width  # nearest shade for each pixel column
            strip = np.repeat(swatch[columns][None], font_size, axis=0)
            picture.paste(Image.fromarray(strip), (pad, top))
            draw.rectangle((pad, top, pad + strip_width - 1, top + font_size - 1), outline=(128, 128, 128))
        draw.text((2 * pad + swatch_width, top), name, fill=(0, 0, 0), font=font)
    draw.rectangle((0, 0, width - 1, height - 1), outline=(128, 128, 128))
    return np.asarray(picture)


def attach_legend(
    picture: np.ndarray, legend: np.ndarray, max_fraction: float = LEGEND_MAX_FRACTION, margin: int = 2
) -> np.ndarray:
    """`picture` (H, W, 3) with `legend` in its bottom-right corner when the legend covers at most `max_fraction` of
    it; otherwise the legend goes beside it on a white strip (the result is wider, and taller if the legend is),
    so that the legend never hides more than `max_fraction` of the picture."""
    height, width = picture.shape[:2]
    legend_h, legend_w = legend.shape[:2]
    fits = legend_h + 2 * margin <= height and legend_w + 2 * margin <= width
    if fits and legend_h * legend_w <= max_fraction * height * width:
        result = picture.copy()
        top, left = height - margin - legend_h, width - margin - legend_w
        result[top : top + legend_h, left : left + legend_w] = legend
        return result
    result = np.full((max(height, legend_h), width + margin + legend_w, 3), 255, dtype=np.uint8)
    result[:height, :width] = picture
    result[:legend_h, width + margin :] = legend
    return result


# -------------------------------------------------------------------------------------------- prediction panel


def prediction_panel(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    scale: int = 3,
    gap: int = 4,
) -> Image.Image:
    """A grid of pictures (each (H, W, 3) uint8; an overlay with its legend beside it may be larger than the
    others): one row per image, one column per view (e.g. image, ground truth, prediction overlay, prototype map),
    upscaled `scale` times (nearest), with the column titles on top. Each column is as wide as its widest picture,
    each row as tall as its tallest."""
    if not rows:
        raise ValueError("prediction_panel needs at least one row.")
    header = 20
    columns = max(len(row) for row in rows)
    widths = [max(row[c].shape[1] for row in rows if c < len(row)) * scale for c in range(columns)]
    lefts = [sum(widths[:c]) + c * gap for c in range(columns)]
    heights = [max(picture.shape[0] for picture in row) * scale for row in rows]
    tops = [header + sum(heights[:r]) + r * gap for r in range(len(rows))]
    panel = Image.new("RGB", (lefts[-1] + widths[-1], tops[-1] + heights[-1]), "white")
    draw = ImageDraw.Draw(panel)
    font = _font(13)
    for column, title in enumerate(titles[:columns]):
        draw.text((lefts[column] + 4, 3), title, fill=(0, 0, 0), font=font)
    for row_index, row in enumerate(rows):
        for column, picture in enumerate(row):
            image = Image.fromarray(picture).resize((picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST)
            panel.paste(image, (lefts[column], tops[row_index]))
    return panel
