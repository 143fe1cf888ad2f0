"""Load segmentation data sets (Hub ids, `save_to_disk` folders, parquet folders, ADE20K-style folders), find their
columns and class names, and check them before training starts.

Every problem a user can cause is raised as `DataError` with a message that names it (the column, the label values,
the sample, the file), never as a deep stack trace.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..image_decoding import check_label_orientation
from ..paths import check_source
from .builtin import BUILTIN_DATASETS
from .layouts import canonical_split, find_folder_layout, layout_dataset
from .reading import DataError, decode_image
from .transforms import DEFAULT_IGNORE_INDEX, label_to_array, reduce_label_array, to_rgb

IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "images")
LABEL_COLUMN_CANDIDATES = ("label", "annotation", "semantic_map", "segmentation", "mask", "labels", "seg_map")
BUILTIN_PREFIX = "builtin:"


# --------------------------------------------------------------------------------------------------------- loading


def _is_save_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_ade20k_style_folder(path: str | Path) -> datasets.DatasetDict:
    """`images/<split>/*.jpg` paired by file stem with `annotations/<split>/*.png` -> DatasetDict with columns
    "image" and "label" (split folders "training"/"validation" become "train"/"validation"); a folder of another
    layout (Cityscapes, COCO-Stuff) is read as that layout (`layouts.find_folder_layout`)."""
    layout = find_folder_layout(path)
    if layout is None:
        raise DataError(f"{path} is no data set folder with images/ and annotations/.")
    return layout_dataset(layout)


def _rename_splits(dataset: datasets.DatasetDict) -> datasets.DatasetDict:
    return datasets.DatasetDict({canonical_split(name): split for name, split in dataset.items()})


def load_dataset_any(
    dataset_name: str,
    dataset_config_name: str | None = None,
    *,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
) -> datasets.DatasetDict:
    """Load a data set from a local path (save_to_disk folder, folder of parquet files, a folder of a layout
    `layouts.find_folder_layout` knows: ADE20K-style, Cityscapes, COCO-Stuff-164k or -10k as distributed, whose
    labels come out converted to train ids; or anything `datasets.load_dataset` reads) or a Hub id; split names are
    normalised to train/validation/test."""
    path = Path(os.path.expanduser(dataset_name))
    if path.exists():
        if path.is_dir() and _is_save_to_disk(path):
            try:
                loaded = datasets.load_from_disk(str(path))
            except (IndexError, ValueError, OSError, KeyError) as error:
                raise DataError(
                    f"Could not read the saved data set {path} ({type(error).__name__}: {error}). If a split is"
                    " empty, remove it or add samples; otherwise save it again with DatasetDict.save_to_disk."
                ) from error
            if isinstance(loaded, datasets.Dataset):
                loaded = datasets.DatasetDict({"train": loaded})
            return _rename_splits(loaded)
        layout = find_folder_layout(path)  # ADE20K-style, Cityscapes, COCO-Stuff folders as distributed
        if layout is not None:
            return layout_dataset(layout)
        if path.is_dir() and any(path.rglob("*.parquet")):
            return _rename_splits(datasets.load_dataset(str(path), cache_dir=cache_dir))
        if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
            raise DataError(f"The data set folder {path} is empty.")
    else:
        check_hub_source(dataset_name, cache_dir)
    try:
        loaded = datasets.load_dataset(
            dataset_name, dataset_config_name, cache_dir=cache_dir, token=token, trust_remote_code=trust_remote_code
        )
    except TypeError:  # datasets versions without trust_remote_code
        loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, token=token)
    except (FileNotFoundError, ConnectionError, OSError) as error:
        raise DataError(
            f"Could not load the data set {dataset_name!r}: {error}. Give a Hub id (needs the network, or the"
            " datasets cache with HF_HUB_OFFLINE=1), or a local folder: a DatasetDict saved with save_to_disk, a"
            " folder of parquet files, or an ADE20K-style folder (images/<split>/, annotations/<split>/)."
        ) from error
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return _rename_splits(loaded)


def check_hub_source(dataset_name: str, cache_dir: str | None = None) -> None:
    """A `DataError` at once for a mistyped local path, or a Hub id while the Hub is unreachable (one line)."""
    try:
        check_source(dataset_name, what="data set", repo_type="dataset", cache_dir=cache_dir)
    except OSError as error:
        raise DataError(str(error)) from error


def parse_builtin_name(dataset_name: str | None) -> str | None:
    """The built-in data set meant by `dataset_name` (None, "builtin:<name>", or a bare built-in name that is not a
    local path), or None for other data."""
    if dataset_name is None or dataset_name == "":
        return "scenes"
    if dataset_name in BUILTIN_DATASETS and not Path(os.path.expanduser(dataset_name)).exists():
        return dataset_name
    if dataset_name.startswith(BUILTIN_PREFIX):
        name = dataset_name[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_DATASETS:
            raise DataError(f"Unknown built-in data set {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}.")
        return name
    return None


def ensure_validation_split(
    dataset: datasets.DatasetDict, train_val_split: float | None, seed: int
) -> datasets.DatasetDict:
    """Keep train/validation; carve a validation split out of train when there is none (fraction `train_val_split`)."""
    if "train" not in dataset:
        raise DataError(f"The data set has no training split; its splits are {sorted(dataset)}.")
    if "validation" in dataset:
        return datasets.DatasetDict({"train": dataset["train"], "validation": dataset["validation"]})
    if not train_val_split:
        raise DataError(
            f"The data set has no validation split (its splits are {sorted(dataset)}); pass --train_val_split"
            " (e.g. 0.15) to hold out part of the training split."
        )
    if len(dataset["train"]) < 2:
        raise DataError("The training split has fewer than 2 samples: cannot hold out a validation split.")
    parts = dataset["train"].train_test_split(test_size=train_val_split, seed=seed)
    return datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]})


# --------------------------------------------------------------------------------------------------------- columns


def resolve_column(
    column_names: Sequence[str], requested: str | None, candidates: Sequence[str], what: str, option: str
) -> str:
    """The column to use: `requested` if given (must exist), else the first of `candidates` present."""
    columns = list(column_names)
    if requested is not None:
        if requested not in columns:
            raise DataError(
                f"The data set has no {what} column {requested!r}; its columns are {columns}. Pass {option} with"
                " one of them."
            )
        return requested
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise DataError(
        f"Could not find the {what} column: none of {list(candidates)} is among the data set's columns {columns}."
        f" Pass {option} with one of them."
    )


# -------------------------------------------------------------------------------------------------------- id2label


def _normalise_id2label(raw: Any, source: str) -> dict[int, str]:
    if isinstance(raw, dict) and "id2label" in raw:
        raw = raw["id2label"]
    if isinstance(raw, list):
        return {i: str(name) for i, name in enumerate(raw)}
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{source} must hold a non-empty {{id: name}} object or a list of names.")
    try:
        id2label = {int(k): str(v) for k, v in raw.items()}
    except ValueError as error:
        raise DataError(f"{source}: class ids must be integers ({error}).") from error
    ids = sorted(id2label)
    if ids != list(range(len(ids))):
        raise DataError(f"{source}: class ids must be 0..{len(ids) - 1} without gaps, got {ids[:10]}...")
    return id2label


def read_id2label_file(path: str | Path) -> dict[int, str]:
    """id2label from a json file ({"0": "wall", ...}, a list of names, or a config.json with "id2label")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The id2label file {path} does not exist.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"The id2label file {path} is not valid json: {error}.") from error
    return _normalise_id2label(raw, f"The id2label file {path}")


