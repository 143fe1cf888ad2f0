"""Writing outputs so that a crash or `kill -9` at any moment leaves the old state or the new one, never half, and
never touches a file the library did not write.

- `atomic_write`: a file is written under a temporary name in its folder and renamed over the target (`os.replace`).
- `staging_folder`: a fresh hidden folder next to a destination, on the same file system, to assemble into.
- `exchange_folders`: swap two folders in one step (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames).
- `read_manifest` / `write_manifest`: the list of files a tool wrote into a folder, so that a later run replaces
  only those; optionally with each file's SHA-256 (`file_sha256`, `read_manifest_hashes`), so that a later run can
  tell a file it wrote from one a user has edited since.
- `copy_into_upload` / `read_for_upload`: the one way a file enters a folder that is uploaded (the Hub repository, the
  Space): a file of the model folder must be a regular file inside it (a link that leads outside, a FIFO, a device is
  refused with a `RefusedFile` that says which and why); a file the user named on the command line may lie anywhere
  but must still be a regular file.

Permissions: `tempfile.mkstemp` / `mkdtemp` create owner-only files (0600) and folders (0700) whatever the umask, and
a rename keeps them. Everything renamed into place here gets the mode that `open()` / `mkdir()` would have given it:
a new file 0666 & ~umask (0644 under the usual umask 022), a new folder 0777 & ~umask (0755); a file or folder that
it replaces keeps its own mode (as overwriting it with `open(path, "w")` would).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

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


def read_manifest_hashes(path: str | Path) -> dict[str, str] | None:
    """{file: SHA-256 hex} recorded by `write_manifest(..., hashes=...)`; None if the manifest is missing or records
    no hashes (written before hashes were recorded, or by a tool that records none)."""
    path = Path(path)
    if read_manifest(path) is None:
        return None
    hashes = json.loads(path.read_text()).get("sha256")
    if not isinstance(hashes, dict):
        return None
    return {str(name): str(value) for name, value in hashes.items() if isinstance(value, str)}


def write_manifest(
    path: str | Path, files: Iterable[str], written_by: str, hashes: Mapping[str, str] | None = None
) -> Path:
    """Record (atomically) the relative paths of the files `written_by` wrote into the manifest's folder and, when
    given, the SHA-256 of those whose content is known (`hashes`, {file: hex}; names not in `files` are dropped)."""
    files = sorted(set(files))
    data: dict = {"written_by": written_by, "files": files}
    if hashes is not None:
        listed = set(files)
        data["sha256"] = {name: hashes[name] for name in sorted(hashes) if name in listed}
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- files entering an upload


class RefusedFile(ValueError):
    """A file that may not enter an upload folder; the message names it and says why, in one line."""


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO must not wait for a writer
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _kind(mode: int) -> str | None:
    """What a non-regular file is ("a FIFO", ...), None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISLNK, "a link"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _refuse_special(source: Path, mode: int) -> None:
    kind = _kind(mode)
    if kind is not None:
        raise RefusedFile(f"{source} is {kind}, not a regular file")


def _open_named(source: Path) -> int:
    """Open a file the user named (links followed), refusing anything but a regular file before opening it."""
    try:
        _refuse_special(source, os.stat(source).st_mode)
        return os.open(source, os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC)
    except FileNotFoundError:
        raise RefusedFile(f"{source} does not exist") from None
    except OSError as error:
        raise RefusedFile(f"{source} cannot be read ({error.strerror})") from None


def _outside_reason(source: Path, target: str, folder: str) -> str:
    if source.is_symlink():
        return f"{source} is a link to {target}, which lies outside {folder}"
    return f"{source} resolves to {target}, which lies outside {folder}"


def _resolved(path: str | Path) -> str:
    """The real path of `path` (every link resolved)."""
    return os.path.realpath(path)


def _open_inside(source: Path, model_folder: Path) -> int:
    """Open `source`, which must resolve to a regular file inside `model_folder`, without following any link on the
    way from the model folder (O_NOFOLLOW on every step): a link swapped in after the check fails to open."""
    folder = _resolved(model_folder)
    target = _resolved(source)
    if os.path.commonpath([folder, target]) != folder:
        raise RefusedFile(_outside_reason(source, target, folder))
    parts = Path(target).relative_to(folder).parts
    if not parts:
        raise RefusedFile(f"{source} is the folder {folder} itself, not a file")
    if not os.path.lexists(target):
        raise RefusedFile(
            f"{source} is a link to {target}, which does not exist"
            if source.is_symlink()
            else f"{source} does not exist"
        )
    flags = os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC
    try:
        if os.open not in os.supports_dir_fd or not _O_NOFOLLOW:  # no openat: check, then open the final name only
            _refuse_special(source, os.lstat(target).st_mode)
            return os.open(target, flags)
        directory = os.open(folder, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        try:
            for part in parts[:-1]:
                inner = os.open(part, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=directory)
                os.close(directory)
                directory = inner
            _refuse_special(source, os.stat(parts[-1], dir_fd=directory, follow_symlinks=False).st_mode)
            return os.open(parts[-1], flags, dir_fd=directory)
        finally:
            os.close(directory)
    except OSError as error:
        raise RefusedFile(f"{source} changed while it was being read ({error.strerror}); run again") from None


def open_for_upload(source: str | Path, model_folder: str | Path, *, named_by_user: bool = False) -> BinaryIO:
    """`source` opened for reading, for a copy into an upload folder; `RefusedFile` (one line: which and why) for:

    - any file that is not a regular file (a FIFO, a device, a socket, a folder): never opened, so nothing hangs;
    - unless `named_by_user`: a file that does not resolve to a place inside `model_folder` (a link to a file
      elsewhere, e.g. a credentials file). A link to another file inside the folder is harmless and followed.

    A file the user named on the command line (`named_by_user`) may lie anywhere, through links.
    """
    source = Path(source)
    descriptor = _open_named(source) if named_by_user else _open_inside(source, Path(model_folder))
    try:
        _refuse_special(source, os.fstat(descriptor).st_mode)  # what was opened, not what was checked
    except BaseException:
        os.close(descriptor)
        raise
    return os.fdopen(descriptor, "rb")


def copy_contents(reader: BinaryIO, writer: BinaryIO) -> None:
    """Copy an open file's bytes into another (the step a full disk fails)."""
    shutil.copyfileobj(reader, writer, 1 << 20)


def copy_into_upload(
    source: str | Path, destination: str | Path, model_folder: str | Path, *, named_by_user: bool = False
) -> Path:
    """Copy `source` into the new file `destination` (inside a folder being assembled for upload), with the checks
    of `open_for_upload`; return `destination`. Never overwrites: `destination` must not exist yet."""
    destination = Path(destination)
    with open_for_upload(source, model_folder, named_by_user=named_by_user) as reader:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with open(destination, "xb") as writer:
            copy_contents(reader, writer)
    return destination


def read_for_upload(source: str | Path, model_folder: str | Path, *, named_by_user: bool = False) -> bytes:
    """The bytes of `source`, with the checks of `open_for_upload` (for a file whose content enters an upload)."""
    with open_for_upload(source, model_folder, named_by_user=named_by_user) as reader:
        return reader.read()
