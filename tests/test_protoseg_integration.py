"""ProtoSegForSemanticSegmentation through the package's integrations: the endpoint handler, the pipeline, class
editing, torch.export, remote code in a process without the package, and the scripts (train, resume, 2 processes,
predict with prototype maps, the atlas, evaluation, add_classes, push_to_hub's folder)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import requires_extra
from PIL import Image
from protoseg_helpers import tiny_protoseg_config
from test_hf_integration import run_clean
from train_helpers import REPO, TINY_DATA_ARGS, clean_env
from transformers import SegformerImageProcessorPil

from proto_segformer import ProtoSegForSemanticSegmentation

NAMES = {0: "background", 1: "person", 2: "chair", 3: "table", 4: "plant"}


def labelled_config(kind="resnet", **fields):
    return tiny_protoseg_config(kind, num_labels=5, id2label=NAMES, label2id={v: k for k, v in NAMES.items()}, **fields)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("protoseg_repo")
    torch.manual_seed(0)
    model = ProtoSegForSemanticSegmentation(labelled_config()).eval()
    model.save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder, model


def photo(width=48, height=40):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_saved_folder_ships_the_new_modeling_code(repo):
    folder, _ = repo
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "protoseg"
    assert config["auto_map"]["AutoModelForSemanticSegmentation"] == "modeling_protoseg.ProtoSegForSemanticSegmentation"
    for name in ("modeling_protoseg.py", "configuration_protoseg.py", "prototype_head.py", "prototype_kernels.py"):
        assert (folder / name).is_file(), name
    assert not (folder / "modeling_proto_segformer.py").exists()  # lean: the SegFormer model is not shipped


def test_endpoint_handler_and_pipeline_in_process(repo):
    import base64
    import io

    from transformers import pipeline

    from proto_segformer.endpoint_handler import EndpointHandler

    folder, _ = repo
    image = photo()
    masks = pipeline("image-segmentation", model=str(folder), trust_remote_code=True)(image)
    assert masks and {m["label"] for m in masks} <= set(NAMES.values())
    assert all(np.array(m["mask"]).shape == (image.height, image.width) for m in masks)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    results = EndpointHandler(str(folder))({"inputs": buffer.getvalue()})
    assert results and {entry["label"] for entry in results} <= set(NAMES.values())
    for entry in results:
        assert Image.open(io.BytesIO(base64.b64decode(entry["mask"]))).size == (image.width, image.height)


def test_add_remove_and_rename_classes(repo):
    folder, _ = repo
    model = ProtoSegForSemanticSegmentation.from_pretrained(folder).eval()
    before = model.prototypes.clone()
    images = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.long)
    masks[:, 16:48, 16:48] = 1
    ids = model.add_classes(images, masks, ["lamp"])
    assert ids == {"lamp": 5} and model.prototypes.shape == (6, 3, 8) and model.config.num_labels == 6
    assert torch.equal(model.prototypes[:5], before)
    with torch.no_grad():
        assert model(images).logits.shape == (2, 6, 16, 16)
    assert model.rename_class("lamp", "light") == 5
    assert model.remove_classes(["chair"]) == {0: 0, 1: 1, 3: 2, 4: 3, 5: 4}
    assert model.config.id2label[4] == "light"


@pytest.mark.parametrize("decoder", ["upernet", "mlp"])
def test_torch_export_runs_other_sizes_and_batches(decoder):
    from proto_segformer.export import export_program

    torch.manual_seed(0)
    model = ProtoSegForSemanticSegmentation(labelled_config(decoder_type=decoder)).eval()
    program = export_program(model)
    pixel_values = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        expected = model(pixel_values).logits
    exported = program.module()(pixel_values)
    exported = exported[0] if isinstance(exported, (tuple, list)) else exported
    torch.testing.assert_close(exported, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_remote_code_and_pipeline_in_a_process_without_the_package(repo, tmp_path):
    folder, model = repo
    torch.manual_seed(5)
    pixel_values = torch.randn(1, 3, 64, 64)
    torch.save(pixel_values, tmp_path / "x.pt")
    photo().save(tmp_path / "photo.png")
    result = run_clean(
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoConfig, AutoModel, AutoModelForSemanticSegmentation, pipeline
        x = torch.load({str(tmp_path / "x.pt")!r})
        config = AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=True)
        a = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        b = AutoModelForSemanticSegmentation.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            la, lb = a(x).logits, b(x).logits
        torch.save(la, {str(tmp_path / "logits.pt")!r})
        masks = pipeline("image-segmentation", model={str(folder)!r}, trust_remote_code=True)(
            Image.open({str(tmp_path / "photo.png")!r}))
        print(json.dumps({{"config": type(config).__name__, "module": type(a).__module__,
                           "same": bool(torch.equal(la, lb)), "labels": [m["label"] for m in masks]}}))
        """,
        cwd=tmp_path,
    )
    assert result["config"] == "ProtoSegConfig" and result["same"]
    assert not result["module"].startswith("proto_segformer")  # the copied custom code, not the package
    assert result["labels"] and set(result["labels"]) <= set(NAMES.values())
    with torch.no_grad():
        expected = model(pixel_values).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-4, atol=1e-4)


