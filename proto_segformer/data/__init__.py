"""Data for training ProtoSegformer: built-in offline data sets, loading user data sets, checks and transforms.

Public: `build_builtin_dataset` (the offline data sets named in `BUILTIN_DATASETS`) and `load_dataset_any` (a Hub
id, a `save_to_disk` folder, a parquet folder or an ADE20K-style folder, as `scripts/train.py --dataset_name` reads).
"""

from .builtin import BUILTIN_DATASETS, IGNORE_INDEX, build_builtin_dataset
from .loading import load_dataset_any

__all__ = ["BUILTIN_DATASETS", "IGNORE_INDEX", "build_builtin_dataset", "load_dataset_any"]
