"""Where a model or data set name points: a local folder, or a repository on the Hugging Face Hub.

A local path with a typo (`runs/paramm`) would otherwise be sent to the Hub, retried for a minute and end in a
message about the internet connection; a Hub id while the Hub is unreachable ends the same way. `check_source`
answers both at once, in one line:

- a name that looks local and does not exist -> `LocalPathNotFoundError`, naming the closest existing folder and
  what it holds (close matches first), without touching the network;
- a Hub id that is not in the local cache while the Hub cannot be reached -> `HubUnreachableError`, after one
  connection attempt of at most `timeout` seconds.

A name "looks local" when it starts with `.`, `/` or `~`, cannot be a Hub id (more than one `/`, characters the Hub
refuses), has the Hub's `owner/name` form but its `owner` is a local folder (`runs/x` while `runs/` exists), or is a
bare name close to an entry of the current folder (`ade_lik` beside `ade_like/`) - unless the Hub id is cached.

Standard library and huggingface_hub only: the modelling file imports this module, and it travels with it as remote
code.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

# "name" or "owner/name" with the characters the Hub accepts (huggingface_hub's validate_repo_id, without "--"/"..").
HUB_ID_FORM = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
SHOWN_ENTRIES = 8


class LocalPathNotFoundError(FileNotFoundError):
    """A name that looks like a local path, and nothing exists there."""


class HubUnreachableError(ConnectionError):
    """A Hub id that is not cached locally, while the Hub cannot be reached (or HF_HUB_OFFLINE is set)."""


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


def hub_unreachable_reason(timeout: float = 2.0) -> str | None:
    """Why the Hub cannot be reached (one TCP connection to its endpoint, at most `timeout` s), or None if it can.

    None as well when HF_HUB_OFFLINE is set or a proxy is configured (the libraries then decide themselves).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as error:
        return f"{host}:{port}: {error.strerror or error}"


def check_source(
    name: str,
    *,
    what: str = "model",
    repo_type: str = "model",
    cache_dir: str | os.PathLike | None = None,
    network: bool = True,
    timeout: float = 2.0,
) -> None:
    """Raise at once, in one line, when `name` cannot be found: a local-looking path that does not exist
    (`LocalPathNotFoundError`), or a Hub id that is not cached while the Hub is unreachable or HF_HUB_OFFLINE is set
    (`HubUnreachableError`). Existing paths and reachable or cached Hub ids pass; `network=False` (e.g. for
    `local_files_only`) skips the Hub checks."""
    from huggingface_hub import constants

    name = str(name)
    if Path(os.path.expanduser(name)).exists():
        return
    cached = _is_hub_id_form(name) and is_cached(name, repo_type, cache_dir)
    if cached:
        return
    if looks_local(name):
        raise LocalPathNotFoundError(missing_path_message(name, what))
    if not network:
        return
    kind = "data set" if repo_type == "dataset" else "model"
    if constants.HF_HUB_OFFLINE and repo_type == "model":
        raise HubUnreachableError(
            f"HF_HUB_OFFLINE is set and the Hub {kind} {name!r} is not in the local cache: unset HF_HUB_OFFLINE"
            " (and connect to the network) to download it, or give a local folder."
        )
    reason = hub_unreachable_reason(timeout)
    if reason is not None:
        raise HubUnreachableError(
            f"Cannot reach the Hugging Face Hub ({reason}) to download the {kind} {name!r}, and it is not in the"
            " local cache: check the network connection, or give a local folder."
        )


__all__ = [
    "HubUnreachableError",
    "LocalPathNotFoundError",
    "check_source",
    "close_matches",
    "hub_unreachable_reason",
    "is_cached",
    "looks_local",
    "missing_path_message",
]
