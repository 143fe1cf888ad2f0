"""Inference with a trained ProtoSegformer: checkpoint checks, whole-image and sliding-window prediction, prototype
assignment maps, and the pictures a user looks at (palette label PNG, colour overlays).

Shapes: K classes, M prototypes per class, D embedding width, an image (H, W, 3) uint8 RGB, its embedding grid
(h, w) = (H/4, W/4) of the network input.

Modes (as in mmsegmentation):
- "whole": the image processor resizes the image to its `size` (the training crop) or, if it does not resize
  (`do_resize=False`), the image runs at its own resolution; logits are upsampled back to the original size.
- "slide": the image keeps its resolution; windows of `crop` pixels every `stride` pixels (the last window of a
  row/column is shifted back inside the image) are run in batches and their logits averaged where they overlap.
- "auto": "slide" for an image larger than the crop in either dimension, else "whole".
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .configuration_proto_segformer import ProtoSegformerConfig, check_similarity_dtype
from .image_decoding import to_rgb_array
from .local_paths import close_matches
from .output_folders import OutputError, check_output_folder, is_write_failure
from .training_crop import CROP_RECORDS, recorded_training_crop

logger = logging.getLogger(__name__)

MODEL_TYPE = "proto_segformer"
WEIGHTS_NAME = "model.safetensors"
SHARDED_WEIGHTS_INDEX = "model.safetensors.index.json"
PROCESSOR_NAME = "preprocessor_config.json"
MODES = ("auto", "whole", "slide")
BACKENDS = ("pytorch", "onnxruntime")
# Alignment of windows and padding: the embedding grid is the input at 1/4 resolution.
GRID = 4


class CheckpointError(ValueError):
    """A folder that cannot serve as a ProtoSegformer checkpoint (missing, corrupt or of another model)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a valid checkpoint folder holds: its config (as a dict), weight files and prototype shape (K, M, D)."""

    folder: Path
    config: dict[str, Any]
    weight_files: tuple[Path, ...]
    prototype_shape: tuple[int, int, int]


# ----------------------------------------------------------------------------------------------- checkpoint checks


def read_config(folder: str | Path) -> dict[str, Any]:
    """`config.json` of a ProtoSegformer checkpoint folder as a dict, checked by `ProtoSegformerConfig` (class ids
    0..K-1 and names, field ranges); `CheckpointError` naming what is wrong (a missing folder: with close matches)."""
    folder = Path(folder)
    if not folder.exists():
        close = close_matches(str(folder))
        hint = f" Did you mean {', '.join(repr(path) for path in close)}?" if close else ""
        raise CheckpointError(f"Checkpoint folder {str(folder)!r} does not exist.{hint}")
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is a file, not a checkpoint folder (expected config.json and weights).")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{str(folder)!r} is not a ProtoSegformer checkpoint: it has no config.json."
            " Pass the training output folder (or one of its checkpoint-* folders)."
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}.") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, got {type(config).__name__}.")
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{str(folder)!r} is not a ProtoSegformer checkpoint: config.json has model_type {model_type!r},"
            f" expected {MODEL_TYPE!r}."
        )
    try:  # the config's own checks: class ids 0..K-1 and names, field ranges and resource bounds
        ProtoSegformerConfig.from_dict(dict(config))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{config_path}: {error}") from error
    return config


def weight_files(folder: Path) -> tuple[Path, ...]:
    """The safetensors files of a checkpoint (one file, or the shards listed in the index)."""
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return (single,)
    index = folder / SHARDED_WEIGHTS_INDEX
    if index.is_file():
        try:
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as error:
            raise CheckpointError(f"{index} is corrupt (no readable weight_map): {error}.") from error
        missing = [name for name in shard_names if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing from {folder}: {missing}.")
        return tuple(folder / name for name in shard_names)
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = f" (found {others}: re-save the model with save_pretrained to get safetensors)" if others else ""
    raise CheckpointError(f"No weights file in {str(folder)!r}: expected {WEIGHTS_NAME}{hint}.")


def read_tensor_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the safetensors `files`, reading headers only."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except Exception as error:  # safetensors raises several types for truncated/garbage files
            raise CheckpointError(
                f"Weights file {path} is corrupt or not a safetensors file ({type(error).__name__}: {error})."
            ) from error
    return shapes


def non_finite_weights(files: Iterable[Path]) -> list[str]:
    """Names of the tensors in the safetensors `files` that hold NaN or inf (reads every tensor)."""
    from safetensors import safe_open

    from .modeling_proto_segformer import non_finite_tensor_names

    bad: list[str] = []
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            bad += non_finite_tensor_names((name, handle.get_tensor(name)) for name in handle.keys())
    return bad


def validate_checkpoint(folder: str | Path) -> CheckpointInfo:
    """Check that `folder` is a loadable ProtoSegformer checkpoint whose weights hold prototypes matching its config.

    Raises `CheckpointError` with a message naming the problem (no folder, no config, another model type, no or
    corrupt weights, no `prototypes` tensor, prototypes whose shape disagrees with the config, NaN or inf in any
    tensor).
    """
    folder = Path(folder)
    config = read_config(folder)
    files = weight_files(folder)
    shapes = read_tensor_shapes(files)
    if "prototypes" not in shapes:
        raise CheckpointError(
            f"The weights in {str(folder)!r} have no 'prototypes' tensor: without it the classifier would be random."
            " Was the model saved from ProtoSegformerForSemanticSegmentation?"
        )
    shape = shapes["prototypes"]
    num_labels = len(config.get("id2label") or {}) or config.get("num_labels")
    dim = config.get("prototype_dim") or config.get("decoder_hidden_size")
    expected = (num_labels, config.get("num_prototypes_per_class"), dim)
    if len(shape) != 3 or any(e is not None and s != e for s, e in zip(shape, expected)):
        raise CheckpointError(
            f"'prototypes' in {str(folder)!r} has shape {shape}, but config.json implies (num_labels,"
            f" num_prototypes_per_class, embedding_dim) = {expected}."
        )
    bad = non_finite_weights(files)
    if bad:
        from .modeling_proto_segformer import non_finite_message

        raise CheckpointError(non_finite_message(bad, where=f"The checkpoint {str(folder)!r}"))
    return CheckpointInfo(folder=folder, config=config, weight_files=files, prototype_shape=tuple(shape))


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A validated ProtoSegformer checkpoint loaded in eval mode on `device` (the package's own classes).

    `CheckpointError` for anything `validate_checkpoint` rejects, a tensor missing from the weights, or a weight that
    is not finite once loaded (also after a cast to `dtype`, e.g. float16 overflowing to inf)."""
    from .modeling_proto_segformer import ProtoSegformerForSemanticSegmentation

    info = validate_checkpoint(folder)
    try:
        model, loading_info = ProtoSegformerForSemanticSegmentation.from_pretrained(
            str(info.folder), output_loading_info=True, dtype=dtype
        )
    except Exception as error:
        raise CheckpointError(f"Could not load the model from {str(info.folder)!r}: {error}") from error
    missing = [name for name in loading_info.get("missing_keys", []) if name]
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
        raise CheckpointError(
            f"The weights in {str(info.folder)!r} lack {len(missing)} tensors of the model ({shown}):"
            " the checkpoint is incomplete or from another architecture size."
        )
    bad = model.non_finite_tensors()
    if bad:
        from .modeling_proto_segformer import non_finite_message

        where = f"The model loaded from {str(info.folder)!r}" + (f" as {dtype}" if dtype is not None else "")
        raise CheckpointError(non_finite_message(bad, where=where))
    return model.to(device).eval()


