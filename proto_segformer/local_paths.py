"""Whether a name meant as a local path exists, answered on this machine alone (no network).

A local path with a typo (`runs/paramm`) would otherwise be sent to the Hub, retried for a minute and end in a
message about the internet connection. `check_local_source` answers at once, in one line: a name that looks local and
does not exist -> `LocalPathNotFoundError`, naming the closest existing folder and what it holds (close matches
first). A name "looks local" when it starts with `.`, `/` or `~`, cannot be a Hub id (more than one `/`, characters
the Hub refuses), has the Hub's `owner/name` form but its `owner` is a local folder (`runs/x` while `runs/` exists),
or is a bare name close to an entry of the current folder (`ade_lik` beside `ade_like/`) - unless the Hub id is
cached.

The modelling and configuration files call this module, and it travels with them as remote code: the standard library
and huggingface_hub's constants only, and never the network. Whether the Hub can be reached is `paths.py`'s question
(asked by the scripts, not by the model).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

# "name" or "owner/name" with the characters the Hub accepts (huggingface_hub's validate_repo_id, without "--"/"..").
HUB_ID_FORM = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
SHOWN_ENTRIES = 8


class LocalPathNotFoundError(FileNotFoundError):
    """A name that looks like a local path, and nothing exists there."""


def _is_hub_id_form(name: str) -> bool:
    return bool(HUB_ID_FORM.match(name)) and "--" not in name and ".." not in name and not name.endswith((".", "-"))


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith("."))
    except OSError:
        return []


def is_cached(name: str, repo_type: str = "model", cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the Hub cache (or the `datasets` cache, for data sets) holds anything of repository `name`."""
    from huggingface_hub import constants

    folders = [Path(cache_dir)] if cache_dir else []
    folders.append(Path(constants.HF_HUB_CACHE))
    repo_folder = f"{repo_type}s--{name.replace('/', '--')}"
    if any((folder / repo_folder).is_dir() for folder in folders):
        return True
    if repo_type == "dataset":
        datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
        builder_folder = name.replace("/", "___")
        return any((folder / builder_folder).is_dir() for folder in [*folders, datasets_cache])
    return False


def looks_local(name: str) -> bool:
    """Whether `name` is meant as a local path (see the module docstring); True for any path that exists."""
    path = Path(os.path.expanduser(name))
    if path.exists() or name.startswith((".", "/", "~")) or not _is_hub_id_form(name):
        return True
    if "/" in name:
        return path.parent.is_dir()
    return bool(difflib.get_close_matches(name, _entries(Path(".")), n=1, cutoff=0.8))


def _closest_existing(name: str) -> tuple[Path, list[str]]:
    """The closest existing folder above path `name`, and the names of its entries closest to the missing part."""
    path = Path(os.path.expanduser(name))
    existing = path.parent
    while not existing.is_dir() and existing != existing.parent:
        existing = existing.parent
    missing_part = path.relative_to(existing).parts[0] if path.is_relative_to(existing) else path.name
    return existing, difflib.get_close_matches(missing_part, _entries(existing), n=3, cutoff=0.6)


def close_matches(name: str) -> list[str]:
    """Existing paths whose names are close to the missing part of path `name` (at most 3, closest first), e.g.
    ["runs/demo"] for "runs/demoo": for a "did you mean" hint, without touching the network."""
    existing, close = _closest_existing(name)
    return [str(existing / entry) for entry in close]


def missing_path_message(name: str, what: str = "model", hub: bool = True) -> str:
    """One line: `name` does not exist; the closest existing folder above it and its close matches (or entries).
    `hub`: say that the name was not looked up on the Hub (for names that could be Hub ids)."""
    existing, close = _closest_existing(name)
    entries = _entries(existing)
    where = "the current folder" if str(existing) == "." else f"{existing}/"
    message = f"The {what} path {name!r} does not exist"
    message += " (checked locally; it was not looked up on the Hub)" if hub else ""
    if close:
        suggestions = ", ".join(repr(str(existing / entry)) for entry in close)
        return f"{message}. Did you mean {suggestions}?"
    if entries:
        shown = ", ".join(entries[:SHOWN_ENTRIES]) + (", ..." if len(entries) > SHOWN_ENTRIES else "")
        return f"{message}; {where} holds: {shown}."
    return f"{message}; {where} is empty."


def check_local_source(
    name: str,
    *,
    what: str = "model",
    repo_type: str = "model",
    cache_dir: str | os.PathLike | None = None,
) -> bool:
    """Whether `name` is found on this machine (an existing path, or a Hub id in the local cache): True; False for a
    Hub id that is not cached (to be downloaded). A local-looking path that does not exist raises
    `LocalPathNotFoundError` in one line, naming the close matches. Never touches the network."""
    name = str(name)
    if Path(os.path.expanduser(name)).exists():
        return True
    if _is_hub_id_form(name) and is_cached(name, repo_type, cache_dir):
        return True
    if looks_local(name):
        raise LocalPathNotFoundError(missing_path_message(name, what))
    return False
