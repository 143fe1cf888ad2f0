"""A ProtoSeg model folder (either model of `model_types.py`), read and checked once.

`validate_checkpoint(folder)` reads a checkpoint folder (a training output or one of its `checkpoint-*` folders) and
checks everything that loading it relies on, each once: `config.json` parsed and checked by its config class,
the weight files found (one file or the shards of an index), the tensor shapes read from the safetensors headers
(the `prototypes` tensor agreeing with the config), every tensor scanned for NaN and inf, the image processor's
folder found and the recorded training crop read (`training_crop.py`). The result, a `ModelFolder`, is what
predict (`Segmenter.from_pretrained`), push_to_hub (`hub.py`), add_classes and the ONNX export load the model and
its image processor from (`load_model`, `load_image_processor`), so no check runs twice in one command.

Every problem is a `CheckpointError` whose one-line message names it. (The endpoint handler and the Space app run
standalone, without this package: they keep their own checks.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .local_paths import close_matches
from .model_types import MODEL_TYPES, config_class, model_class
from .training_crop import recorded_training_crop

logger = logging.getLogger(__name__)

MODEL_TYPE = "proto_segformer"  # the SegFormer model's; MODEL_TYPES lists every model type a checkpoint may have
WEIGHTS_NAME = "model.safetensors"
SHARDED_WEIGHTS_INDEX = "model.safetensors.index.json"
PROCESSOR_NAME = "preprocessor_config.json"
# The training crop when nothing records it: train.py's default --crop_size (and SegFormer's ADE20K crop).
DEFAULT_CROP = 512


class CheckpointError(ValueError):
    """A folder that cannot serve as a ProtoSegformer checkpoint (missing, corrupt or of another model)."""


@dataclass(frozen=True)
class ModelFolder:
    """A checked ProtoSegformer checkpoint folder (`validate_checkpoint`): what loading it needs, read once.

    folder: the checkpoint folder. config: its `config.json` (a dict, checked by `ProtoSegformerConfig`).
    weight_files: its safetensors files. tensor_shapes: name -> shape of every saved tensor (from the headers).
    processor_folder: the folder holding `preprocessor_config.json` (the checkpoint, or for `checkpoint-*` its run
    folder), None if neither has one. training_crop: the recorded training crop (height, width) and the file that
    records it (`training_crop.recorded_training_crop`), None if no file records one.
    """

    folder: Path
    config: dict[str, Any]
    weight_files: tuple[Path, ...]
    tensor_shapes: dict[str, tuple[int, ...]]
    processor_folder: Path | None
    training_crop: tuple[tuple[int, int], Path] | None

    @property
    def prototype_shape(self) -> tuple[int, int, int]:
        """(K, M, D) of the saved prototypes."""
        return tuple(self.tensor_shapes["prototypes"])

    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in (self.config.get("id2label") or {}).items()}


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
    if model_type not in MODEL_TYPES:
        expected = " or ".join(repr(name) for name in MODEL_TYPES)
        raise CheckpointError(
            f"{str(folder)!r} is not a ProtoSegformer checkpoint: config.json has model_type {model_type!r},"
            f" expected {expected}."
        )
    try:  # the config's own checks: class ids 0..K-1 and names, field ranges and resource bounds
        config_class(model_type).from_dict(dict(config))
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

    from .prototype_head import non_finite_tensor_names

    bad: list[str] = []
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            bad += non_finite_tensor_names((name, handle.get_tensor(name)) for name in handle.keys())
    return bad


def validate_checkpoint(folder: str | Path) -> ModelFolder:
    """Read and check the checkpoint `folder` once (see the module docstring): a `ModelFolder` to load from.

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
        from .prototype_head import non_finite_message

        raise CheckpointError(non_finite_message(bad, where=f"The checkpoint {str(folder)!r}"))
    return ModelFolder(
        folder=folder,
        config=config,
        weight_files=files,
        tensor_shapes=shapes,
        processor_folder=find_processor_folder(folder),
        training_crop=recorded_training_crop(folder),
    )


def _checked(source: str | Path | ModelFolder) -> ModelFolder:
    """`source` itself if it is a `ModelFolder` (checked already), else `validate_checkpoint(source)`."""
    return source if isinstance(source, ModelFolder) else validate_checkpoint(source)


def load_model(source: str | Path | ModelFolder, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The checkpoint's model (the package's own classes) in eval mode on `device`; `source` is a `ModelFolder` or a
    folder (checked first by `validate_checkpoint`).

    `CheckpointError` for anything `validate_checkpoint` rejects, a tensor missing from the weights, or (with a
    `dtype`) a weight that a cast makes non-finite (e.g. float16 overflowing to inf): the saved values were scanned
    once already, so without a cast they are not scanned again."""
    checkpoint = _checked(source)
    try:
        model, loading_info = model_class(checkpoint.config.get("model_type")).from_pretrained(
            str(checkpoint.folder), output_loading_info=True, dtype=dtype
        )
    except Exception as error:
        raise CheckpointError(f"Could not load the model from {str(checkpoint.folder)!r}: {error}") from error
    missing = [name for name in loading_info.get("missing_keys", []) if name]
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
        raise CheckpointError(
            f"The weights in {str(checkpoint.folder)!r} lack {len(missing)} tensors of the model ({shown}):"
            " the checkpoint is incomplete or from another architecture size."
        )
    bad = model.non_finite_tensors() if dtype is not None else []
    if bad:
        from .prototype_head import non_finite_message

        where = f"The model loaded from {str(checkpoint.folder)!r} as {dtype}"
        raise CheckpointError(non_finite_message(bad, where=where))
    return model.to(device).eval()


def find_processor_folder(folder: str | Path) -> Path | None:
    """The folder holding `preprocessor_config.json`: the checkpoint itself or, for `checkpoint-*`, its parent."""
    folder = Path(folder)
    for candidate in (folder, folder.parent):
        if (candidate / PROCESSOR_NAME).is_file():
            return candidate
    return None


def load_image_processor(source: str | Path | ModelFolder, crop_size: int | None = None):
    """The image processor of a checkpoint (a `ModelFolder`, or a folder such as an ONNX export); SegFormer's default
    (ImageNet statistics) resizing to `crop_size` (default: the recorded training crop, else `DEFAULT_CROP`) if it
    has none."""
    from transformers import AutoImageProcessor, SegformerImageProcessorPil

    if isinstance(source, ModelFolder):
        folder, source_folder, recorded = source.folder, source.processor_folder, source.training_crop
    else:
        folder = Path(source)
        source_folder, recorded = find_processor_folder(folder), recorded_training_crop(folder)
    if source_folder is not None:
        try:
            return AutoImageProcessor.from_pretrained(str(source_folder))
        except Exception as error:
            raise CheckpointError(
                f"{source_folder / PROCESSOR_NAME} is not a valid image processor config: {error}"
            ) from error
    height, width = (crop_size, crop_size) if crop_size else (recorded[0] if recorded else (DEFAULT_CROP,) * 2)
    logger.warning(
        "%s has no %s; using SegFormer's default image processor (ImageNet mean/std, %dx%d).",
        folder,
        PROCESSOR_NAME,
        height,
        width,
    )
    return SegformerImageProcessorPil(size={"height": height, "width": width})
