"""The segmenter: images in, per-pixel predictions out (a label map, and optionally which prototype each pixel
matched), by a ProtoSegformer (or its ONNX export) in whole-image or sliding-window mode, in batches.

Shapes: K classes, M prototypes per class, D embedding width, an image (H, W, 3) uint8 RGB, its embedding grid
(h, w) = (H/4, W/4) of the network input.

Modes (as in mmsegmentation):
- "whole": the image processor resizes the image to its `size` (the training crop) or, if it does not resize
  (`do_resize=False`), the image runs at its own resolution; logits are upsampled back to the original size.
- "slide": the image keeps its resolution; windows of `crop` pixels every `stride` pixels (the last window of a
  row/column is shifted back inside the image) are run in batches and their logits averaged where they overlap.
- "auto": "slide" for an image larger than the crop in either dimension, else "whole".

Reading files and writing pictures are elsewhere (`prediction_files.py`, `pictures.py`); the model folder is read
and checked by `checkpoint.py`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import DEFAULT_CROP, ModelFolder, load_image_processor, load_model, validate_checkpoint
from .configuration_proto_segformer import check_similarity_dtype, check_unknown_threshold
from .image_decoding import to_rgb_array
from .label_maps import upsampled_argmax
from .training_crop import CROP_RECORDS, recorded_training_crop
from .unknown import required_threshold, upsample_scores

logger = logging.getLogger(__name__)

MODES = ("auto", "whole", "slide")
BACKENDS = ("pytorch", "onnxruntime")
# Alignment of windows and padding: the embedding grid is the input at 1/4 resolution.
GRID = 4


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


def as_rgb_array(image: Any) -> np.ndarray:
    """An RGB uint8 (H, W, 3) array from a PIL image or an image array, by `image_decoding.to_rgb_array`: arrays of
    shape (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4) holding uint8, uint16, bool or float values."""
    return to_rgb_array(image)


def sliding_window_crop(folder: str | Path | ModelFolder | None, processor) -> tuple[tuple[int, int], str]:
    """The crop (height, width) the model was trained on, and where it comes from, by the first rule that applies:

    1. "crop_size" recorded with the checkpoint (`recorded_training_crop`: model_card_inputs.json or
       training_args.json, which train.py writes);
    2. the image processor's size, when the processor resizes (a processor that resizes every image to one size
       trains and predicts at that size);
    3. `DEFAULT_CROP` (512, train.py's default --crop_size), logged as a guess.

    (train.py saves a processor that does not resize, whose `size` is SegFormer's unused default 512: it is not the
    crop.) `folder` may be a `ModelFolder`, whose recorded crop was read once already.
    """
    if isinstance(folder, ModelFolder):
        folder, recorded = folder.folder, folder.training_crop
    else:
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
    reject_unknown: pixels whose unknown score `max_similarity` (upsampled like the logits) is below the threshold
        get `ignore_index` (the model's `semantic_loss_ignore_index`, 255) in the label map and are marked in
        `Prediction.unknown_map`: the one switch of predict, evaluate, the endpoint handler and the Space. Off by
        default; needs a calibrated model (`config.unknown_threshold`, proto_segformer/unknown.py).
    unknown_threshold: the threshold to use instead of the model's calibrated one, in [-1, 1] (`None`: the model's).
    unknown_scores: also return each pixel's unknown score (`Prediction.max_similarity`) without rejecting anything
        (what calibration reads: `unknown.calibrate_segmenter`).
    """

    mode: str = "auto"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    batch_size: int = 4
    prototype_maps: bool = False
    similarity_dtype: str | None = None
    reject_unknown: bool = False
    unknown_threshold: float | None = None
    unknown_scores: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        check_similarity_dtype(self.similarity_dtype)
        check_unknown_threshold(self.unknown_threshold)
        if self.unknown_threshold is not None and not self.reject_unknown:
            raise ValueError("An unknown threshold was given without rejection: add --reject_unknown.")
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
    unknown_map: (H, W) bool, True where the pixel was rejected as unknown (`InferenceOptions.reject_unknown`; its
        label is then the ignore value), or None without rejection.
    max_similarity: (H, W) float32 unknown score of each pixel (the largest similarity to any prototype), or None.
    """

    label_map: np.ndarray
    prototype_map: np.ndarray | None
    unknown_map: np.ndarray | None = None
    max_similarity: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------------- the forward


@torch.no_grad()
def forward_batches(
    model,
    pixel_values: torch.Tensor,
    batch_size: int,
    with_embeddings: bool,
    with_prototype_indices: bool = False,
    with_max_similarity: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Logits (N, K, h, w) and, if asked, unit embeddings (N, D, h, w) of (N, 3, H, W) inputs in chunks; with
    `with_prototype_indices` also each class's nearest prototype (N, K, h, w), with `with_max_similarity` the unknown
    score (N, h, w), both from the model's own head pass."""
    device, dtype = model.device, model.dtype
    logits, embeddings, indices, nearest = [], [], [], []
    extra = {"output_max_similarity": True} if with_max_similarity else {}
    for start in range(0, pixel_values.shape[0], batch_size):
        chunk = pixel_values[start : start + batch_size].to(device=device, dtype=dtype)
        output = model(
            pixel_values=chunk,
            output_pixel_embeddings=with_embeddings,
            output_prototype_indices=with_prototype_indices,
            **extra,
        )
        logits.append(output.logits.float())
        if with_embeddings:
            embeddings.append(output.pixel_embeddings.float())
        if with_prototype_indices:
            indices.append(output.prototype_indices)
        if with_max_similarity:
            nearest.append(output.max_similarity.float())
    return (
        torch.cat(logits),
        torch.cat(embeddings) if with_embeddings else None,
        torch.cat(indices) if with_prototype_indices else None,
        torch.cat(nearest) if with_max_similarity else None,
    )


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
    with_max_similarity: bool = False,
) -> tuple:
    """Sliding-window logits of one image (1, 3, H, W) on its padded 1/4 grid.

    The image is padded to a multiple of 4 and at least the crop; windows start on multiples of 4, so every window's
    (crop/4) logits land exactly on the padded image's 1/4 grid, where overlaps are averaged (as mmseg averages
    upsampled window logits; bilinear upsampling commutes with the average away from window borders).

    Returns: averaged logits (K, Hp/4, Wp/4), averaged unit embeddings (D, Hp/4, Wp/4) or None, and (Hp, Wp);
    with `with_max_similarity` a fourth item, the unknown score (Hp/4, Wp/4) averaged over the windows like the logits.
    """
    _, _, height, width = pixel_values.shape
    padded_h = max(crop[0], math.ceil(height / GRID) * GRID)
    padded_w = max(crop[1], math.ceil(width / GRID) * GRID)
    padded = pad_to(pixel_values, padded_h, padded_w)
    origins = [
        (y, x) for y in window_starts(padded_h, crop[0], stride[0]) for x in window_starts(padded_w, crop[1], stride[1])
    ]
    windows = torch.cat([padded[:, :, y : y + crop[0], x : x + crop[1]] for y, x in origins])
    logits, embeddings, _, nearest = forward_batches(
        model, windows, batch_size, with_embeddings, with_max_similarity=with_max_similarity
    )
    grid_h, grid_w = padded_h // GRID, padded_w // GRID
    win_h, win_w = logits.shape[2], logits.shape[3]
    logit_sum = logits.new_zeros(logits.shape[1], grid_h, grid_w)
    counts = logits.new_zeros(1, grid_h, grid_w)
    embedding_sum = embeddings.new_zeros(embeddings.shape[1], grid_h, grid_w) if with_embeddings else None
    nearest_sum = nearest.new_zeros(1, grid_h, grid_w) if with_max_similarity else None
    for index, (y, x) in enumerate(origins):
        gy, gx = y // GRID, x // GRID
        logit_sum[:, gy : gy + win_h, gx : gx + win_w] += logits[index]
        counts[:, gy : gy + win_h, gx : gx + win_w] += 1
        if embedding_sum is not None:
            embedding_sum[:, gy : gy + win_h, gx : gx + win_w] += embeddings[index]
        if nearest_sum is not None:
            nearest_sum[:, gy : gy + win_h, gx : gx + win_w] += nearest[index]
    averaged_embeddings = F.normalize(embedding_sum, dim=0) if embedding_sum is not None else None
    result = (logit_sum / counts.clamp_min(1), averaged_embeddings, (padded_h, padded_w))
    if with_max_similarity:
        return (*result, (nearest_sum / counts.clamp_min(1))[0])
    return result


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