def find_processor_folder(folder: str | Path) -> Path | None:
    """The folder holding `preprocessor_config.json`: the checkpoint itself or, for `checkpoint-*`, its parent."""
    folder = Path(folder)
    for candidate in (folder, folder.parent):
        if (candidate / PROCESSOR_NAME).is_file():
            return candidate
    return None


def load_image_processor(folder: str | Path, crop_size: int | None = None):
    """The checkpoint's image processor; SegFormer's default (ImageNet statistics) resizing to `crop_size` (default:
    the recorded training crop, else `DEFAULT_CROP`) if it has none."""
    from transformers import AutoImageProcessor, SegformerImageProcessorPil

    source = find_processor_folder(folder)
    if source is not None:
        try:
            return AutoImageProcessor.from_pretrained(str(source))
        except Exception as error:
            raise CheckpointError(
                f"{source / PROCESSOR_NAME} is not a valid image processor config: {error}"
            ) from error
    recorded = recorded_training_crop(folder)
    height, width = (crop_size, crop_size) if crop_size else (recorded[0] if recorded else (DEFAULT_CROP,) * 2)
    logger.warning(
        "%s has no %s; using SegFormer's default image processor (ImageNet mean/std, %dx%d).",
        folder,
        PROCESSOR_NAME,
        height,
        width,
    )
    return SegformerImageProcessorPil(size={"height": height, "width": width})


# The training crop when nothing records it: train.py's default --crop_size (and SegFormer's ADE20K crop).
DEFAULT_CROP = 512
def sliding_window_crop(folder: str | Path | None, processor) -> tuple[tuple[int, int], str]:
    """The crop (height, width) the model was trained on, and where it comes from, by the first rule that applies:

    1. "crop_size" recorded with the checkpoint (`recorded_training_crop`: model_card_inputs.json or
       training_args.json, which train.py writes);
    2. the image processor's size, when the processor resizes (a processor that resizes every image to one size
       trains and predicts at that size);
    3. `DEFAULT_CROP` (512, train.py's default --crop_size), logged as a guess.

    (train.py saves a processor that does not resize, whose `size` is SegFormer's unused default 512: it is not the
    crop.)
    """
    recorded = recorded_training_crop(folder) if folder is not None else None
    if recorded is not None:
        return recorded[0], f"recorded in {recorded[1]}"
    if bool(getattr(processor, "do_resize", True)):
        return processor_crop_size(processor), "the image processor's size (it resizes every image to it)"
    logger.warning(
        "No training crop is recorded with %s (no crop_size in %s) and its image processor does not resize: sliding"
        " windows use %dx%d. Pass --crop_size with the crop the model was trained on.",
        folder if folder is not None else "the model",
        " or ".join(CROP_RECORDS),
        DEFAULT_CROP,
        DEFAULT_CROP,
    )
    return (DEFAULT_CROP, DEFAULT_CROP), f"not recorded: the default {DEFAULT_CROP}"


def resolve_device(device: str) -> torch.device:
    """`"cpu"`, `"cuda"`, `"cuda:N"`, `"mps"` or `"auto"` (CUDA when available) as a checked torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"Unknown device {device!r}; use cpu, cuda, cuda:N or auto.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} requested but CUDA is not available here; use --device cpu.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"Device {device!r} requested but MPS is not available here; use --device cpu.")
    return resolved


# ------------------------------------------------------------------------------------------------------ images in


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file by `image_decoding.to_rgb_array` (the decoder training uses: EXIF
    orientation applied, transparency on white, 16-bit and float samples scaled by their range). Raises `OSError`
    if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb_array(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = str(error).replace(f" '{path}'", "").replace(str(path), "<file>")
        raise OSError(f"not a readable image ({type(error).__name__}: {reason})") from error


def as_rgb_array(image: Any) -> np.ndarray:
    """An RGB uint8 (H, W, 3) array from a PIL image or an image array, by `image_decoding.to_rgb_array`: arrays of
    shape (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4) holding uint8, uint16, bool or float values."""
    return to_rgb_array(image)


# -------------------------------------------------------------------------------------------------- window geometry


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of mmseg 'slide' windows along one axis of `length` pixels (the last one ends at `length`).

    `length >= crop` is expected (pad first). Example: length 1000, crop 512, stride 344 -> [0, 344, 488].
    """
    if crop <= 0 or stride <= 0:
        raise ValueError(f"crop and stride must be positive, got crop={crop}, stride={stride}.")
    count = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(index * stride, length - crop), 0) for index in range(count)})


