"""Label maps from logits: the argmax over classes of logits upsampled to the image, computed in blocks of classes.

The one function here, `upsampled_argmax`, is shared by prediction (`segmenter.py`) and by evaluation during
training (`training.py`), which therefore do not import each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsampled_argmax(
    logits: torch.Tensor,
    size: tuple[int, int],
    output_size: tuple[int, int] | None = None,
    max_values: int = 2**25,
) -> torch.Tensor:
    """argmax over classes of logits (B, K, h, w) -> (B, H, W), or (K, h, w) -> (H, W), upsampled bilinearly
    (align_corners=False) to `size` and cropped to `output_size` (default: all of `size`). Used by prediction and by
    evaluation during training. Classes go in blocks so that at most about `max_values` upsampled values exist at
    once (large images with many classes); the result equals the argmax of the full upsampled stack (ties: lowest
    index)."""
    if logits.dim() == 3:
        return upsampled_argmax(logits[None], size, output_size, max_values)[0]
    logits = logits.float()
    height, width = output_size or size
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits[:, :, :height, :width].argmax(dim=1)
    batch, num_classes = logits.shape[:2]
    block = max(1, min(num_classes, max_values // max(1, batch * size[0] * size[1])))
    best_value = best_index = None
    for start in range(0, num_classes, block):
        chunk = F.interpolate(logits[:, start : start + block], size=size, mode="bilinear", align_corners=False)
        value, index = chunk[:, :, :height, :width].max(dim=1)
        if best_value is None:
            best_value, best_index = value, index
        else:
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best_index = torch.where(better, index + start, best_index)
    return best_index