def id2label_from_features(features: datasets.Features, label_column: str) -> dict[int, str] | None:
    """Class names stored in the data set's features: a ClassLabel in the label column (or nested in it), or
    a ClassLabel column named like "classes"/"objects"; None if there is none."""
    feature = features.get(label_column)
    while feature is not None:
        if isinstance(feature, datasets.ClassLabel):
            return dict(enumerate(feature.names))
        feature = getattr(feature, "feature", None)
    return None


def id2label_from_dataset(dataset: datasets.DatasetDict, dataset_name: str, label_column: str) -> dict[int, str] | None:
    """id2label found with the data: features, or an id2label.json next to a local data set / in a Hub repo."""
    split = dataset["train"]
    from_features = id2label_from_features(split.features, label_column)
    if from_features:
        return from_features
    path = Path(os.path.expanduser(dataset_name))
    if path.is_dir():
        layout = find_folder_layout(path)
        if layout is not None and layout.id2label is not None:
            return dict(layout.id2label)
        for name in ("id2label.json", "label2id.json"):
            if (path / name).is_file():
                mapping = json.loads((path / name).read_text())
                if name == "label2id.json":
                    mapping = {v: k for k, v in mapping.items()}
                return _normalise_id2label(mapping, str(path / name))
        return None
    try:  # a Hub data set repository (as in transformers' run_semantic_segmentation.py)
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(dataset_name, "id2label.json", repo_type="dataset")
    except Exception:  # noqa: BLE001 - absent file, private repo, or offline: fall back to the next source
        return None
    return read_id2label_file(file)