# A ResNet of a few thousand parameters, a 16-wide UperNet decoder, on the built-in data at 32 pixels.
TINY_PROTOSEG_ARGS = [
    "--model_preset",
    "resnet-18",
    "--config_overrides",
    'backbone_config={"model_type":"resnet","embedding_size":8,"hidden_sizes":[8,16,24,32],"depths":[1,1,1,1],'
    '"out_features":["stage1","stage2","stage3","stage4"]}',
    "--decoder_hidden_size",
    "16",
    "--prototype_dim",
    "8",
    "--num_prototypes_per_class",
    "3",
    *TINY_DATA_ARGS,
]


def script(name: str, *args: str, cwd: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), str(REPO / "scripts" / name), *args]
    done = subprocess.run(command, cwd=str(cwd), env=clean_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.mark.slow
def test_scripts_train_resume_predict_atlas_evaluate_add_classes_and_publish(tmp_path):
    run = tmp_path / "run"
    script(
        "train.py", "--output_dir", str(run), "--max_steps", "4", "--save_steps", "2", *TINY_PROTOSEG_ARGS, cwd=tmp_path
    )
    config = json.loads((run / "config.json").read_text())
    assert config["model_type"] == "protoseg" and (run / "modeling_protoseg.py").is_file()
    # Resume: two more steps from the last checkpoint.
    resumed = script(
        "train.py", "--output_dir", str(run), "--resume_from_checkpoint", "last", "--max_steps", "6",
        "--save_steps", "2", *TINY_PROTOSEG_ARGS, cwd=tmp_path,
    )  # fmt: skip
    assert "resuming checkpoint-4" in resumed.stderr + resumed.stdout
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 6

    images = tmp_path / "images"
    images.mkdir()
    photo().save(images / "a.png")
    script("predict.py", "--model", str(run), "--inputs", str(images), "--output_dir", str(tmp_path / "pred"),
           "--prototype_maps", cwd=tmp_path)  # fmt: skip
    assert (tmp_path / "pred" / "a_label.png").is_file() and (tmp_path / "pred" / "a_prototype.png").is_file()
    atlas, stats = tmp_path / "atlas.png", tmp_path / "stats.json"
    script("visualize_prototypes.py", "--model", str(run), "--dataset", "scenes", "--num_images", "6",
           "--output", str(atlas), "--stats_output", str(stats), cwd=tmp_path)  # fmt: skip
    assert Image.open(tmp_path / "atlas.png").size[0] > 0
    script("evaluate_model.py", "--model", str(run), "--dataset_name", "scenes", "--builtin_num_validation", "4",
           "--builtin_image_size", "32", "--output_dir", str(tmp_path / "eval"), cwd=tmp_path)  # fmt: skip
    assert (tmp_path / "eval" / "evaluation_results.json").is_file()

    support = tmp_path / "support"
    (support / "images").mkdir(parents=True)
    (support / "masks").mkdir()
    photo(32, 32).save(support / "images" / "s.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 1
    Image.fromarray(mask).save(support / "masks" / "s.png")
    script("add_classes.py", "--model_dir", str(run), "--support_dir", str(support), "--names", "lamp",
           "--output_dir", str(tmp_path / "plus"), cwd=tmp_path)  # fmt: skip
    plus = json.loads((tmp_path / "plus" / "config.json").read_text())
    assert plus["model_type"] == "protoseg" and plus["id2label"][str(len(plus["id2label"]) - 1)] == "lamp"

    script("push_to_hub.py", "--model", str(run), "--local_dir", str(tmp_path / "hub"), cwd=tmp_path)
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "UperNet semantic segmentation model on a resnet backbone" in card and "- upernet" in card
    assert (tmp_path / "hub" / "modeling_protoseg.py").is_file() and (tmp_path / "hub" / "handler.py").is_file()


@pytest.mark.slow
def test_two_processes_train_the_same_prototypes(tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    run = tmp_path / "ddp"
    script("train.py", "--use_cpu", "--output_dir", str(run), "--max_steps", "4", "--save_steps", "4",
           "--save_rank_prototypes", *TINY_PROTOSEG_ARGS, cwd=tmp_path, launcher=launcher)  # fmt: skip
    ranks = sorted((run / "rank_prototypes").glob("prototypes_rank*.pt"))
    assert len(ranks) == 2
    first, second = (torch.load(path) for path in ranks)
    first = first["prototypes"] if isinstance(first, dict) else first
    second = second["prototypes"] if isinstance(second, dict) else second
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)


def test_onnx_export_of_the_upernet_decoder_is_refused_up_front(tmp_path):
    pytest.importorskip("onnxscript")
    from proto_segformer.export import ExportError, write_onnx_folder

    model = ProtoSegForSemanticSegmentation(labelled_config()).eval()
    with pytest.raises(ExportError, match="--decoder_type mlp, or use torch.export"):
        write_onnx_folder(model, SegformerImageProcessorPil(), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.slow
def test_onnx_export_of_the_mlp_decoder_runs_other_sizes(tmp_path):
    pytest.importorskip("onnxruntime")
    from proto_segformer.export import OnnxRuntimeModel, write_onnx_folder

    torch.manual_seed(0)
    model = ProtoSegForSemanticSegmentation(labelled_config(decoder_type="mlp")).eval()
    write_onnx_folder(model, SegformerImageProcessorPil(size={"height": 64, "width": 64}), tmp_path / "onnx")
    runtime = OnnxRuntimeModel(tmp_path / "onnx")
    assert type(runtime.config).__name__ == "ProtoSegConfig"
    pixel_values = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        expected = model(pixel_values).logits
    torch.testing.assert_close(runtime(pixel_values=pixel_values).logits, expected, rtol=1e-4, atol=1e-4)


@requires_extra("demo", "gradio")
def test_the_space_app_runs_a_protoseg_repository(repo, tmp_path):
    from test_space import load_app

    from proto_segformer.hub import assemble_repository
    from proto_segformer.space import write_space

    folder, _ = repo
    hub_repo, space = tmp_path / "repo", tmp_path / "space"
    assemble_repository(folder, hub_repo, repo_id="alice/protoseg-resnet")
    assert (hub_repo / "modeling_protoseg.py").is_file() and not (hub_repo / "modeling_proto_segformer.py").exists()
    write_space(space, "alice/protoseg-resnet", NAMES, source=folder)
    app = load_app(space)
    segmenter = app.Segmenter(str(hub_repo), max_pixels=app.DEFAULT_MAX_PIXELS)
    label_map, prototype_map = segmenter.label_and_prototype_maps(photo())
    assert label_map.shape == prototype_map.shape == (40, 48)
    assert set(np.unique(label_map)) <= set(NAMES)
