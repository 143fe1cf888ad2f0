"""Case-based explanations: the prototype patches file (written by visualize_prototypes), its fingerprints (stale
after training, still right after add_classes / remove_classes), and predict's --explain_pixel / --explain_class."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from transformers import SegformerImageProcessorPil

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer.explanations import (
    PATCHES_FILE,
    ExplanationError,
    PatchLookup,
    collect_prototype_patches,
    network_fingerprint,
    prototype_fingerprints,
    read_prototype_patches,
    write_prototype_patches,
)
from proto_segformer.visualization import DatasetSamples, match_prototypes

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def script(name: str):
    sys.path.insert(0, str(SCRIPTS))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def striped_samples(count: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(count):
        image = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
        label = np.zeros((32, 32), dtype=np.int64)
        label[:, 16:] = 1  # class 2 never appears
        samples.append((image, label))
    return samples


@pytest.fixture
def model_and_processor():
    torch.manual_seed(0)
    model = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=3)).eval()
    return model, SegformerImageProcessorPil(size={"height": 32, "width": 32})


def stored_patches(model, processor, tmp_path, top_n=2) -> Path:
    samples = DatasetSamples(striped_samples())
    matches = match_prototypes(model, processor, samples)
    names = [f"image{i}.png" for i in range(len(samples))]
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    patches = collect_prototype_patches(model, matches, samples, names, id2label, top_n=top_n, patch_size=24)
    return write_prototype_patches(tmp_path / PATCHES_FILE, patches)


def test_patches_round_trip_and_match_the_atlas(model_and_processor, tmp_path):
    model, processor = model_and_processor
    path = stored_patches(model, processor, tmp_path)
    patches = read_prototype_patches(path)
    # classes 0 and 1 appear in all 3 images: 2 of 4 prototypes x 2 classes x top 2 images; class 2 never appears
    assert len(patches.entries) == 2 * 4 * 2
    assert {e.class_id for e in patches.entries} == {0, 1}
    assert patches.network == network_fingerprint(model) and patches.patch_size == 24
    lookup = PatchLookup.for_model(model, path)
    best = lookup.entries(1, 3)
    assert [e.rank for e in best] == [0, 1] and best[0].similarity >= best[1].similarity
    assert best[0].source.startswith("image") and best[0].picture().size == (24, 24)
    # the stored similarity is the cosine of the prototype and the best pixel of its class in that image
    samples = DatasetSamples(striped_samples())
    matches = match_prototypes(model, processor, samples)
    images, scores = matches.best(2)
    assert best[0].similarity == pytest.approx(float(scores[1, 3, 0]), abs=1e-6)
    assert best[0].source == f"image{int(images[1, 3, 0])}.png"
    with pytest.raises(ExplanationError, match="no patches of prototype 0 of class 'LABEL_2'"):
        lookup.entries(2, 0)


def test_the_file_is_stale_after_training_and_right_after_class_edits(model_and_processor, tmp_path):
    model, processor = model_and_processor
    path = stored_patches(model, processor, tmp_path)
    fingerprints = prototype_fingerprints(model.prototypes)
    # remove_classes: the remaining prototypes are the same vectors, the file still explains them
    model.remove_classes(["LABEL_0"])
    assert prototype_fingerprints(model.prototypes) == fingerprints[4:]
    lookup = PatchLookup.for_model(model, path)
    assert lookup.entries(0, 1)[0].class_name == "LABEL_1"  # class 1 is class 0 now
    # prototypes moved (training further): stale, one line naming the command
    with torch.no_grad():
        model.prototypes.add_(1e-3)
    with pytest.raises(ExplanationError, match="stale: none of its prototypes.*visualize_prototypes.py"):
        PatchLookup.for_model(model, path)
    # the network changed: stale too
    torch.manual_seed(0)
    other = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=3)).eval()
    assert prototype_fingerprints(other.prototypes) == fingerprints
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)  # an encoder weight: the prototypes are the file's
    with pytest.raises(ExplanationError, match="stale: it was made with another network"):
        PatchLookup.for_model(other, path)


def test_a_broken_or_foreign_file_is_one_line(model_and_processor, tmp_path):
    model, _ = model_and_processor
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(b"\x10\x00\x00")
    with pytest.raises(ExplanationError, match="cannot be read as a prototype patches file"):
        PatchLookup.for_model(model, truncated)
    foreign = tmp_path / "model.safetensors"
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(foreign)
    with pytest.raises(ExplanationError, match="is not a prototype patches file"):
        PatchLookup.for_model(model, foreign)
    with pytest.raises(ExplanationError, match="does not exist"):
        PatchLookup.for_model(model, tmp_path / "missing.safetensors")


def test_visualize_prototypes_writes_the_patches_file(tmp_path, capsys):
    torch.manual_seed(0)
    model = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=11)).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    visualize = script("visualize_prototypes")
    # No --split: with --patches_output the patches come from the training images (validation without it).
    arguments = ["--model", str(folder), "--dataset", "scenes", "--num_images", "4"]
    arguments += ["--output", str(tmp_path / "atlas.png"), "--patches_output", str(folder / PATCHES_FILE)]
    assert visualize.main(arguments) == 0
    assert "Patches for explanations" in capsys.readouterr().out
    patches = read_prototype_patches(folder / PATCHES_FILE)
    assert "train images" in patches.data and patches.entries[0].source.startswith("built-in scenes train[")
    assert all(e.rank < 3 for e in patches.entries)
    assert (folder / PATCHES_FILE).stat().st_size < 200_000  # compact: JPEG crops
    # a folder as the output: one line, nothing written
    (tmp_path / "folder").mkdir()
    assert visualize.main([*arguments[:-1], str(tmp_path / "folder")]) == 2
    assert "is a folder" in capsys.readouterr().err


def image_file(tmp_path: Path, name: str = "photo.png", size: tuple[int, int] = (40, 48)) -> Path:
    rng = np.random.default_rng(3)
    path = tmp_path / "inputs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def model_folder(model_and_processor, tmp_path) -> Path:
    model, processor = model_and_processor
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    stored_patches(model, processor, folder)
    return folder


def predict_run(model_folder: Path, tmp_path: Path):
    """scripts/predict.py, an input image, the output folder and the arguments that predict the one into the other."""
    image, out = image_file(tmp_path), tmp_path / "out"
    arguments = ["--model", str(model_folder), "--inputs", str(image), "--output_dir", str(out), "--no_progress"]
    return script("predict"), image, out, arguments


def test_predict_explains_a_pixel_with_the_winning_prototype(model_folder, model_and_processor, tmp_path, capsys):
    model, processor = model_and_processor
    predict, image, out, arguments = predict_run(model_folder, tmp_path)
    assert predict.main([*arguments, "--explain_pixel", "20,7", "--prototype_maps", "--mode", "whole"]) == 0
    record = json.loads((out / "photo_explanation.json").read_text())
    label = np.asarray(Image.open(out / "photo_label.png"))
    prototype = np.asarray(Image.open(out / "photo_prototype.png"))
    # the class and prototype at that pixel are the label and prototype maps' (one truth)
    assert record["pixel"] == {"x": 20, "y": 7} and record["image"] == "photo.png"
    assert record["known"] is None and record["unknown_threshold"] is None  # not calibrated
    assert record["rejected_as_unknown"] is False
    assert record["class_id"] == int(label[7, 20]) and record["prototype"] == int(prototype[7, 20])
    # its similarity is the cosine of the pixel's embedding (on the 1/4 grid) and that prototype
    pixels = processor(images=np.asarray(Image.open(image)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeddings = model(pixel_values=pixels, output_pixel_embeddings=True).pixel_embeddings[0]
    row, col = 7 * 8 // 40, 20 * 8 // 48  # the 32x32 input's 8x8 grid covers the 40x48 image
    cosine = torch.nn.functional.normalize(model.prototypes[record["class_id"], record["prototype"]], dim=0)
    assert record["similarity"] == pytest.approx(float(cosine @ embeddings[:, row, col]), abs=1e-3)
    stored = PatchLookup.for_model(model, model_folder / PATCHES_FILE).entries(record["class_id"], record["prototype"])
    assert [p["similarity"] for p in record["patches"]] == [round(e.similarity, 4) for e in stored]
    picture = Image.open(out / "photo_explanation.png")
    assert picture.width == 4 + (1 + len(stored)) * (96 + 4)  # this image, then the patches, 96 pixels each


def test_predict_explains_a_class(model_folder, tmp_path):
    predict, image, out, arguments = predict_run(model_folder, tmp_path)
    assert predict.main([*arguments, "--explain_class", "LABEL_1", "--prototype_maps"]) == 0
    record = json.loads((out / "photo_explanation.json").read_text())
    label = np.asarray(Image.open(out / "photo_label.png"))
    prototype = np.asarray(Image.open(out / "photo_prototype.png"))
    assert record["class"] == "LABEL_1" and record["predicted_pixels"] == int((label == 1).sum())
    if record["predicted_pixels"]:  # the prototype most of the class's pixels matched, as the prototype map says
        counts = np.bincount(prototype[label == 1], minlength=4)
        assert record["prototype"] == int(counts.argmax())
        assert record["share_of_class_pixels"] == pytest.approx(counts.max() / counts.sum(), abs=1e-4)
        x, y = record["pixel"]["x"], record["pixel"]["y"]
        assert label[y, x] == 1 and prototype[y, x] == record["prototype"]


def test_predict_explanation_errors_are_one_line_and_write_nothing(model_folder, model_and_processor, tmp_path, capsys):
    model, _ = model_and_processor
    predict, image, out, arguments = predict_run(model_folder, tmp_path)

    def fails(extra: list[str], message: str, code: int = 2) -> None:
        assert predict.main([*arguments, *extra]) == code
        captured = capsys.readouterr()
        assert message in captured.err + captured.out, captured.err
        assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith(".")), "wrote files"

    fails(["--explain_class", "zebra"], "Unknown class names ['zebra']")
    fails(["--explain_pixel", "3"], "--explain_pixel takes X,Y")
    fails(["--explain_pixel=-1,2"], "count from 0")
    fails(["--explain_pixel", "1,2", "--explain_class", "LABEL_0"], "not both")
    fails(["--explain_pixel", "48,0"], "is outside this image of 48x40 pixels", code=1)
    fails(["--explain_pixel", "1,1", "--patches", str(tmp_path / "none.safetensors")], "is not a file")
    # stale: the prototypes were trained further since the patches were stored
    with torch.no_grad():
        model.prototypes.mul_(-1)
    model.save_pretrained(model_folder)
    fails(["--explain_pixel", "1,1"], "is stale: none of its prototypes is one of this model's")


def test_add_classes_keeps_the_patches_right_for_the_old_classes(model_folder, tmp_path):
    from test_class_editing import load_script, write_support_folder

    script = load_script("add_classes")
    write_support_folder(tmp_path / "support")
    arguments = script.AddClassesArguments(
        model_dir=str(model_folder),
        support_dir=str(tmp_path / "support"),
        names=["red", "blue"],
        output_dir=str(tmp_path / "extended"),
    )
    assert script.main(arguments) == {"red": 3, "blue": 4}
    extended = ProtoSegformerForSemanticSegmentation.from_pretrained(tmp_path / "extended")
    lookup = PatchLookup.for_model(extended, tmp_path / "extended" / PATCHES_FILE)  # carried over, not stale
    assert lookup.entries(1, 0)[0].class_name == "LABEL_1"
    with pytest.raises(ExplanationError, match="no patches of prototype 0 of class 'red' \\(a class added after"):
        lookup.entries(3, 0)


def test_push_to_hub_ships_the_patches_and_the_card_mentions_them(model_folder, tmp_path, caplog):
    from proto_segformer.hub import push_to_hub

    result = push_to_hub(model_folder, "alice/protoseg-tiny", local_dir=tmp_path / "repo")
    assert PATCHES_FILE in result.files
    card = (tmp_path / "repo" / "README.md").read_text()
    assert "### Case-based explanations" in card and "16 patches of 8 prototypes" in card
    # stale (the prototypes changed since): left out with one warning, and the card does not mention it
    model = ProtoSegformerForSemanticSegmentation.from_pretrained(model_folder)
    with torch.no_grad():
        model.prototypes.mul_(-1)
    model.save_pretrained(model_folder)
    result = push_to_hub(model_folder, "alice/protoseg-tiny", local_dir=tmp_path / "repo2")
    assert PATCHES_FILE not in result.files
    assert "Case-based explanations" not in (tmp_path / "repo2" / "README.md").read_text()
    assert any(
        "Skipped prototype_patches.safetensors" in r.getMessage() and "stale" in r.getMessage() for r in caplog.records
    )


def test_a_bad_pixel_or_a_missing_patches_file_is_refused_before_torch_loads(tmp_path):
    from test_cli import run_without_torch

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    base = ["--model", "model", "--inputs", "photo.png", "--output_dir", str(tmp_path / "out")]
    code, output = run_without_torch("predict.py", *base, "--explain_pixel", "1;2", cwd=tmp_path)
    assert code == 2 and output.strip().splitlines() == [
        "error: --explain_pixel takes X,Y (two whole numbers: column, row), got '1;2'."
    ]
    code, output = run_without_torch("predict.py", *base, "--explain_pixel", "1,2", cwd=tmp_path)
    (line,) = output.strip().splitlines()
    assert code == 2 and "model/prototype_patches.safetensors is not a file" in line and "--patches_output" in line
    assert not (tmp_path / "out").exists()


def test_a_pixel_rejected_as_unknown_is_explained_by_the_class_it_had(model_and_processor, tmp_path):
    from proto_segformer.explanations import Explainer
    from proto_segformer.segmenter import InferenceOptions, Segmenter

    model, processor = model_and_processor
    path = stored_patches(model, processor, tmp_path)
    segmenter = Segmenter(model, processor, InferenceOptions(mode="whole"))
    image = np.asarray(Image.open(image_file(tmp_path)))
    label_map = segmenter.predict([image])[0].label_map
    explainer = Explainer(segmenter, PatchLookup.for_model(model, path), (20, 7), None)
    record, _ = explainer.explain(image, label_map)
    rejected = label_map.copy()
    rejected[7, 20] = 255  # the ignore value rejection gives
    again, _ = explainer.explain(image, rejected)
    assert again["rejected_as_unknown"] is True and record["rejected_as_unknown"] is False
    assert again["known"] is False and record["known"] is None
    assert (again["class_id"], again["prototype"], again["similarity"]) == (
        record["class_id"],
        record["prototype"],
        record["similarity"],
    )
