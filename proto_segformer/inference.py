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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .configuration_proto_segformer import check_similarity_dtype
from .output_folders import OutputError, check_output_folder

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
    """`config.json` of a ProtoSegformer checkpoint folder as a dict; `CheckpointError` naming what is wrong."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"Checkpoint folder {str(folder)!r} does not exist.")
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
    """The checkpoint's image processor; SegFormer's default (ImageNet statistics) at `crop_size` if it has none."""
    from transformers import AutoImageProcessor, SegformerImageProcessorPil

    source = find_processor_folder(folder)
    if source is not None:
        try:
            return AutoImageProcessor.from_pretrained(str(source))
        except Exception as error:
            raise CheckpointError(
                f"{source / PROCESSOR_NAME} is not a valid image processor config: {error}"
            ) from error
    size = crop_size or 512
    logger.warning(
        "%s has no %s; using SegFormer's default image processor (ImageNet mean/std, %dx%d).",
        folder,
        PROCESSOR_NAME,
        size,
        size,
    )
    return SegformerImageProcessorPil(size={"height": size, "width": size})


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
    """(H, W, 3) uint8 RGB of an image file, EXIF orientation applied. Raises `OSError` if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = str(error).replace(f" '{path}'", "").replace(str(path), "<file>")
        raise OSError(f"not a readable image ({type(error).__name__}: {reason})") from error


