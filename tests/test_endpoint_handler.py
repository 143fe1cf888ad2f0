"""The Inference Endpoints handler under hostile and sloppy requests (issue 11, parts 2 and 6): a pixel cap checked
from the image header before decoding, every decoding failure a ValueError that says why, base64 with line breaks,
valid JSON (never a NaN score), and no model with non-finite weights."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import SegformerImageProcessorPil

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer.endpoint_handler import (
    DEFAULT_MAX_PIXELS,
    EndpointHandler,
    decode_image,
    max_pixels_setting,
)

LABELS = {0: "background", 1: "a", 2: "b", 3: "c", 4: "d"}


def png_bytes(width: int, height: int, bit_depth: int = 1, colour_type: int = 0) -> bytes:
    """A valid all-zero PNG of any size, compressed row by row (20000 x 20000 at 1 bit is about 50 KiB): the image is
    never held in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    chunks = [chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))]
    if colour_type == 3:
        chunks.append(chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff"))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def photo_png(width: int = 40, height: int = 30) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_repo(folder, edit=None):
    torch.manual_seed(0)
    config = tiny_config(num_labels=5, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    ProtoSegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessorPil(do_resize=False).save_pretrained(folder)
    if edit is not None:
        weights = load_file(folder / "model.safetensors")
        edit(weights)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return save_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def handler(repo):
    return EndpointHandler(str(repo))


def test_response_is_valid_json_with_masks_of_the_image_size(handler) -> None:
    results = handler({"inputs": photo_png()})
    text = json.dumps(results, allow_nan=False)
    assert json.loads(text) == results and results
    for entry in results:
        assert 0.0 < entry["score"] <= 1.0 and entry["label"] in LABELS.values()
        assert Image.open(io.BytesIO(base64.b64decode(entry["mask"]))).size == (40, 30)


def test_base64_with_line_breaks_and_trailing_newlines_is_accepted(handler) -> None:
    raw = photo_png()
    plain = base64.b64encode(raw).decode()
    wrapped = "\n".join(plain[i : i + 76] for i in range(0, len(plain), 76)) + "\n"  # coreutils `base64`
    variants = {
        "plain": plain,
        "coreutils": wrapped,
        "mime": base64.encodebytes(raw).decode(),
        "crlf": wrapped.replace("\n", "\r\n"),
        "trailing": plain + "\n\n",
        "data uri": "data:image/png;base64," + wrapped,
        "spaces": " ".join(plain[i : i + 10] for i in range(0, len(plain), 10)),
    }
    expected = np.asarray(decode_image(raw))
    for name, text in variants.items():
        assert np.array_equal(np.asarray(decode_image(text)), expected), name
    assert handler({"inputs": wrapped}) == handler({"inputs": raw})


@pytest.mark.parametrize("kind", ["JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF"])
def test_common_formats_decode(kind) -> None:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo_png())).save(buffer, format=kind)
    assert decode_image(buffer.getvalue()).size == (40, 30)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ("this is not base64!", "not valid base64"),
        ("", "empty string"),
        ("\n  \n", "empty string"),
        ("data:image/png;base64,", "empty string"),
        (b"not an image", "could not be decoded as an image"),
        (photo_png()[:200], "could not be decoded as an image"),  # truncated
        (base64.b64encode(b"GIF89a garbage").decode(), "could not be decoded as an image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "could not be decoded as an image"),  # no Ghostscript
        (12, "must be image bytes, a base64 string or a PIL image, got int"),
        (b"", "holds no bytes"),
        (b"not an image", r"not an image in a format this endpoint reads \(PNG, JPEG, WEBP, BMP, GIF, TIFF\)"),
    ],
)
def test_every_decoding_failure_is_a_named_value_error(inputs, message) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        decode_image(inputs)
    assert " object at 0x" not in str(caught.value)  # names what was wrong, not PIL's "<_io.BytesIO object at 0x..>"


def test_a_request_without_inputs_is_a_value_error(handler) -> None:
    with pytest.raises(ValueError, match="under 'inputs'"):
        handler({"image": photo_png()})


def test_pixel_cap_is_checked_from_the_header_before_decoding() -> None:
    palette = png_bytes(4096, 4096, bit_depth=1, colour_type=3)  # the 78-second request of the issue
    assert len(palette) < 10_000
    with pytest.raises(ValueError, match=r"4096x4096 = 16,777,216 pixels, above this endpoint's limit of 4,194,304"):
        decode_image(palette)
    with pytest.raises(ValueError, match=r"4096x4096 = 16,777,216 pixels"):
        decode_image(base64.encodebytes(palette).decode())
    assert decode_image(palette, max_pixels=4096 * 4096).size == (4096, 4096)
    large = png_bytes(10000, 10000)  # ran past 300 s; above Pillow's warning limit, below its error limit
    with pytest.raises(ValueError, match=r"10000x10000 = 100,000,000 pixels, above this endpoint's limit"):
        decode_image(large)
    bomb = png_bytes(20000, 20000)  # escaped as PIL.DecompressionBombError; even with a higher cap
    assert len(bomb) < 100_000
    for max_pixels in (DEFAULT_MAX_PIXELS, 10**9):
        with pytest.raises(ValueError, match=r"too large to decode .*400000000 pixels.* limit is [0-9,]+ pixels"):
            decode_image(bomb, max_pixels=max_pixels)
    with pytest.raises(ValueError, match="100x100 = 10,000 pixels, above this endpoint's limit of 9,999"):
        decode_image(Image.new("RGB", (100, 100)), max_pixels=9999)  # PIL images from the Endpoint's deserialiser


def test_pixel_cap_from_the_constructor_or_the_environment(repo, monkeypatch) -> None:
    assert max_pixels_setting() == DEFAULT_MAX_PIXELS == 2048 * 2048
    monkeypatch.setenv("PROTOSEG_MAX_PIXELS", "1_000")
    assert max_pixels_setting() == 1000 and max_pixels_setting(5000) == 5000
    handler = EndpointHandler(str(repo))
    with pytest.raises(ValueError, match="40x30 = 1,200 pixels, above this endpoint's limit of 1,000"):
        handler({"inputs": photo_png()})
    assert EndpointHandler(str(repo), max_pixels=1200)({"inputs": photo_png()})
    monkeypatch.setenv("PROTOSEG_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="PROTOSEG_MAX_PIXELS must be a whole number"):
        max_pixels_setting()
    with pytest.raises(ValueError, match="max_pixels must be a positive number"):
        max_pixels_setting(0)


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, value) -> None:
    def poison(weights):
        weights["prototypes"][2, 1, 0] = value

    folder = save_repo(tmp_path / "repo", poison)
    with pytest.raises(ValueError, match="holds NaN or inf values in prototypes"):
        EndpointHandler(str(folder))
    shutil.rmtree(folder)
    folder = save_repo(tmp_path / "repo", lambda weights: weights["projection.conv2.weight"].fill_(value))
    with pytest.raises(ValueError, match="holds NaN or inf values in projection.conv2.weight"):
        EndpointHandler(str(folder))


def test_non_finite_scores_are_an_error_not_a_nan_in_the_json(repo) -> None:
    handler = EndpointHandler(str(repo))
    with torch.no_grad():
        handler.model.prototypes[0, 0, 0] = float("nan")  # broken after loading (e.g. in memory)
    with pytest.raises(RuntimeError, match="NaN or inf scores"):
        handler({"inputs": photo_png()})
