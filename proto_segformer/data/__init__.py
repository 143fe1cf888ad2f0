"""Data for training ProtoSegformer: built-in offline data sets, loading user data sets, checks and transforms."""

from .builtin import BUILTIN_DATASETS, IGNORE_INDEX, build_builtin_dataset

__all__ = ["BUILTIN_DATASETS", "IGNORE_INDEX", "build_builtin_dataset"]
