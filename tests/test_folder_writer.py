"""The one atomic folder writer (`proto_segformer.folder_writer`): a `kill -9` at each of its points leaves the old
folder or the new one, never a mix; an error leaves the old one; a file the library did not write is never deleted;
the one fault hook PROTOSEG_FAULT=<point>[@<step>]."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proto_segformer import folder_writer
from proto_segformer.folder_writer import fault_point, owned_files, publish_files, write_folder
from proto_segformer.safe_files import write_manifest

REPO = Path(__file__).resolve().parents[1]
MANIFEST = ".test_manifest.json"
OLD = {"a.txt": "old a", "sub/b.txt": "old b", "gone.txt": "old only"}
NEW = {"a.txt": "new a", "sub/b.txt": "new b", "c.txt": "new only"}

# A child process that writes NEW over the destination (an earlier write of OLD, with its manifest), like a command.
WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from proto_segformer.folder_writer import fault_point, owned_files, write_folder

    NEW = {new!r}

    def fill(staging):
        for index, (name, text) in enumerate(sorted(NEW.items())):
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
            if index == 0:
                fault_point("test:mid-fill")

    destination = Path(sys.argv[1])
    previous, foreign = owned_files(destination, {manifest!r})
    assert not foreign, foreign
    write_folder(destination, fill, purpose="test", replaceable=previous or [], manifest={manifest!r})
    """
).format(new=NEW, manifest=MANIFEST)


def contents(folder: Path) -> dict[str, str]:
    """{relative path: text} of the files under `folder`, the manifest left out."""
    return {
        p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    }


def write_old(folder: Path) -> None:
    for name, text in OLD.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    write_manifest(folder / MANIFEST, OLD, "test")


def run_writer(destination: Path, fault: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PROTOSEG_FAULT", None)
    if fault is not None:
        env["PROTOSEG_FAULT"] = fault
    command = [sys.executable, "-c", WRITER, str(destination)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("existing", [True, False], ids=["replacing", "new"])
@pytest.mark.parametrize(
    "fault, survives",
    [("test:mid-fill", "old"), ("test:before-swap", "old"), ("test:after-swap", "new"), (None, "new")],
)
def test_a_kill_at_each_point_leaves_the_old_folder_or_the_new(tmp_path, existing, fault, survives):
    destination = tmp_path / "out"
    if existing:
        destination.mkdir()
        write_old(destination)
    result = run_writer(destination, fault)
    if fault is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == -signal.SIGKILL, result.stderr
    if survives == "new":
        assert contents(destination) == NEW
        assert json.loads((destination / MANIFEST).read_text())["files"] == sorted(NEW)
    elif existing:
        assert contents(destination) == OLD
    else:
        assert not destination.exists()
    # Whatever is left beside it is a hidden staging folder of this write, never a half-replaced destination.
    assert all(p.name.startswith(".out.test-") for p in tmp_path.iterdir() if p != destination)
    if fault is None:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_after_a_kill_the_next_write_replaces_only_the_files_it_owns(tmp_path):
    destination = tmp_path / "out"
    destination.mkdir()
    write_old(destination)
    assert run_writer(destination, "test:after-swap").returncode == -signal.SIGKILL
    assert run_writer(destination, None).returncode == 0
    assert contents(destination) == NEW


def test_an_error_while_filling_leaves_the_folder_and_no_staging(tmp_path):
    destination = tmp_path / "out"
    destination.mkdir()
    write_old(destination)

    def fill(staging: Path) -> None:
        (staging / "a.txt").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):  # goes up unchanged, for the command's one-line report
        write_folder(destination, fill, purpose="test", replaceable=OLD, manifest=MANIFEST)
    assert contents(destination) == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_foreign_file_in_the_destination_is_never_removed(tmp_path, caplog):
    destination = tmp_path / "out"
    destination.mkdir()
    write_old(destination)
    (destination / "notes.txt").write_text("the user's")
    previous, foreign = owned_files(destination, MANIFEST)
    assert sorted(previous) == sorted(OLD) and foreign == ["notes.txt"]

    def fill(staging: Path) -> None:
        (staging / "a.txt").write_text("new a")
        (destination / "sub" / "late.txt").write_text("appeared during the write")  # a user's file, mid-write

    with caplog.at_level(logging.WARNING, logger="proto_segformer.folder_writer"):
        write_folder(destination, fill, purpose="test", replaceable=previous, manifest=MANIFEST)
    assert contents(destination) == {"a.txt": "new a"}
    (kept,) = [p for p in tmp_path.iterdir() if p != destination]  # the previous folder, with only foreign files
    assert contents(kept) == {"notes.txt": "the user's", "sub/late.txt": "appeared during the write"}
    assert "notes.txt" in caplog.text and str(kept) in caplog.text


def test_a_folder_that_is_not_listed_as_ours_is_not_owned(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    assert owned_files(tmp_path, MANIFEST) == (None, ["mine.txt", "sub"])
    assert owned_files(tmp_path / "missing", MANIFEST) == (None, [])


def test_a_link_to_a_folder_replaces_the_folder_it_points_to(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    write_folder(link, lambda staging: (staging / "a.txt").write_text("new"), purpose="test", manifest=MANIFEST)
    assert link.is_symlink() and (real / "a.txt").read_text() == "new"


def test_publish_files_moves_the_last_file_last(tmp_path, monkeypatch):
    staging, destination = tmp_path / "staging", tmp_path / "out"
    staging.mkdir()
    destination.mkdir()
    (destination / "README.md").write_text("old card")
    (destination / "checkpoint-1").mkdir()  # another output of the folder: left alone
    for name in ("README.md", "a.bin", "z.json"):
        (staging / name).write_text(name)
    seen = []
    monkeypatch.setattr(
        folder_writer, "fault_point", lambda name, step=None: seen.append(sorted(os.listdir(destination)))
    )
    publish_files(staging, destination, last="README.md")
    assert seen == [["a.bin", "checkpoint-1"]]  # after the first move: the old card is gone, the new not yet there
    assert sorted(os.listdir(destination)) == ["README.md", "a.bin", "checkpoint-1", "z.json"]
    assert not staging.exists()


@pytest.mark.parametrize(
    "setting, name, step, kills",
    [
        (None, "a", None, False),
        ("a", "a", None, True),
        ("a", "b", None, False),
        ("a", "a", 3, True),
        ("a@3", "a", 3, True),
        ("a@3", "a", 4, False),
        ("a@3", "a", None, False),
    ],
)
def test_the_fault_hook(monkeypatch, setting, name, step, kills):
    killed = []
    monkeypatch.setattr(folder_writer.os, "kill", lambda pid, sig: killed.append(sig))
    if setting is None:
        monkeypatch.delenv("PROTOSEG_FAULT", raising=False)
    else:
        monkeypatch.setenv("PROTOSEG_FAULT", setting)
    fault_point(name, step)
    assert killed == ([signal.SIGKILL] if kills else [])


def test_every_writer_uses_the_one_hook():
    """No module but folder_writer reads a fault variable or sends itself a signal."""
    package = REPO / "proto_segformer"
    for path in package.rglob("*.py"):
        if path.name == "folder_writer.py":
            continue
        text = path.read_text()
        assert "PROTOSEG_FAULT" not in text.replace("`PROTOSEG_FAULT=", ""), path
        assert "TEST_CRASH" not in text and "SIGKILL" not in text, path
