"""Atomic writes, folder exchange and manifest-limited removal (proto_segformer/safe_files.py)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from proto_segformer import safe_files
from proto_segformer.safe_files import atomic_write, exchange_folders, read_manifest, remove_listed, write_manifest


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def half_then_fail(temporary):
        temporary.write_text("ne")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    atomic_write(target, lambda temporary: temporary.write_text("new"))
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


@pytest.mark.parametrize("native", [True, False])
def test_exchange_folders_swaps_contents(tmp_path, monkeypatch, native):
    if not native:
        monkeypatch.setattr(safe_files, "_renameat2_exchange", lambda first, second: False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from_a").write_text("a")
    (tmp_path / "b" / "from_b").write_text("b")
    exchange_folders(tmp_path / "a", tmp_path / "b")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["from_b"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from_a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_remove_listed_deletes_only_the_listed_files(tmp_path):
    root = tmp_path / "root"
    for name in ("README.md", "images/x.png", "images/y.png", ".git/HEAD"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    (tmp_path / "outside.txt").write_text("not under the folder")
    write_manifest(root / "manifest.json", ["README.md", "images/x.png", "../outside.txt"], written_by="test")
    assert read_manifest(root / "manifest.json") == ["../outside.txt", "README.md", "images/x.png"]
    left = remove_listed(root, read_manifest(root / "manifest.json"))
    assert left == [".git", ".git/HEAD", "images", "images/y.png", "manifest.json"]
    assert (tmp_path / "outside.txt").is_file()  # a listed name never reaches outside the folder
    (root / "manifest.json").write_text("not json")
    assert read_manifest(root / "manifest.json") is None


# -------------------------------------------------------------------------------------- files entering an upload


def test_copy_into_upload_refuses_links_out_of_the_folder_and_special_files(tmp_path):
    from proto_segformer.safe_files import RefusedFile, copy_into_upload

    model, out = tmp_path / "model", tmp_path / "out"
    model.mkdir()
    out.mkdir()
    (tmp_path / "credentials").write_text("secret")
    (model / "real.json").write_text("{}")
    (model / "inside.json").symlink_to(model / "real.json")  # harmless: another file of the folder
    (model / "outside.json").symlink_to(tmp_path / "credentials")
    (model / "sub").symlink_to(tmp_path)  # a folder link leading out
    (model / "dangling.json").symlink_to(model / "gone.json")
    os.mkfifo(model / "fifo.json")
    assert copy_into_upload(model / "inside.json", out / "inside.json", model).read_text() == "{}"
    refusals = {
        "outside.json": f"is a link to {tmp_path / 'credentials'}, which lies outside {model}",
        "sub/credentials": f"resolves to {tmp_path / 'credentials'}, which lies outside {model}",
        "dangling.json": "which does not exist",
        "fifo.json": "is a FIFO, not a regular file",
        "missing.json": "does not exist",
    }
    for name, reason in refusals.items():
        with pytest.raises(RefusedFile, match=re.escape(reason)):
            copy_into_upload(model / name, out / name.replace("/", "_"), model)
    assert sorted(p.name for p in out.iterdir()) == ["inside.json"]
    # a file the user named may lie anywhere, through links, but must be a regular file
    assert copy_into_upload(model / "outside.json", out / "named", model, named_by_user=True).read_text() == "secret"
    for special, kind in ((model / "fifo.json", "a FIFO"), (Path(os.devnull), "a character device")):
        with pytest.raises(RefusedFile, match=f"is {kind}, not a regular file"):
            copy_into_upload(special, out / "special", model, named_by_user=True)


def test_copy_into_upload_follows_no_link_swapped_in_after_the_check(tmp_path, monkeypatch):
    """A link put in place between the check (the resolved path lies inside) and the opening is not followed."""
    from proto_segformer.safe_files import RefusedFile, copy_into_upload

    model = tmp_path / "model"
    (model / "logs").mkdir(parents=True)
    (tmp_path / "credentials").write_text("secret")
    real = safe_files._resolved
    swapped = {model / "file.json": tmp_path / "credentials", model / "logs": tmp_path}

    def checked_before_the_swap(path):  # as if resolved before the link was put in place
        return str(Path(path).absolute()) if Path(path).parent in swapped or Path(path) in swapped else real(path)

    monkeypatch.setattr(safe_files, "_resolved", checked_before_the_swap)
    (model / "file.json").symlink_to(tmp_path / "credentials")
    with pytest.raises(RefusedFile, match="is a link, not a regular file"):
        copy_into_upload(model / "file.json", tmp_path / "copy", model)
    (model / "logs").rmdir()
    (model / "logs").symlink_to(tmp_path)
    with pytest.raises(RefusedFile, match="changed while it was being read"):
        copy_into_upload(model / "logs" / "credentials", tmp_path / "copy", model)
    assert not (tmp_path / "copy").exists()


@pytest.fixture(params=[0o022, 0o077, 0o027], ids=oct)
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_and_staging_folder_give_the_modes_of_new_files(umask, tmp_path):
    """mkstemp / mkdtemp make 0600 / 0700 whatever the umask; what is renamed into place must not stay so."""
    path = atomic_write(tmp_path / "a.txt", lambda temporary: temporary.write_text("a"))
    assert _mode(path) == 0o666 & ~umask
    assert _mode(write_manifest(tmp_path / "manifest.json", ["a.txt"], "test")) == 0o666 & ~umask
    staging = safe_files.staging_folder(tmp_path / "new" / "out", "testing")
    assert _mode(staging) == 0o777 & ~umask


def test_a_replaced_file_or_folder_keeps_its_mode(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write(path, lambda temporary: temporary.write_text("new"))
    assert path.read_text() == "new" and _mode(path) == 0o640
    folder = tmp_path / "out"
    folder.mkdir(mode=0o750)
    folder.chmod(0o750)
    assert _mode(safe_files.staging_folder(folder, "testing")) == 0o750


def test_current_umask_is_read_without_changing_it(umask, monkeypatch):
    assert safe_files.current_umask() == umask
    monkeypatch.setattr(safe_files, "_PROC_STATUS", safe_files.Path("/nonexistent/status"))  # not Linux
    assert safe_files.current_umask() == umask
    assert safe_files.current_umask() == umask  # the fallback restored it