# ----------------------------------------------------------------------------------------------------- data checks


def undecoded(split: datasets.Dataset, columns: Sequence[str]) -> datasets.Dataset:
    """`split` with its Image columns among `columns` left undecoded ({"bytes", "path"} dicts), so that each file
    is opened by `decode_image`, which names the file it cannot read."""
    for column in columns:
        feature = split.features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            split = split.cast_column(column, datasets.Image(decode=False))
    return split


def label_size(label: Image.Image | np.ndarray) -> tuple[int, ...]:
    """(height, width) of a label image or array (its shape for an array that is no 2-D map)."""
    if isinstance(label, Image.Image):
        return (label.size[1], label.size[0])
    return tuple(np.shape(label)[:2])


def read_pair(
    split: datasets.Dataset, index: int, image_column: str, label_column: str, split_name: str = "train"
) -> tuple[Image.Image, Image.Image | np.ndarray]:
    """Sample `index` as (RGB image as shown, label); `split` should come from `undecoded` so unreadable files are
    named (`read_row`)."""
    return read_row(split[index], index, image_column, label_column, split_name)


def read_row(
    row: dict[str, Any], index: int, image_column: str, label_column: str, split_name: str = "train"
) -> tuple[Image.Image, Image.Image | np.ndarray]:
    """A sample's row (sample `index` of its split) as (RGB image as shown, label).

    The image goes through `image_decoding.to_rgb_array`, the decoder `predict`, the endpoint and the Space use
    (EXIF orientation applied, transparency on white, 16-bit and float samples scaled by their range); a label that
    fits the image only as stored, not as shown, is a `DataError` (`image_decoding.check_label_orientation`)."""
    name = f"Split {split_name!r}, sample {index}"
    image = decode_image(row[image_column], f"{name}, image")
    label = decode_image(row[label_column], f"{name}, label")
    try:
        if isinstance(image, Image.Image):
            check_label_orientation(image, label_size(label))
        rgb = to_rgb(image)  # to_rgb_array's pixels (an RGB image without EXIF orientation is used as it is)
    except ValueError as error:
        raise DataError(f"{name}, image{_file_in(row, image_column)}: {error}.") from error
    return rgb, label


def _path_of(value: Any) -> str | None:
    return value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None


def _file_in(row: dict[str, Any], column: str) -> str:
    path = _path_of(row[column])
    return f" ({path})" if path else ""


def prepare_label(label: Image.Image | np.ndarray, reduce_labels: bool, ignore_index: int) -> np.ndarray:
    """(H, W) int64 class indices, reduced (0 -> ignore, others - 1) when `reduce_labels`."""
    array = label_to_array(label)
    return reduce_label_array(array, ignore_index) if reduce_labels else array


def checked_label(
    split: datasets.Dataset,
    index: int,
    label: Image.Image | np.ndarray,
    label_column: str,
    reduce_labels: bool,
    ignore_index: int,
    split_name: str = "train",
) -> np.ndarray:
    """`prepare_label` of sample `index`; a label it cannot use is a `DataError` naming the sample and its file."""
    return _checked_label(split[index], index, label, label_column, reduce_labels, ignore_index, split_name)


def _checked_label(row, index, label, label_column, reduce_labels, ignore_index, split_name) -> np.ndarray:
    try:
        return prepare_label(label, reduce_labels, ignore_index)
    except ValueError as error:
        raise DataError(f"Split {split_name!r}, sample {index}{_file_in(row, label_column)}: {error}") from error


def label_values(array: np.ndarray) -> np.ndarray:
    """The sorted distinct values of an integer label map (`np.unique`, counted with `np.bincount` when the values
    span a small range: 5x faster on a 512x384 map)."""
    flat = np.asarray(array).ravel()
    if flat.size == 0:
        return np.empty(0, dtype=np.int64)
    low, high = int(flat.min()), int(flat.max())
    if high - low > 1 << 16:
        return np.unique(flat)
    return np.flatnonzero(np.bincount(flat - low if low else flat)) + low


@dataclass(frozen=True)
class SampleCheck:
    """`checked_row` with a split's options: `SampleCheck(...)(row, index)`."""

    image_column: str
    label_column: str
    num_labels: int
    ignore_index: int = DEFAULT_IGNORE_INDEX
    reduce_labels: bool = False
    split_name: str = "train"

    def __call__(self, row: dict[str, Any], index: int) -> tuple[Image.Image, np.ndarray, np.ndarray]:
        return checked_row(row, index, **dataclasses.asdict(self))


