"""Data sets as distributed (`proto_segformer.data.layouts`): Cityscapes, COCO-Stuff-164k and COCO-Stuff-10k folders
generated with the real file names (tiny images) are recognised, their labels come out converted to train ids as
the official tables define them, and every bad folder is one `DataError` naming the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat
from train_helpers import REPO, TINY_ARGS, clean_env

from proto_segformer.data import load_dataset_any
from proto_segformer.data.dataset import SegmentationDataset
from proto_segformer.data.layouts import find_folder_layout
from proto_segformer.data.loading import DataError, check_split, id2label_from_dataset, infer_num_labels
from proto_segformer.run_training import FINAL_OUTPUT_FILES, main

H, W = 16, 32
# Cityscapes label ids -> train ids (cityscapesScripts' labels.py): road 7 -> 0, sidewalk 8 -> 1, car 26 -> 13,
# bicycle 33 -> 18; unlabeled 0, ego vehicle 1, parking 9, caravan 29 have no train id -> 255.
CITYSCAPES_RAW = [7, 8, 26, 33, 0, 1, 9, 29]
CITYSCAPES_TRAIN = [0, 1, 13, 18, 255, 255, 255, 255]
# COCO-Stuff-164k (0-based COCO ids; mmsegmentation's coco_stuff164k.py): 0 person -> 0, 12 stop sign -> 11,
# 24 giraffe... -> 23, 26 -> 24 (25 is unused), 91 banner -> 80, 181 wood -> 170, 255 unlabelled -> 255.
COCO_164K_RAW = [0, 12, 24, 26, 91, 181, 255, 10]
COCO_164K_TRAIN = [0, 11, 23, 24, 80, 170, 255, 10]
# COCO-Stuff-10k (1-based ids; coco_stuff10k.py with reduce_zero_label): 0 unlabelled -> 255, 1 -> 0, 13 -> 11, 92 ->
# 80, 182 -> 170.
COCO_10K_RAW = [0, 1, 13, 25, 27, 92, 182, 11]
COCO_10K_TRAIN = [255, 0, 11, 23, 24, 80, 170, 10]


def _label(values: list[int], dtype=np.uint8) -> np.ndarray:
    """An (H, W) map holding each of `values` in a band of columns."""
    return np.repeat(np.array(values, dtype=dtype), W // len(values))[None, :].repeat(H, axis=0)


def _converted(values: list[int]) -> np.ndarray:
    return _label(values, np.int64)


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


def cityscapes(root: Path, raw: list[int] = CITYSCAPES_RAW, test: bool = True, labels: bool = True) -> Path:
    cities = {"train": ("aachen", "bochum"), "val": ("frankfurt",), "test": ("berlin",) if test else ()}
    for split, names in cities.items():
        for city in names:
            for frame in range(2):
                key = f"{city}_000000_{frame:06d}"
                _image(root / "leftImg8bit" / split / city / f"{key}_leftImg8bit.png", frame)
                if labels:
                    label_dir = root / "gtFine" / split / city
                    label_dir.mkdir(parents=True, exist_ok=True)
                    label = np.zeros((H, W), np.uint8) if split == "test" else _label(raw)
                    Image.fromarray(label).save(label_dir / f"{key}_gtFine_labelIds.png")
                    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(label_dir / f"{key}_gtFine_color.png")
    return root


def coco_stuff_164k(root: Path, raw: list[int] = COCO_164K_RAW) -> Path:
    for split, ids in (("train2017", (9, 25, 30)), ("val2017", (139,))):
        for i in ids:
            _image(root / "images" / split / f"{i:012d}.jpg", i)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_label(raw)).save(root / "annotations" / split / f"{i:012d}.png")
    return root


def coco_stuff_10k(root: Path, raw: list[int] = COCO_10K_RAW, dtype=np.uint16) -> Path:
    lists = {
        "train": ["COCO_train2014_000000000077", "COCO_train2014_000000000078"],
        "test": ["COCO_train2014_000000000081"],
    }
    (root / "imageLists").mkdir(parents=True)
    (root / "annotations").mkdir(parents=True)
    for split, names in lists.items():
        (root / "imageLists" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for seed, name in enumerate(names):
            _image(root / "images" / f"{name}.jpg", seed)
            savemat(root / "annotations" / f"{name}.mat", {"S": _label(raw, dtype), "names": np.array(["x"])})
    return root


def test_cityscapes_folder_loads_with_train_ids_names_and_colours(tmp_path) -> None:
    root = cityscapes(tmp_path / "cityscapes")
    layout = find_folder_layout(root)
    assert layout.name == "cityscapes" and set(layout.splits) == {"train", "validation", "test"}
    image, label = layout.splits["train"][0]
    assert (
        image.name == "aachen_000000_000000_leftImg8bit.png"
        and label.name == "aachen_000000_000000_gtFine_labelIds.png"
    )
    assert len(layout.splits["train"]) == 4 and all(label is None for _, label in layout.splits["test"])
    assert len(layout.id2label) == 19 and layout.id2label[0] == "road" and layout.id2label[13] == "car"
    assert layout.id2label[18] == "bicycle" and layout.colours.shape == (19, 3)
    assert layout.colours[0].tolist() == [128, 64, 128] and layout.colours[13].tolist() == [0, 0, 142]
    assert np.array_equal(layout.load_label(label), _converted(CITYSCAPES_TRAIN))
    ignored = [255] * 7
    expected = [*ignored, 0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, *range(6, 16), 255, 255, 16, 17, 18]
    assert layout.convert_label(np.arange(34, dtype=np.uint8)[None], "x").tolist() == [expected]

    dataset = load_dataset_any(str(root))  # the test split (no public labels) is not offered
    assert set(dataset) == {"train", "validation"} and len(dataset["validation"]) == 2
    assert np.array_equal(dataset["train"][1]["label"], _converted(CITYSCAPES_TRAIN))
    assert dataset["train"][1]["image"].size == (W, H)
    assert np.array_equal(np.asarray(Image.open(label)), _label(CITYSCAPES_RAW))  # nothing rewritten on disk

    # The conversion reaches training: class names, the checks, the inferred classes and the model-ready samples.
    assert id2label_from_dataset(dataset, str(root), "label") == layout.id2label
    assert check_split(dataset["train"], "train", "image", "label", num_labels=19)["label_values"] == [
        0,
        1,
        13,
        18,
        255,
    ]
    assert infer_num_labels(dataset["validation"], "image", "label", False, 255) == 19
    sample = SegmentationDataset(dataset["validation"], "image", "label", 19, train=False)[0]
    assert np.array_equal(sample["labels"].numpy(), _converted(CITYSCAPES_TRAIN))
    parts = dataset["train"].train_test_split(test_size=0.5, seed=0)["test"].select([0])
    assert np.array_equal(parts[0]["label"], _converted(CITYSCAPES_TRAIN))


def test_cityscapes_test_split_and_missing_gtfine_are_one_line(tmp_path) -> None:
    layout = find_folder_layout(cityscapes(tmp_path / "full"))
    with pytest.raises(DataError, match="test split has no public labels"):
        layout.labelled_samples("test")
    only_test = cityscapes(tmp_path / "only_test")
    for split in ("train", "val"):
        for folder in ("leftImg8bit", "gtFine"):
            for path in sorted((only_test / folder / split).rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            (only_test / folder / split).rmdir()
    with pytest.raises(DataError, match="test split has no public labels .* train on train and evaluate on val"):
        load_dataset_any(str(only_test))

    images_only = cityscapes(tmp_path / "images_only", labels=False)
    with pytest.raises(
        DataError, match=r"images_only holds Cityscapes images \(leftImg8bit/\) but no labels \(gtFine/\)"
    ):
        find_folder_layout(images_only)
    with pytest.raises(DataError, match="gtFine_trainvaltest.zip"):
        load_dataset_any(str(images_only))


def test_cityscapes_bad_files_are_named(tmp_path) -> None:
    root = cityscapes(tmp_path / "outside", raw=[7, 8, 40, 34])
    dataset = load_dataset_any(str(root))
    message = r"aachen_000000_000000_gtFine_labelIds\.png: label value\(s\) 34, 40 are not Cityscapes label ids"
    with pytest.raises(DataError, match=message):
        dataset["train"][0]
    with pytest.raises(DataError, match=message):
        check_split(dataset["train"], "train", "image", "label", num_labels=19)

    root = cityscapes(tmp_path / "missing")
    (root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000001_gtFine_labelIds.png").unlink()
    with pytest.raises(
        DataError,
        match=r"1 image\(s\) in .*leftImg8bit/val have no label file: frankfurt_000000_000001_leftImg8bit\.png needs"
        r" .*gtFine/val/frankfurt/frankfurt_000000_000001_gtFine_labelIds\.png \(found"
        r" frankfurt_000000_000001_gtFine_color\.png",
    ):
        load_dataset_any(str(root))

    root = cityscapes(tmp_path / "suffix")
    _image(root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000009_leftImg8bit.jpg", 0)
    with pytest.raises(DataError, match=r"aachen_000000_000009_leftImg8bit\.jpg: not a Cityscapes image name"):
        load_dataset_any(str(root))


def test_coco_stuff_164k_folder_converts_as_mmsegmentation_and_refuses_unused_ids(tmp_path) -> None:
    root = coco_stuff_164k(tmp_path / "coco")
    layout = find_folder_layout(root)
    assert layout.name == "coco-stuff-164k" and len(layout.id2label) == 171 and layout.colours.shape == (171, 3)
    assert (layout.id2label[0], layout.id2label[11], layout.id2label[80], layout.id2label[170]) == (
        "person",
        "stop sign",
        "banner",
        "wood",
    )
    # Every id of mmsegmentation's clsID_to_trID maps as there (k -> its rank among the 171 used ids); 10k is +1.
    used = [i for i in range(182) if i not in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)]
    assert layout.convert_label(np.array([used + [255]]), "x").tolist() == [list(range(171)) + [255]]
    ten_k = find_folder_layout(coco_stuff_10k(tmp_path / "coco10k"))
    assert ten_k.convert_label(np.array([[0] + [i + 1 for i in used]]), "x").tolist() == [[255, *range(171)]]
    dataset = load_dataset_any(str(root))
    assert set(dataset) == {"train", "validation"} and len(dataset["train"]) == 3
    assert dataset["train"][0]["image"].size == (W, H)
    assert np.array_equal(dataset["validation"][0]["label"], _converted(COCO_164K_TRAIN))
    assert check_split(dataset["train"], "train", "image", "label", num_labels=171)["checked"] == 3

    for value in (11, 90, 200):  # COCO ids no class uses (mmsegmentation would keep 11 as stop sign), above 181
        bad = coco_stuff_164k(tmp_path / f"bad{value}", raw=[0, value])
        with pytest.raises(
            DataError, match=rf"000000000009\.png: label value\(s\) {value} are not COCO-Stuff-164k ids"
        ):
            load_dataset_any(str(bad))["train"][0]

    (root / "annotations" / "train2017" / "000000000025.png").unlink()
    with pytest.raises(DataError, match=r"000000000025\.jpg needs .*annotations/train2017/000000000025\.png"):
        load_dataset_any(str(root))
    (root / "annotations" / "train2017" / "000000000025.png").write_bytes(b"")
    Image.new("RGB", (W, H)).save(root / "images" / "val2017" / "000000000632.png")
    with pytest.raises(DataError, match=r"val2017/000000000632\.png: not a COCO image \(<id>\.jpg"):
        load_dataset_any(str(root))


def test_coco_stuff_10k_folder_reads_mat_files_and_refuses_unused_ids(tmp_path) -> None:
    root = coco_stuff_10k(tmp_path / "coco10k")
    layout = find_folder_layout(root)
    assert layout.name == "coco-stuff-10k" and len(layout.id2label) == 171
    assert [len(layout.splits[s]) for s in ("train", "validation")] == [2, 1]
    dataset = load_dataset_any(str(root))
    assert np.array_equal(dataset["train"][1]["label"], _converted(COCO_10K_TRAIN))
    assert np.array_equal(dataset["validation"][0]["label"], _converted(COCO_10K_TRAIN))

    as_double = load_dataset_any(str(coco_stuff_10k(tmp_path / "double", dtype=np.float64)))  # MATLAB's default
    assert np.array_equal(as_double["train"][0]["label"], _converted(COCO_10K_TRAIN))
    half = tmp_path / "double" / "annotations" / "COCO_train2014_000000000077.mat"
    savemat(half, {"S": _label(COCO_10K_RAW, np.float64) + 0.5})
    with pytest.raises(DataError, match=r"000000000077\.mat: the label map 'S' holds values that are not whole"):
        as_double["train"][0]
    bad = coco_stuff_10k(tmp_path / "unused", raw=[1, 12, 183, 1])
    with pytest.raises(DataError, match=r"000000000077\.mat: label value\(s\) 12, 183 are not COCO-Stuff-10k ids"):
        load_dataset_any(str(bad))["train"][0]

    missing = root / "annotations" / "COCO_train2014_000000000081.mat"
    missing.rename(missing.with_suffix(".png"))
    with pytest.raises(
        DataError, match=r"000000000081\.jpg needs .*000000000081\.mat \(found COCO_train2014_000000000081\.png"
    ):
        load_dataset_any(str(root))


def test_training_refuses_bad_layout_folders_before_anything_is_written(tmp_path, capsys) -> None:
    def fails(argv: list[str]) -> str:
        output = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_info:
            main(["--output_dir", str(output), "--max_steps", "2", *TINY_ARGS, *argv])
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
        assert message.startswith("error: ") and "Traceback" not in message
        assert not any((output / name).exists() for name in FINAL_OUTPUT_FILES)
        return message

    good = cityscapes(tmp_path / "good")
    assert "--reduce_labels does not apply to the cityscapes folder" in fails(
        ["--dataset_name", str(good), "--reduce_labels"]
    )
    outside = cityscapes(tmp_path / "outside", raw=[7, 50])
    assert "label value(s) 50 are not Cityscapes label ids" in fails(["--dataset_name", str(outside)])
    no_labels = cityscapes(tmp_path / "no_labels", labels=False)
    assert "but no labels (gtFine/)" in fails(["--dataset_name", str(no_labels)])


@pytest.mark.slow
def test_train_script_trains_on_a_cityscapes_folder(tmp_path) -> None:
    root = cityscapes(tmp_path / "cityscapes")
    output = tmp_path / "run"
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--dataset_name", str(root), "--output_dir"]
    command += [str(output), "--max_steps", "2", "--crop_size", "32", "--save_strategy", "no", *TINY_ARGS]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((output / "config.json").read_text())
    assert len(config["id2label"]) == 19 and config["id2label"]["13"] == "car"
    assert 0.0 <= json.loads((output / "eval_results.json").read_text())["eval_mean_iou"] <= 1.0
