"""The one way the library puts a folder of outputs in place: assembled aside, then swapped in, in one step.

- `write_folder(destination, fill, purpose=...)`: `fill(staging)` writes every file into a fresh hidden staging
  folder beside `destination` (`safe_files.staging_folder`: same file system, the modes of a new folder); with
  `manifest=` the files written are listed in a manifest file inside it; then the staging folder takes the place of
  `destination` in one step (a rename for a new folder, `safe_files.exchange_folders` for an existing one). Of the
  previous folder only the files named `replaceable` (a previous manifest's files, or those the user asked to
  replace) are deleted; anything else found there is kept, under the staging name, with a warning. A crash or
  `kill -9` at any moment leaves the old folder or the new one (and at most a hidden `.<name>.<purpose>-*` folder
  beside it); an error in `fill` removes the staging folder and leaves `destination` as it was.
- `owned_files(folder, manifest)`: before writing, what a previous write of the library recorded in `folder`'s
  manifest, and the entries of `folder` it did not write (which no writer ever replaces).
- `publish_files(staging, destination, last)`: for a folder shared with other outputs (a training output holds its
  checkpoints): the staged files are moved in one by one (`os.replace`), `last` (the model card) last, so the folder
  never looks finished before it is.
- `fault_point(name, step)`: the one test hook. With the environment variable `PROTOSEG_FAULT=<point>[@<step>]` the
  process kills itself (SIGKILL, as `kill -9`) at that point. Points: `<purpose>:before-swap` (staging complete,
  manifest written) and `<purpose>:after-swap` (new folder in place, the previous one not yet cleared) of every
  `write_folder` (purposes: `saving` for add_classes, `export`, `assembling` for the Hub repository, `space`);
  `<purpose>:during-move` of `publish_files` (`final-save`); `add-classes:after-weights`; training's
  `final-save:after-weights` and `checkpoint-save:after-weights|before-rename|after-rename` (with `@<step>`).

A full disk is not turned into a message here: the error goes up unchanged (after the staging folder is removed),
for the command's own one-line report (`cli.exit_if_write_failure`, `hub_folders.assemble_folder`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterable
from pathlib import Path

from .safe_files import exchange_folders, read_manifest, remove_listed, staging_folder, write_manifest

logger = logging.getLogger(__name__)

FAULT_ENV = "PROTOSEG_FAULT"


def fault_point(name: str, step: int | None = None) -> None:
    """Test hook: with the environment variable PROTOSEG_FAULT=`name` (or `name@step`, `step` being e.g. the global
    step of a checkpoint save), the process kills itself with SIGKILL here, as `kill -9` would. Unset: one lookup."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, at_step = wanted.partition("@")
    if point == name and (not at_step or (step is not None and int(at_step) == step)):
        os.kill(os.getpid(), signal.SIGKILL)


def _entries(folder: Path) -> list[str]:
    """Relative POSIX paths of everything under `folder` (files, links and folders), sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def owned_files(folder: Path, manifest: str) -> tuple[list[str] | None, list[str]]:
    """(the files the manifest `folder/manifest` lists, or None where there is none; the entries of `folder` that
    are neither those files, the manifest, nor the sub-folders holding them). A missing folder: (None, [])."""
    if not folder.is_dir():
        return None, []
    previous = read_manifest(folder / manifest)
    ours = set(previous or ()) | {manifest}
    ours |= {parent.as_posix() for name in ours for parent in Path(name).parents if parent != Path(".")}
    return previous, [name for name in _entries(folder) if name not in ours]


def _written_files(staging: Path, manifest: str | None) -> list[str]:
    return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file() and p.name != manifest)


def _swap_in(staging: Path, target: Path, purpose: str, replaceable: Iterable[str]) -> None:
    """Put `staging` in place of `target` in one step; then delete, of the previous folder, only `replaceable`."""
    if not target.exists():
        os.rename(staging, target)
        fault_point(f"{purpose}:after-swap")
        return
    exchange_folders(staging, target)  # `staging` now holds the previous folder
    fault_point(f"{purpose}:after-swap")
    left = remove_listed(staging, replaceable)
    if left:
        shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        logger.warning("Kept %s of the previous %s (not written by this tool) in %s.", shown, target, staging)
    else:
        staging.rmdir()


def write_folder(
    destination: str | Path,
    fill: Callable[[Path], object],
    *,
    purpose: str,
    replaceable: Iterable[str] = (),
    manifest: str | None = None,
    written_by: str = "proto_segformer",
) -> list[str]:
    """Write the folder `destination` in one step (see the module docstring); return the files written (relative).

    `fill(staging)` writes the new contents into the empty staging folder (what it returns is ignored).
    `replaceable`: the previous folder's files that may be deleted once the new folder is in place (the previous
    manifest's files; the manifest itself always may); read only after `fill`, so `fill` may add to a list passed
    here (add_classes: the files it carried over by hard link). `manifest`: the name of the manifest file to write,
    listing every file written. A link to a folder: the folder it points to is replaced, not the link.
    """
    target = Path(destination).resolve()
    staging = staging_folder(target, purpose)
    try:
        fill(staging)
        files = _written_files(staging, manifest)
        if manifest is not None:
            write_manifest(staging / manifest, files, written_by)
        fault_point(f"{purpose}:before-swap")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the staging folder is ours alone
        raise
    _swap_in(staging, target, purpose, [*replaceable, *([manifest] if manifest else [])])
    return files


def publish_files(staging: Path, destination: Path, last: str, *, purpose: str = "final-save") -> None:
    """Move every entry of `staging` into `destination` (os.replace, one by one) with `last` moved last, then
    remove `staging`. An old `last` file goes first, so that during the move the folder never looks finished."""
    (destination / last).unlink(missing_ok=True)
    names = sorted(path.name for path in staging.iterdir())
    ordered = [name for name in names if name != last] + [name for name in names if name == last]
    for index, name in enumerate(ordered):
        os.replace(staging / name, destination / name)
        if index == 0:
            fault_point(f"{purpose}:during-move")
    staging.rmdir()
