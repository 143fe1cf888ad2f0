"""Export a ProtoSegformer for deployment: `torch.export` programs and ONNX models, and ONNX Runtime inference.

- `export_program`: `torch.export.export` of the model in eval mode, with dynamic batch, height and width.
- `export_onnx`: the same graph as an ONNX file (`torch.onnx.export(..., dynamo=True)`), input `pixel_values`
  (B, 3, H, W) float32, output `logits` (B, K, H/4, W/4), with batch, height and width dynamic.
- `write_onnx_folder`: model.onnx, config.json (id2label) and the image processor's config in an output folder,
  written atomically (`folder_writer.write_folder`); it only replaces a folder it wrote itself.
- `OnnxRuntimeModel`: an ONNX Runtime session that the `Segmenter` (`segmenter.py`) runs like the PyTorch model; it
  refuses a folder whose config.json names another class count than model.onnx outputs.

Traced and compiled code skips the model's data-dependent input checks (NaN/inf pixels, label values): the
exported graph runs whatever it is given; `OnnxRuntimeModel` checks its inputs before running the session.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch

from .folder_writer import owned_files, write_folder

ONNX_NAME = "model.onnx"
EXPORT_MANIFEST = ".proto_segformer_export.json"
WRITTEN_BY = "proto_segformer.export"
ONNX_OPSET = 18
# Smallest (height, width) of an exported graph's input: below it the first stage's sequence-reduction convolution
# (stride 8 on the 1/4 map) gives a single row or column, a size torch.export specialises (the graph broadcasts
# differently there). `OnnxRuntimeModel` zero-pads smaller inputs to it and crops the logits.
EXPORT_MIN_SIZE = (61, 61)


class _LogitsOnly(torch.nn.Module):
    """The model's forward reduced to pixel_values -> logits (the graph's one output)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=True).logits


class _LogitsAndUnknownScore(_LogitsOnly):
    """pixel_values -> (logits, max_similarity): the unknown score (B, H/4, W/4) from the same head pass."""

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(pixel_values=pixel_values, output_max_similarity=True, return_dict=True)
        return output.logits, output.max_similarity


