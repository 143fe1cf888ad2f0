"""Built-in data sets, data set loading and checks, and the SegFormer training transforms."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from proto_segformer.data import build_builtin_dataset
from proto_segformer.data.builtin import COLOUR_FAMILIES, HUE_WHEEL, STRIPE_ORIENTATIONS, stripes
from proto_segformer.data.dataset import SegmentationDataset
from proto_segformer.data.loading import (
    DataError,
    check_split,
    ensure_validation_split,
    id2label_from_dataset,
    load_dataset_any,
    parse_builtin_name,
    read_id2label_file,
    resolve_column,
)
from proto_segformer.data.transforms import (
    AugmentationConfig,
    pad_collate,
    photometric_distortion,
    reduce_label_array,
    to_rgb,
    train_transform,
)


@pytest.fixture(scope="module")
def scenes():
    return build_builtin_dataset("scenes", num_train=24, num_validation=8, image_size=48, seed=0, cache_dir=False)


# ------------------------------------------------------------------------------------------------ built-in data


def test_scenes_layout(scenes) -> None:
    dataset, id2label = scenes
    assert set(dataset) == {"train", "validation"}
    assert (len(dataset["train"]), len(dataset["validation"])) == (24, 8)
    assert id2label[0] == "background" and len(id2label) == 11
    sample = dataset["train"][0]
    assert sample["image"].mode == "RGB" and sample["label"].mode == "L"
    assert sample["image"].size == sample["label"].size == (48, 48)
    values = np.unique(np.concatenate([np.unique(np.array(s["label"])) for s in dataset["train"]]))
    assert set(values) <= set(range(11)) and 0 in values and len(values) >= 6
    # Items are a real share of the pixels (not a handful of pixels per image).
    labels = np.stack([np.array(s["label"]) for s in dataset["train"]])
    assert 0.05 < (labels > 0).mean() < 0.6


def test_builtin_is_deterministic_and_seeded(scenes) -> None:
    again, _ = build_builtin_dataset("scenes", num_train=24, num_validation=8, image_size=48, seed=0, cache_dir=False)
    other, _ = build_builtin_dataset("scenes", num_train=24, num_validation=8, image_size=48, seed=1, cache_dir=False)
    first = scenes[0]
    for index in (0, 5, 23):
        assert np.array_equal(np.array(first["train"][index]["image"]), np.array(again["train"][index]["image"]))
        assert np.array_equal(np.array(first["train"][index]["label"]), np.array(again["train"][index]["label"]))
    assert not np.array_equal(np.array(first["train"][0]["image"]), np.array(other["train"][0]["image"]))
    # Train and validation use different scenes.
    assert not np.array_equal(np.array(first["train"][0]["image"]), np.array(first["validation"][0]["image"]))


def test_cache_round_trip(tmp_path, scenes) -> None:
    kwargs = {"num_train": 24, "num_validation": 8, "image_size": 48, "seed": 0, "cache_dir": tmp_path}
    built, id2label = build_builtin_dataset("scenes", **kwargs)
    cached, cached_id2label = build_builtin_dataset("scenes", **kwargs)
    assert cached_id2label == id2label == scenes[1] and len(list(tmp_path.iterdir())) == 1
    for a, b in zip(cached["train"], scenes[0]["train"]):
        assert np.array_equal(np.array(a["image"]), np.array(b["image"]))
        assert np.array_equal(np.array(a["label"]), np.array(b["label"]))
    build_builtin_dataset("scenes", **{**kwargs, "seed": 1})
    assert len(list(tmp_path.iterdir())) == 2


def test_ignore_classes_only_in_train() -> None:
    dataset, _ = build_builtin_dataset("scenes", num_train=40, num_validation=40, image_size=32, ignore_classes=[3, 7])
    train = np.stack([np.array(s["label"]) for s in dataset["train"]])
    validation = np.stack([np.array(s["label"]) for s in dataset["validation"]])
    assert not np.isin(train, [3, 7]).any() and (train == 255).any()
    assert np.isin(validation, [3, 7]).any() and not (validation == 255).any()
    with pytest.raises(ValueError, match="not item classes"):
        build_builtin_dataset("scenes", num_train=2, num_validation=2, image_size=32, ignore_classes=[0])


@pytest.mark.parametrize(
    "name, first, last",
    [("scenes-large", "red+orange", "magenta+rose"), ("scenes-large-digits", "digit 0 red", "digit 9 magenta")],
)
def test_scenes_large_many_classes_long_tail(name: str, first: str, last: str) -> None:
    dataset, id2label = build_builtin_dataset(name, num_train=300, num_validation=100, image_size=32)
    num_classes = len(id2label)
    assert num_classes in (101, 106) and id2label[1] == first and id2label[num_classes - 1] == last
    assert len(COLOUR_FAMILIES) == 10
    labels = np.stack([np.array(s["label"]) for s in dataset["train"]])
    pixels = np.bincount(labels.ravel(), minlength=num_classes)[1:num_classes]
    assert (pixels > 0).sum() > 60
    # Long tail: the 10 most frequent classes hold far more pixels than the 50 least frequent ones.
    ordered = np.sort(pixels)
    assert ordered[-10:].sum() > 2 * ordered[:50].sum()


def test_stripes_run_along_their_orientation_and_alternate_across() -> None:
    rng = np.random.default_rng(0)
    inks = {name: stripes(i, 24, 24, 8.0, rng) for i, name in enumerate(STRIPE_ORIENTATIONS)}
    for name, ink in inks.items():
        assert ink.shape == (24, 24) and set(np.unique(ink)) == {0.0, 1.0} and 0.35 < ink.mean() < 0.65, name
    horizontal, vertical = inks["horizontal"], inks["vertical"]
    assert (horizontal == horizontal[:, :1]).all() and (vertical == vertical[:1]).all()
    assert (horizontal[:, 0] != np.roll(horizontal[:, 0], 4)).all()  # half a period apart: opposite
    assert (horizontal[:, 0] == np.roll(horizontal[:, 0], 8)).all()  # a period apart: equal
    flipped = np.fliplr(inks["diagonal"])  # diagonal stripes (x + y const) become constant along the main diagonal
    assert (np.diagonal(flipped) == flipped[0, 0]).mean() > 0.8 and (np.diagonal(inks["diagonal"]) != 0).any()
    names = list(inks)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (inks[a] != inks[b]).mean() > 0.2, (a, b)


def test_scenes_large_items_show_both_colours_of_their_class() -> None:
    dataset, id2label = build_builtin_dataset("scenes-large", num_train=2, num_validation=80, image_size=64)
    assert len(id2label) == 106 and id2label[1] == "red+orange" and id2label[105] == "magenta+rose"
    assert len(HUE_WHEEL) == 15
    checked = 0
    for sample in dataset["validation"]:
        hsv = np.asarray(sample["image"].convert("HSV"), dtype=np.float32)
        label = np.array(sample["label"])
        for k in np.unique(label[label > 0]):
            pixels = hsv[label == k]
            pixels = pixels[pixels[:, 1] > 120]  # saturated: the item's own colours, not blended edges
            if len(pixels) < 40:
                continue
            expected = [HUE_WHEEL[name] for name in id2label[int(k)].split("+")]
            hues = pixels[:, 0] * 360 / 255
            nearest = np.argmin([np.minimum(abs(hues - e), 360 - abs(hues - e)) for e in expected], axis=0)
            distance = np.min([np.minimum(abs(hues - e), 360 - abs(hues - e)) for e in expected], axis=0)
            assert np.median(distance) < 8, (id2label[int(k)], np.median(distance))
            assert 0.2 < nearest.mean() < 0.8, id2label[int(k)]  # both colours, in comparable amounts
            checked += 1
    assert checked > 60


@pytest.mark.parametrize("name, num_classes", [("voc", 21), ("arc2017", 41)])
def test_annotated_photos(name: str, num_classes: int) -> None:
    dataset, id2label = build_builtin_dataset(name, num_train=3, num_validation=1, image_size=64)
    assert len(id2label) == num_classes and id2label[0] == "background"
    full = dataset["validation"][0]
    assert full["image"].size == full["label"].size and full["image"].size[0] > 300
    assert len(np.unique(np.array(full["label"]))) >= 4
    assert dataset["train"][0]["image"].size == (64, 64)


def test_builtin_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Unknown built-in data set 'nope'"):
        build_builtin_dataset("nope", num_train=1, num_validation=1, image_size=32)
    with pytest.raises(ValueError, match="num_train must be >= 1"):
        build_builtin_dataset("scenes", num_train=0, num_validation=1, image_size=32)
    with pytest.raises(DataError, match="Unknown built-in"):
        parse_builtin_name("builtin:nope")
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="long_tail .* must be >= 0"):
            build_builtin_dataset("scenes-large", num_train=1, num_validation=1, image_size=32, long_tail=bad)
    assert parse_builtin_name(None) == "scenes" and parse_builtin_name("builtin:voc") == "voc"
    assert parse_builtin_name("org/data") is None


# ---------------------------------------------------------------------------------------------------- loading


def _write_ade_folder(root, sizes=((20, 30), (16, 16)), label_max=3):
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / split / f"{i}.jpg")
            label = rng.integers(0, label_max + 1, (h, w), dtype=np.uint8)
            Image.fromarray(label).save(root / "annotations" / split / f"{i}.png")
    return root


def test_load_save_to_disk_parquet_and_ade_folders(tmp_path, scenes) -> None:
    dataset, _ = scenes
    dataset.save_to_disk(str(tmp_path / "disk"))
    loaded = load_dataset_any(str(tmp_path / "disk"))
    assert set(loaded) == {"train", "validation"} and len(loaded["train"]) == 24

    (tmp_path / "parquet").mkdir()
    dataset["train"].to_parquet(str(tmp_path / "parquet" / "train-00000.parquet"))
    dataset["validation"].to_parquet(str(tmp_path / "parquet" / "validation-00000.parquet"))
    loaded = load_dataset_any(str(tmp_path / "parquet"))
    assert set(loaded) == {"train", "validation"} and len(loaded["validation"]) == 8
    assert np.array_equal(np.array(loaded["train"][3]["label"]), np.array(dataset["train"][3]["label"]))

    ade = load_dataset_any(str(_write_ade_folder(tmp_path / "ade")))
    assert set(ade) == {"train", "validation"} and ade["train"].column_names == ["image", "label"]
    assert ade["train"][0]["image"].size == (30, 20)


def test_missing_path_and_missing_annotation(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_any(str(tmp_path / "nothing" / "here"))
    root = _write_ade_folder(tmp_path / "ade")
    (root / "annotations" / "training" / "1.png").unlink()
    with pytest.raises(DataError, match=r"have no annotation .*1\.jpg"):
        load_dataset_any(str(root))


def test_same_name_with_two_extensions_is_an_error_naming_both(tmp_path) -> None:
    root = _write_ade_folder(tmp_path / "ade")
    Image.new("RGB", (30, 20)).save(root / "images" / "training" / "1.png")  # beside 1.jpg: one would be dropped
    with pytest.raises(
        DataError, match=r"training holds files that differ only in their extension \(1\.jpg and 1\.png"
    ):
        load_dataset_any(str(root))
    (root / "images" / "training" / "1.png").unlink()
    Image.new("L", (30, 20)).save(root / "annotations" / "validation" / "0.bmp")
    with pytest.raises(DataError, match=r"validation holds files .*0\.bmp and 0\.png"):
        load_dataset_any(str(root))


def test_validation_split_is_made_or_explained(scenes) -> None:
    only_train = datasets.DatasetDict({"train": scenes[0]["train"]})
    split = ensure_validation_split(only_train, 0.25, seed=0)
    assert (len(split["train"]), len(split["validation"])) == (18, 6)
    with pytest.raises(DataError, match="no validation split.*--train_val_split"):
        ensure_validation_split(only_train, None, seed=0)


def test_resolve_column_lists_the_columns() -> None:
    assert resolve_column(["pixel_values", "annotation"], None, ("image", "pixel_values"), "image", "--x") == (
        "pixel_values"
    )
    with pytest.raises(DataError, match=r"no image column 'photo'; its columns are \['img', 'mask'\]"):
        resolve_column(["img", "mask"], "photo", ("image",), "image", "--image_column_name")
    with pytest.raises(DataError, match=r"none of \['label'\] .*\['img', 'x'\]"):
        resolve_column(["img", "x"], None, ("label",), "label", "--label_column_name")


def test_id2label_sources(tmp_path) -> None:
    (tmp_path / "names.json").write_text('{"0": "sky", "1": "road"}')
    assert read_id2label_file(tmp_path / "names.json") == {0: "sky", 1: "road"}
    (tmp_path / "list.json").write_text('["a", "b", "c"]')
    assert read_id2label_file(tmp_path / "list.json") == {0: "a", 1: "b", 2: "c"}
    (tmp_path / "gap.json").write_text('{"0": "a", "2": "c"}')
    with pytest.raises(DataError, match="without gaps"):
        read_id2label_file(tmp_path / "gap.json")
    with pytest.raises(DataError, match="does not exist"):
        read_id2label_file(tmp_path / "missing.json")
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Sequence(datasets.ClassLabel(names=["bg", "cat"]))}
    )
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": [], "label": []}, features=features)})
    assert id2label_from_dataset(ds, str(tmp_path), "label") == {0: "bg", 1: "cat"}


# ------------------------------------------------------------------------------------------------------ checks


def _split(images, labels) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_check_split_reports_bad_label_values_and_suggests_reduce_labels() -> None:
    good = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    labels = [Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8).repeat(2, 0).repeat(2, 1))]
    split = _split([good], labels)
    expected = r"label values 3 \(sample 0\) are outside id2label \(class ids 0..2\).*--reduce_labels"
    with pytest.raises(DataError, match=expected):
        check_split(split, "train", "image", "label", num_labels=3)
    with pytest.raises(DataError, match=r"label values 200 \(sample 0\)") as error:
        check_split(_split([good], [Image.fromarray(np.full((4, 4), 200, np.uint8))]), "train", "image", "label", 3)
    assert "--reduce_labels" not in str(error.value)
    reduced = check_split(split, "train", "image", "label", num_labels=3, reduce_labels=True)
    assert reduced["label_values"] == [0, 1, 2, 255]


def test_check_split_size_mismatch_empty_and_unreadable(tmp_path) -> None:
    image = Image.fromarray(np.zeros((4, 6, 3), np.uint8))
    label = Image.fromarray(np.zeros((6, 4), np.uint8))
    with pytest.raises(DataError, match=r"Split 'validation', sample 0: the image is 4x6 .* label is 6x4"):
        check_split(_split([image], [label]), "validation", "image", "label", 2)
    with pytest.raises(DataError, match="The 'train' split is empty"):
        check_split(_split([], []), "train", "image", "label", 2)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ok.png")
    split = _split([str(broken)], [str(tmp_path / "ok.png")])
    with pytest.raises(DataError, match=r"sample 0, image \(.*broken\.jpg\): cannot read the file"):
        check_split(split, "train", "image", "label", 2)


def test_check_split_converts_grayscale_and_rgba(tmp_path) -> None:
    gray = Image.fromarray(np.full((4, 4), 7, np.uint8))
    rgba = Image.fromarray(np.full((4, 4, 4), 9, np.uint8), mode="RGBA")
    labels = [Image.fromarray(np.ones((4, 4), np.uint8))] * 2
    split = _split([gray, rgba], labels)
    assert check_split(split, "train", "image", "label", 2)["checked"] == 2
    dataset = SegmentationDataset(split, "image", "label", 2, train=False)
    assert dataset[0]["pixel_values"].shape == dataset[1]["pixel_values"].shape == (3, 4, 4)


def test_colour_label_is_rejected_with_a_message() -> None:
    image = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    split = _split([image], [image])
    with pytest.raises(DataError, match="mode RGB .* single-channel"):
        check_split(split, "train", "image", "label", 2)


# -------------------------------------------------------------------------------------------------- transforms


def test_to_rgb_modes() -> None:
    for image in (
        Image.fromarray(np.full((3, 3), 100, np.uint8)),
        Image.fromarray(np.full((3, 3, 4), 100, np.uint8), mode="RGBA"),
        Image.fromarray(np.full((3, 3), 1000, np.uint16)),
        Image.fromarray(np.full((3, 3), 100, np.uint8)).convert("P"),
    ):
        converted = to_rgb(image)
        assert converted.mode == "RGB" and converted.size == (3, 3)
    opaque = np.full((3, 3, 4), 255, np.uint8)
    opaque[..., :3] = (10, 20, 30)
    assert to_rgb(Image.fromarray(opaque, mode="RGBA")).getpixel((0, 0)) == (10, 20, 30)
    transparent = np.zeros((3, 3, 4), np.uint8)
    assert to_rgb(Image.fromarray(transparent, mode="RGBA")).getpixel((0, 0)) == (255, 255, 255)


def test_reduce_labels() -> None:
    assert reduce_label_array(np.array([0, 1, 2, 255])).tolist() == [255, 0, 1, 255]
    assert reduce_label_array(np.array([0, 1, 99]), ignore_index=99).tolist() == [99, 0, 99]
    with pytest.raises(ValueError, match="holds the value 256, which reduce_labels would shift onto the ignore"):
        reduce_label_array(np.array([0, 1, 256]))


def test_reduce_labels_turning_a_class_into_the_ignore_index_names_the_file(tmp_path) -> None:
    """A 16-bit label with the value 256 would become 255 (ignored) under reduce_labels."""
    label = np.zeros((6, 8), np.uint16)
    label[2:4, 2:4] = 256
    label[0, :] = 3
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "x.jpg")
    Image.fromarray(label).save(tmp_path / "x.png")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    split = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / "x.jpg")], "label": [str(tmp_path / "x.png")]}, features
    )
    assert np.asarray(Image.open(tmp_path / "x.png")).max() == 256
    with pytest.raises(DataError, match=r"sample 0 \(.*x\.png\): the label holds the value 256"):
        check_split(split, "train", "image", "label", num_labels=300, reduce_labels=True)
    dataset = SegmentationDataset(split, "image", "label", 300, train=False, reduce_labels=True)
    with pytest.raises(DataError, match=r"sample 0 \(.*x\.png\): the label holds the value 256"):
        dataset[0]
    assert check_split(split, "train", "image", "label", num_labels=300)["label_values"] == [0, 3, 256]


def _aligned_pair(size=(40, 60)):
    """An image whose colour encodes its label (3 vertical bands + a box), to check image/label alignment."""
    label = np.zeros(size, np.int64)
    label[:, size[1] // 3 :] = 1
    label[:, 2 * size[1] // 3 :] = 2
    label[5:15, 5:15] = 3
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)
    return Image.fromarray(palette[label]), label, palette


def test_train_transform_keeps_image_and_label_aligned() -> None:
    image, label, palette = _aligned_pair()
    config = AugmentationConfig(crop_size=(32, 32), min_scale=0.5, max_scale=2.0, photometric_distortion=False)
    for seed in range(12):
        sample = train_transform(image, label, np.random.default_rng(seed), config, mean=(0, 0, 0), std=(1, 1, 1))
        pixels = (sample["pixel_values"].permute(1, 2, 0).numpy() * 255).round()
        labels = sample["labels"].numpy()
        assert sample["pixel_values"].shape == (3, 32, 32) and labels.shape == (32, 32)
        valid = labels != 255
        nearest = np.argmin(((pixels[:, :, None, :] - palette[None, None].astype(float)) ** 2).sum(-1), axis=-1)
        assert (nearest[valid] == labels[valid]).mean() > 0.9
        # Padding (when the resized image is smaller than the crop) is ignore-labelled and zero-valued.
        assert np.all(pixels[~valid] == 0)


def test_train_transform_pads_with_ignore_and_is_seeded() -> None:
    image, label, _ = _aligned_pair((20, 20))
    config = AugmentationConfig(crop_size=(64, 64), min_scale=0.5, max_scale=0.5)
    sample = train_transform(image, label, np.random.default_rng(0), config)
    assert (sample["labels"] == 255).float().mean() == 0.75  # 64 * 0.5 = 32: a 32x32 image in a 64x64 crop
    again = train_transform(image, label, np.random.default_rng(0), config)
    assert torch.equal(sample["pixel_values"], again["pixel_values"])


def test_photometric_distortion_without_hue_keeps_hue() -> None:
    rng = np.random.default_rng(0)
    image = np.tile(np.array([[[200.0, 40.0, 40.0]]]), (4, 4, 1))
    config = AugmentationConfig(hue_delta=0.0)
    for _ in range(10):
        out = photometric_distortion(image, rng, config)
        assert out.shape == image.shape and out.min() >= 0 and out.max() <= 255
        assert np.all(out[..., 0] >= out[..., 1] - 1e-3) and np.allclose(out[..., 1], out[..., 2], atol=1e-3)
    shifted = [photometric_distortion(image, np.random.default_rng(s), AugmentationConfig()) for s in range(20)]
    assert any(not np.allclose(s[..., 1], s[..., 2], atol=1.0) for s in shifted)


def test_pad_collate_pads_labels_with_ignore() -> None:
    a = {"pixel_values": torch.ones(3, 4, 6), "labels": torch.zeros(4, 6, dtype=torch.long)}
    b = {"pixel_values": torch.ones(3, 5, 3), "labels": torch.ones(5, 3, dtype=torch.long)}
    batch = pad_collate([a, b], min_size=1)
    assert batch["pixel_values"].shape == (2, 3, 5, 6) and batch["labels"].shape == (2, 5, 6)
    assert (batch["labels"][0, 4] == 255).all() and (batch["labels"][1, :, 3:] == 255).all()
    assert batch["pixel_values"][1, :, :, 3:].abs().sum() == 0
    # Inputs smaller than SegFormer's minimum (32) are padded up to it, even alone.
    small = pad_collate([a])
    assert small["pixel_values"].shape == (1, 3, 32, 32) and (small["labels"][0, 4:] == 255).all()


def test_segmentation_dataset_augmentation_depends_on_seed_epoch_index(scenes) -> None:
    dataset = SegmentationDataset(
        scenes[0]["train"], "image", "label", 11, train=True, augmentation=AugmentationConfig(crop_size=(48, 48))
    )
    first = dataset[3]["pixel_values"]
    assert torch.equal(first, dataset[3]["pixel_values"])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[3]["pixel_values"])
    dataset.set_epoch(0)
    assert torch.equal(first, dataset[3]["pixel_values"])
    # Bad labels are caught at load time too, naming the split and sample.
    strict = SegmentationDataset(scenes[0]["train"], "image", "label", 5, train=False)
    with pytest.raises(DataError, match=r"Split 'validation': label values"):
        for index in range(len(strict)):
            strict[index]


def test_fashion_scenes_explain_a_missing_debian_package() -> None:
    from proto_segformer.data.builtin import find_fashion_mnist

    if find_fashion_mnist() is not None:
        dataset, id2label = build_builtin_dataset("scenes-fashion", num_train=4, num_validation=2, image_size=32)
        assert id2label[1] == "t-shirt" and len(dataset["train"]) == 4
    else:
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            build_builtin_dataset("scenes-fashion", num_train=4, num_validation=2, image_size=32, cache_dir=False)


def test_check_split_shares_the_checked_samples_between_processes() -> None:
    # Each of n processes checks samples r, r + n, ... of the first max_samples: together each once, none twice.
    image = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    labels = [Image.fromarray(np.full((4, 4), value, np.uint8)) for value in (0, 1, 2, 3, 4, 9)]
    split = _split([image] * 6, labels)
    shares = [check_split(split, "train", "image", "label", 10, max_samples=5, rank=r, world_size=2) for r in (0, 1)]
    assert [share["checked"] for share in shares] == [3, 2]
    assert [share["label_values"] for share in shares] == [[0, 2, 4], [1, 3]]
    bad = _split([image] * 3, [labels[0], labels[1], Image.fromarray(np.full((4, 4), 7, np.uint8))])
    check_split(bad, "train", "image", "label", 5, rank=1, world_size=2)  # sample 2 is process 0's
    with pytest.raises(DataError, match=r"label values 7 \(sample 2\)"):
        check_split(bad, "train", "image", "label", 5, rank=0, world_size=2)
