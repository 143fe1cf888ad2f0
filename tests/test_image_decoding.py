"""One image file, one set of pixels (issue 18): training, predict, the endpoint handler, the Gradio Space,
add_classes, `model.add_classes` and the pictures all decode an image through `proto_segformer.image_decoding`.

For each awkward file (16-bit grayscale PNG, RGBA and LA with transparency, float32 TIFF, palette PNG with a
transparent entry, JPEGs with EXIF orientation 3 and 6) every path gives exactly the same uint8 pixels, and those are
the pixels of the documented rules (computed here independently of the decoder).
"""

from __future__ import annotations

import filecmp
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from proto_segformer import image_decoding
from proto_segformer.add_classes import AddClassesError, read_support
from proto_segformer.class_editing import pil_to_pixel_values
from proto_segformer.data.dataset import SegmentationDataset
from proto_segformer.data.loading import DataError, check_split, load_ade20k_style_folder
from proto_segformer.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from proto_segformer.endpoint_handler import decode_image
from proto_segformer.image_decoding import to_rgb_array
from proto_segformer.prediction_files import read_image
from proto_segformer.segmenter import as_rgb_array
from proto_segformer.visualization import DatasetSamples

HEIGHT, WIDTH = 36, 44  # not square: EXIF orientation 6 swaps them
CASES = ("gray16.png", "rgba.png", "la.png", "float.tif", "palette.png", "exif3.jpg", "exif6.jpg")


def rng() -> np.random.Generator:
    return np.random.default_rng(18)


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference compositing (float, then rounded): colour * a + white * (1 - a)."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(colour.astype(np.float64) * a + 255.0 * (1 - a)).astype(np.uint8)


def gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2)


def jpeg_with_orientation(path: Path, orientation: int) -> np.ndarray:
    """Write a JPEG whose EXIF orientation is `orientation`; return its pixels as stored (decoded, not turned)."""
    stored = rng().integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    stored[:8, :8] = (255, 0, 0)  # a marked corner, to see the turn
    exif = Image.Exif()
    exif[image_decoding.EXIF_ORIENTATION_TAG] = orientation
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def write_case(folder: Path, name: str) -> np.ndarray:
    """Write the test file `name` into `folder`; return the pixels the module's rules give for it."""
    path = folder / name
    generator = rng()
    if name == "gray16.png":
        values = generator.integers(0, 40000, (HEIGHT, WIDTH)).astype(np.uint16)  # not full range: no stretching
        Image.fromarray(values).save(path)
        return gray(np.round(values / 257.0).astype(np.uint8))
    if name == "rgba.png":
        rgba = generator.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
        rgba[:10, :, 3] = 0  # fully transparent rows: white
        Image.fromarray(rgba, mode="RGBA").save(path)
        return over_white(rgba[..., :3], rgba[..., 3])
    if name == "la.png":
        la = generator.integers(0, 256, (HEIGHT, WIDTH, 2), dtype=np.uint8)
        Image.fromarray(la, mode="LA").save(path)
        return over_white(gray(la[..., 0]), la[..., 1])
    if name == "float.tif":
        values = generator.random((HEIGHT, WIDTH)).astype(np.float32)  # 0..1 data
        Image.fromarray(values, mode="F").save(path)
        return gray(np.round(values.astype(np.float64) * 255.0).astype(np.uint8))
    if name == "palette.png":
        indices = generator.integers(0, 4, (HEIGHT, WIDTH), dtype=np.uint8)
        palette = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [0, 0, 0]], dtype=np.uint8)
        image = Image.fromarray(indices, mode="P")
        image.putpalette(palette.ravel().tolist())
        image.save(path, transparency=3)  # entry 3 (black) is transparent: white, not black
        expected = palette[indices]
        expected[indices == 3] = 255
        return expected
    if name == "exif3.jpg":
        return jpeg_with_orientation(path, 3)[::-1, ::-1].copy()  # rotated 180 degrees when shown
    if name == "exif6.jpg":
        return np.rot90(jpeg_with_orientation(path, 6), k=-1).copy()  # rotated 90 degrees clockwise when shown
    raise AssertionError(name)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    folder = tmp_path_factory.mktemp("cases")
    return {name: (folder / name, write_case(folder, name)) for name in CASES}


