"""The checkpoint folders of a training run, read without torch (scripts/train.py checks --resume_from_checkpoint
before torch loads; `proto_segformer.training` uses them).

Checkpoints are written into `tmp-checkpoint-N/` and renamed to `checkpoint-N/` once every process has written its
part, so a `checkpoint-N` folder is always complete (`checkpoint_problem` checks one; `newest_complete_checkpoint`
finds the one to resume from; `find_resume_checkpoint` resolves --resume_from_checkpoint).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR (checked in training.py)
TRAINER_STATE_FILE = "trainer_state.json"  # the Trainer writes it last into a checkpoint
CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
CHECKPOINT_STAGING_PREFIX = "tmp-"  # tmp-checkpoint-N: a checkpoint being written
FINAL_STAGING_DIR = "tmp-final-save"  # the final outputs being written
MODEL_CARD_FILE = "README.md"  # moved into place last: its presence marks a finished run
RESUME_LAST = ("last", "true")  # --resume_from_checkpoint values meaning the newest complete checkpoint


class ResumeError(ValueError):
    """--resume_from_checkpoint names nothing to resume from (with the reason and the way out)."""


def listing(paths: list[Path]) -> str:
    """'a, b, c, d and 3 more' of the paths' names."""
    names = [path.name for path in paths]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def read_trainer_state(folder: str | Path) -> dict[str, Any] | None:
    """The trainer_state.json of a checkpoint or output folder as a dict, None if missing or unreadable."""
    try:
        state = json.loads((Path(folder) / TRAINER_STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a complete Trainer checkpoint (None when it is): a staging folder of an interrupted save,
    or a file missing (the Trainer writes trainer_state.json last)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder"
    if is_staging_folder(folder.name) or is_staging_folder(folder.parent.name):
        return "it is the staging folder of a checkpoint save that was interrupted"
    if read_trainer_state(folder) is None:
        return f"{TRAINER_STATE_FILE} is missing or truncated (the save was interrupted)"
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not (folder / "config.json").is_file() or not any((folder / name).is_file() for name in weights):
        return "config.json or the weights are missing"
    return None


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The checkpoint-N folders of `output_dir`, newest (largest N) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)), reverse=True)


def is_staging_folder(name: str) -> bool:
    """Whether `name` is a staging folder of this library's saves (tmp-checkpoint-N, tmp-final-save)."""
    if name == FINAL_STAGING_DIR:
        return True
    return name.startswith(CHECKPOINT_STAGING_PREFIX) and bool(
        CHECKPOINT_PATTERN.match(name[len(CHECKPOINT_STAGING_PREFIX) :])
    )


def interrupted_saves(output_dir: str | Path) -> list[Path]:
    """Staging folders left in `output_dir` by interrupted saves (tmp-checkpoint-N, tmp-final-save)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.is_dir() and is_staging_folder(p.name))


def newest_complete_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint-N of `output_dir` (None if there is none) and the incomplete ones skipped
    on the way (with the reason), staging folders of interrupted saves included."""
    skipped = [
        (path, "the staging folder of an interrupted save")
        for path in interrupted_saves(output_dir)
        if path.name != FINAL_STAGING_DIR
    ]
    for folder in checkpoint_folders(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def find_resume_checkpoint(output_dir: str | Path, resume: str) -> tuple[Path, list[tuple[Path, str]]]:
    """The checkpoint --resume_from_checkpoint `resume` means, and the incomplete checkpoints skipped to find it:
    "last"/"true" is the newest complete checkpoint-N of `output_dir`; anything else must be a complete checkpoint
    folder. `ResumeError` (one line: what is wrong, what to do) otherwise."""
    output_dir = Path(output_dir)
    if resume.lower() in RESUME_LAST:
        checkpoint, skipped = newest_complete_checkpoint(output_dir)
        if checkpoint is None:
            found = f" (only incomplete ones: {listing([p for p, _ in skipped])})" if skipped else ""
            raise ResumeError(
                f"--resume_from_checkpoint {resume}: no complete checkpoint-* folder in {output_dir}{found}. Start"
                " a new run without --resume_from_checkpoint (in a folder that holds a run, that needs"
                " --overwrite_output_dir, which deletes the run's model files and checkpoints)."
            )
        return checkpoint, skipped
    problem = checkpoint_problem(resume)
    if problem is not None:
        if not Path(resume).exists():
            from .local_paths import missing_path_message

            raise ResumeError(missing_path_message(resume, "--resume_from_checkpoint", hub=False))
        folder = Path(resume).parent
        folder = folder.parent if is_staging_folder(folder.name) else folder
        newest, _ = newest_complete_checkpoint(folder)
        hint = f" The newest complete checkpoint there is {newest}." if newest is not None else ""
        raise ResumeError(f"--resume_from_checkpoint {resume} is not a complete checkpoint: {problem}.{hint}")
    return Path(resume), []
