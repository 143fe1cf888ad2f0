"""Writing outputs so that a crash or `kill -9` at any moment leaves the old state or the new one, never half, and
never touches a file the library did not write.

- `atomic_write`: a file is written under a temporary name in its folder and renamed over the target (`os.replace`).
- `staging_folder`: a fresh hidden folder next to a destination, on the same file system, to assemble into.
- `exchange_folders`: swap two folders in one step (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames).
- `read_manifest` / `write_manifest`: the list of files a tool wrote into a folder, so that a later run replaces
  only those.

Permissions: `tempfile.mkstemp` / `mkdtemp` create owner-only files (0600) and folders (0700) whatever the umask, and
a rename keeps them. Everything renamed into place here gets the mode that `open()` / `mkdir()` would have given it:
a new file 0666 & ~umask (0644 under the usual umask 022), a new folder 0777 & ~umask (0755); a file or folder that
it replaces keeps its own mode (as overwriting it with `open(path, "w")` would).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


_PROC_STATUS = Path("/proc/self/status")


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    `os.umask` is read only by setting it, and the umask is shared by every thread: a file another thread creates
    between the set and the restore gets the wrong mode. Linux (4.7+) reports it as "Umask:" in /proc/self/status;
    elsewhere the set-and-restore is the fallback, with the strict 0o077 in between, so that a file created in that
    window is private rather than open.
    """
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def default_mode(path: str | Path, folder: bool = False) -> int:
    """The permission bits for a file (or `folder`) about to be renamed onto `path`: those of what is at `path` now,
    else what `open()` (0666) or `mkdir()` (0777) would give a new one under the current umask."""
    try:
        existing = os.stat(path)
    except OSError:
        existing = None
    if existing is not None and stat.S_ISDIR(existing.st_mode) == folder:
        return stat.S_IMODE(existing.st_mode)
    return (0o777 if folder else 0o666) & ~current_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)` for a temporary file next to `path`, then rename it over `path` in one step.

    The file gets the mode `default_mode` gives (that of the file it replaces, or 0666 & ~umask), not mkstemp's 0600.
    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, default_mode(path))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a text file."""
    return atomic_write(path, lambda temporary: temporary.write_text(text))


def staging_folder(destination: str | Path, purpose: str) -> Path:
    """A new empty hidden folder `.<name>.<purpose>-XXXX` beside `destination` (same file system, so that renames
    are atomic); the parent folder is created if needed. It has the mode the folder renamed onto `destination`
    should have (`default_mode`: that of an existing `destination`, else 0777 & ~umask), not mkdtemp's 0700."""
    destination = Path(destination).absolute()
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.{purpose}-", dir=destination.parent))
    os.chmod(staging, default_mode(destination, folder=True))
    return staging


def is_within(path: str | Path, folder: str | Path) -> bool:
    """True if `path` is `folder` or lies inside it (after resolving links)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def _renameat2_exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths with Linux's renameat2; False where the call is not available."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is None:
        return False
    result = function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result != 0:
        errno = ctypes.get_errno()
        if errno in (38, 22, 95):  # ENOSYS, EINVAL (file system without support), EOPNOTSUPP
            return False
        raise OSError(errno, os.strerror(errno), str(first), None, str(second))
    return True


def exchange_folders(first: str | Path, second: str | Path) -> None:
    """Swap the contents of two existing folders: afterwards `first` holds what `second` held and vice versa.

    One atomic step on Linux; elsewhere (or on a file system without RENAME_EXCHANGE) three renames through a
    hidden sibling name, so a crash in between leaves both folders' contents on disk under one of the names.
    """
    first, second = Path(first), Path(second)
    if _renameat2_exchange(first, second):
        return
    parking = Path(tempfile.mkdtemp(prefix=f".{first.name}.exchange-", dir=first.parent))
    parking.rmdir()
    os.rename(first, parking)
    os.rename(second, first)
    os.rename(parking, second)


def remove_listed(folder: str | Path, files: Iterable[str]) -> list[str]:
    """Delete the listed files (relative paths) under `folder` and the sub-folders that held them once they are
    empty; return what is left under `folder` (relative paths), which is never deleted. `folder` itself stays."""
    folder = Path(folder)
    parents: set[Path] = set()
    for name in files:
        target = folder / name
        if target.parent.resolve() != folder.resolve() and not is_within(target.parent, folder):
            continue  # a name that points outside the folder is never followed
        if target.is_file() or target.is_symlink():
            target.unlink()
        elif target.is_dir():
            parents.add(target)  # a listed folder goes once it is empty
        parents.update(p for p in target.parents if p != folder and folder in p.parents)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if parent.is_dir() and not parent.is_symlink() and not any(parent.iterdir()):
            parent.rmdir()
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def read_manifest(path: str | Path) -> list[str] | None:
    """The file list of a manifest written by `write_manifest`, or None if `path` does not exist or is not one."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return files


def write_manifest(path: str | Path, files: Iterable[str], written_by: str) -> Path:
    """Record (atomically) the relative paths of the files `written_by` wrote into the manifest's folder."""
    text = json.dumps({"written_by": written_by, "files": sorted(set(files))}, indent=1) + "\n"
    return atomic_write_text(path, text)


__all__ = [
    "atomic_write",
    "atomic_write_text",
    "current_umask",
    "default_mode",
    "exchange_folders",
    "is_within",
    "read_manifest",
    "remove_listed",
    "staging_folder",
    "write_manifest",
]
