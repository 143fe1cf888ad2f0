"""The side of the square crop a model was trained on, read from what its folder records.

Tools that build inputs for a trained model (the prototype atlas's built-in scenes, the precision benchmark, the card
pictures, predict's sliding window) must use the training crop, not the image processor's `size`: scripts/train.py
saves a processor that does not resize (`do_resize=False`) and keeps transformers' default `size` of 512 in
preprocessor_config.json, so for a model trained on 64-pixel crops the processor says 512.

Where the crop is found, first match wins:
1. `model_card_inputs.json` "crop_size" (what the model card states; add_classes and push_to_hub carry it along);
2. `training_args.json` "crop_size" (scripts/train.py records it there);
3. `preprocessor_config.json` "size" when the processor resizes (`do_resize` not false): a checkpoint made elsewhere,
   whose processor brings every image to the size it was trained on.
A `checkpoint-N` folder, which holds none of the first two, reads its run folder's records.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .model_card import CARD_INPUTS_FILE, TRAINING_ARGS_FILE

PROCESSOR_FILE = "preprocessor_config.json"
# Files of a training output (and of an assembled Hub repository) that record the training crop as "crop_size".
CROP_RECORDS = (CARD_INPUTS_FILE, TRAINING_ARGS_FILE)
CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+$")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def crop_side(value: Any) -> int | None:
    """The side of a recorded crop: an int, [height, width], {"height", "width"} or {"shortest_edge"}; the shorter
    side of a non-square crop; None for anything else."""
    if isinstance(value, Mapping):
        if "height" in value and "width" in value:
            value = [value["height"], value["width"]]
        else:
            value = value.get("shortest_edge")
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        sides = [crop_side(side) for side in value]
        return min(sides) if None not in sides else None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def crop_pair(value: Any) -> tuple[int, int] | None:
    """(height, width) of a recorded crop: a side, [height, width] or {"height", "width"}; None for anything else."""
    if isinstance(value, Mapping):
        value = [value.get("height"), value.get("width")]
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        value = [value, value]
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            return int(value[0]), int(value[1])
    return None


def recorded_training_crop(model_folder: str | Path) -> tuple[tuple[int, int], Path] | None:
    """The training crop (height, width) recorded with a model folder and the file that records it (rules 1 and 2 of
    the module docstring; a `checkpoint-N` folder reads its run folder's records); None if no file records one."""
    folder = Path(model_folder)
    if not folder.is_dir():
        return None
    folders = [folder]
    if CHECKPOINT_NAME.match(folder.resolve().name):
        folders.append(folder.resolve().parent)
    for candidate in folders:
        for name in CROP_RECORDS:
            crop = crop_pair(_read_json(candidate / name).get("crop_size"))
            if crop is not None:
                return crop, candidate / name
    return None


def training_crop_size(model_folder: str | Path) -> int | None:
    """The side of the crop the model in `model_folder` was trained on (see the module docstring; the shorter side of
    a non-square crop); None when the folder records none (or is not a local folder, e.g. a Hub id)."""
    recorded = recorded_training_crop(model_folder)
    if recorded is not None:
        return min(recorded[0])
    folder = Path(model_folder)
    processor = _read_json(folder / PROCESSOR_FILE) if folder.is_dir() else {}
    if processor and processor.get("do_resize") is not False:
        return crop_side(processor.get("size"))
    return None
