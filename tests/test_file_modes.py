"""Permissions of what the tools write: a new file gets 0666 & ~umask and a new folder 0777 & ~umask (0644 / 0755
under the usual umask 022; private under 077), although the files are written through mkstemp / mkdtemp (0600 /
0700) or safetensors (0600) and renamed into place."""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from transformers import SegformerImageProcessorPil

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer import export as export_module
from proto_segformer.add_classes import save_model_atomically
from proto_segformer.hub import assemble_repository
from proto_segformer.space import write_space

ROOT = Path(__file__).resolve().parents[1]
UMASKS = [0o022, 0o077]


@pytest.fixture(params=UMASKS, ids=["umask022", "umask077"])
def umask(request):
    """The process umask for the test (restored afterwards): the modes every written file and folder must have."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def wrong_modes(folder: Path, mask: int, include_root: bool = True) -> list[str]:
    """Entries under `folder` (and `folder` itself) whose permission bits differ from a new file's / folder's."""
    entries = [*([folder] if include_root else []), *sorted(folder.rglob("*"))]
    wrong = []
    for path in entries:
        mode = stat.S_IMODE(path.lstat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        if not path.is_symlink() and mode != expected:
            wrong.append(f"{path.relative_to(folder.parent)}: {oct(mode)} != {oct(expected)}")
    return wrong


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=3)).save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    for path in [folder, *folder.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"modes_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_save_pretrained_gives_the_weights_the_mode_of_a_new_file(umask, tmp_path):
    folder = tmp_path / "model"
    ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=2)).save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    assert wrong_modes(folder, umask) == []


def test_predict_outputs_have_the_modes_of_new_files(umask, checkpoint, tmp_path):
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(tmp_path / "photo.png")
    output = tmp_path / "predictions"
    argv = ["--model", str(checkpoint), "--inputs", str(tmp_path / "photo.png"), "--output_dir", str(output)]
    assert load_script("predict").main([*argv, "--no_progress", "--prototype_maps"]) == 0
    assert (output / "photo_label.png").is_file()
    assert wrong_modes(output, umask) == []


def test_export_folder_has_the_modes_of_new_files(umask, checkpoint, tmp_path, monkeypatch):
    # The staging folder and its renaming are what is tested; the ONNX conversion itself is replaced by a stub.
    monkeypatch.setattr(export_module, "export_onnx", lambda model, path: Path(path).write_bytes(b"onnx"))
    model = ProtoSegformerForSemanticSegmentation.from_pretrained(checkpoint)
    processor = SegformerImageProcessorPil.from_pretrained(checkpoint)
    output = export_module.write_onnx_folder(model, processor, tmp_path / "onnx")
    assert (output / "model.onnx").is_file()
    assert wrong_modes(output, umask) == []
    export_module.write_onnx_folder(model, processor, output)  # replacing an earlier export
    assert wrong_modes(output, umask) == []


def test_hub_and_space_folders_have_the_modes_of_new_files(umask, checkpoint, tmp_path):
    repository = tmp_path / "hub"
    assemble_repository(checkpoint, repository, repo_id="alice/tiny")
    assert (repository / "model.safetensors").is_file()
    assert wrong_modes(repository, umask) == []
    space = tmp_path / "space"
    write_space(space, "alice/tiny", {0: "a", 1: "b", 2: "c"}, source=checkpoint)
    assert wrong_modes(space, umask) == []


def test_add_classes_output_has_the_modes_of_new_files(umask, checkpoint, tmp_path):
    model = ProtoSegformerForSemanticSegmentation.from_pretrained(checkpoint)
    output = tmp_path / "extended"
    save_model_atomically(model, None, output, lambda folder: (folder / "README.md").write_text("card\n"))
    assert wrong_modes(output, umask) == []


def test_replacing_a_folder_keeps_its_modes(checkpoint, tmp_path, monkeypatch):
    """A file or folder that a tool replaces keeps its permissions (as `open(path, "w")` would keep them)."""
    monkeypatch.setattr(export_module, "export_onnx", lambda model, path: Path(path).write_bytes(b"onnx"))
    model = ProtoSegformerForSemanticSegmentation.from_pretrained(checkpoint)
    processor = SegformerImageProcessorPil.from_pretrained(checkpoint)
    output = export_module.write_onnx_folder(model, processor, tmp_path / "onnx")
    output.chmod(0o750)
    export_module.write_onnx_folder(model, processor, output)
    assert stat.S_IMODE(output.stat().st_mode) == 0o750
