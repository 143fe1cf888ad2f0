"""Pictures of a prediction: class colours (`palette.py`), label PNGs, colour overlays with a legend of the classes
present, and prototype overlays (each pixel in its class's colour, shaded by the prototype it matched).

Everything here turns arrays into arrays or PIL images in memory; writing files is `prediction_files.py`'s. The
legend drawing itself (`legend_picture`, `attach_legend`) lives in `visualization.py`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .palette import IGNORE_COLOUR

# The colour of pixels rejected as unknown in overlays: the label PNG's colour of the ignore value they get (a light
# neutral, apart from every class colour: `palette.RESERVED_COLOURS`).
UNKNOWN_COLOUR = IGNORE_COLOUR


def class_colormap(num_classes: int) -> np.ndarray:
    """(max(num_classes, 256), 3) uint8 colours of classes 0 .. K-1 (`palette.class_palette`: far apart in OKLab,
    black for class 0; entry 255 is the ignored label's neutral colour when K <= 255)."""
    from .palette import class_palette

    return class_palette(num_classes)


def label_colours(label_map: np.ndarray, num_classes: int | None) -> np.ndarray:
    """`class_colormap` for a model of `num_classes` (default: the label map's largest value + 1), long enough for
    every value of `label_map` (so 255, the ignored label, gets the neutral ignore colour for K <= 255)."""
    largest = int(label_map.max()) if label_map.size else 0
    colours = class_colormap(num_classes or largest + 1)
    return colours if largest < len(colours) else class_colormap(largest + 1)


def index_png(values: np.ndarray, count: int, colours: np.ndarray) -> Image.Image:
    """An (H, W) map of indices in [0, count) as a PNG-ready image whose pixel values are the indices: palette mode
    ('P', `colours` (>= min(count, 256), 3) uint8 as its palette) when count <= 256, else 16-bit grey ('I;16', up to
    65536 indices; a viewer shows it dark, the values are exact)."""
    if count <= 256:
        image = Image.fromarray(values.astype(np.uint8), mode="P")
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[: min(256, len(colours))] = colours[:256]
        image.putpalette(palette.reshape(-1).tolist())
        return image
    if count > 65536:
        raise ValueError(f"A PNG holds at most 65536 indices, got {count}.")
    return Image.fromarray(values.astype(np.uint16))


def label_png(label_map: np.ndarray, num_classes: int) -> Image.Image:
    """The label map as a PNG-ready image: palette mode ('P', value = class index, colours `class_colormap`) when
    K <= 256, else 16-bit."""
    return index_png(label_map, num_classes, class_colormap(num_classes))


def blend(image: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """(H, W, 3) uint8: `alpha` of the (H, W, 3) colours over the image."""
    mixed = alpha * colours.astype(np.float32) + (1 - alpha) * image.astype(np.float32)
    return mixed.round().clip(0, 255).astype(np.uint8)


def legend_font_size(image: np.ndarray) -> int:
    """The legend's font size for an overlay of `image`: scaled with the image, at least 10 pixels."""
    return max(10, min(image.shape[:2]) // 25)


def present_classes(label_map: np.ndarray, id2label: dict[int, str] | None) -> list[int]:
    """The classes of `id2label` that occur in `label_map`, in index order."""
    present = set(np.unique(label_map).tolist())
    return [int(k) for k in sorted(id2label or {}, key=int) if int(k) in present]


def colour_overlay(
    image: np.ndarray,
    label_map: np.ndarray,
    id2label: dict[int, str] | None = None,
    alpha: float = 0.5,
    legend: bool = True,
    unknown_map: np.ndarray | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8: class colours blended over the image, with a legend of the classes present.

    `unknown_map` (H, W) bool: the pixels rejected as unknown (`Prediction.unknown_map`), painted in the neutral
    `UNKNOWN_COLOUR` and listed last in the legend as "unknown".

    The legend (font scaled with the image) sits in the bottom-right corner when it covers at most
    `visualization.LEGEND_MAX_FRACTION` of the image; for a smaller image it goes on a white strip beside it, so the
    result is wider (and taller if the legend is): the image part is never hidden.
    """
    from .visualization import attach_legend, legend_picture

    colormap = label_colours(label_map, len(id2label or {}))
    colours = colormap[label_map]
    unknown = unknown_map is not None and bool(unknown_map.any())
    if unknown:
        colours[unknown_map] = UNKNOWN_COLOUR
    blended = blend(image, colours, alpha)
    present = present_classes(label_map, id2label)
    if not legend or not (present or unknown):
        return blended
    items = [(str(id2label[k]), colormap[k]) for k in present]
    if unknown:
        items.append(("unknown", np.asarray(UNKNOWN_COLOUR, dtype=np.uint8)))
    return attach_legend(blended, legend_picture(items, legend_font_size(image)))


def prototype_colormap(num_prototypes: int) -> np.ndarray:
    """(M, 3) uint8 qualitatively distinct colours, one per prototype index (evenly spaced hues)."""
    import colorsys

    colours = [colorsys.hsv_to_rgb(index / num_prototypes, 0.85, 0.95) for index in range(num_prototypes)]
    return (np.asarray(colours) * 255).round().astype(np.uint8)


def class_boundaries(label_map: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another class."""
    edges = np.zeros(label_map.shape, dtype=bool)
    edges[:, :-1] |= label_map[:, :-1] != label_map[:, 1:]
    edges[:-1, :] |= label_map[:-1, :] != label_map[1:, :]
    return edges


def shade_table(colours: np.ndarray, num_prototypes: int) -> np.ndarray:
    """(n, M, 3) uint8: the shades of n class colours (n, 3) for prototypes 0 .. M-1: prototype 0 darkest, M-1
    lightest (up to 75% of the way to black and to white), the middle one the class colour; near-black colours are
    lifted to grey first. Any M works; neighbouring prototypes of a large M get close shades."""
    base = colours.astype(np.float32)
    base = np.where(base.max(axis=-1, keepdims=True) < 60, 128.0, base)[:, None, :]  # (n, 1, 3)
    level = np.arange(num_prototypes, dtype=np.float32)[None, :, None] / max(1, num_prototypes - 1) - 0.5
    amount = np.abs(level) * 1.5
    target = np.where(level > 0, 255.0, 0.0)
    return (base * (1 - amount) + target * amount).round().clip(0, 255).astype(np.uint8)


def prototype_shades(
    label_map: np.ndarray, prototype_map: np.ndarray, num_prototypes: int, num_classes: int | None = None
) -> np.ndarray:
    """(H, W, 3) uint8: each pixel in its class's colour (as in `colour_overlay`), shaded by its prototype index
    (`shade_table`: prototype 0 darkest, prototype M-1 lightest)."""
    table = shade_table(label_colours(label_map, num_classes), num_prototypes)
    return table[label_map, np.clip(prototype_map, 0, num_prototypes - 1)]


def prototype_legend(
    label_map: np.ndarray, id2label: dict[int, str], num_prototypes: int, font_size: int
) -> np.ndarray | None:
    """(h, w, 3) uint8 legend of a prototype overlay: what the shades mean, then per class present its name and its
    shades for prototypes 0 .. M-1 (left to right); None if no class of `id2label` is present."""
    from .visualization import legend_picture

    present = present_classes(label_map, id2label)
    if not present:
        return None
    table = shade_table(class_colormap(max(present) + 1)[present], num_prototypes)
    last = num_prototypes - 1
    title = f"shade = prototype 0 (dark) .. {last} (light)" if last > 0 else "1 prototype per class"
    items = [(str(id2label[k]), table[index]) for index, k in enumerate(present)]
    return legend_picture(items, font_size, title=title)


def prototype_overlay(
    image: np.ndarray,
    label_map: np.ndarray,
    prototype_map: np.ndarray,
    num_prototypes: int,
    alpha: float = 0.7,
    id2label: dict[int, str] | None = None,
    legend: bool = True,
) -> np.ndarray:
    """(H, W, 3) uint8: `prototype_shades` blended over the image, class boundaries in white; pixels of one class
    that matched different prototypes get different shades of the class colour. With `id2label` a legend
    (`prototype_legend`: the classes present, their shades from prototype 0 to M-1) is attached as in
    `colour_overlay` (in the corner, or beside a small image)."""
    from .visualization import attach_legend

    colours = prototype_shades(label_map, prototype_map, num_prototypes, len(id2label or {}))
    blended = blend(image, colours, alpha)
    blended[class_boundaries(label_map)] = 255
    key = prototype_legend(label_map, id2label, num_prototypes, legend_font_size(image)) if legend else None
    return blended if key is None else attach_legend(blended, key)
