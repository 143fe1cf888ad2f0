"""The command-line tools' paths, checked as early as their flags: before torch loads (6-27 s on a loaded machine).

A mistyped path answers in a second, in one line naming the flag and the closest existing names; an output folder
that is a file or read-only is found before any work (`output_folders.check_output_folder`). Each script calls
`check_failed` with its checks right after parsing its flags; scripts/train.py calls `check_training_command`
on its raw command line (`proto_segformer.run_training.main` calls it too).

Built-in data sets: `--dataset_name builtin:voc` and plain `--dataset_name voc` (when no local folder is named
`voc`) mean the same; a name close to a built-in one (`scenez`) that is neither a local folder nor in the Hub cache
is answered with the built-in names it resembles.

Standard library only (and huggingface_hub's constants through `paths`).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .checkpoint_folders import find_resume_checkpoint
from .local_paths import is_cached, missing_path_message
from .output_folders import check_output_folder
from .paths import HubUnreachableError, check_source

BUILTIN_PREFIX = "builtin:"
GLOB_CHARACTERS = set("*?[")
DEFAULT_TRAINING_OUTPUT_DIR = "trainer_output"  # TrainingArguments' output_dir when none is given


class PathError(ValueError):
    """A path on the command line that does not exist or is not what the flag needs."""


@functools.cache
def builtin_dataset_names() -> tuple[str, ...]:
    """`proto_segformer.data.builtin.BUILTIN_DATASETS`, read from its source (importing it loads `datasets`)."""
    from .source_help import module_names

    return tuple(module_names(Path(__file__).resolve().parent / "data" / "builtin.py")["BUILTIN_DATASETS"])


def _close_builtin_names(name: str) -> list[str]:
    return difflib.get_close_matches(name.lower(), builtin_dataset_names(), n=2, cutoff=0.7)


def _builtin_list() -> str:
    return ", ".join(builtin_dataset_names())


def builtin_dataset(dataset_name: str | None) -> str | None:
    """The built-in data set `dataset_name` means: "builtin:<name>", or a bare built-in name that is not a local
    path; None for anything else (an unknown "builtin:" name included: `check_dataset_name` reports it)."""
    if not dataset_name:
        return None
    if dataset_name.startswith(BUILTIN_PREFIX):
        name = dataset_name[len(BUILTIN_PREFIX) :]
        return name if name in builtin_dataset_names() else None
    if dataset_name in builtin_dataset_names() and not Path(os.path.expanduser(dataset_name)).exists():
        return dataset_name
    return None


def check_dataset_name(name: str | None, cache_dir: str | None = None, network: bool = True) -> None:
    """Raise (one line) when --dataset_name `name` names nothing: an unknown built-in name, a local-looking path
    that does not exist, a name close to a built-in one that is neither a folder nor cached, or a Hub id that
    cannot be fetched (`paths.check_source`)."""
    if not name or builtin_dataset(name) is not None or Path(os.path.expanduser(name)).exists():
        return
    if name.startswith(BUILTIN_PREFIX):
        bare = name[len(BUILTIN_PREFIX) :]
        close = _close_builtin_names(bare)
        hint = f"; did you mean {' or '.join(BUILTIN_PREFIX + c for c in close)}?" if close else "."
        raise PathError(f"Unknown built-in data set {bare!r}{hint} The built-in data sets are: {_builtin_list()}.")
    close = _close_builtin_names(name)
    if close and "/" not in name and not is_cached(name, "dataset", cache_dir):
        raise PathError(
            f"The data set {name!r} is neither a local folder nor a built-in data set; did you mean"
            f" {' or '.join(repr(c) for c in close)} (built-in)? A Hub data set is named owner/name."
        )
    try:
        check_source(name, what="data set", repo_type="dataset", cache_dir=cache_dir, network=network)
    except HubUnreachableError as error:
        if "/" in name:
            raise
        raise HubUnreachableError(f"{error} The built-in data sets (offline) are: {_builtin_list()}.") from error


def check_dataset_folder(name: str, flag: str = "--dataset") -> None:
    """`PathError` unless `name` is a built-in data set (bare or "builtin:<name>") or an existing folder; the error
    names the close built-in names, or the close local ones."""
    if builtin_dataset(name) is not None or Path(os.path.expanduser(name)).is_dir():
        return
    if Path(os.path.expanduser(name)).exists():
        raise PathError(
            f"The {flag} path {name!r} is a file; give a folder saved with save_to_disk or a built-in name."
        )
    close = _close_builtin_names(name.removeprefix(BUILTIN_PREFIX))
    if close:
        raise PathError(
            f"{flag} {name!r} is neither a folder nor a built-in data set; did you mean"
            f" {' or '.join(repr(c) for c in close)}?"
        )
    raise PathError(f"{missing_path_message(name, flag, hub=False)} Built-in data sets: {_builtin_list()}.")


def check_existing(path: str, flag: str, kind: str = "any") -> Path:
    """`PathError` unless `path` exists (and is a "file" or a "folder" when `kind` says so); the error names the
    flag and the closest existing names."""
    resolved = Path(os.path.expanduser(str(path)))
    if not resolved.exists():
        raise PathError(missing_path_message(str(path), flag, hub=False))
    if kind == "folder" and not resolved.is_dir():
        raise PathError(f"The {flag} path {str(path)!r} is a file; it must be a folder.")
    if kind == "file" and not resolved.is_file():
        raise PathError(f"The {flag} path {str(path)!r} is a folder; it must be a file.")
    return resolved


def check_model_folder(path: str, flag: str = "--model") -> Path:
    """`PathError` unless the model folder `path` exists and is a folder (what is inside is checked on loading)."""
    return check_existing(path, flag, kind="folder")


def check_input_paths(entries: Iterable[str], flag: str = "--inputs") -> None:
    """`PathError` for the first entry that is not a glob pattern and does not exist."""
    for entry in entries:
        if not (GLOB_CHARACTERS & set(str(entry))):
            check_existing(str(entry), flag)


def command_values(argv: Sequence[str], names: Iterable[str]) -> dict[str, Any]:
    """The values of the flags `--<name>` (or `--<na-me>`, `--<name>=value`; the last one given wins) on a raw
    command line, or the keys of the json file that is its only argument. Absent flags are left out."""
    names = list(names)
    if len(argv) == 1 and argv[0].endswith(".json"):
        try:
            data = json.loads(Path(argv[0]).read_text())
        except (OSError, ValueError):
            return {}  # the real parser reports it
        return {name: data[name] for name in names if isinstance(data, dict) and data.get(name) is not None}
    spellings = {f"--{name}": name for name in names} | {f"--{name.replace('_', '-')}": name for name in names}
    values: dict[str, Any] = {}
    for index, arg in enumerate(argv):
        flag, equals, value = arg.partition("=")
        if flag not in spellings:
            continue
        if equals:
            values[spellings[flag]] = value
        elif index + 1 < len(argv):
            values[spellings[flag]] = argv[index + 1]
    return values


def check_training_command(argv: Sequence[str]) -> None:
    """The paths of a scripts/train.py command line, before torch loads: --dataset_name, --model_name_or_path,
    --id2label, --resume_from_checkpoint, --output_dir. Raises (one line) on the first problem."""
    names = ("output_dir", "dataset_name", "model_name_or_path", "resume_from_checkpoint", "id2label", "cache_dir")
    values = command_values(argv, names)
    cache_dir = values.get("cache_dir")
    check_dataset_name(values.get("dataset_name"), cache_dir=cache_dir)
    if values.get("model_name_or_path"):
        check_source(str(values["model_name_or_path"]), what="model", cache_dir=cache_dir)
    if values.get("id2label"):
        check_existing(str(values["id2label"]), "--id2label", kind="file")
    output_dir = str(values.get("output_dir") or DEFAULT_TRAINING_OUTPUT_DIR)
    if values.get("resume_from_checkpoint"):
        find_resume_checkpoint(output_dir, str(values["resume_from_checkpoint"]))
    check_output_folder(output_dir, "--output_dir")


def check_failed(check: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Run `check(*args, **kwargs)`; True after writing the problem it raised (ValueError, OSError) to stderr in one
    line (`error: ...`; the caller exits with code 2), False when it passed."""
    try:
        check(*args, **kwargs)
    except (ValueError, OSError) as error:
        sys.stderr.write(f"error: {error}\n")
        return True
    return False
