"""Data for training ProtoSegformer: built-in offline data sets, loading user data sets, checks and transforms.

Public: `build_builtin_dataset` (the offline data sets named in `BUILTIN_DATASETS`), `load_dataset_any` (a Hub
id, a `save_to_disk` folder, a parquet folder or a folder laid out as ADE20K, Cityscapes or COCO-Stuff distribute
it, as `scripts/train.py --dataset_name` reads) and `find_folder_layout` (which of those layouts a folder has: its
splits, class names, official colours and label conversion to train ids).
"""

from .builtin import BUILTIN_DATASETS, IGNORE_INDEX, build_builtin_dataset
from .layouts import FolderLayout, find_folder_layout
from .loading import load_dataset_any

__all__ = [
    "BUILTIN_DATASETS",
    "IGNORE_INDEX",
    "FolderLayout",
    "build_builtin_dataset",
    "find_folder_layout",
    "load_dataset_any",
]
