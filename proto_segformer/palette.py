"""Class colours that stay apart: every class gets a colour far from all earlier classes' colours in OKLab, a
perceptual colour space (Euclidean distance there approximates how different two colours look).

The colours are a fixed sequence: class 0 is black (the usual background colour of label PNGs); each next class takes
the candidate colour farthest (in OKLab) from every colour taken so far and from the reserved colours (white, the
class-boundary colour of prototype overlays; mid grey, what black becomes in prototype shades; `IGNORE_COLOUR`, the
ignored label 255), greedy farthest-point sampling over a fixed grid of 32 levels per RGB channel. A model with K
classes uses the first K colours, so adding classes never changes the colours of the existing ones, and neighbouring
classes (k, k+1) are at least as far apart as any two of the first K colours.

Deterministic to the bit on every machine: the OKLab coordinates are rounded to integers (1e-4 units) once and the
sampling runs in integer arithmetic (no BLAS, no float reductions whose result depends on the machine); the first
colours are pinned by a test. `class_colours` caches the sequence.

A copy of this algorithm lives in the Gradio Space template (templates/space/app.py, which cannot import this
package); a test checks that both give the same colours.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

IGNORE_INDEX = 255
# The colour of the ignored label (255) in palette PNGs: PASCAL VOC's light neutral "void" colour.
IGNORE_COLOUR = (224, 224, 192)
RESERVED_COLOURS = ((255, 255, 255), (128, 128, 128), IGNORE_COLOUR)
FIRST_COLOUR = (0, 0, 0)
LEVELS = 32  # per RGB channel: 32**3 candidate colours
# Candidates' OKLab lightness range: darker colours read as black and lighter ones as white over a photo.
LIGHTNESS = (0.40, 0.92)
QUANTUM = 10_000  # OKLab coordinates are stored as round(value * QUANTUM)
# The precomputed length of the sequence: enough for a 256-entry palette; longer sequences are computed on demand.
MIN_SEQUENCE = 256


def oklab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) float64 OKLab (L in [0, 1]) of (..., 3) uint8 sRGB colours (Björn Ottosson's transform)."""
    value = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(value <= 0.04045, value / 12.92, ((value + 0.055) / 1.055) ** 2.4)
    r, g, b = linear[..., 0], linear[..., 1], linear[..., 2]
    # Written out (no matrix product) so that no BLAS call is involved.
    lms = (
        0.4122214708 * r + 0.5363325363 * g + 0.0514459929 * b,
        0.2119034982 * r + 0.6806995451 * g + 0.1073969566 * b,
        0.0883024619 * r + 0.2817188376 * g + 0.6299787005 * b,
    )
    l_, m_, s_ = (np.cbrt(channel) for channel in lms)
    return np.stack(
        (
            0.2104542553 * l_ + 0.7936177850 * m_ - 0.0040720468 * s_,
            1.9779984951 * l_ - 2.4285922050 * m_ + 0.4505937099 * s_,
            0.0259040371 * l_ + 0.7827717662 * m_ - 0.8086757660 * s_,
        ),
        axis=-1,
    )


def quantized_oklab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) int64 OKLab coordinates in units of 1 / `QUANTUM`."""
    return np.rint(oklab(rgb) * QUANTUM).astype(np.int64)


def candidate_colours() -> tuple[np.ndarray, np.ndarray]:
    """The candidates: (n, 3) uint8 colours of the RGB grid (levels round(i * 255 / (LEVELS - 1)), red slowest)
    whose lightness is in `LIGHTNESS`, and their (n, 3) int64 `quantized_oklab` coordinates."""
    levels = (np.arange(LEVELS) * 255 * 2 + (LEVELS - 1)) // (2 * (LEVELS - 1))  # exact integer rounding
    red, green, blue = np.meshgrid(levels, levels, levels, indexing="ij")
    colours = np.stack((red.ravel(), green.ravel(), blue.ravel()), axis=1).astype(np.uint8)
    points = quantized_oklab(colours)
    low, high = (round(bound * QUANTUM) for bound in LIGHTNESS)
    keep = (points[:, 0] >= low) & (points[:, 0] <= high)
    return colours[keep], points[keep]


def _farthest_point_sequence(count: int) -> np.ndarray:
    """(count, 3) uint8: `FIRST_COLOUR`, then greedy farthest points in OKLab (ties: the first candidate)."""
    candidates, points = candidate_colours()
    columns = [np.ascontiguousarray(points[:, axis]) for axis in range(3)]

    def squared_distances(point: np.ndarray) -> np.ndarray:
        return sum((column - int(value)) ** 2 for column, value in zip(columns, point))

    taken = [np.asarray(FIRST_COLOUR, dtype=np.uint8)]
    nearest = np.full(len(candidates), np.iinfo(np.int64).max, dtype=np.int64)  # squared distance to the taken set
    for colour in (FIRST_COLOUR, *RESERVED_COLOURS):
        nearest = np.minimum(nearest, squared_distances(quantized_oklab(np.asarray(colour, dtype=np.uint8))))
    while len(taken) < count:
        index = int(np.argmax(nearest))
        if nearest[index] == 0:  # every candidate is taken: repeat the sequence
            taken += taken[: count - len(taken)]
            break
        taken.append(candidates[index])
        nearest = np.minimum(nearest, squared_distances(points[index]))
    return np.stack(taken[:count])


@lru_cache(maxsize=4)
def _sequence(length: int) -> np.ndarray:
    sequence = _farthest_point_sequence(length)
    sequence.flags.writeable = False
    return sequence


def class_colours(count: int) -> np.ndarray:
    """(count, 3) uint8: the colours of classes 0 .. count-1 (the first `count` of the sequence; a copy)."""
    if count < 0:
        raise ValueError(f"The number of classes must be >= 0, got {count}.")
    return _sequence(max(MIN_SEQUENCE, count))[:count].copy()


def class_palette(num_classes: int) -> np.ndarray:
    """(max(num_classes, 256), 3) uint8 lookup table for label maps: class k -> `class_colours`' colour k; for a
    model with at most 255 classes, entry 255 (the ignored label) is `IGNORE_COLOUR` (a 256-entry palette PNG)."""
    palette = class_colours(max(num_classes, 256))
    if num_classes <= IGNORE_INDEX:
        palette[IGNORE_INDEX] = IGNORE_COLOUR
    return palette


def minimum_distance(colours: np.ndarray) -> float:
    """The smallest OKLab distance between two of the (n, 3) uint8 colours (inf for fewer than two)."""
    points = oklab(np.asarray(colours, dtype=np.uint8))
    if len(points) < 2:
        return float("inf")
    difference = points[:, None, :] - points[None, :, :]
    distances = np.sqrt((difference * difference).sum(axis=-1))
    return float(distances[np.triu_indices(len(points), k=1)].min())
