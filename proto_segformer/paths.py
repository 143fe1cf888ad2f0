"""Where a model or data set name points: a local folder, or a repository on the Hugging Face Hub that can be reached.

`check_source` answers at once, in one line, what would otherwise be a minute of retries ending in a message about the
internet connection:

- a name that looks local and does not exist -> `LocalPathNotFoundError` (`local_paths.check_local_source`, without
  touching the network);
- a Hub id that is not in the local cache while the Hub cannot be reached -> `HubUnreachableError`, after one
  connection attempt of at most `timeout` seconds (or at once when HF_HUB_OFFLINE is set).

The scripts (training, data loading) call it before loading anything. It is not remote code: a model never probes the
network itself (its `from_pretrained` runs the local check only).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from .local_paths import (
    check_local_source,
)

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class HubUnreachableError(ConnectionError):
    """A Hub id that is not cached locally, while the Hub cannot be reached (or HF_HUB_OFFLINE is set)."""


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
    if check_local_source(name, what=what, repo_type=repo_type, cache_dir=cache_dir) or not network:
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
