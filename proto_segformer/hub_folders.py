"""The folders the library uploads to the Hub (a model repository, a Gradio Space): what `hub.py` and `space.py`
share, so that neither imports the other.

- `HubError` and `check_repo_id`: a problem with publishing, and the "owner/name" form of a repository id;
- `check_destination`: the rules of an upload folder, checked before any work: never the checkpoint folder (nor
  inside it, nor around it), never a file, a non-empty folder only with `overwrite` and only if it holds nothing
  but the files a previous assembly listed in its manifest (`.proto_segformer_assembly.json`);
- `assemble_folder`: the folder written in one step by `folder_writer.write_folder`, with that manifest; a full disk
  is a one-line `HubError` and leaves the destination as it was.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .folder_writer import owned_files, write_folder
from .safe_files import RefusedFile, copy_into_upload, is_within

REPO_ID_FORM = re.compile(r"^[^/\s]+/[^/\s]+$")
MANIFEST_NAME = ".proto_segformer_assembly.json"  # the files an assembly wrote; only these are ever replaced
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class HubError(ValueError):
    """A problem with publishing (repository id, token, destination folder)."""


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it has the form "owner/name" with characters the Hub accepts; `HubError` otherwise."""
    if not isinstance(repo_id, str) or not REPO_ID_FORM.match(repo_id):
        raise HubError(
            f"Repository id {repo_id!r} is not of the form 'owner/name' (e.g. 'alice/protosegformer-b0-scenes');"
            " 'owner' is your user or organisation name."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubError(f"Repository id {repo_id!r} is not valid on the Hub: {error}") from error
    return repo_id


def check_destination(local_dir: Path, source: Path, overwrite: bool) -> list[str]:
    """Check the repository folder before any work; return the files of a previous assembly there (to replace).

    Refused: a folder that is, contains or lies inside the checkpoint `source`; a file; a non-empty folder without
    `overwrite`; and, with `overwrite`, a folder that holds anything but the files a previous assembly recorded in
    its manifest (a training output, a `.git`, checkpoints, a user's notes): nothing the tool did not write is ever
    deleted.
    """
    if is_within(local_dir, source) or is_within(source, local_dir):
        raise HubError(
            f"The repository folder {local_dir} and the checkpoint folder {source} overlap (one is, contains or lies"
            " inside the other); choose a repository folder outside the checkpoint, e.g. a new folder beside it."
        )
    if local_dir.exists() and not local_dir.is_dir():
        raise HubError(f"{local_dir} exists and is a file; choose a folder for the repository.")
    if not local_dir.is_dir() or not any(local_dir.iterdir()):
        return []
    if not overwrite:
        raise HubError(
            f"{local_dir} is not empty; choose an empty folder (or --overwrite to replace a repository folder that"
            " push_to_hub assembled before)."
        )
    previous, others = owned_files(local_dir, MANIFEST_NAME)
    if previous is None:
        held = ", ".join(sorted(p.name for p in local_dir.iterdir())[:8])
        raise HubError(
            f"{local_dir} is not empty and not a previously assembled repository (no {MANIFEST_NAME}); not"
            f" overwriting it. It holds: {held}. Choose another folder."
        )
    if others:
        shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        raise HubError(
            f"{local_dir} holds files that push_to_hub did not write ({shown}); not overwriting it. Move them away"
            " or choose another folder (--overwrite replaces only the files of a previous assembly)."
        )
    return previous


def assemble_folder(
    folder: Path, source: Path, overwrite: bool, write: Callable[[Path], None], *, purpose: str, written_by: str
) -> list[str]:
    """Write a folder the library owns (`folder_writer.write_folder`): `write(staging)` fills a fresh staging folder
    beside `folder`, a manifest lists its files, and it replaces `folder` in one step, deleting only the previous
    assembly's files; returns the files (relative). Refuses what `check_destination` refuses; on a failure `folder`
    is left as it was."""
    previous = check_destination(folder, source, overwrite)
    existed = folder.exists()
    state = "it is as it was" if existed else "it was not created"
    try:
        return write_folder(
            folder,
            write,
            purpose=purpose,
            replaceable=previous,
            manifest=MANIFEST_NAME,
            written_by=f"proto_segformer.hub.{written_by}",
        )
    except RefusedFile as error:  # a file changed between the checks and the copy
        raise HubError(f"Refused {error}; publishing stopped before {folder} was written ({state}).") from error
    except Exception as error:
        full = disk_full_error(error, folder, existed)
        if full is None:
            raise
        raise full from error


def disk_full_error(error: BaseException, folder: Path, existed: bool) -> HubError | None:
    """The one-line `HubError` for a full disk (or quota) while writing `folder`, else None. Libraries that write
    through their own code (safetensors) report it in their message rather than as an `OSError`."""
    message = str(error)
    if not (
        isinstance(error, OSError)
        and error.errno in DISK_FULL
        or "No space left on device" in message
        or "os error 28" in message
    ):
        return None
    state = "it is as it was" if existed else "it was not created"
    return HubError(
        f"No space left on the device while writing {folder}: nothing was changed ({state}; the partial copy"
        " beside it was removed). Free some space and run again."
    )


# The one image decoder, shipped as a byte-identical copy beside the standalone handler.py and the Space's app.py.
IMAGE_DECODING_SOURCE = Path(__file__).resolve().parent / "image_decoding.py"


def copy_image_decoder(folder: Path) -> None:
    """Put the package's `image_decoding.py` into `folder` (a repository or Space being assembled), replacing any
    copy `save_pretrained` left there, so handler.py / app.py decode images as training does."""
    (folder / IMAGE_DECODING_SOURCE.name).unlink(missing_ok=True)
    copy_into_upload(IMAGE_DECODING_SOURCE, folder / IMAGE_DECODING_SOURCE.name, IMAGE_DECODING_SOURCE.parent)