def unnormalise(pixel_values: torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 of ImageNet-normalised (3, H, W) pixel values (exact: the values were whole numbers)."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((pixel_values * std + mean) * 255.0).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def ade_folder(root: Path, image: Path, label_size: tuple[int, int]) -> Path:
    """An ADE20K-style data set of `image` with an all-zero label of `label_size` (height, width)."""
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        (root / "images" / split / image.name).write_bytes(image.read_bytes())
        Image.fromarray(np.zeros(label_size, np.uint8)).save(root / "annotations" / split / f"{image.stem}.png")
    return root


def training_pixels(image: Path, tmp_path: Path) -> np.ndarray:
    """What training's evaluation transform feeds the model for `image` (after check_split accepts the pair)."""
    shown = Image.open(image)
    width, height = image_decoding.displayed_size(shown)
    split = load_ade20k_style_folder(ade_folder(tmp_path / "ade", image, (height, width)))["train"]
    check_split(split, "train", "image", "label", num_labels=2)
    dataset = SegmentationDataset(split, "image", "label", num_labels=2, train=False)
    return unnormalise(dataset[0]["pixel_values"])


def space_app(folder: Path):
    """The Space's app.py from `folder`, imported as `python app.py` runs it (its folder first on sys.path)."""
    sys.path.insert(0, str(folder))
    sys.modules.pop("image_decoding", None)
    try:
        spec = importlib.util.spec_from_file_location("space_app_decoding", folder / "app.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("image_decoding", None)
    return module


def space_pixels(app, image: Path, tmp_path: Path) -> np.ndarray:
    """What the Space's model sees for an upload of `image`: Gradio's preprocessing with the app's image mode, then
    the app's `bounded`."""
    from gradio.data_classes import ImageData
    from gradio.image_utils import preprocess_image

    source = Path(app.__file__).read_text()
    mode = app.INPUT_IMAGE_MODE if 'gr.Image(type="pil", image_mode=INPUT_IMAGE_MODE' in source else "RGB"  # default
    payload = ImageData(path=str(image), orig_name=image.name)
    uploaded = preprocess_image(payload, str(tmp_path), "webp", mode, "pil")
    return np.asarray(app.bounded(uploaded, max_pixels=10**7))


@pytest.fixture(scope="module")
def template_space(tmp_path_factory) -> Path:
    """The Space's app.py with its decoder, as `space.write_space_files` writes them (without the examples)."""
    from proto_segformer.space import app_source

    folder = tmp_path_factory.mktemp("space")
    (folder / "app.py").write_text(app_source("alice/tiny"))
    (folder / "image_decoding.py").write_bytes(Path(image_decoding.__file__).read_bytes())
    return folder


@pytest.mark.parametrize("name", CASES)
def test_every_path_gives_the_same_pixels(name, cases, template_space, tmp_path):
    path, expected = cases[name]
    app = space_app(template_space)
    pixels = {
        "decoder": to_rgb_array(Image.open(path)),
        "training": training_pixels(path, tmp_path),
        "predict": read_image(path),
        "predict (PIL)": as_rgb_array(Image.open(path)),
        "handler (bytes)": np.asarray(decode_image(path.read_bytes())),
        "handler (PIL)": np.asarray(decode_image(Image.open(path))),
        "space": space_pixels(app, path, tmp_path),
        "add_classes": np.asarray(read_support([(path, write_mask(path, tmp_path))])[0][0]),
        "model.add_classes": unnormalise(pil_to_pixel_values(Image.open(path))),
        "pictures": DatasetSamples([(Image.open(path), None)])[0][0],
    }
    for where, array in pixels.items():
        assert array.dtype == np.uint8 and array.shape == expected.shape, (where, array.dtype, array.shape)
        assert np.array_equal(array, expected), (where, np.abs(array.astype(int) - expected).mean())


def write_mask(image: Path, folder: Path) -> Path:
    """A support mask of the image's shown size."""
    width, height = image_decoding.displayed_size(Image.open(image))
    mask = folder / f"{image.stem}_mask.png"
    Image.fromarray(np.ones((height, width), np.uint8)).save(mask)
    return mask


# ------------------------------------------------------------------------------------------- EXIF and the labels


def test_a_turned_jpeg_with_a_label_of_its_shown_size_is_a_training_pair(cases, tmp_path):
    path, expected = cases["exif6.jpg"]
    split = load_ade20k_style_folder(ade_folder(tmp_path / "ade", path, (WIDTH, HEIGHT)))["train"]
    assert check_split(split, "train", "image", "label", num_labels=2)["checked"] == 1
    sample = SegmentationDataset(split, "image", "label", num_labels=2, train=True, seed=0)[0]
    assert sample["labels"].shape == sample["pixel_values"].shape[1:]
    image, label = SegmentationDataset(split, "image", "label", num_labels=2, train=False).load(0)
    assert image.size == (HEIGHT, WIDTH) and label.shape == (WIDTH, HEIGHT)  # shown: 44 high, 36 wide
    assert np.array_equal(np.asarray(image), expected)


def test_a_label_drawn_on_the_unturned_pixels_is_refused_with_the_fix(cases, tmp_path):
    path, _ = cases["exif6.jpg"]
    split = load_ade20k_style_folder(ade_folder(tmp_path / "ade", path, (HEIGHT, WIDTH)))["train"]
    message = r"EXIF orientation 6 .* 44x36 \(height x width\) as shown, but its label is 36x44.*exiftool"
    with pytest.raises(DataError, match=message) as caught:
        check_split(split, "train", "image", "label", num_labels=2)
    assert "exif6.jpg" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(DataError, match=message):
        SegmentationDataset(split, "image", "label", num_labels=2, train=True)[0]
    mask = tmp_path / "stored_mask.png"
    Image.fromarray(np.ones((HEIGHT, WIDTH), np.uint8)).save(mask)
    with pytest.raises(AddClassesError, match=message):
        read_support([(path, mask)])


# ---------------------------------------------------------------------------------------------- arrays and modes


def test_arrays_follow_the_rules_of_the_images_they_come_from(cases):
    for name in ("gray16.png", "rgba.png", "la.png", "float.tif"):
        path, expected = cases[name]
        assert np.array_equal(to_rgb_array(np.asarray(Image.open(path))), expected), name
    assert np.array_equal(to_rgb_array(np.array([[True, False]])), [[[255] * 3, [0] * 3]])
    assert np.array_equal(to_rgb_array(np.array([[0.0, 255.0, np.nan]])), [[[0] * 3, [255] * 3, [0] * 3]])
    with pytest.raises(ValueError, match=r"int64 samples must hold 8-bit \(0..255\) or 16-bit .* got -1..300"):
        to_rgb_array(np.array([[-1, 300]]))
    with pytest.raises(ValueError, match=r"shape \(H, W\), .* got \(3, 4, 5\)"):
        to_rgb_array(np.zeros((3, 4, 5), np.uint8))


def test_sixteen_bit_samples_are_scaled_by_their_range_not_by_the_image():
    values = np.array([[0, 128, 129, 257, 32896, 65535]], dtype=np.uint16)
    assert to_rgb_array(values)[0, :, 0].tolist() == [0, 0, 1, 1, 128, 255]
    dark = Image.fromarray(np.full((4, 4), 1000, np.uint16))  # a dark 16-bit image stays dark
    assert to_rgb_array(dark).max() == 4


def test_32_bit_integer_images_are_8_bit_when_their_values_fit_else_16_bit(tmp_path):
    """`datasets` stores an int64 gray array as a mode "I" TIFF: 0..255 stays 8-bit (as training read it), as does
    the int64 array itself."""
    import datasets

    values = np.arange(48, dtype=np.int64).reshape(6, 8) * 5
    for array, expected in ((values, values), (values * 200, np.round(values * 200 / 257.0))):
        features = datasets.Features({"image": datasets.Image()})
        split = datasets.Dataset.from_dict({"image": [array]}, features=features).cast_column(
            "image", datasets.Image(decode=False)
        )
        image = Image.open(io.BytesIO(split[0]["image"]["bytes"]))
        assert image.mode == "I"
        assert np.array_equal(to_rgb_array(image), gray(expected.astype(np.uint8)))
        assert np.array_equal(to_rgb_array(array), gray(expected.astype(np.uint8)))


def test_other_pil_modes_decode(cases):
    rgb = rng().integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    for mode in ("CMYK", "YCbCr", "RGBX"):
        decoded = to_rgb_array(image.convert(mode))
        assert decoded.shape == rgb.shape and np.abs(decoded.astype(int) - rgb).mean() < 3, mode
    assert np.array_equal(to_rgb_array(image.convert("1")), gray(np.asarray(image.convert("1").convert("L"))))
    with pytest.raises(ValueError, match="expected a PIL image or a numpy array, got str"):
        to_rgb_array("photo.jpg")


# ------------------------------------------------------------------------------------------------- shipped copies


def test_the_hub_repository_and_the_space_ship_the_decoder_byte_identical(tmp_path):
    from test_hub import LABELS, save_checkpoint

    from proto_segformer.hub import assemble_repository
    from proto_segformer.space import write_space

    source = Path(image_decoding.__file__)
    checkpoint = tmp_path / "run"
    save_checkpoint(checkpoint)
    repo, space = tmp_path / "repo", tmp_path / "space"
    files = assemble_repository(checkpoint, repo, repo_id="alice/tiny")
    assert "image_decoding.py" in files and filecmp.cmp(repo / "image_decoding.py", source, shallow=False)
    write_space(space, "alice/tiny", LABELS, source=checkpoint)
    assert filecmp.cmp(space / "image_decoding.py", source, shallow=False)

    # handler.py, imported as Endpoints import it (its folder on sys.path), decodes through its neighbour.
    sys.path.insert(0, str(repo))
    sys.modules.pop("image_decoding", None)
    try:
        spec = importlib.util.spec_from_file_location("handler", repo / "handler.py")
        handler = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(handler)
        assert Path(sys.modules["image_decoding"].__file__).resolve() == (repo / "image_decoding.py").resolve()
    finally:
        sys.path.remove(str(repo))
        sys.modules.pop("image_decoding", None)
    assert handler.to_rgb_image.__module__ == "image_decoding"
    app = space_app(space)
    assert app.to_rgb_image.__module__ == "image_decoding"
    sixteen = io.BytesIO()
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(sixteen, format="PNG")
    assert np.asarray(handler.decode_image(sixteen.getvalue()))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(app.bounded(Image.open(sixteen), 100))[0, :, 0].tolist() == [0, 128, 255]


def test_the_decoder_imports_nothing_but_pil_and_numpy():
    import ast

    tree = ast.parse(Path(image_decoding.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} <= {"__future__", "typing", "numpy", "PIL"}
