"""Output folders of the command-line tools: one check before any heavy work, one message when writing fails.

- `check_output_folder`: the folder exists or can be created, is a folder, is writable (a temporary file is created
  in it, or in its nearest existing parent, and removed at once) and, when asked, has room for a model. Every script
  calls it for each folder it writes (train, predict, export, add_classes, push_to_hub --local_dir / --space_dir,
  visualize_prototypes) before torch loads, so a read-only or mistyped folder is found at once, not at the first
  checkpoint.
- `is_write_failure` / `write_failure_message`: a failed write (a full disk above all) told apart from other errors
  and described in one line that names the folder, the cause and what is intact. A full disk reaches Python in
  several shapes: `OSError` errno 28 (plain files, json), safetensors' "No space left on device (os error 28)", and
  torch.save's `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534` (torch 2.13:
  the errno is lost; the free space on the folder's file system then tells).

Standard library only: the scripts import this before torch.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

# A write that failed without an errno (torch.save) counts as a full disk when less than this is left.
LOW_FREE_BYTES = 64 * 2**20
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_WRITE_ERRNOS = (*_FULL_ERRNOS, errno.EFBIG, errno.EIO, errno.EROFS)
_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
# torch.save (PyTorchStreamWriter) failing to write: the shapes of torch 2.x's messages.
_TORCH_WRITE_TEXTS = ("unexpected pos", "file write failed", "iostream error")


class OutputError(ValueError):
    """An output folder that cannot be used: a file, not writable, too full, or one where outputs would replace
    files the tool did not write (an input, a user's file)."""


def size_text(size: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def _nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.absolute().parents) if p.exists())


def free_bytes(path: str | Path) -> int | None:
    """Bytes free (for unprivileged users) on the file system of `path` or its nearest existing parent."""
    try:
        return shutil.disk_usage(_nearest_existing(Path(path))).free
    except (OSError, StopIteration):
        return None


def folder_weights_bytes(folder: str | Path) -> int:
    """The size of the weight files at the top of a model folder (what a copy or an export of it needs)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.glob("*.safetensors") if p.is_file())


def check_output_folder(
    output_dir: str | Path, flag: str | None = None, need_bytes: int | None = None, what: str = "output folder"
) -> None:
    """`OutputError` unless `output_dir` is (or can be created as) a writable folder with at least `need_bytes`
    free on its file system; creates nothing. Writability is probed with a temporary file in the folder (or its
    nearest existing parent), removed at once."""
    output_dir = Path(os.path.expanduser(str(output_dir)))
    named = f"The {what} {output_dir}" + (f" ({flag})" if flag else "")
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"{named} is a file; choose a folder (it is created if needed).")
    existing = _nearest_existing(output_dir)
    if not existing.is_dir():
        raise OutputError(f"Cannot create the {what} {output_dir}: {existing} is a file.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        where = "" if existing == output_dir else f" ({existing}, where it would be created)"
        raise OutputError(f"{named} is not writable{where}: {error.strerror or error}.") from error
    free = free_bytes(existing)
    if need_bytes and free is not None and free < need_bytes:
        raise OutputError(
            f"{named} has {size_text(free)} free on its disk; the model needs about {size_text(need_bytes)}."
            " Free some space or choose a folder on another disk."
        )


def _chain(error: BaseException):
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _torch_write_failure(error: BaseException) -> bool:
    text = str(error).lower()
    return ("inline_container" in text and any(part in text for part in _TORCH_WRITE_TEXTS)) or (
        "pytorchstreamwriter" in text and "write" in text
    )


def is_write_failure(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) is a file write that failed: a full disk or quota, a file
    too large, an I/O error, a read-only file system, torch.save's stream writer failing."""
    for item in _chain(error):
        if isinstance(item, OSError) and item.errno in _WRITE_ERRNOS:
            return True
        text = str(item).lower()
        if any(part in text for part in _FULL_TEXTS) or _torch_write_failure(item):
            return True
    return False


def is_disk_full(error: BaseException, folder: str | Path) -> bool:
    """Whether `error` says the disk (or the quota) is full, or is a write failure without an errno (torch.save)
    while less than `LOW_FREE_BYTES` is free under `folder`."""
    for item in _chain(error):
        if isinstance(item, OSError) and item.errno in _FULL_ERRNOS:
            return True
        if any(part in str(item).lower() for part in _FULL_TEXTS):
            return True
    free = free_bytes(folder)
    return is_write_failure(error) and free is not None and free < LOW_FREE_BYTES


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"


def write_failure_message(
    error: BaseException,
    folder: str | Path,
    what: str,
    intact: str,
    disk_full: bool | None = None,
    free: int | None = None,
) -> str:
    """One line: writing `what` into `folder` failed, why (a full disk, with the space left; else the error), and
    `intact` (what is unchanged and how to go on). `disk_full` and `free`: as measured when the write failed
    (before a half-written file was removed); measured now when None."""
    free = free_bytes(folder) if free is None else free
    free_text = f"{size_text(free)} free" if free is not None else "free space unknown"
    if is_disk_full(error, folder) if disk_full is None else disk_full:
        cause = f"the disk is full ({free_text})"
    else:
        cause = f"{_short(error)} ({free_text} on its disk)"
    return f"Could not write {what} into {folder}: {cause}. {intact}".strip()
