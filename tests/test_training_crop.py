"""The training crop of a saved model (proto_segformer.training_crop), and the tools that build data at it: a model
trained on 64-pixel crops saves a processor that does not resize and says 512."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from transformers import SegformerImageProcessorPil

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer.training_crop import crop_side, training_crop_size

ROOT = Path(__file__).resolve().parents[1]


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def trained_like(folder: Path, crop: int = 32, num_labels: int = 11) -> Path:
    """A model folder as scripts/train.py leaves it: a processor that does not resize (size 512, transformers'
    default) and the crop in training_args.json."""
    torch.manual_seed(0)
    ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=num_labels)).eval().save_pretrained(folder)
    SegformerImageProcessorPil(do_resize=False).save_pretrained(folder)
    write_json(folder / "training_args.json", {"crop_size": crop, "learning_rate": 0.001})
    return folder


def test_the_recorded_crop_wins_over_a_processor_that_does_not_resize(tmp_path):
    folder = tmp_path / "run"
    write_json(folder / "preprocessor_config.json", {"do_resize": False, "size": {"height": 512, "width": 512}})
    assert training_crop_size(folder) is None  # the processor's 512 is not the training crop
    write_json(folder / "training_args.json", {"crop_size": 64})
    assert training_crop_size(folder) == 64
    write_json(folder / "model_card_inputs.json", {"crop_size": [48, 48]})  # what the card states comes first
    assert training_crop_size(folder) == 48


def test_a_processor_that_resizes_gives_the_crop_and_a_checkpoint_reads_its_run(tmp_path):
    folder = tmp_path / "elsewhere"
    write_json(folder / "preprocessor_config.json", {"size": {"height": 96, "width": 96}})  # do_resize: default
    assert training_crop_size(folder) == 96
    run = tmp_path / "run"
    write_json(run / "training_args.json", {"crop_size": 64})
    write_json(run / "checkpoint-150" / "preprocessor_config.json", {"do_resize": False, "size": {"height": 512}})
    assert training_crop_size(run / "checkpoint-150") == 64
    assert training_crop_size(tmp_path / "missing") is None and training_crop_size("nvidia/mit-b0") is None


@pytest.mark.parametrize(
    ("value", "side"),
    [(64, 64), ([64, 64], 64), ((32, 48), 32), ({"height": 40, "width": 40}, 40), ({"shortest_edge": 24}, 24),
     (None, None), (True, None), (0, None), ("64", None), ([64], None)],
)  # fmt: skip
def test_crop_side_reads_every_recorded_form(value, side):
    assert crop_side(value) == side


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"crop_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("one_thread")
def test_the_atlas_builds_scenes_at_the_training_crop(tmp_path, capsys):
    model = trained_like(tmp_path / "model", crop=32)
    output = tmp_path / "atlas.png"
    argv = ["--model", str(model), "--dataset", "scenes", "--num_images", "2", "--output", str(output)]
    assert load_script("visualize_prototypes").main(argv) == 0
    stats = json.loads((tmp_path / "prototype_stats.json").read_text())
    assert stats["usage"]["pixels"] == 2 * 8 * 8  # 32x32 scenes: an 8x8 embedding grid each, not 512x512
    assert "(32x32)" in capsys.readouterr().out


class Built(Exception):
    """Raised by the stand-in data builder, carrying the arguments it was called with."""


def record_builder(monkeypatch) -> None:
    def builder(*args, **kwargs):
        raise Built(kwargs)

    import proto_segformer.data

    monkeypatch.setattr(proto_segformer.data, "build_builtin_dataset", builder)


def test_the_card_pictures_use_the_training_crop(tmp_path, monkeypatch):
    model = trained_like(tmp_path / "model", crop=32)
    record_builder(monkeypatch)
    with pytest.raises(Built) as built:
        load_script("make_card_pictures").main(["--model", str(model), "--output_dir", str(tmp_path / "card")])
    assert built.value.args[0]["image_size"] == 32


def test_the_precision_benchmark_uses_the_training_crop(tmp_path, monkeypatch):
    from benchmarks import precision
    from benchmarks.arguments import PrecisionArguments

    model = trained_like(tmp_path / "model", crop=32)
    seen = {}
    monkeypatch.setattr(precision, "agreement", lambda *args: seen.update(image_size=args[3]) or {})
    monkeypatch.setattr(precision, "format_report", lambda result: "")
    precision.run(PrecisionArguments(model=str(model)))
    assert seen["image_size"] == 32
