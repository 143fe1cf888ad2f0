"""Test-time augmentation as mmsegmentation does it: several views of an image (scales, and each view's horizontal
flip), each view's class scores resized back to the image size, averaged, then the argmax.

What is averaged is what mmsegmentation's `SegTTAModel.merge_preds` averages: the **softmax probabilities** of each
view (not the logits), every view weighted equally. A view at scale r is the image resized by r (keep the aspect
ratio, sides rounded as mmcv's `imrescale`, `int(side * r + 0.5)`) from the size the model sees without
augmentation: the image's own size, or the image processor's size when it resizes ("whole" mode). Each view runs in
the segmenter's mode ("whole" or "slide", `Segmenter.image_logits`), its scores are resized bilinearly to the image
and, for a flipped view, flipped back. One view (scale 1.0, no flip) is plain prediction: the argmax of its logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .segmenter import Segmenter, processor_crop_size


@dataclass(frozen=True)
class TestTimeAugmentation:
    """scales: resize ratios (positive; mmsegmentation's ADE20K and Cityscapes recipes use 0.5 0.75 1.0 1.25 1.5
    1.75); flip: add each scale's horizontally flipped view."""

    __test__ = False  # not a pytest test class

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        check_scales(self.scales)
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    @property
    def views(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    @property
    def plain(self) -> bool:
        """One view at scale 1.0, unflipped: plain prediction."""
        return self.scales == (1.0,) and not self.flip

    def description(self) -> str:
        scales = ", ".join(f"{s:g}" for s in self.scales)
        return f"scales {scales}" + (" with horizontal flip" if self.flip else ", no flip")


def check_scales(scales: Sequence[float]) -> None:
    """`ValueError` (one line) unless `scales` is a non-empty list of finite positive numbers."""
    if len(scales) == 0:
        raise ValueError("--scales needs at least one ratio, e.g. --scales 1.0 (or 0.5 0.75 1.0 1.25 1.5 1.75).")
    bad = [s for s in scales if not (np.isfinite(float(s)) and float(s) > 0)]
    if bad:
        raise ValueError(f"--scales must be positive numbers (resize ratios such as 0.5 1.0 1.5), got {bad[0]:g}.")


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(height, width) `size` resized by `scale` as mmcv's imrescale rounds, at least one pixel."""
    return max(1, int(size[0] * scale + 0.5)), max(1, int(size[1] * scale + 0.5))


def view_scores(segmenter: Segmenter, array: np.ndarray, scale: float, flip: bool) -> torch.Tensor:
    """Class scores (K, H, W) of one view of the image (H, W, 3), at the image's size and orientation."""
    height, width = array.shape[:2]
    whole_resized = segmenter.resizes and not segmenter.uses_slide(array)
    base = processor_crop_size(segmenter.processor) if whole_resized else (height, width)
    input_size = None if scale == 1.0 else scaled_size(base, scale)
    view = np.ascontiguousarray(array[:, ::-1]) if flip else array
    scores = segmenter.image_logits(view, input_size)
    return scores.flip(-1) if flip else scores


def augmented_label_map(segmenter: Segmenter, array: np.ndarray, augmentation: TestTimeAugmentation) -> np.ndarray:
    """(H, W) int64 label map of the image (H, W, 3): argmax of the views' mean softmax probabilities (of the logits
    for a single view). Holds two (K, H, W) float32 score maps at a time."""
    views = [
        (scale, flip) for scale in augmentation.scales for flip in ((False, True) if augmentation.flip else (False,))
    ]
    if len(views) == 1:
        return view_scores(segmenter, array, *views[0]).argmax(dim=0).cpu().numpy()
    total = None
    for scale, flip in views:
        probabilities = view_scores(segmenter, array, scale, flip).softmax(dim=0)
        total = probabilities if total is None else total.add_(probabilities)
    return (total / len(views)).argmax(dim=0).cpu().numpy()
