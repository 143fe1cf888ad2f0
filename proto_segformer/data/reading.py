"""Reading one file of a data set, naming it when that fails: `DataError` (a problem with the user's data, with a
message that names it) and `decode_image` (an image or label from whatever a data set column holds)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """A problem with the user's data set (columns, labels, sizes, files), with a message that names it."""


def decode_image(value: Any, what: str) -> Image.Image | np.ndarray:
    """A PIL image (or an array, for array-valued labels) from whatever a data set column holds: PIL image, path,
    {"bytes", "path"} dict, nested lists / array. Raises `DataError` naming `what` and the file."""
    if isinstance(value, Image.Image):
        return value
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    try:
        if isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif path:
            image = Image.open(path)
        elif isinstance(value, np.ndarray | list):
            return np.asarray(value)
        else:
            raise DataError(f"{what}: expected an image, got {type(value).__name__}.")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        where = f" ({path})" if path else ""
        raise DataError(f"{what}{where}: cannot read the file ({error}).") from error
    return image
