"""The evaluation's pictures (PIL only), readable at 150 classes and more:

- `iou_chart`: one row per class, sorted by IoU (best first), a bar in the class's colour (`palette`), the value;
  classes absent from the split at the end, marked as such;
- `confusion_chart`: the `top` most confused pairs (reference -> predicted class), each bar the share of the
  reference class's pixels predicted as the other class, with the pixel count. A full K x K matrix is unreadable at
  150 classes; the pairs show where the errors are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .metrics import ConfusionMatrix
from .palette import class_colours
from .visualization import _font, fit_text

ROW = 16
NAME_WIDTH = 220
BAR_WIDTH = 360
VALUE_WIDTH = 150
MARGIN = 8
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (130, 130, 130)


def _canvas(rows: int, title: str, subtitle: str) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    width = MARGIN * 2 + NAME_WIDTH + BAR_WIDTH + VALUE_WIDTH
    height = MARGIN * 2 + 2 * ROW + 6 + max(rows, 1) * ROW
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), title, fill=TEXT, font=_font(13))
    draw.text((MARGIN, MARGIN + ROW), subtitle, fill=MUTED, font=_font(11))
    return image, draw, MARGIN + 2 * ROW + 6


def _bar(draw: ImageDraw.ImageDraw, y: int, fraction: float, colour: tuple[int, int, int]) -> None:
    x = MARGIN + NAME_WIDTH
    draw.rectangle((x, y + 2, x + BAR_WIDTH, y + ROW - 3), outline=(225, 225, 225))
    length = int(round(BAR_WIDTH * min(max(fraction, 0.0), 1.0)))
    if length:
        draw.rectangle((x, y + 2, x + length, y + ROW - 3), fill=colour, outline=(60, 60, 60))


def iou_chart(report: dict[str, Any]) -> Image.Image:
    """Per-class IoU bars of an evaluation report (`evaluation.evaluation_report`)."""
    rows = report["per_class"]
    present = sorted((r for r in rows if not r["absent"]), key=lambda r: -(r["iou"] or 0.0))
    absent = [r for r in rows if r["absent"]]
    colours = class_colours(len(rows))
    miou = report["metrics"]["mIoU"]
    subtitle = (
        f"{report.get('dataset', '')} {report.get('split', '')}, mIoU {100 * miou:.2f}" if miou is not None else ""
    )
    image, draw, y = _canvas(len(rows), "IoU per class (%)", subtitle)
    font = _font(11)
    for row in present + absent:
        name = fit_text(f"{row['id']} {row['name']}", font, NAME_WIDTH - 8)
        draw.text((MARGIN, y + 2), name, fill=MUTED if row["absent"] else TEXT, font=font)
        if row["absent"]:
            text = "absent from the split" + ("" if row["iou"] is None else f" (IoU {100 * row['iou']:.1f})")
            draw.text((MARGIN + NAME_WIDTH, y + 2), text, fill=MUTED, font=font)
        else:
            _bar(draw, y, row["iou"] or 0.0, tuple(int(c) for c in colours[row["id"]]))
            draw.text(
                (MARGIN + NAME_WIDTH + BAR_WIDTH + 6, y + 2), f"{100 * (row['iou'] or 0):.1f}", fill=TEXT, font=font
            )
        y += ROW
    return image


def confused_pairs(matrix: ConfusionMatrix, top: int) -> list[tuple[int, int, int, float]]:
    """The `top` largest off-diagonal counts as (reference, predicted, pixels, share of the reference's pixels)."""
    k = matrix.num_labels
    counts = matrix.matrix[:k, :k].astype(np.int64).copy()
    np.fill_diagonal(counts, 0)
    labelled = matrix.matrix[:k, :].sum(axis=1)
    order = np.argsort(counts, axis=None, kind="stable")[::-1][: max(0, top)]
    pairs = []
    for flat in order:
        reference, predicted = divmod(int(flat), k)
        pixels = int(counts[reference, predicted])
        if pixels == 0:
            break
        pairs.append((reference, predicted, pixels, pixels / labelled[reference]))
    return pairs


def confusion_chart(matrix: ConfusionMatrix, id2label: dict[int, str], top: int = 20) -> Image.Image:
    """The `top` most confused (reference -> predicted) pairs as bars of the reference class's pixel share."""
    pairs = confused_pairs(matrix, top)
    colours = class_colours(matrix.num_labels)
    image, draw, y = _canvas(
        len(pairs),
        f"Most confused classes (top {len(pairs)})",
        "label -> predicted: share of the label's pixels (pixels)",
    )
    font = _font(11)
    if not pairs:
        draw.text((MARGIN, y + 2), "no confusion: every labelled pixel is predicted right", fill=MUTED, font=font)
    for reference, predicted, pixels, share in pairs:
        name = fit_text(f"{id2label[reference]} -> {id2label[predicted]}", font, NAME_WIDTH - 8)
        draw.text((MARGIN, y + 2), name, fill=TEXT, font=font)
        _bar(draw, y, share, tuple(int(c) for c in colours[predicted]))
        draw.text((MARGIN + NAME_WIDTH + BAR_WIDTH + 6, y + 2), f"{100 * share:.1f} % ({pixels})", fill=TEXT, font=font)
        y += ROW
    return image
