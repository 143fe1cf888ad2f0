"""Atomic writes, folder exchange and manifest-limited removal (proto_segformer/safe_files.py)."""

from __future__ import annotations

import os
import stat

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
