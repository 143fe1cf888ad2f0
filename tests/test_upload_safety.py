"""What enters a Hub upload (issue 18): nothing from outside the model folder unless the user named it, no FIFO that
hangs the push, a card that shows known fields only and never a token, and a full disk that changes nothing.

Every test assembles with --local_dir (the Hub is unreachable here)."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image
from test_hub import EXPECTED_FILES, save_checkpoint

from proto_segformer import safe_files
from proto_segformer.hub import HubError, push_to_hub

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"
SECRET = "BEGIN-PRIVATE-KEY-0123456789"
CREDENTIALS = {"private_key": SECRET, "hub_token": TOKEN, "learning_rate": 0.5}


def push_script():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        import push_to_hub as script
    finally:
        sys.path.pop(0)
    return script


@contextmanager
def no_hang(seconds: int = 120):
    """Fail (rather than hang the suite) if the block blocks, e.g. opening a FIFO without a writer."""

    def hung(signum, frame):
        raise AssertionError(f"still running after {seconds} s: blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def tree_text(folder: Path) -> str:
    """Every file under `folder` as text (bytes decoded leniently), to search for a leaked secret."""
    return "\n".join(p.read_bytes().decode("latin-1") for p in sorted(folder.rglob("*")) if p.is_file())


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))
    }


@pytest.fixture()
def run_with_credentials(tmp_path) -> tuple[Path, Path]:
    """A training output and, outside it, a credentials file."""
    run = tmp_path / "run"
    save_checkpoint(run)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "credentials.json").write_text(json.dumps(CREDENTIALS))
    return run, secrets / "credentials.json"


def test_links_out_of_the_model_folder_stay_out_of_the_upload_and_the_card(run_with_credentials, tmp_path, caplog):
    run, credentials = run_with_credentials
    links = ("eval_results.json", "training_args.json", "model_card_inputs.json", "prototype_stats.json")
    for name in links:
        (run / name).symlink_to(credentials)  # each a link to the credentials file outside the folder
    (run / "kept").mkdir()
    (run / "kept" / "train.json").write_text(json.dumps({"train_runtime": 12.5}))
    (run / "train_results.json").symlink_to(run / "kept" / "train.json")  # a link inside the folder: harmless
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8), "blue").save(elsewhere / "photo_of_a_cat.png")
    (elsewhere / "named_link.png").symlink_to(elsewhere / "photo_of_a_cat.png")
    repo = tmp_path / "repo"
    code = push_script().main(
        ["--model", str(run), "--local_dir", str(repo), "--pictures", str(elsewhere / "named_link.png")]
    )
    assert code == 0
    files = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
    assert EXPECTED_FILES <= files
    assert not {"eval_results.json", "training_args.json", "prototype_stats.json"} & files  # the card writes its
    assert json.loads((repo / "model_card_inputs.json").read_text()) == {}  # own inputs file: none known here
    assert SECRET not in tree_text(repo) and TOKEN not in tree_text(repo)
    card = (repo / "README.md").read_text()
    assert "private_key" not in card and "hub_token" not in card
    assert json.loads((repo / "train_results.json").read_text()) == {"train_runtime": 12.5}
    assert "train_runtime = 12.5" in card
    # the picture the user named is copied, wherever it lies (through a link too)
    assert (repo / "images" / "named_link.png").read_bytes() == (elsewhere / "photo_of_a_cat.png").read_bytes()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for name in links:
        (line,) = [w for w in warnings if w.startswith(f"Skipped {name}:")]
        assert f"is a link to {credentials.resolve()}, which lies outside {run.resolve()}" in line
        assert "continuing without it" in line and "\n" not in line


def test_a_card_picture_linked_outside_its_folder_stops_the_push(run_with_credentials, tmp_path, capsys):
    from proto_segformer.model_card import render_model_card

    run, credentials = run_with_credentials
    cards = tmp_path / "cards"
    cards.mkdir()
    render_model_card(run, pictures=[("atlas.png", "the atlas")]).save(cards / "README.md")
    (cards / "atlas.png").symlink_to(credentials)
    repo = tmp_path / "repo"
    capsys.readouterr()
    assert push_script().main(["--model", str(run), "--local_dir", str(repo), "--card", str(cards / "README.md")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "links to 'atlas.png', which is refused" in line and "which lies outside" in line
    assert "Publishing stopped (nothing was written)" in line
    assert not repo.exists()
    # a link to another file inside the card's folder is harmless
    Image.new("RGB", (8, 8), "red").save(cards / "real_atlas.png")
    (cards / "atlas.png").unlink()
    (cards / "atlas.png").symlink_to(cards / "real_atlas.png")
    assert push_script().main(["--model", str(run), "--local_dir", str(repo), "--card", str(cards / "README.md")]) == 0
    assert (repo / "atlas.png").read_bytes() == (cards / "real_atlas.png").read_bytes()


def test_the_card_shows_known_training_arguments_and_results_only(tmp_path):
    from proto_segformer.hub import assemble_repository

    run = tmp_path / "run"
    save_checkpoint(run)
    arguments = {
        "learning_rate": 0.004,
        "max_steps": 300,
        "optim": "adamw_torch",
        "hub_token": TOKEN,
        "push_to_hub_token": TOKEN,
        "private_key": SECRET,
        "unknown_setting": "some-value",
        "lr_scheduler_type": TOKEN,  # a known field holding a token
        "include_num_input_tokens_seen": "no",  # a count setting, not a secret
    }
    (run / "training_args.json").write_text(json.dumps(arguments))
    results = {"eval_mean_iou": 0.5, "eval_private_key": 0.25, f"eval_{TOKEN}": 0.125, "train_loss": TOKEN}
    (run / "all_results.json").write_text(json.dumps(results))
    assemble_repository(run, tmp_path / "repo", dataset_name="scenes")
    card = (tmp_path / "repo" / "README.md").read_text()
    assert "| learning_rate | 0.004 |" in card and "| optim | adamw_torch |" in card and "| Mean IoU | 50.00 |" in card
    for shown in ("hub_token", "push_to_hub_token", "private_key", "Private Key", "unknown_setting", "some-value"):
        assert shown not in card, shown
    assert "| lr_scheduler_type |" not in card and "hf_" not in card and SECRET not in card
    published = json.loads((tmp_path / "repo" / "training_args.json").read_text())
    assert not {"hub_token", "push_to_hub_token", "private_key"} & set(published)
    assert published["lr_scheduler_type"] == "<redacted>"
    assert published["include_num_input_tokens_seen"] == "no" and published["learning_rate"] == 0.004
    assert TOKEN not in tree_text(tmp_path / "repo") and SECRET not in tree_text(tmp_path / "repo")


def test_a_fifo_in_the_model_folder_is_skipped_without_hanging(tmp_path, caplog):
    from proto_segformer.hub import assemble_repository

    run = tmp_path / "run"
    save_checkpoint(run)
    os.mkfifo(run / "eval_results.json")
    with no_hang():
        files = assemble_repository(run, tmp_path / "repo")
    assert EXPECTED_FILES <= set(files) and "eval_results.json" not in files
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipped eval_results.json:")]
    assert "is a FIFO, not a regular file" in line


@pytest.mark.parametrize("kind", ["fifo", "link-out"])
def test_a_refused_model_file_stops_the_push(tmp_path, capsys, kind):
    """A model file (here the image processor's config, loaded and published) that is a FIFO or a link leading out
    of the model folder stops the push before anything is written."""
    run = tmp_path / "run"
    save_checkpoint(run)
    outside = tmp_path / "elsewhere.json"
    (run / "preprocessor_config.json").rename(outside)
    if kind == "fifo":
        os.mkfifo(run / "preprocessor_config.json")
    else:
        (run / "preprocessor_config.json").symlink_to(outside)
    capsys.readouterr()
    with no_hang():
        code = push_script().main(["--model", str(run), "--local_dir", str(tmp_path / "repo")])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    reason = "is a FIFO, not a regular file" if kind == "fifo" else f"which lies outside {run.resolve()}"
    assert line.startswith("error: Refused preprocessor_config.json:") and reason in line
    assert "Publishing stopped (nothing was written)" in line
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("previous", [True, False], ids=["previous-assembly", "new-folder"])
def test_a_full_disk_while_assembling_is_one_line_and_changes_nothing(tmp_path, monkeypatch, capsys, previous):
    run = tmp_path / "run"
    save_checkpoint(run)
    repo = tmp_path / "out" / "repo"
    script = push_script()
    if previous:
        assert script.main(["--model", str(run), "--local_dir", str(repo)]) == 0
    before = snapshot(repo) if previous else None
    capsys.readouterr()

    def full(reader, writer):
        writer.write(reader.read(10))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safe_files, "copy_contents", full)
    with pytest.raises(SystemExit) as exit_info:  # the scripts' one line for a failed write (cli.py), exit code 1
        script.main(["--model", str(run), "--local_dir", str(repo), "--overwrite"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err  # transformers' progress bars, then the error
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert err.strip().splitlines()[-1] == line
    assert f"Could not write the repository into {repo}: the disk is full" in line
    assert "An earlier assembly there is unchanged" in line
    with pytest.raises(HubError) as hub_error:  # the library's own one-line error, from the same failure
        push_to_hub(run, None, local_dir=repo, overwrite=True)
    assert f"No space left on the device while writing {repo}: nothing was changed" in str(hub_error.value)
    assert ("it is as it was" if previous else "it was not created") in str(hub_error.value)
    if previous:
        assert snapshot(repo) == before
        assert sorted(p.name for p in repo.parent.iterdir()) == ["repo"]  # no partial copy left beside it
    else:
        assert not repo.exists() and list(repo.parent.iterdir()) == []


def test_add_classes_does_not_copy_a_linked_training_args_file(run_with_credentials, tmp_path, caplog):
    """add_classes carries training_args.json into the new model (which may be pushed later): not a link's target."""
    from test_class_editing import saved_model_with_extras, write_support_folder

    from proto_segformer.add_classes import add_classes_from_folder

    _, credentials = run_with_credentials
    model_dir = tmp_path / "model"
    saved_model_with_extras(model_dir)
    (model_dir / "training_args.json").symlink_to(credentials)
    write_support_folder(tmp_path / "support")
    add_classes_from_folder(model_dir, tmp_path / "support", ["red", "blue"], tmp_path / "out")
    assert not (tmp_path / "out" / "training_args.json").exists()
    assert SECRET not in tree_text(tmp_path / "out")
    assert any(r.getMessage().startswith("Skipped training_args.json:") for r in caplog.records)