def grid_to_prediction(
    logits: torch.Tensor,
    embeddings: torch.Tensor | None,
    prototypes: torch.Tensor | None,
    scaled_size: tuple[int, int],
    output_size: tuple[int, int],
    prototype_indices: torch.Tensor | None = None,
    rejection: UnknownRejection | None = None,
    max_similarity: torch.Tensor | None = None,
) -> Prediction:
    """Upsample 1/4-grid logits (K, h, w) to `scaled_size`, crop to `output_size` and take the argmax.

    `scaled_size` is the size the grid covers (the resized input for "whole" is the original size; the padded
    input for "slide"); `output_size` = (H, W) of the original image. The prototype map takes each class's nearest
    prototype from `prototype_indices` (K, h, w) (the model's head found them with the logits: "whole"), else from
    `embeddings` (D, h, w) and `prototypes` ("slide": the embeddings averaged over the windows belong to no window).
    With `rejection` and the unknown score `max_similarity` (h, w): pixels whose score, upsampled like the logits, is
    below the threshold get the ignore value (`UnknownRejection.apply`).
    """
    height, width = output_size
    label_map = upsampled_argmax(logits, scaled_size, (height, width))
    prototype_map = None
    if prototype_indices is not None or embeddings is not None:
        # Only the classes that are predicted somewhere need their nearest-prototype map.
        present, position = torch.unique(label_map, return_inverse=True)
        if prototype_indices is not None:
            per_class = prototype_indices.to(present.device)[present]
        else:
            per_class = nearest_prototype_per_class(embeddings, prototypes.to(embeddings.device)[present])
        grid_h, grid_w = per_class.shape[1:]
        # torch's "nearest": source index floor(dst * in / out).
        rows = (torch.arange(height, device=per_class.device) * grid_h // scaled_size[0]).clamp_max(grid_h - 1)
        cols = (torch.arange(width, device=per_class.device) * grid_w // scaled_size[1]).clamp_max(grid_w - 1)
        prototype_map = per_class[position, rows[:, None], cols[None, :]].cpu().numpy()
    label_map = label_map.cpu().numpy()
    if max_similarity is None:
        return Prediction(label_map, prototype_map)
    scores = upsample_scores(max_similarity[None], scaled_size)[0, :height, :width].cpu().numpy()
    unknown = rejection.apply(label_map, scores) if rejection is not None else None
    return Prediction(label_map, prototype_map, unknown, scores)


@dataclass(frozen=True)
class UnknownRejection:
    """The rejection of unknown pixels: the threshold on `max_similarity` and the label value they get."""

    threshold: float
    ignore_index: int

    @classmethod
    def for_model(cls, model, options: InferenceOptions) -> UnknownRejection | None:
        """The rejection `options` ask for (None when off); a model without a calibrated threshold (or an ONNX
        export without the score) is one ValueError naming the fix."""
        if not options.reject_unknown:
            return None
        threshold = required_threshold(model.config, options.unknown_threshold)
        return cls(threshold, int(getattr(model.config, "semantic_loss_ignore_index", 255)))

    def apply(self, label_map: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Set the label of pixels scoring below the threshold to the ignore value, in place; returns that mask."""
        unknown = scores < self.threshold
        label_map[unknown] = self.ignore_index
        return unknown


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
        self.rejection = UnknownRejection.for_model(model, self.options)
        # The unknown score is computed for rejection or when asked for (calibration).
        self.scores = self.rejection is not None or self.options.unknown_scores
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
        cls,
        folder: str | Path | ModelFolder,
        device: str = "cpu",
        options: InferenceOptions | None = None,
        backend: str = "pytorch",
    ) -> Segmenter:
        """Load a checkpoint folder, read and checked once (`checkpoint.validate_checkpoint`), onto `device` ("cpu",
        "cuda", "auto").

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
            source = folder
        else:
            # Read and checked once (a `ModelFolder` was already): the model and processor load from it.
            source = folder if isinstance(folder, ModelFolder) else validate_checkpoint(folder)
            model = load_model(source, device=resolve_device(device))
            if options is not None and options.similarity_dtype is not None:
                model.config.similarity_dtype = options.similarity_dtype
        crop = options.crop_size[0] if options is not None and options.crop_size else None
        processor = load_image_processor(source, crop_size=crop)
        training_crop = None
        if options is None or options.crop_size is None:
            training_crop, origin = sliding_window_crop(source, processor)
            logger.info("Sliding window %dx%d: the training crop, %s.", *training_crop, origin)
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
        maps, reject = self.options.prototype_maps, self.scores
        logits, _, indices, nearest = forward_batches(self.model, padded, self.options.batch_size, False, maps, reject)
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
                    logits[i],
                    None,
                    None,
                    scaled,
                    (height, width),
                    indices[i] if maps else None,
                    self.rejection,
                    nearest[i] if reject else None,
                )
            )
        return predictions

    def image_grid(
        self, array: np.ndarray, input_size: tuple[int, int] | None = None, with_embeddings: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int], tuple[int, int]]:
        """One image's 1/4-grid outputs under the current mode: logits (1, K, h, w), unit embeddings (D, h, w) when
        `with_embeddings` (else None), the input size the grid covers (padding included) and the size of the image
        within it (`image_logits` says how `input_size` resizes it)."""
        resize = (
            {} if input_size is None else {"do_resize": True, "size": {"height": input_size[0], "width": input_size[1]}}
        )
        if self.uses_slide(array):
            pixel_values = self._pixel_values(array, **(resize or {"do_resize": False}))
            logits, embeddings, padded = slide_grid(
                self.model, pixel_values, self.crop, self.stride, self.options.batch_size, with_embeddings
            )
            return logits[None], embeddings, tuple(padded), tuple(pixel_values.shape[2:])
        pixel_values = self._pixel_values([array], **resize)
        scale = tuple(pixel_values.shape[2:])
        covered = (max(scale[0], self.min_input_size), max(scale[1], self.min_input_size))
        logits, embeddings, _, _ = forward_batches(
            self.model, pad_to(pixel_values, *covered), self.options.batch_size, with_embeddings
        )
        return logits, embeddings[0] if with_embeddings else None, covered, scale

    def image_logits(self, array: np.ndarray, input_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Class scores (K, H, W) float32 of one image (H, W, 3) at its own size, under the current mode: the 1/4-grid
        logits upsampled bilinearly (as for `predict`, whose label map is their argmax). `input_size` (height,
        width): the image is first resized to it (test-time scales, `test_time_augmentation.py`); None: as `predict`
        (the processor's resize in "whole" mode, the image's own size in "slide" mode)."""
        height, width = array.shape[:2]
        logits, _, covered, scale = self.image_grid(array, input_size)
        # The grid covers `covered` input pixels, of which the first `scale` are the image (resized to `scale`).
        upsampled = F.interpolate(logits, size=tuple(covered), mode="bilinear", align_corners=False)
        upsampled = upsampled[:, :, : scale[0], : scale[1]]
        if tuple(scale) != (height, width):
            upsampled = F.interpolate(upsampled, size=(height, width), mode="bilinear", align_corners=False)
        return upsampled[0]

    def _predict_slide(self, array: np.ndarray) -> Prediction:
        pixel_values = self._pixel_values(array, do_resize=False)
        reject = self.scores
        logits, embeddings, padded, *nearest = slide_grid(
            self.model,
            pixel_values,
            self.crop,
            self.stride,
            self.options.batch_size,
            self.options.prototype_maps,
            with_max_similarity=reject,
        )
        prototypes = self.model.prototypes.float() if self.options.prototype_maps else None
        scores = nearest[0] if reject else None
        return grid_to_prediction(logits, embeddings, prototypes, padded, array.shape[:2], None, self.rejection, scores)


def check_prediction_size(prediction: Prediction, size: tuple[int, int]) -> None:
    """`RuntimeError` unless the prediction's maps have the image's (H, W): a wrong-sized label file is never
    written."""
    shapes = {prediction.label_map.shape[:2]}
    for extra in (prediction.prototype_map, prediction.unknown_map, prediction.max_similarity):
        if extra is not None:
            shapes.add(extra.shape[:2])
    if shapes != {tuple(size)}:
        raise RuntimeError(
            f"internal error: the prediction has size {sorted(shapes)} for an image of {tuple(size)}; not written."
        )


__all__ = ["InferenceOptions", "Prediction", "Segmenter"]