def example_inputs(model, batch: int = 2, size: int = 96) -> torch.Tensor:
    """Random pixel values (batch, C, size, size) in the model's dtype and device, to trace with."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(batch, model.config.num_channels, size, size, generator=generator)
    return values.to(device=model.device, dtype=model.dtype)


def dynamic_shapes(model) -> dict:
    """torch.export dynamic shapes for `pixel_values`: batch >= 1, (height, width) >= EXPORT_MIN_SIZE."""
    dims = torch.export.Dim
    return {
        "pixel_values": {
            0: dims("batch", min=1, max=1024),
            2: dims("height", min=EXPORT_MIN_SIZE[0], max=16384),
            3: dims("width", min=EXPORT_MIN_SIZE[1], max=16384),
        }
    }


def export_program(
    model, example: torch.Tensor | None = None, with_max_similarity: bool = False
) -> torch.export.ExportedProgram:
    """`torch.export.export` of the model's inference forward (eval mode): pixel_values -> logits, with dynamic
    batch, height and width. The model is left in the mode it was in.

    Called as `export_program(model)` or `export_program(model, example)`, `example` (positional or by name) being
    the pixel values to trace with: (B, C, H, W) with B >= 2 and H, W >= 64, in the model's dtype and device
    (default: `example_inputs(model)`, random 2 x C x 96 x 96). The program runs any batch (1 included) and any
    H, W >= 61 (`EXPORT_MIN_SIZE`): `program.module()(pixel_values)` returns the logits (B, K, H/4, W/4), or with
    `with_max_similarity` (logits, max_similarity), the unknown score (B, H/4, W/4) of the same pass.
    """
    example = example_inputs(model) if example is None else example
    if example.shape[0] < 2 or min(example.shape[2:]) < 64:
        raise ValueError(
            f"Trace with a batch of at least 2 images of at least 64x64 pixels (got"
            f" {tuple(example.shape)}): torch.export specialises a size of 1 and smaller inputs, so the graph would"
            " not be dynamic. The exported graph then runs any batch size, batch 1 included."
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            wrapper = _LogitsAndUnknownScore(model) if with_max_similarity else _LogitsOnly(model)
            return torch.export.export(wrapper, (example,), dynamic_shapes=dynamic_shapes(model))
    finally:
        model.train(was_training)


def export_onnx(
    model, path: str | Path, program: torch.export.ExportedProgram | None = None, opset: int = ONNX_OPSET
) -> Path:
    """Write the model's inference graph to `path` as ONNX (`torch.onnx.export(..., dynamo=True)` of
    `export_program(model, with_max_similarity=True)`, or of `program` when given), dynamic batch, height and width.
    Outputs `logits` and, unless `program` returns the logits only, `max_similarity` (the unknown score)."""
    _require_onnx()
    problem = model.onnx_export_problem() if hasattr(model, "onnx_export_problem") else None
    if problem is not None:
        raise ExportError(problem)
    if getattr(model.config, "similarity_dtype", None) == "bfloat16":
        raise ValueError(
            "similarity_dtype='bfloat16' cannot go to ONNX: ONNX Runtime's CPU kernels have no bfloat16 MatMul. "
            "Export the float32 head: set model.config.similarity_dtype = None first (in Python, or in the model"
            " folder's config.json)."
        )
    program = export_program(model, with_max_similarity=True) if program is None else program
    outputs = ["logits", "max_similarity"][: len(program.graph_signature.user_outputs)]
    with known_exporter_warnings_silenced():
        onnx_program = torch.onnx.export(
            program,
            input_names=["pixel_values"],
            output_names=outputs,
            dynamo=True,
            opset_version=opset,
            verbose=False,
        )
    path = Path(path)
    onnx_program.save(str(path))
    return path


# The logger of torch.onnx's operator registry, and the start of the one message of it that is silenced.
_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
_NO_TORCHVISION = "torchvision is not installed. Skipping torchvision::"
_LEAF_SPEC_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _DropMessagesStartingWith(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def known_exporter_warnings_silenced():
    """Silence the five known-harmless messages of torch 2.13's ONNX exporter on this model, and only those:

    - "torchvision is not installed. Skipping torchvision::nms" (and ::roi_align, ::roi_pool, ::deform_conv2d),
      logged at WARNING by the exporter's operator registry, which adds translations for torchvision's detection
      operators when torchvision is installed: this model uses none of them, and torchvision is not a dependency.
    - FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated": torch's exporter copies the program's
      input/output tree specifications, which torch.export built with its own deprecated `LeafSpec` class; torch
      calling torch, nothing this package (or its user) can change.
    Any other warning or log message of the export still shows.
    """
    registry = logging.getLogger(_REGISTRY_LOGGER)
    dropped = _DropMessagesStartingWith(_NO_TORCHVISION)
    registry.addFilter(dropped)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LEAF_SPEC_DEPRECATION, category=FutureWarning)
            yield
    finally:
        registry.removeFilter(dropped)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs the packages onnx and onnxscript ({error}); install them with"
            " `pip install 'proto_segformer[onnx]'` (or `pip install onnx onnxscript onnxruntime`)."
        ) from error


class ExportError(ValueError):
    """An export that cannot be written where it was asked to go."""


def _check_destination(output_dir: Path) -> list[str]:
    """The files of an earlier export of ours in `output_dir` (to replace; none for a missing or empty folder); an
    `ExportError` for a file, or a folder holding anything an export did not write."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"{output_dir} exists and is not a folder; choose another --output_dir.")
    previous, foreign = owned_files(output_dir, EXPORT_MANIFEST)
    if foreign:
        raise ExportError(
            f"{output_dir} holds files that an ONNX export did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); export into a new or empty folder."
        )
    return previous or []


def write_onnx_folder(model, processor, output_dir: str | Path, training_crop: tuple[int, int] | None = None) -> Path:
    """Write model.onnx, config.json and the image processor's config into `output_dir`, atomically; with
    `training_crop` (height, width) also model_card_inputs.json recording it as "crop_size" (prediction's sliding
    window, `segmenter.sliding_window_crop`).

    The files are assembled in a staging folder beside `output_dir` and swapped into place
    (`folder_writer.write_folder`); an existing `output_dir` must be empty or an earlier export (its manifest lists
    every file), whose files are then replaced. On any error nothing at `output_dir` changes.
    """
    output_dir = Path(output_dir).absolute()
    previous = _check_destination(output_dir)

    def fill(staging: Path) -> None:
        export_onnx(model, staging / ONNX_NAME)
        model.config.save_pretrained(staging)
        processor.save_pretrained(staging)
        if training_crop is not None:
            (staging / "model_card_inputs.json").write_text(json.dumps({"crop_size": list(training_crop)}) + "\n")

    write_folder(
        output_dir, fill, purpose="export", replaceable=previous, manifest=EXPORT_MANIFEST, written_by=WRITTEN_BY
    )
    return output_dir