def as_rgb_array(image: Any) -> np.ndarray:
    """An RGB uint8 (H, W, 3) array from a PIL image or an (H, W), (H, W, 3) or (H, W, 4) uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"Images must be uint8 arrays or PIL images, got dtype {array.dtype}.")
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[..., :3])
    raise ValueError(f"Images must have shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}.")


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
    """A ProtoSegformer, its image processor and `InferenceOptions`: `predict(images) -> list[Prediction]`."""

    def __init__(self, model, processor, options: InferenceOptions | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self.options = options or InferenceOptions()
        self.crop = tuple(self.options.crop_size or self._aligned(processor_crop_size(processor)))
        self.stride = tuple(self.options.stride or (default_stride(self.crop[0]), default_stride(self.crop[1])))

    @staticmethod
    def _aligned(size: tuple[int, int]) -> tuple[int, int]:
        return tuple(max(GRID, s // GRID * GRID) for s in size)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str = "cpu", options: InferenceOptions | None = None, backend: str = "pytorch"
    ) -> Segmenter:
        """Load and check a checkpoint folder (see `validate_checkpoint`) onto `device` ("cpu", "cuda", "auto").

        `backend="onnxruntime"`: `folder` is an ONNX export (`export.write_onnx_folder`), run by ONNX Runtime on the
        CPU; it gives label maps only (prototype maps need the PyTorch model's embeddings and prototypes).
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
        return cls(model, load_image_processor(folder, crop_size=crop), options)

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
        """Predictions for PIL images or uint8 arrays, in order; "whole" images share batches."""
        arrays = [as_rgb_array(image) for image in images]
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
        return results  # type: ignore[return-value]

    def _predict_whole(self, arrays: list[np.ndarray]) -> list[Prediction]:
        pixel_values = self.processor(images=arrays, return_tensors="pt")["pixel_values"]
        with_embeddings = self.options.prototype_maps
        logits, embeddings = forward_batches(self.model, pixel_values, self.options.batch_size, with_embeddings)
        prototypes = self.model.prototypes.float() if with_embeddings else None
        return [
            grid_to_prediction(
                logits[i], embeddings[i] if with_embeddings else None, prototypes, array.shape[:2], array.shape[:2]
            )
            for i, array in enumerate(arrays)
        ]

    def _predict_slide(self, array: np.ndarray) -> Prediction:
        pixel_values = self.processor(images=array, do_resize=False, return_tensors="pt")["pixel_values"]
        logits, embeddings, padded = slide_grid(
            self.model, pixel_values, self.crop, self.stride, self.options.batch_size, self.options.prototype_maps
        )
        prototypes = self.model.prototypes.float() if self.options.prototype_maps else None
        return grid_to_prediction(logits, embeddings, prototypes, padded, array.shape[:2])


# ---------------------------------------------------------------------------------------------------- pictures out


def class_colormap(num_classes: int) -> np.ndarray:
    """(max(num_classes, 256), 3) uint8 colours: imgviz's (PASCAL VOC) label colormap, extended if K > 256."""
    import imgviz

    base = imgviz.label_colormap()
    if num_classes <= len(base):
        return base
    rng = np.random.default_rng(0)
    extra = rng.integers(0, 256, size=(num_classes - len(base), 3), dtype=np.uint8)
    return np.concatenate([base, extra])


def label_png(label_map: np.ndarray, num_classes: int) -> Image.Image:
    """The label map as a PNG-ready image: palette mode ('P', value = class index) when K <= 256, else 16-bit."""
    if num_classes <= 256:
        image = Image.fromarray(label_map.astype(np.uint8), mode="P")
        image.putpalette(class_colormap(256)[:256].reshape(-1).tolist())
        return image
    return Image.fromarray(label_map.astype(np.uint16))


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
    import imgviz

    from .visualization import attach_legend, legend_picture

    colormap = class_colormap(int(label_map.max()) + 1)
    blended = imgviz.label2rgb(label_map.astype(np.int32), image=image, alpha=alpha, colormap=colormap)
    present = [int(k) for k in sorted(id2label or {}, key=int) if (label_map == int(k)).any()]
    if not legend or not present:
        return blended
    font_size = max(10, min(image.shape[:2]) // 25)
    items = [(str(id2label[k]), colormap[k]) for k in present]
    return attach_legend(blended, legend_picture(items, font_size))


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


def prototype_shades(label_map: np.ndarray, prototype_map: np.ndarray, num_prototypes: int) -> np.ndarray:
    """(H, W, 3) uint8: each pixel in its class's colour (as in `colour_overlay`), shaded by its prototype index:
    prototype 0 darkest, prototype M-1 lightest (near-black class colours are lifted to grey first)."""
    base = class_colormap(int(label_map.max()) + 1)[label_map].astype(np.float32)
    dark = base.max(axis=-1, keepdims=True) < 60
    base = np.where(dark, 128.0, base)
    level = prototype_map.astype(np.float32)[..., None] / max(1, num_prototypes - 1) - 0.5  # in [-0.5, 0.5]
    amount = np.abs(level) * 1.5  # up to 75% towards black or white
    target = np.where(level > 0, 255.0, 0.0)
    return (base * (1 - amount) + target * amount).round().clip(0, 255).astype(np.uint8)


def prototype_overlay(
    image: np.ndarray, label_map: np.ndarray, prototype_map: np.ndarray, num_prototypes: int, alpha: float = 0.7
) -> np.ndarray:
    """(H, W, 3) uint8: `prototype_shades` blended over the image, class boundaries in white; pixels of one class
    that matched different prototypes get different shades of the class colour."""
    colours = prototype_shades(label_map, prototype_map, num_prototypes).astype(np.float32)
    blended = (alpha * colours + (1 - alpha) * image.astype(np.float32)).round().astype(np.uint8)
    blended[class_boundaries(label_map)] = 255
    return blended


def output_paths(output_dir: Path, stem: str) -> dict[str, Path]:
    """Where `save_prediction` writes the outputs of the image named `stem`."""
    return {
        "label": output_dir / f"{stem}_label.png",
        "overlay": output_dir / f"{stem}_overlay.jpg",
        "prototype": output_dir / f"{stem}_prototype.png",
        "prototype_overlay": output_dir / f"{stem}_prototype_overlay.jpg",
    }


def save_image(picture: Image.Image, path: Path, **options: Any) -> Path:
    """Save `picture` to `path` atomically (a temporary file in the same folder, then `os.replace`): a crash leaves
    the old file or the new one, never half of it. The format follows `path`'s suffix."""
    from .safe_files import atomic_write

    file_format = Image.registered_extensions()[path.suffix.lower()]
    return atomic_write(path, lambda temporary: picture.save(temporary, format=file_format, **options))


def save_prediction(
    prediction: Prediction,
    image: np.ndarray,
    output_dir: str | Path,
    stem: str,
    id2label: dict[int, str],
    num_prototypes: int,
) -> list[Path]:
    """Write the label PNG, the overlay and (if computed) the prototype map PNG and its overlay; return the paths.

    `{stem}_prototype.png` is a palette PNG whose value is the prototype index in [0, M) of the pixel's predicted
    class (read it with the label PNG: class k, prototype m). Every file is written atomically (`save_image`).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(output_dir, stem)
    save_image(label_png(prediction.label_map, len(id2label)), paths["label"])
    save_image(Image.fromarray(colour_overlay(image, prediction.label_map, id2label)), paths["overlay"], quality=90)
    written = [paths["label"], paths["overlay"]]
    if prediction.prototype_map is not None:
        raw = Image.fromarray(prediction.prototype_map.astype(np.uint8), mode="P")
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[:num_prototypes] = prototype_colormap(num_prototypes)
        raw.putpalette(palette.reshape(-1).tolist())
        save_image(raw, paths["prototype"])
        picture = prototype_overlay(image, prediction.label_map, prediction.prototype_map, num_prototypes)
        save_image(Image.fromarray(picture), paths["prototype_overlay"], quality=90)
        written += [paths["prototype"], paths["prototype_overlay"]]
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


# Records, in an output folder, the files prediction wrote there: only those may be replaced by a later run.
PREDICTIONS_MANIFEST = ".proto_segformer_predictions.json"


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
    folder is the input folder and holds `cat.jpg` and `cat_label.png`), or when an output file exists that an earlier
    prediction did not write (it is not listed in the folder's manifest): no file the tool did not write is replaced.
    """
    from .safe_files import read_manifest

    check_output_folder(output_dir)
    plan = plan_outputs(paths, output_dir, prototype_maps)
    inputs = {Path(path).resolve() for path in paths}
    planned = [target for outputs in plan.values() for target in outputs.values()]
    ours = set(read_manifest(Path(output_dir) / PREDICTIONS_MANIFEST) or [])
    clashes = sorted({target for target in planned if target.resolve() in inputs})
    if clashes:
        earlier = any(target.name in ours for target in clashes)
        raise OutputError(
            f"Writing the predictions into {output_dir} would overwrite input file(s):"
            f" {', '.join(map(str, clashes[:5]))}"
            + (" (outputs of an earlier prediction there are inputs now)" if earlier else "")
            + ". Choose another --output_dir."
        )
    foreign = sorted(str(target) for target in planned if target.exists() and target.name not in ours)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise OutputError(
            f"{output_dir} already holds {', '.join(foreign[:5])}{more}, not written by an earlier prediction there;"
            " not overwriting. Choose another --output_dir or move them away."
        )
    return plan


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


def predict_files(
    segmenter: Segmenter,
    paths: Sequence[Path],
    output_dir: str | Path,
    progress: bool = True,
) -> PredictSummary:
    """Predict every image in `paths` in batches and write its outputs (see `save_prediction`) into `output_dir`.

    The outputs are checked first (`prepare_outputs`: never an input, never a file an earlier prediction did not
    write) and recorded in the folder's manifest before they are written, each atomically. Files that cannot be read
    as images are skipped with a warning and listed in the summary; they never stop the batch. A progress bar (tqdm)
    runs over the files when `progress`.
    """
    import time

    from tqdm.auto import tqdm

    from .safe_files import read_manifest, write_manifest

    output_dir = Path(output_dir)
    plan = prepare_outputs(paths, output_dir, segmenter.options.prototype_maps)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = output_dir / PREDICTIONS_MANIFEST
    planned = {target.name for outputs in plan.values() for target in outputs.values()}
    write_manifest(manifest, (read_manifest(manifest) or []) + sorted(planned), written_by="predict_files")
    written: dict[Path, list[Path]] = {}
    skipped: list[tuple[Path, str]] = []
    pixels = 0
    num_prototypes = int(segmenter.model.config.num_prototypes_per_class)
    start = time.perf_counter()
    bar = tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress)
    batch_size = segmenter.options.batch_size
    for offset in range(0, len(paths), batch_size):
        batch: list[tuple[Path, np.ndarray]] = []
        for path in paths[offset : offset + batch_size]:
            try:
                batch.append((path, read_image(path)))
            except OSError as error:
                logger.warning("Skipping %s: %s", path, error)
                skipped.append((path, str(error)))
                bar.update(1)
        if not batch:
            continue
        predictions = segmenter.predict([image for _, image in batch])
        for (path, image), prediction in zip(batch, predictions):
            stem = plan[Path(path)]["label"].name[: -len("_label.png")]
            written[path] = save_prediction(prediction, image, output_dir, stem, segmenter.id2label, num_prototypes)
            pixels += image.shape[0] * image.shape[1]
            bar.update(1)
    bar.close()
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