def checked_row(
    row: dict[str, Any],
    index: int,
    image_column: str,
    label_column: str,
    num_labels: int,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    reduce_labels: bool = False,
    split_name: str = "train",
) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """(RGB image, (H, W) int64 label, its distinct values) of a sample's row (sample `index` of its split), checked:
    a file it cannot read, image and label of different sizes, a label that is not a class map, label values neither
    in [0, num_labels) nor `ignore_index` are a `DataError` naming the sample and its file. The one check of a
    sample: before training (`check_split`) and as each sample is read (`dataset.SegmentationDataset`,
    `streaming.StreamingSegmentationDataset`)."""
    image, label = read_row(row, index, image_column, label_column, split_name)
    array = _checked_label(row, index, label, label_column, reduce_labels, ignore_index, split_name)
    image_size = (image.size[1], image.size[0])
    if array.shape != image_size:
        raise DataError(
            f"Split {split_name!r}, sample {index}{_file_in(row, image_column)}: the image is"
            f" {image_size[0]}x{image_size[1]} (height x width) but its label is {array.shape[0]}x{array.shape[1]}."
            " Images and labels must have the same size."
        )
    values = label_values(array)
    bad = values[((values < 0) | (values >= num_labels)) & (values != ignore_index)]
    if bad.size:
        message = label_values_message(
            {int(value): index for value in bad}, split_name, num_labels, ignore_index, reduce_labels, set()
        )
        path = _path_of(row[label_column])
        raise DataError(f"{message} Sample {index}'s label file: {path}." if path else message)
    return image, array, values


def check_split(
    split: datasets.Dataset,
    split_name: str,
    image_column: str,
    label_column: str,
    num_labels: int,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    reduce_labels: bool = False,
    max_samples: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Read the samples of a split (all, or the first `max_samples`) and raise `DataError` on the first problem:
    empty split, unreadable file, image and label of different sizes, a label that is not a class map, label values
    that are neither in [0, num_labels) nor `ignore_index` (`checked_row`). Returns {"checked": n,
    "label_values": sorted values}.

    With several processes each checks its share (process `rank` of `world_size`: samples rank, rank + world_size,
    ...), so the check takes no longer with more processes; `progress` shows a progress bar."""
    if len(split) == 0:
        raise DataError(f"The {split_name!r} split is empty.")
    count = len(split) if max_samples is None else min(len(split), max_samples)
    split = undecoded(split, (image_column, label_column))
    seen: set[int] = set()
    indices = range(rank, count, max(world_size, 1))
    check = SampleCheck(image_column, label_column, num_labels, ignore_index, reduce_labels, split_name)
    description = f"Checking {count} of the {len(split)} {split_name!r} samples"
    for index in tqdm(indices, desc=description, unit=" samples", disable=not progress, leave=False):
        _, _, values = check(split[index], index)
        seen.update(int(v) for v in values)
    return {"checked": len(indices), "label_values": sorted(seen)}


def label_values_message(
    bad_values: dict[int, int],
    split_name: str,
    num_labels: int,
    ignore_index: int,
    reduce_labels: bool,
    seen: set[int],
) -> str:
    """Explain label values outside id2label (value -> first sample index), with the fix that fits."""
    shown = ", ".join(f"{value} (sample {index})" for value, index in sorted(bad_values.items())[:10])
    message = (
        f"Split {split_name!r}: label values {shown} are outside id2label (class ids 0..{num_labels - 1}) and not"
        f" the ignore index {ignore_index}" + (" after --reduce_labels." if reduce_labels else ".")
    )
    if not reduce_labels and max(bad_values) == num_labels:
        message += (
            f" The labels look 1-based with 0 for 'other' (ids 0..{num_labels}), as in ADE20K: pass --reduce_labels"
            " (0 becomes the ignore index, the rest shift down by one)."
        )
    else:
        message += " Give an id2label (--id2label) that covers every class, or map those values to the ignore index."
    return message


def infer_num_labels(
    split: datasets.Dataset,
    image_column: str,
    label_column: str,
    reduce_labels: bool,
    ignore_index: int,
    max_samples: int = 200,
) -> int:
    """1 + the largest label value (not the ignore index) in the first `max_samples` samples."""
    largest = -1
    split = undecoded(split, (image_column, label_column))
    for index in range(min(len(split), max_samples)):
        _, label = read_pair(split, index, image_column, label_column)
        array = checked_label(split, index, label, label_column, reduce_labels, ignore_index)
        values = array[array != ignore_index]
        if values.size:
            largest = max(largest, int(values.max()))
    if largest < 0:
        raise DataError("Every label pixel in the first samples is the ignore index: cannot infer the classes.")
    return largest + 1