class OnnxRuntimeModel:
    """An exported folder (`write_onnx_folder`) run by ONNX Runtime on the CPU, called like the PyTorch model:
    `model(pixel_values=...)` returns an object with `logits` (float32 tensors in and out)."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, folder: str | Path, num_threads: int | None = None) -> None:
        from .model_types import config_class

        folder = Path(folder)
        if not (folder / ONNX_NAME).is_file():
            raise FileNotFoundError(
                f"{folder} has no {ONNX_NAME}; write one with `python scripts/export_onnx.py --model CHECKPOINT"
                f" --output_dir {folder}`."
            )
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError(
                "The onnxruntime backend needs the package onnxruntime; install it with"
                " `pip install 'proto_segformer[onnx]'`."
            ) from error
        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        self.session = onnxruntime.InferenceSession(
            str(folder / ONNX_NAME), options, providers=["CPUExecutionProvider"]
        )
        self.folder = folder
        try:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = "proto_segformer"  # from_pretrained reports the problem
        # The config of either model (model_types.py); checks id2label: ids 0..K-1, one-line names.
        self.config = config_class(model_type).from_pretrained(folder)
        shapes = {output.name: output.shape for output in self.session.get_outputs()}
        if "logits" not in shapes:
            self._class_count_mismatch("no 'logits' output")
        self.has_max_similarity = "max_similarity" in shapes
        classes = shapes["logits"][1] if len(shapes["logits"]) == 4 else None
        if isinstance(classes, int) and classes != self.config.num_labels:  # else checked on the logits, in __call__
            self._class_count_mismatch(f"logits for {classes} classes")

    def _class_count_mismatch(self, what: str) -> None:
        """The error for a folder whose config.json names other classes than model.onnx outputs logits for."""
        raise ValueError(
            f"{self.folder / 'config.json'} names {self.config.num_labels} classes (id2label) but"
            f" {self.folder / ONNX_NAME} has {what}: the files come from different models. Export the checkpoint again"
            " (python scripts/export_onnx.py --model CHECKPOINT --output_dir NEW_FOLDER)."
        )

    def eval(self) -> OnnxRuntimeModel:
        return self

    def __call__(
        self, pixel_values: torch.Tensor, output_pixel_embeddings: bool = False, output_max_similarity=False, **_
    ) -> SimpleNamespace:
        if output_pixel_embeddings:
            raise ValueError(
                "The ONNX model outputs logits only: prototype maps need the PyTorch backend (--backend pytorch)."
            )
        if output_max_similarity and not self.has_max_similarity:
            raise ValueError(
                f"{self.folder / ONNX_NAME} has no max_similarity output (exported before unknown scores existed):"
                " export it again with scripts/export_onnx.py to reject unknown pixels with --backend onnxruntime."
            )
        pixel_values = torch.as_tensor(pixel_values, dtype=torch.float32)
        channels = self.config.num_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"The ONNX model takes pixel_values of shape (batch_size, {channels}, height, width), got"
                f" {tuple(pixel_values.shape)}. Use the image processor to build them."
            )
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or inf values.")
        height, width = pixel_values.shape[2:]
        # Smaller images: zero-padded (the normalised mean colour) at the bottom/right, logits cropped to the image's
        # 1/4 grid. Close to, not equal to, PyTorch's logits at that size (the padding is context for attention).
        pad_h, pad_w = max(0, EXPORT_MIN_SIZE[0] - height), max(0, EXPORT_MIN_SIZE[1] - width)
        if pad_h or pad_w:
            pixel_values = torch.nn.functional.pad(pixel_values, (0, pad_w, 0, pad_h))
        names = ["logits", "max_similarity"] if output_max_similarity else ["logits"]
        logits, *nearest = self.session.run(names, {"pixel_values": pixel_values.contiguous().numpy()})
        if logits.ndim != 4 or logits.shape[1] != self.config.num_labels:  # a graph whose class axis is dynamic
            self._class_count_mismatch(f"logits of shape {logits.shape}")
        grid = (slice(None), slice(0, (height + 3) // 4), slice(0, (width + 3) // 4))
        return SimpleNamespace(
            logits=torch.from_numpy(logits)[:, :, grid[1], grid[2]],
            max_similarity=torch.from_numpy(nearest[0])[grid] if nearest else None,
        )