def default_stride(crop: int) -> int:
    """Two thirds of the crop (mmseg's 512/341), rounded down to the embedding grid (a multiple of 4)."""
    return max(GRID, (2 * crop // 3) // GRID * GRID)


def processor_crop_size(processor) -> tuple[int, int]:
    """(height, width) the image processor resizes to: the model's training crop."""
    size = processor.size
    height = size.get("height") if hasattr(size, "get") else getattr(size, "height", None)
    width = size.get("width") if hasattr(size, "get") else getattr(size, "width", None)
    if not height or not width:
        edge = (size.get("shortest_edge") if hasattr(size, "get") else None) or 512
        return int(edge), int(edge)
    return int(height), int(width)


@dataclass(frozen=True)
class InferenceOptions:
    """How to run the model over images.

    mode: "auto" | "whole" | "slide" (see the module docstring).
    crop_size: window (height, width) for "slide", multiples of 4; `None` = the image processor's size (which
        should be the training crop).
    stride: window step (height, width), multiples of 4; `None` = 2/3 of the crop.
    batch_size: images ("whole") or windows ("slide") per forward pass.
    prototype_maps: also compute which prototype of the predicted class each pixel matched.
    similarity_dtype: the head's similarity dtype ("bfloat16": the reduced-precision option; `None`: the model's
        config, float32 unless set there). PyTorch backend only.
    """

    mode: str = "auto"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    batch_size: int = 4
    prototype_maps: bool = False
    similarity_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        check_similarity_dtype(self.similarity_dtype)
        for name in ("crop_size", "stride"):
            value = getattr(self, name)
            if value is None:
                continue
            if len(value) != 2 or any(int(v) < GRID or int(v) % GRID for v in value):
                raise ValueError(f"{name} must be two positive multiples of {GRID} (height, width), got {value}.")


@dataclass
class Prediction:
    """Per-pixel results at the original image size (H, W).

    label_map: (H, W) int64 class index (argmax of the nearest-prototype scores).
    prototype_map: (H, W) int64 index in [0, M) of the predicted class's prototype each pixel matched, or None.
    """

    label_map: np.ndarray
    prototype_map: np.ndarray | None


# ----------------------------------------------------------------------------------------------------- the forward


@torch.no_grad()
def forward_batches(
    model, pixel_values: torch.Tensor, batch_size: int, with_embeddings: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (N, K, h, w) and, if asked, unit embeddings (N, D, h, w) of (N, 3, H, W) inputs in chunks."""
    device, dtype = model.device, model.dtype
    logits, embeddings = [], []
    for start in range(0, pixel_values.shape[0], batch_size):
        chunk = pixel_values[start : start + batch_size].to(device=device, dtype=dtype)
        output = model(pixel_values=chunk, output_pixel_embeddings=with_embeddings)
        logits.append(output.logits.float())
        if with_embeddings:
            embeddings.append(output.pixel_embeddings.float())
    return torch.cat(logits), (torch.cat(embeddings) if with_embeddings else None)


def pad_to(pixel_values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad (normalised: the mean colour) (B, 3, H, W) at the bottom/right to at least (height, width)."""
    pad_h, pad_w = max(0, height - pixel_values.shape[2]), max(0, width - pixel_values.shape[3])
    return F.pad(pixel_values, (0, pad_w, 0, pad_h)) if pad_h or pad_w else pixel_values


def slide_grid(
    model,
    pixel_values: torch.Tensor,
    crop: tuple[int, int],
    stride: tuple[int, int],
    batch_size: int,
    with_embeddings: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
    """Sliding-window logits of one image (1, 3, H, W) on its padded 1/4 grid.

    The image is padded to a multiple of 4 and at least the crop; windows start on multiples of 4, so every window's
    (crop/4) logits land exactly on the padded image's 1/4 grid, where overlaps are averaged (as mmseg averages
    upsampled window logits; bilinear upsampling commutes with the average away from window borders).

    Returns: averaged logits (K, Hp/4, Wp/4), averaged unit embeddings (D, Hp/4, Wp/4) or None, and (Hp, Wp).
    """
    _, _, height, width = pixel_values.shape
    padded_h = max(crop[0], math.ceil(height / GRID) * GRID)
    padded_w = max(crop[1], math.ceil(width / GRID) * GRID)
    padded = pad_to(pixel_values, padded_h, padded_w)
    origins = [
        (y, x) for y in window_starts(padded_h, crop[0], stride[0]) for x in window_starts(padded_w, crop[1], stride[1])
    ]
    windows = torch.cat([padded[:, :, y : y + crop[0], x : x + crop[1]] for y, x in origins])
    logits, embeddings = forward_batches(model, windows, batch_size, with_embeddings)
    grid_h, grid_w = padded_h // GRID, padded_w // GRID
    win_h, win_w = logits.shape[2], logits.shape[3]
    logit_sum = logits.new_zeros(logits.shape[1], grid_h, grid_w)
    counts = logits.new_zeros(1, grid_h, grid_w)
    embedding_sum = embeddings.new_zeros(embeddings.shape[1], grid_h, grid_w) if with_embeddings else None
    for index, (y, x) in enumerate(origins):
        gy, gx = y // GRID, x // GRID
        logit_sum[:, gy : gy + win_h, gx : gx + win_w] += logits[index]
        counts[:, gy : gy + win_h, gx : gx + win_w] += 1
        if embedding_sum is not None:
            embedding_sum[:, gy : gy + win_h, gx : gx + win_w] += embeddings[index]
    averaged_embeddings = F.normalize(embedding_sum, dim=0) if embedding_sum is not None else None
    return logit_sum / counts.clamp_min(1), averaged_embeddings, (padded_h, padded_w)


def nearest_prototype_per_class(embeddings: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """For unit embeddings (D, h, w) and prototypes (K, M, D): (K, h, w) index of each class's nearest prototype."""
    dim, height, width = embeddings.shape
    num_classes, num_prototypes, _ = prototypes.shape
    pixels = embeddings.reshape(dim, -1).t()  # (n, D)
    # Classes in blocks so that at most ~2**24 scores exist at once; the argmax runs over the contiguous last axis.
    block = max(1, min(num_classes, 2**24 // max(1, pixels.shape[0] * num_prototypes)))
    parts = []
    for start in range(0, num_classes, block):
        chunk = prototypes[start : start + block].to(pixels.dtype)  # (k, M, D)
        scores = pixels @ chunk.reshape(-1, dim).t()  # (n, k*M)
        parts.append(scores.view(pixels.shape[0], chunk.shape[0], num_prototypes).argmax(dim=-1).t())
    return torch.cat(parts).reshape(num_classes, height, width)


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


def grid_to_prediction(
    logits: torch.Tensor,
    embeddings: torch.Tensor | None,
    prototypes: torch.Tensor | None,
    scaled_size: tuple[int, int],
    output_size: tuple[int, int],
) -> Prediction:
    """Upsample 1/4-grid logits (K, h, w) to `scaled_size`, crop to `output_size` and take the argmax.

    `scaled_size` is the size the grid covers (the resized input for "whole" is the original size; the padded
    input for "slide"); `output_size` = (H, W) of the original image.
    """
    height, width = output_size
    label_map = upsampled_argmax(logits, scaled_size, (height, width))
    prototype_map = None
    if embeddings is not None:
        # Only the classes that are predicted somewhere need their nearest-prototype map.
        present, position = torch.unique(label_map, return_inverse=True)
        per_class = nearest_prototype_per_class(embeddings, prototypes.to(embeddings.device)[present])
        grid_h, grid_w = per_class.shape[1:]
        # torch's "nearest": source index floor(dst * in / out).
        rows = (torch.arange(height, device=per_class.device) * grid_h // scaled_size[0]).clamp_max(grid_h - 1)
        cols = (torch.arange(width, device=per_class.device) * grid_w // scaled_size[1]).clamp_max(grid_w - 1)
        prototype_map = per_class[position, rows[:, None], cols[None, :]].cpu().numpy()
    return Prediction(label_map.cpu().numpy(), prototype_map)


class Segmenter:
    """A ProtoSegformer, its image processor and `InferenceOptions`: `predict(images) -> list[Prediction]`.

    The sliding window (`crop`) is `options.crop_size`, else `training_crop` (the crop the model was trained on;
    `from_pretrained` finds it with `sliding_window_crop`), else the processor's size when it resizes, else
    `DEFAULT_CROP`. Images smaller than the encoder accepts (`min_input_size`, e.g. 29 pixels for mit-b0) are padded
    with the mean colour and the result cropped back, so every image of at least one pixel gets a prediction.
    """

    def __init__(
        self, model, processor, options: InferenceOptions | None = None, training_crop: tuple[int, int] | None = None
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.options = options or InferenceOptions()
        if training_crop is None:
            training_crop = sliding_window_crop(None, processor)[0]
        self.crop = tuple(self.options.crop_size or self._aligned(training_crop))
        self.stride = tuple(self.options.stride or (default_stride(self.crop[0]), default_stride(self.crop[1])))
        # The ONNX Runtime model pads small inputs itself.
        self.min_input_size = int(getattr(model, "min_input_size", 1))
        if min(self.crop) < self.min_input_size:
            raise ValueError(
                f"The sliding window {self.crop[0]}x{self.crop[1]} is smaller than this encoder accepts"
                f" ({self.min_input_size} pixels a side); pass --crop_size {self._aligned_up(self.min_input_size)}"
                " or more (the crop the model was trained on)."
            )

    @staticmethod
    def _aligned(size: tuple[int, int]) -> tuple[int, int]:
        return tuple(max(GRID, s // GRID * GRID) for s in size)

    @staticmethod
    def _aligned_up(side: int) -> int:
        return math.ceil(side / GRID) * GRID

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str = "cpu", options: InferenceOptions | None = None, backend: str = "pytorch"
    ) -> Segmenter:
        """Load and check a checkpoint folder (see `validate_checkpoint`) onto `device` ("cpu", "cuda", "auto").

        `backend="onnxruntime"`: `folder` is an ONNX export (`export.write_onnx_folder`), run by ONNX Runtime on the
        CPU; it gives label maps only (prototype maps need the PyTorch model's embeddings and prototypes).
        The sliding window is the training crop (`sliding_window_crop`) unless `options.crop_size` is set.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        if backend == "onnxruntime":
            from .export import OnnxRuntimeModel

            if options is not None and options.prototype_maps:
                raise ValueError("Prototype maps need the PyTorch backend; drop --prototype_maps or --backend.")
            if options is not None and options.similarity_dtype == "bfloat16":
                raise ValueError(
                    "bfloat16 similarities need the PyTorch backend; drop --similarity_dtype or --backend."
                )
            if resolve_device(device).type != "cpu":
                raise ValueError(f"The onnxruntime backend runs on the CPU; use --device cpu, not {device!r}.")
            model = OnnxRuntimeModel(folder)
        else:
            model = load_model(folder, device=resolve_device(device))
            if options is not None and options.similarity_dtype is not None:
                model.config.similarity_dtype = options.similarity_dtype
        crop = options.crop_size[0] if options is not None and options.crop_size else None
        processor = load_image_processor(folder, crop_size=crop)
        training_crop = None
        if options is None or options.crop_size is None:
            training_crop, source = sliding_window_crop(folder, processor)
            logger.info("Sliding window %dx%d: the training crop, %s.", *training_crop, source)
        return cls(model, processor, options, training_crop=training_crop)

    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): v for k, v in self.model.config.id2label.items()}

    @property
    def resizes(self) -> bool:
        """Whether the image processor resizes images to its `size` ("whole" then runs at that size); a processor
        with `do_resize=False` runs "whole" images at their own resolution."""
        return bool(getattr(self.processor, "do_resize", True))

    def uses_slide(self, image: np.ndarray) -> bool:
        """Whether `image` (H, W, 3) goes through sliding windows under the current mode."""
        if self.options.mode == "auto":
            return image.shape[0] > self.crop[0] or image.shape[1] > self.crop[1]
        return self.options.mode == "slide"

    def predict(self, images: Sequence[Any]) -> list[Prediction]:
        """Predictions for PIL images or uint8 arrays, in order; "whole" images share batches. Every prediction has
        its image's (H, W)."""
        arrays = [as_rgb_array(image) for image in images]
        empty = [array.shape for array in arrays if array.shape[0] < 1 or array.shape[1] < 1]
        if empty:
            raise ValueError(f"Images must have at least one pixel, got shape {empty[0]}.")
        results: list[Prediction | None] = [None] * len(arrays)
        whole = [i for i, array in enumerate(arrays) if not self.uses_slide(array)]
        whole_set = set(whole)
        for i, array in enumerate(arrays):
            if i not in whole_set:
                results[i] = self._predict_slide(array)
        # A resizing processor gives every image the same input size; without resizing, batch equal sizes only.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in whole:
            groups.setdefault(() if self.resizes else arrays[i].shape, []).append(i)
        for indices_of_size in groups.values():
            for start in range(0, len(indices_of_size), self.options.batch_size):
                indices = indices_of_size[start : start + self.options.batch_size]
                for i, prediction in zip(indices, self._predict_whole([arrays[i] for i in indices])):
                    results[i] = prediction
        for array, prediction in zip(arrays, results):
            check_prediction_size(prediction, array.shape[:2])
        return results  # type: ignore[return-value]

    def _pixel_values(self, images: np.ndarray | list[np.ndarray], **kwargs: Any) -> torch.Tensor:
        """The processor's (N, 3, H, W) input; images are channels-last (H, W, 3), said explicitly: the processor
        would take a 3-pixel-high (3, W, 3) image, or a (1, W, 3) one, for channels-first and mangle it."""
        return self.processor(images=images, input_data_format="channels_last", return_tensors="pt", **kwargs)[
            "pixel_values"
        ]

    def _predict_whole(self, arrays: list[np.ndarray]) -> list[Prediction]:
        pixel_values = self._pixel_values(arrays)
        input_h, input_w = pixel_values.shape[2:]
        # Smaller than the encoder accepts (a small image that is not resized): pad, predict, crop back.
        padded = pad_to(pixel_values, max(input_h, self.min_input_size), max(input_w, self.min_input_size))
        with_embeddings = self.options.prototype_maps
        logits, embeddings = forward_batches(self.model, padded, self.options.batch_size, with_embeddings)
        prototypes = self.model.prototypes.float() if with_embeddings else None
        predictions = []
        for i, array in enumerate(arrays):
            height, width = array.shape[:2]
            # The grid covers the padded input; in image pixels that is the image scaled by image / input size.
            scaled = (
                round(padded.shape[2] * height / input_h) if padded.shape[2] != input_h else height,
                round(padded.shape[3] * width / input_w) if padded.shape[3] != input_w else width,
            )
            predictions.append(
                grid_to_prediction(
                    logits[i], embeddings[i] if with_embeddings else None, prototypes, scaled, (height, width)
                )
            )
        return predictions

    def _predict_slide(self, array: np.ndarray) -> Prediction:
        pixel_values = self._pixel_values(array, do_resize=False)
        logits, embeddings, padded = slide_grid(
            self.model, pixel_values, self.crop, self.stride, self.options.batch_size, self.options.prototype_maps
        )
        prototypes = self.model.prototypes.float() if self.options.prototype_maps else None
        return grid_to_prediction(logits, embeddings, prototypes, padded, array.shape[:2])


def check_prediction_size(prediction: Prediction, size: tuple[int, int]) -> None:
    """`RuntimeError` unless the prediction's maps have the image's (H, W): a wrong-sized label file is never
    written."""
    shapes = {prediction.label_map.shape[:2]}
    if prediction.prototype_map is not None:
        shapes.add(prediction.prototype_map.shape[:2])
    if shapes != {tuple(size)}:
        raise RuntimeError(
            f"internal error: the prediction has size {sorted(shapes)} for an image of {tuple(size)}; not written."
        )


# ---------------------------------------------------------------------------------------------------- pictures out


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
) -> np.ndarray:
    """(H, W, 3) uint8: class colours blended over the image, with a legend of the classes present.

    The legend (font scaled with the image) sits in the bottom-right corner when it covers at most
    `visualization.LEGEND_MAX_FRACTION` of the image; for a smaller image it goes on a white strip beside it, so the
    result is wider (and taller if the legend is): the image part is never hidden.
    """
    from .visualization import attach_legend, legend_picture

    colormap = label_colours(label_map, len(id2label or {}))
    blended = blend(image, colormap[label_map], alpha)
    present = present_classes(label_map, id2label)
    if not legend or not present:
        return blended
    items = [(str(id2label[k]), colormap[k]) for k in present]
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


def output_paths(output_dir: Path, stem: str) -> dict[str, Path]:
    """Where `save_prediction` writes the outputs of the image named `stem`."""
    return {
        "label": output_dir / f"{stem}_label.png",
        "overlay": output_dir / f"{stem}_overlay.jpg",
        "prototype": output_dir / f"{stem}_prototype.png",
        "prototype_overlay": output_dir / f"{stem}_prototype_overlay.jpg",
    }


def save_image(picture: Image.Image, path: Path, on_written: Callable[[Path], None] | None = None, **options) -> Path:
    """Save `picture` to `path` atomically (a temporary file in the same folder, then `os.replace`): a crash leaves
    the old file or the new one, never half of it. The format follows `path`'s suffix. `on_written(temporary)` is
    called once the temporary file is complete, before the rename (to record its checksum)."""
    from .safe_files import atomic_write

    file_format = Image.registered_extensions()[path.suffix.lower()]

    def write(temporary: Path) -> None:
        picture.save(temporary, format=file_format, **options)
        if on_written is not None:
            on_written(temporary)

    return atomic_write(path, write)


def prediction_pictures(
    prediction: Prediction, image: np.ndarray, id2label: dict[int, str], num_prototypes: int
) -> dict[str, tuple[Image.Image, dict[str, Any]]]:
    """{kind: (picture, save options)} of one image's outputs (the kinds of `output_paths`), rendered in memory."""
    pictures: dict[str, tuple[Image.Image, dict[str, Any]]] = {
        "label": (label_png(prediction.label_map, len(id2label)), {}),
        "overlay": (Image.fromarray(colour_overlay(image, prediction.label_map, id2label)), {"quality": 90}),
    }
    if prediction.prototype_map is not None:
        raw = index_png(prediction.prototype_map, num_prototypes, prototype_colormap(num_prototypes))
        overlay = prototype_overlay(
            image, prediction.label_map, prediction.prototype_map, num_prototypes, id2label=id2label
        )
        pictures["prototype"] = (raw, {})
        pictures["prototype_overlay"] = (Image.fromarray(overlay), {"quality": 90})
    return pictures


def save_prediction(
    prediction: Prediction,
    image: np.ndarray,
    output_dir: str | Path,
    stem: str,
    id2label: dict[int, str],
    num_prototypes: int,
    on_written: Callable[[Path, Path], None] | None = None,
) -> list[Path]:
    """Write the label PNG, the overlay and (if computed) the prototype map PNG and its overlay; return the paths.

    `{stem}_prototype.png` holds, per pixel, the prototype index in [0, M) of the pixel's predicted class (read it
    with the label PNG: class k, prototype m): a palette PNG for M <= 256, else 16-bit. Every picture is rendered
    before the first file is written (an error writes nothing), and every file is written atomically
    (`save_image`); `on_written(path, temporary)` is called for each file before it is renamed into place.
    A prediction whose size is not the image's is refused (`check_prediction_size`).
    """
    check_prediction_size(prediction, image.shape[:2])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(output_dir, stem)
    written = []
    for kind, (picture, options) in prediction_pictures(prediction, image, id2label, num_prototypes).items():
        path = paths[kind]
        hook = (lambda temporary, path=path: on_written(path, temporary)) if on_written is not None else None
        written.append(save_image(picture, path, on_written=hook, **options))
    return written


# --------------------------------------------------------------------------------------------- files and folders

GLOB_CHARACTERS = set("*?[")


def collect_inputs(inputs: Sequence[str | Path], recursive: bool = False) -> list[Path]:
    """Files named by `inputs`: files, folders (every non-hidden file in them) and glob patterns, deduplicated.

    Non-image files are kept here (they are reported and skipped when read). A path that does not exist and is not a
    glob raises `FileNotFoundError`; a glob that matches nothing is logged.
    """
    found: list[Path] = []
    for entry in inputs:
        text = str(entry)
        if any(c in GLOB_CHARACTERS for c in text) and not Path(text).exists():
            from glob import glob

            matches = sorted(Path(p) for p in glob(text, recursive=recursive) if Path(p).is_file())
            if not matches:
                logger.warning("The pattern %r matches no file.", text)
            found += matches
        elif Path(text).is_dir():
            pattern = "**/*" if recursive else "*"
            found += sorted(
                p
                for p in Path(text).glob(pattern)
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(text).parts)
            )
        elif Path(text).is_file():
            found.append(Path(text))
        else:
            raise FileNotFoundError(f"Input {text!r} is neither a file, a folder nor a glob pattern that exists.")
    unique: dict[Path, None] = {}
    for path in found:
        unique.setdefault(path.resolve(), None)
    return list(unique)


def unique_stem(path: Path, used: set[str]) -> str:
    """The file name without suffix, made unique among `used` (adds _1, _2 ...), and recorded in `used`."""
    stem, index = path.stem, 1
    while stem in used:
        stem, index = f"{path.stem}_{index}", index + 1
    used.add(stem)
    return stem


# Records, in an output folder, the files prediction wrote there and the SHA-256 of each as written: only those
# files, with those bytes, may be replaced by a later run (a file edited since is the user's).
PREDICTIONS_MANIFEST = ".proto_segformer_predictions.json"
# While a run writes, it appends "<sha256> <name>" here before each file is renamed into place (a killed run's
# files are then still recognised); folded into the manifest at the end of the run, then removed.
PREDICTIONS_JOURNAL = ".proto_segformer_predictions.journal"
MANIFEST_WRITER = "predict_files"


@dataclass
class OutputRecords:
    """What an output folder records about the files prediction wrote there.

    files: the names listed in the manifest; hashes: {name: SHA-256} from the manifest (None: a manifest of an
    older version that recorded no hashes); journal: {name: hashes} a run appended but did not fold in (a run that
    was killed).
    """

    files: set[str]
    hashes: dict[str, str] | None
    journal: dict[str, set[str]]

    @classmethod
    def read(cls, output_dir: str | Path) -> OutputRecords:
        from .safe_files import read_manifest, read_manifest_hashes

        manifest = Path(output_dir) / PREDICTIONS_MANIFEST
        files = read_manifest(manifest)
        hashes = read_manifest_hashes(manifest) if files is not None else {}
        journal: dict[str, set[str]] = {}
        path = Path(output_dir) / PREDICTIONS_JOURNAL
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                digest, _, name = line.partition(" ")
                if len(digest) == 64 and name:  # a line cut short by a kill is left out
                    journal.setdefault(name, set()).add(digest)
        return cls(set(files or []), hashes, journal)

    def accepted(self, name: str) -> set[str]:
        """The contents (SHA-256) that a file of this name had when prediction wrote it."""
        recorded = {self.hashes[name]} if self.hashes and name in self.hashes else set()
        return recorded | self.journal.get(name, set())

    def verdict(self, path: Path) -> str | None:
        """None if the existing file `path` is one prediction wrote, unchanged; else why it may not be replaced:
        "foreign" (not written by prediction), "edited" (changed since) or "unverifiable" (listed without a
        checksum: by an older version of predict, which recorded none)."""
        from .safe_files import file_sha256

        name = path.name
        if name not in self.files and name not in self.journal:
            return "foreign"
        accepted = self.accepted(name)
        if not accepted:
            return "unverifiable"
        return None if file_sha256(path) in accepted else "edited"


def refusal_message(output_dir: str | Path, refused: dict[str, list[str]]) -> str:
    """One line: which existing outputs are not replaced, why, and what to do."""

    def listing(paths: list[str]) -> str:
        more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
        return ", ".join(paths[:5]) + more

    reasons = []
    if refused.get("foreign"):
        reasons.append(f"{listing(refused['foreign'])}, not written by an earlier prediction there")
    if refused.get("edited"):
        reasons.append(f"{listing(refused['edited'])}, changed since prediction wrote them (edited by hand?)")
    if refused.get("unverifiable"):
        reasons.append(
            f"{listing(refused['unverifiable'])}, written by an older version of predict that kept no checksums, so"
            " an edit cannot be ruled out"
        )
    return (
        f"{output_dir} already holds {'; and '.join(reasons)}; not overwriting anything. Choose another --output_dir,"
        " or move or delete those files to predict them again."
    )


def plan_outputs(paths: Sequence[Path], output_dir: str | Path, prototype_maps: bool) -> dict[Path, dict[str, Path]]:
    """{input: {kind: output path}}: where `predict_files` writes each input's outputs (stems made unique)."""
    used: set[str] = set()
    kinds = ("label", "overlay", "prototype", "prototype_overlay") if prototype_maps else ("label", "overlay")
    plan = {}
    for path in paths:
        outputs = output_paths(Path(output_dir), unique_stem(Path(path), used))
        plan[Path(path)] = {kind: outputs[kind] for kind in kinds}
    return plan


def prepare_outputs(paths: Sequence[Path], output_dir: str | Path, prototype_maps: bool) -> dict[Path, dict[str, Path]]:
    """Check the output folder and the planned outputs of `paths` before any work; return the plan.

    `OutputError` when the folder is a file or not writable, when an output would replace an input (e.g. the output
    folder is the input folder and holds `cat.jpg` and `cat_label.png`), or when an output file exists that may not
    be replaced (`OutputRecords.verdict`): one that an earlier prediction did not write, one changed since it was
    written (its SHA-256 is not the one recorded: a user's edit), or one listed by an older version without
    checksums. Nothing is replaced but files prediction wrote, unchanged.
    """
    check_output_folder(output_dir)
    plan = plan_outputs(paths, output_dir, prototype_maps)
    inputs = {Path(path).resolve() for path in paths}
    planned = [target for outputs in plan.values() for target in outputs.values()]
    records = OutputRecords.read(output_dir)
    clashes = sorted({target for target in planned if target.resolve() in inputs})
    if clashes:
        earlier = any(target.name in records.files for target in clashes)
        raise OutputError(
            f"Writing the predictions into {output_dir} would overwrite input file(s):"
            f" {', '.join(map(str, clashes[:5]))}"
            + (" (outputs of an earlier prediction there are inputs now)" if earlier else "")
            + ". Choose another --output_dir."
        )
    refused: dict[str, list[str]] = {}
    for target in planned:
        verdict = records.verdict(target) if target.exists() else None
        if verdict is not None:
            refused.setdefault(verdict, []).append(str(target))
    if refused:
        raise OutputError(refusal_message(output_dir, {k: sorted(v) for k, v in refused.items()}))
    return plan


class OutputLog:
    """The manifest of one prediction run: planned names are listed before any is written; each file's SHA-256 is
    appended to the journal before its rename (`record`) and the manifest is rewritten with all hashes at `close`."""

    def __init__(self, output_dir: Path, planned: Iterable[str]) -> None:
        from .safe_files import file_sha256, write_manifest

        self.output_dir = output_dir
        records = OutputRecords.read(output_dir)
        self.files = records.files | set(planned)
        self.hashes = dict(records.hashes or {})
        for name, accepted in records.journal.items():  # a killed run's files, as they are now
            path = output_dir / name
            if path.is_file() and (digest := file_sha256(path)) in accepted:
                self.hashes[name] = digest
        write_manifest(self.manifest, self.files, written_by=MANIFEST_WRITER, hashes=self.hashes)
        self.journal_path.unlink(missing_ok=True)
        self.journal = self.journal_path.open("a")
        self.pending: dict[str, str] = {}

    @property
    def manifest(self) -> Path:
        return self.output_dir / PREDICTIONS_MANIFEST

    @property
    def journal_path(self) -> Path:
        return self.output_dir / PREDICTIONS_JOURNAL

    def record(self, path: Path, temporary: Path) -> None:
        """Journal the content of `temporary`, about to become `path`."""
        from .safe_files import file_sha256

        digest = file_sha256(temporary)
        self.journal.write(f"{digest} {path.name}\n")
        self.journal.flush()
        self.pending[path.name] = digest

    def written(self, path: Path) -> None:
        """`path` is in place with the content last recorded for it."""
        if path.name in self.pending:
            self.hashes[path.name] = self.pending.pop(path.name)

    def close(self) -> None:
        """Record the hashes (also of files renamed into place before an error) in the manifest; drop the journal."""
        from .safe_files import file_sha256, write_manifest

        self.journal.close()
        for name, digest in self.pending.items():
            path = self.output_dir / name
            if path.is_file() and file_sha256(path) == digest:
                self.hashes[name] = digest
        write_manifest(self.manifest, self.files, written_by=MANIFEST_WRITER, hashes=self.hashes)
        self.journal_path.unlink(missing_ok=True)


@dataclass
class PredictSummary:
    """Outcome of `predict_files`: written outputs per input, skipped inputs with the reason, and timing."""

    written: dict[Path, list[Path]]
    skipped: list[tuple[Path, str]]
    seconds: float
    pixels: int

    @property
    def images_per_second(self) -> float:
        return len(self.written) / self.seconds if self.seconds > 0 else float("nan")


def failure_reason(error: BaseException) -> str:
    """One line for a skipped image: the error's type and first line."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def predict_batch(segmenter: Segmenter, images: list[np.ndarray]) -> list[Prediction | BaseException]:
    """The predictions of `images`; if the batch fails, each image alone, so that one image's error (returned in
    its place) does not cost the others theirs."""
    try:
        return list(segmenter.predict(images))
    except Exception as error:
        if len(images) == 1:
            return [error]
    results: list[Prediction | BaseException] = []
    for image in images:
        try:
            results.append(segmenter.predict([image])[0])
        except Exception as error:
            results.append(error)
    return results


def predict_files(
    segmenter: Segmenter,
    paths: Sequence[Path],
    output_dir: str | Path,
    progress: bool = True,
) -> PredictSummary:
    """Predict every image in `paths` in batches and write its outputs (see `save_prediction`) into `output_dir`.

    The outputs are checked first (`prepare_outputs`: never an input, never a file an earlier prediction did not
    write or that was changed since) and listed in the folder's manifest before they are written, each atomically;
    the manifest then records each file's SHA-256. An image that cannot be read, predicted or rendered is skipped
    with a warning and its reason, listed in the summary: it never stops the batch (its pictures are all rendered
    before the first of its files is written); a failed write (a full disk, a read-only folder) stops the run, since
    every later image would fail alike. Every image of at least one pixel is predicted (small ones are
    padded, `Segmenter`). A progress bar (tqdm) runs over the files when `progress`.
    """
    import time

    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    plan = prepare_outputs(paths, output_dir, segmenter.options.prototype_maps)
    output_dir.mkdir(parents=True, exist_ok=True)
    log = OutputLog(output_dir, [target.name for outputs in plan.values() for target in outputs.values()])
    written: dict[Path, list[Path]] = {}
    skipped: list[tuple[Path, str]] = []
    pixels = 0
    num_prototypes = int(segmenter.model.config.num_prototypes_per_class)
    start = time.perf_counter()
    bar = tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress)

    def skip(path: Path, reason: str) -> None:
        logger.warning("Skipping %s: %s", path, reason)
        skipped.append((path, reason))

    def on_written(path: Path, temporary: Path) -> None:
        log.record(path, temporary)

    try:
        batch_size = segmenter.options.batch_size
        for offset in range(0, len(paths), batch_size):
            batch: list[tuple[Path, np.ndarray]] = []
            for path in paths[offset : offset + batch_size]:
                try:
                    batch.append((path, read_image(path)))
                except OSError as error:
                    skip(path, str(error))
                    bar.update(1)
            if not batch:
                continue
            results = predict_batch(segmenter, [image for _, image in batch])
            for (path, image), result in zip(batch, results):
                bar.update(1)
                if isinstance(result, BaseException):
                    skip(path, f"could not be predicted ({failure_reason(result)})")
                    continue
                stem = plan[Path(path)]["label"].name[: -len("_label.png")]
                try:
                    files = save_prediction(
                        result, image, output_dir, stem, segmenter.id2label, num_prototypes, on_written=on_written
                    )
                except (ValueError, RuntimeError, OSError) as error:
                    if is_write_failure(error):  # a full disk or read-only folder: every later image would fail too
                        raise
                    skip(path, f"could not be written ({failure_reason(error)})")
                    continue
                for file in files:
                    log.written(file)
                written[path] = files
                pixels += image.shape[0] * image.shape[1]
    finally:
        bar.close()
        log.close()
    return PredictSummary(written, skipped, time.perf_counter() - start, pixels)


__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "InferenceOptions",
    "OutputError",
    "Prediction",
    "Segmenter",
    "PredictSummary",
    "collect_inputs",
    "colour_overlay",
    "grid_to_prediction",
    "label_png",
    "load_image_processor",
    "load_model",
    "nearest_prototype_per_class",
    "predict_files",
    "prepare_outputs",
    "prototype_overlay",
    "prototype_shades",
    "read_config",
    "read_image",
    "resolve_device",
    "save_prediction",
    "slide_grid",
    "upsampled_argmax",
    "validate_checkpoint",
    "window_starts",
]
