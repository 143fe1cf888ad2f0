"""Data set folders as distributed, recognised by their layout: `find_folder_layout(path)` names the layout of a
folder (None for a folder of no known layout), lists its samples per split and converts its label maps to train ids;
`layout_dataset(layout)` is the DatasetDict `load_dataset_any` returns for it, whose label maps are converted as
samples are read (no file is rewritten).

Layouts (`FolderLayout.name`):
- "ade20k": `images/<split>/*` paired by name without extension with `annotations/<split>/*` (any split names;
  "training"/"validation" become "train"/"validation"); labels as stored (`--reduce_labels` as ADE20K needs).
- "cityscapes": `leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png` with
  `gtFine/{train,val}/<city>/*_gtFine_labelIds.png`; label ids 0-33 -> the 19 train ids of cityscapesScripts
  (ids without a train id -> the ignore index). The test split has no public labels: it is listed (labels None)
  but never trained or evaluated on.
- "coco-stuff-164k": `images/{train2017,val2017}/*.jpg` with `annotations/{train2017,val2017}/*.png` (ids 0-181,
  255 unlabelled) -> 171 classes, as mmsegmentation's `coco_stuff164k.py` converter maps them.
- "coco-stuff-10k": `images/*.jpg`, `annotations/*.mat` (key "S", ids 1-182, 0 unlabelled),
  `imageLists/{train,test}.txt` -> the same 171 classes, as mmsegmentation's `coco_stuff10k.py` converter maps them
  (test.txt, the 1,000 images mmsegmentation evaluates on, is the "validation" split).

Every problem is a `DataError` that names the file: a label value outside the layout's table (the COCO ids no class
uses included, which mmsegmentation's converters would keep as a silent class), a missing label file, a file of the
wrong name or suffix, a Cityscapes folder without `gtFine/`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from .label_tables import (
    CITYSCAPES_LABELS,
    COCO_STUFF_CLASSES,
    COCO_STUFF_COLOURS,
    COCO_STUFF_MAX_ID,
    COCO_STUFF_UNUSED_IDS,
)
from .reading import DataError, decode_image
from .transforms import DEFAULT_IGNORE_INDEX, label_to_array

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "val", "valid", "dev"),
    "test": ("test", "testing"),
}

Samples = list[tuple[Path, Path | None]]


def canonical_split(name: str) -> str:
    """train / validation / test for the usual spellings of a split name; other names unchanged."""
    lowered = name.lower()
    for canonical, aliases in SPLIT_ALIASES.items():
        if lowered in aliases:
            return canonical
    return name


def image_files(folder: Path) -> dict[str, Path]:
    """Image files under `folder` by path without extension; two files of one name (x.jpg, x.png) are an error."""
    files: dict[str, Path] = {}
    clashes: list[str] = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            key = str(path.relative_to(folder).with_suffix(""))
            if key in files:
                clashes.append(f"{files[key].name} and {path.name}")
            files.setdefault(key, path)
    if clashes:
        shown = "; ".join(clashes[:5]) + ("; ..." if len(clashes) > 5 else "")
        raise DataError(
            f"{folder} holds files that differ only in their extension ({shown}): images and annotations are paired"
            " by name without extension, so one of each would be dropped. Remove or rename the extra files."
        )
    return files


# ----------------------------------------------------------------------------------------------------- label tables


@dataclass(frozen=True)
class LabelTable:
    """Raw label values -> train ids (None: a value without a train id, which becomes the ignore index), and the
    words that explain a value outside the table."""

    train_ids: dict[int, int | None]
    expected: str  # what the values should be, e.g. "a Cityscapes label id (0-33 in cityscapesScripts' labels.py)"
    hint: str  # the likely cause and fix

    def convert(self, label: np.ndarray, path: Path | str, ignore_index: int = DEFAULT_IGNORE_INDEX) -> np.ndarray:
        """(H, W) int64 train ids of the raw `label`; a value outside the table is a `DataError` naming `path`."""
        values = np.asarray(label)
        if values.dtype.kind not in "iub":
            raise DataError(f"{path}: the label map holds {values.dtype} values; expected integer {self.expected}.")
        low, high = min(self.train_ids), max(self.train_ids)
        unknown = np.iinfo(np.int64).min
        small = values.dtype.kind == "u" and values.dtype.itemsize <= 2  # PNG / .mat maps: index a full table
        start = 0 if small else low
        lookup = np.full((1 << 8 * values.dtype.itemsize if small else high + 1) - start, unknown, dtype=np.int64)
        for raw, train_id in self.train_ids.items():
            if 0 <= raw - start < lookup.size:
                lookup[raw - start] = ignore_index if train_id is None else train_id
        if small:
            converted = lookup[values]
        else:
            values = values.astype(np.int64, copy=False)
            inside = (values >= low) & (values <= high)
            converted = np.where(inside, lookup[np.clip(values, low, high) - low], unknown)
        bad = converted == unknown
        if bad.any():
            found = np.unique(values[bad])
            shown = ", ".join(str(int(v)) for v in found[:10]) + (", ..." if len(found) > 10 else "")
            raise DataError(f"{path}: label value(s) {shown} are not {self.expected}. {self.hint}")
        return converted


def _cityscapes_table() -> LabelTable:
    return LabelTable(
        train_ids={i: (None if t in (255, -1) else t) for _, i, t, _ in CITYSCAPES_LABELS},
        expected="Cityscapes label ids (0-33 as cityscapesScripts' labels.py defines them)",
        hint="Cityscapes labels are the gtFine/<split>/<city>/*_gtFine_labelIds.png maps of gtFine_trainvaltest.zip"
        " (not *_labelTrainIds, *_color or *_instanceIds maps); replace the file with the original one.",
    )


def _coco_stuff_ids(first_id: int, unlabelled: int) -> dict[int, int | None]:
    used = [i for i in range(COCO_STUFF_MAX_ID + 1) if i not in COCO_STUFF_UNUSED_IDS]
    table: dict[int, int | None] = {raw + first_id: train_id for train_id, raw in enumerate(used)}
    table[unlabelled] = None
    return table


def _unused_ids(first_id: int) -> str:
    return ", ".join(str(i + first_id) for i in COCO_STUFF_UNUSED_IDS)


def _coco_stuff_164k_table() -> LabelTable:
    return LabelTable(
        train_ids=_coco_stuff_ids(0, 255),
        expected=f"COCO-Stuff-164k ids (0-181 and 255 for unlabelled; no class uses {_unused_ids(0)}, the COCO"
        " ids left out of its release)",
        hint="Put the PNGs of COCO-Stuff's stuffthingmaps_trainval2017.zip in annotations/<split>/ unchanged"
        " (maps already converted to train ids do not belong there).",
    )


def _coco_stuff_10k_table() -> LabelTable:
    return LabelTable(
        train_ids=_coco_stuff_ids(1, 0),
        expected=f"COCO-Stuff-10k ids (1-182 and 0 for unlabelled; no class uses {_unused_ids(1)}, the COCO ids"
        " left out of its release)",
        hint="Put the .mat files of cocostuff-10k-v1.1.zip in annotations/ unchanged.",
    )


# ---------------------------------------------------------------------------------------------------------- layouts


@dataclass(eq=False)
class FolderLayout:
    """A data set folder of a known layout.

    Attributes:
        name: "ade20k", "cityscapes", "coco-stuff-164k" or "coco-stuff-10k".
        root: the folder.
        splits: canonical split name (train / validation / test) -> sorted (image file, label file or None).
            Listed (and checked: names, suffixes, missing label files) on first use.
        id2label: the layout's classes by train id (None where the layout defines none: ADE20K-style folders).
        colours: (num classes, 3) uint8 colours by train id, as the data set's tools define them, or None.
        table: raw label value -> train id (None: labels are used as stored).
        unlabelled_splits: split -> why it cannot be trained or evaluated on (its samples have label None).
    """

    name: str
    root: Path
    id2label: dict[int, str] | None
    colours: np.ndarray | None
    table: LabelTable | None
    unlabelled_splits: dict[str, str]
    list_splits: Callable[[Path], dict[str, Samples]] = field(repr=False)
    _splits: dict[str, Samples] | None = field(default=None, repr=False)

    @property
    def splits(self) -> dict[str, Samples]:
        if self._splits is None:
            self._splits = self.list_splits(self.root)
        return self._splits

    def __getstate__(self) -> dict[str, Any]:  # workers and `datasets` fingerprints get no file lists
        return {**self.__dict__, "_splits": None}

    def labelled_samples(self, split: str) -> list[tuple[Path, Path]]:
        """The (image, label) files of `split`; a split without labels (Cityscapes' test) is a `DataError`."""
        if split in self.unlabelled_splits:
            raise DataError(self.unlabelled_splits[split])
        if split not in self.splits:
            raise DataError(f"The {self.name} folder {self.root} has no {split!r} split; it has {sorted(self.splits)}.")
        return [(image, label) for image, label in self.splits[split] if label is not None]

    def read_label(self, label_path: str | Path) -> np.ndarray:
        """The raw (H, W) label map of a label file (a `.mat` file's "S" array, else an image), named on failure."""
        path = Path(label_path)
        if path.suffix.lower() == ".mat":
            return _read_mat_label(path)
        label = decode_image(str(path), "Label")
        if isinstance(label, Image.Image) and label.mode in ("L", "P"):
            return np.asarray(label)  # uint8 as stored: converted through a 256-entry table
        try:
            return label_to_array(label)
        except ValueError as error:
            raise DataError(f"{path}: {error}") from error

    def convert_label(
        self, label_array: np.ndarray, label_path: str | Path, ignore_index: int = DEFAULT_IGNORE_INDEX
    ) -> np.ndarray:
        """Raw label ids -> (H, W) int64 train ids (ids without a train id -> `ignore_index`); a value outside the
        layout's table is a `DataError` naming `label_path`. Labels of a layout without a table come back as they
        are."""
        if self.table is None:
            return np.asarray(label_array)
        return self.table.convert(label_array, label_path, ignore_index)

    def load_label(self, label_path: str | Path, ignore_index: int = DEFAULT_IGNORE_INDEX) -> np.ndarray:
        """`convert_label(read_label(label_path))`."""
        return self.convert_label(self.read_label(label_path), label_path, ignore_index)

    def check_options(self, reduce_labels: bool, ignore_index: int) -> None:
        """Training options that contradict the layout's conversion are a `DataError` (before anything is written)."""
        if self.table is None:
            return
        if reduce_labels:
            raise DataError(
                f"--reduce_labels does not apply to the {self.name} folder {self.root}: its label ids are converted to"
                " train ids by the data set's own table (unlabelled ids become the ignore index). Leave it out."
            )
        if ignore_index != DEFAULT_IGNORE_INDEX:
            raise DataError(
                f"The {self.name} folder's converted labels use the ignore index {DEFAULT_IGNORE_INDEX}, but the"
                f" model's semantic_loss_ignore_index is {ignore_index}; use a model with semantic_loss_ignore_index"
                f" {DEFAULT_IGNORE_INDEX}."
            )


def _read_mat_label(path: Path) -> np.ndarray:
    from scipy.io import loadmat  # scipy comes with scikit-learn, a dependency

    try:
        content = loadmat(str(path))
    except (OSError, ValueError, TypeError, NotImplementedError) as error:
        raise DataError(f"{path}: cannot read the .mat file ({error}).") from error
    if "S" not in content:
        keys = sorted(k for k in content if not k.startswith("__"))
        raise DataError(f"{path}: the .mat file has no label map 'S' (its keys: {keys}); not a COCO-Stuff-10k file.")
    label = np.asarray(content["S"])
    if label.ndim != 2:
        raise DataError(f"{path}: the label map 'S' has shape {label.shape}; expected (height, width).")
    if label.dtype.kind == "f":  # MATLAB's default double: whole numbers are ids, anything else is no label map
        if not (np.isfinite(label).all() and np.array_equal(label, np.round(label))):
            raise DataError(f"{path}: the label map 'S' holds values that are not whole numbers; expected label ids.")
        label = label.astype(np.int64)
    return label


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _paired(images: list[Path], label_of: Callable[[Path], tuple[Path, str]], where: Path) -> list[tuple[Path, Path]]:
    """(image, label) for each image; images whose label file is missing are a `DataError` naming the first, and
    files with the image's name but another suffix if there are some."""
    pairs, missing = [], []
    for image in images:
        label, key = label_of(image)
        (pairs if label.is_file() else missing).append((image, label, key))
    if missing:
        image, label, key = missing[0]
        others = sorted(p.name for p in label.parent.glob(f"{key}*")) if label.parent.is_dir() else []
        found = f" (found {', '.join(others[:3])}: the wrong name or suffix)" if others else ""
        raise DataError(
            f"{len(missing)} image(s) in {where} have no label file: {image.name} needs {label}{found}."
            " Restore the label files as distributed, or remove the images without labels."
        )
    return [(image, label) for image, label, _ in pairs]


def _ade20k_splits(root: Path) -> dict[str, Samples]:
    splits: dict[str, Samples] = {}
    split_dirs = sorted(d for d in (root / "images").iterdir() if d.is_dir())
    if not split_dirs:
        raise DataError(f"{root / 'images'} has no split folders (expected e.g. images/training, images/validation).")
    for image_dir in split_dirs:
        annotation_dir = root / "annotations" / image_dir.name
        if not annotation_dir.is_dir():
            raise DataError(f"{image_dir} has no matching annotation folder {annotation_dir}.")
        images, labels = image_files(image_dir), image_files(annotation_dir)
        missing = sorted(set(images) - set(labels))
        if missing:
            shown = ", ".join(str(images[m].name) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DataError(f"{len(missing)} image(s) in {image_dir} have no annotation in {annotation_dir}: {shown}.")
        splits[canonical_split(image_dir.name)] = [(images[k], labels[k]) for k in sorted(images)]
    return splits


CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_LABEL_SUFFIX = "_gtFine_labelIds.png"
CITYSCAPES_SPLITS = {"train": "train", "val": "validation", "test": "test"}
CITYSCAPES_TEST = (
    "Cityscapes' test split has no public labels (its gtFine/test maps are all 'unlabeled'; results are scored by"
    " the benchmark server): train on train and evaluate on val."
)


def _cityscapes_images(image_dir: Path) -> list[Path]:
    images = []
    for city in _visible_files(image_dir):
        if not city.is_dir():
            raise DataError(
                f"{city}: Cityscapes images lie in city folders (leftImg8bit/<split>/<city>/"
                f"*{CITYSCAPES_IMAGE_SUFFIX}); move or remove this file."
            )
        for file in _visible_files(city):
            if not file.name.endswith(CITYSCAPES_IMAGE_SUFFIX) or not file.is_file():
                raise DataError(
                    f"{file}: not a Cityscapes image name (<city>_<sequence>_<frame>{CITYSCAPES_IMAGE_SUFFIX}, as"
                    " leftImg8bit_trainvaltest.zip holds them); rename or remove it."
                )
            images.append(file)
    if not images:
        raise DataError(f"{image_dir} holds no Cityscapes images (<city>/*{CITYSCAPES_IMAGE_SUFFIX}).")
    return images


def _cityscapes_label(label_dir: Path) -> Callable[[Path], tuple[Path, str]]:
    def label_of(image: Path) -> tuple[Path, str]:
        key = image.name[: -len(CITYSCAPES_IMAGE_SUFFIX)]
        return label_dir / image.parent.name / f"{key}{CITYSCAPES_LABEL_SUFFIX}", f"{key}_"

    return label_of


def _cityscapes_splits(root: Path) -> dict[str, Samples]:
    splits: dict[str, Samples] = {}
    for folder, split in CITYSCAPES_SPLITS.items():
        image_dir = root / "leftImg8bit" / folder
        if not image_dir.is_dir():
            continue
        images = _cityscapes_images(image_dir)
        if split == "test":
            splits[split] = [(image, None) for image in images]
            continue
        label_dir = root / "gtFine" / folder
        if not label_dir.is_dir():
            raise DataError(
                f"{image_dir} has no labels: {label_dir} does not exist. Unpack gtFine_trainvaltest.zip into {root}."
            )
        splits[split] = _paired(images, _cityscapes_label(label_dir), image_dir)
    if not splits:
        raise DataError(f"{root / 'leftImg8bit'} has none of Cityscapes' split folders train/, val/, test/.")
    return splits


COCO_164K_SPLITS = {"train2017": "train", "val2017": "validation"}


def _coco_stuff_164k_splits(root: Path) -> dict[str, Samples]:
    splits: dict[str, Samples] = {}
    for folder, split in COCO_164K_SPLITS.items():
        image_dir, label_dir = root / "images" / folder, root / "annotations" / folder
        if not image_dir.is_dir():
            continue
        if not label_dir.is_dir():
            raise DataError(
                f"{image_dir} has no labels: {label_dir} does not exist. Unpack COCO-Stuff's"
                f" stuffthingmaps_trainval2017.zip into {root / 'annotations'}."
            )
        images = _visible_files(image_dir)
        for image in images:
            if image.suffix != ".jpg" or not image.is_file():
                raise DataError(f"{image}: not a COCO image (<id>.jpg, as COCO's {folder}.zip holds them).")
        if not images:
            raise DataError(f"{image_dir} holds no images.")
        splits[split] = _paired(images, lambda i, d=label_dir: (d / f"{i.stem}.png", f"{i.stem}."), image_dir)
    if not splits:
        raise DataError(f"{root / 'images'} has neither train2017/ nor val2017/ (COCO's image folders).")
    return splits


COCO_10K_SPLITS = {"train.txt": "train", "test.txt": "validation"}


def _coco_stuff_10k_splits(root: Path) -> dict[str, Samples]:
    splits: dict[str, Samples] = {}
    label_dir = root / "annotations"
    for list_name, split in COCO_10K_SPLITS.items():
        list_file = root / "imageLists" / list_name
        if not list_file.is_file():
            continue
        names = sorted({line.strip() for line in list_file.read_text().splitlines() if line.strip()})
        images = []
        for name in names:
            image = root / "images" / f"{name}.jpg"
            if not image.is_file():
                raise DataError(f"{list_file} names {name!r}, but {image} does not exist.")
            images.append(image)
        if not images:
            raise DataError(f"{list_file} names no images.")
        splits[split] = _paired(images, lambda i: (label_dir / f"{i.stem}.mat", f"{i.stem}."), list_file)
    if not splits:
        raise DataError(f"{root / 'imageLists'} has neither train.txt nor test.txt (COCO-Stuff-10k's image lists).")
    return splits


def find_folder_layout(path: str | Path) -> FolderLayout | None:
    """The layout of the data set folder `path`, or None when it is no folder or of no known layout.

    A Cityscapes folder with images but no `gtFine/` (or labels but no `leftImg8bit/`) is a `DataError`. Files are
    listed (and checked) when `splits` is first read."""
    root = Path(os.path.expanduser(str(path)))
    if not root.is_dir():
        return None
    if (root / "leftImg8bit").is_dir() or (root / "gtFine").is_dir():
        if not (root / "gtFine").is_dir():
            raise DataError(
                f"{root} holds Cityscapes images (leftImg8bit/) but no labels (gtFine/): unpack"
                f" gtFine_trainvaltest.zip into {root}, giving gtFine/{{train,val}}/<city>/*{CITYSCAPES_LABEL_SUFFIX}."
            )
        if not (root / "leftImg8bit").is_dir():
            raise DataError(
                f"{root} holds Cityscapes labels (gtFine/) but no images (leftImg8bit/): unpack"
                f" leftImg8bit_trainvaltest.zip into {root}."
            )
        names = {t: name for name, _, t, _ in CITYSCAPES_LABELS if t not in (255, -1)}
        colours = {t: colour for _, _, t, colour in CITYSCAPES_LABELS if t not in (255, -1)}
        return FolderLayout(
            name="cityscapes",
            root=root,
            id2label=dict(sorted(names.items())),
            colours=np.array([colours[t] for t in sorted(colours)], dtype=np.uint8),
            table=_cityscapes_table(),
            unlabelled_splits={"test": CITYSCAPES_TEST},
            list_splits=_cityscapes_splits,
        )
    if not ((root / "images").is_dir() and (root / "annotations").is_dir()):
        return None
    coco = {"id2label": dict(enumerate(COCO_STUFF_CLASSES)), "colours": np.array(COCO_STUFF_COLOURS, dtype=np.uint8)}
    if (root / "imageLists").is_dir():
        return FolderLayout(
            "coco-stuff-10k", root, **coco, table=_coco_stuff_10k_table(), unlabelled_splits={},
            list_splits=_coco_stuff_10k_splits,
        )  # fmt: skip
    if any((root / top / folder).is_dir() for top in ("images", "annotations") for folder in COCO_164K_SPLITS):
        return FolderLayout(
            "coco-stuff-164k", root, **coco, table=_coco_stuff_164k_table(), unlabelled_splits={},
            list_splits=_coco_stuff_164k_splits,
        )  # fmt: skip
    return FolderLayout("ade20k", root, None, None, None, {}, list_splits=_ade20k_splits)


# ------------------------------------------------------------------------------------------------------ DatasetDict


class ConvertedLabels:
    """A `datasets` transform: each label file of the column read and converted to train ids by the layout."""

    def __init__(self, layout: FolderLayout, column: str = "label") -> None:
        self.layout, self.column = layout, column

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        batch[self.column] = [self.layout.load_label(_file_of(value)) for value in batch[self.column]]
        return batch


def _file_of(value: Any) -> str:
    if isinstance(value, dict) and value.get("path"):
        return value["path"]
    if isinstance(value, str):
        return value
    if isinstance(value, Image.Image) and getattr(value, "filename", None):
        return value.filename
    raise DataError(f"A label of a data set folder is no file path ({type(value).__name__}).")


def layout_dataset(layout: FolderLayout) -> datasets.DatasetDict:
    """The DatasetDict of a folder: columns "image" and "label", one split per labelled split of the layout. Labels
    of a layout with a table come out converted to train ids (an (H, W) int64 array per sample) as samples are read;
    the label column then holds the files undecoded ({"bytes", "path"})."""
    converted = layout.table is not None
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image(decode=not converted)})
    splits = {}
    for split, samples in layout.splits.items():
        if split in layout.unlabelled_splits:
            continue
        data = {"image": [str(image) for image, _ in samples], "label": [str(label) for _, label in samples]}
        splits[split] = datasets.Dataset.from_dict(data, features=features)
        if converted:
            splits[split] = splits[split].with_transform(ConvertedLabels(layout))
    if not splits:
        raise DataError(f"{layout.root}: " + " ".join(layout.unlabelled_splits.values()))
    return datasets.DatasetDict(splits)
