"""Streaming data (`scripts/train.py --streaming`): training samples read as a `datasets.IterableDataset`, nothing
copied into the `datasets` cache.

- Sources: a Hub id or a folder of parquet files (`datasets.load_dataset(..., streaming=True)`: files read as they
  are iterated, no Arrow copy in the cache), a folder of a layout `layouts.find_folder_layout` knows (ADE20K-style,
  Cityscapes, COCO-Stuff: its file list, each file read when its sample comes) or a `save_to_disk` folder (its
  memory-mapped Arrow files).
- Length: unknown, so training needs `--max_steps`. The stream repeats without end (pass e of the data is epoch e of
  the augmentation and of the shuffle); the Trainer sees no epochs, so evaluation and saving go by steps.
- Order: `datasets`' shuffle (its shards in a new order each pass, then a buffer of `SHUFFLE_BUFFER` samples),
  seeded by the data seed and the pass.
- Several processes: accelerate's dispatching (its default for an iterable data set): process 0 reads the stream
  and sends each process its share of every batch, so the processes see each sample once per pass, together, and
  always the same number of batches (no process waits at the end of a pass for one that has none left). Process 0
  decodes for all of them: raise `--dataloader_num_workers` (each worker decodes whole batches in turn).
- Resuming: the stream restarts at the sample the checkpoint's step reached (global step x batch size x gradient
  accumulation x processes), skipping the earlier rows without decoding them (`ProtoSegTrainer.
  get_resumed_dataloader`, instead of the Trainer's skipping, which decodes every batch it skips).
- Validation: a folder's validation split is read as without --streaming (in place); a parquet folder's or Hub
  data set's validation split is read once into memory (undecoded: its files' bytes), nothing in the cache; keep it
  small with `--max_eval_samples`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from .layouts import ConvertedLabels, canonical_split, find_folder_layout
from .loading import SampleCheck, _is_save_to_disk, check_hub_source, load_dataset_any
from .reading import DataError
from .transforms import DEFAULT_IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, AugmentationConfig, train_transform

SHUFFLE_BUFFER = 1000  # samples in datasets' shuffle buffer


def undecoded_stream(stream: datasets.IterableDataset, columns: Sequence[str]) -> datasets.IterableDataset:
    """`stream` with its Image columns among `columns` left undecoded ({"bytes", "path"}), as `loading.undecoded`."""
    features = stream.features or {}
    for column in columns:
        feature = features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            stream = stream.cast_column(column, datasets.Image(decode=False))
    return stream


def in_memory(stream: datasets.IterableDataset, limit: int | None = None) -> datasets.Dataset:
    """The first `limit` rows (all if None) of `stream` as an in-memory `datasets.Dataset` (no cache file)."""
    rows = list(stream if limit is None else stream.take(limit))
    features = stream.features
    if features is not None and rows and set(features) != set(rows[0]):
        features = None
    return datasets.Dataset.from_list(rows, features=features)


@dataclass
class StreamedData:
    """What `load_streaming` found.

    Attributes:
        train: the training split as a stream.
        train_rows: its first rows as a `datasets.Dataset`, for the checks before training and the class names (a
            folder's whole training split, read in place as without --streaming).
        validation: the validation split (None if there is none).
        label_conversion: the layout's label conversion for the training rows (None: labels as stored).
    """

    train: datasets.IterableDataset
    train_rows: datasets.Dataset
    validation: datasets.Dataset | None
    label_conversion: ConvertedLabels | None


def load_streaming(
    dataset_name: str,
    dataset_config_name: str | None = None,
    *,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    max_eval_samples: int | None = None,
    head_size: int = 200,
) -> StreamedData:
    """The training split of `dataset_name` as a stream, its first `head_size` rows in memory, and its validation
    split (see the module's docstring)."""
    path = Path(os.path.expanduser(dataset_name))
    local = path.is_dir() and (_is_save_to_disk(path) or find_folder_layout(path) is not None)
    if local:  # files read in place: the splits come as without --streaming (no copy), training rows as a stream
        splits = load_dataset_any(dataset_name, dataset_config_name, cache_dir=cache_dir, token=token)
        if "train" not in splits:
            raise DataError(f"The data set has no training split; its splits are {sorted(splits)}.")
        layout = find_folder_layout(path)
        conversion = ConvertedLabels(layout) if layout is not None and layout.table is not None else None
        train = splits["train"].with_format(None).to_iterable_dataset()
        return StreamedData(train, splits["train"], splits.get("validation"), conversion)
    if not path.exists():
        check_hub_source(dataset_name, cache_dir)
    try:
        streams = datasets.load_dataset(
            str(path) if path.is_dir() else dataset_name,
            dataset_config_name,
            cache_dir=cache_dir,
            token=token,
            streaming=True,
        )
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as error:
        raise DataError(f"Could not stream the data set {dataset_name!r}: {error}.") from error
    if isinstance(streams, datasets.IterableDataset):
        streams = datasets.IterableDatasetDict({"train": streams})
    streams = {canonical_split(name): stream for name, stream in streams.items()}
    if "train" not in streams:
        raise DataError(f"The data set has no training split; its splits are {sorted(streams)}.")
    validation = streams.get("validation")
    if validation is not None:
        validation = in_memory(undecoded_stream(validation, list(validation.features or {})), max_eval_samples)
    train = streams["train"]
    return StreamedData(
        train, in_memory(undecoded_stream(train, list(train.features or {})), head_size), validation, None
    )


class StreamingSegmentationDataset(torch.utils.data.IterableDataset):
    """Model-ready training samples {"pixel_values", "labels"} from a `datasets.IterableDataset`, without end.

    Pass e over the data is epoch e: its shuffle (`datasets`' buffer shuffle, seeded by `seed` and e) and each
    sample's augmentation (`numpy.random.default_rng([seed, e, i])` for the i-th sample of the pass) depend on e, so
    a run that resumes (`resume_at`) sees the samples and augmentations of the run that was never stopped. Each
    sample is checked as it is read (`loading.checked_row`: an error names the sample and its file). With several
    dataloader workers, worker w of W decodes batches w, w + W, ... (`batch_size` samples each), which the DataLoader
    returns in the stream's order.

    Args:
        stream: the training split as a `datasets.IterableDataset`.
        image_column, label_column, num_labels, augmentation, reduce_labels, ignore_index, seed, image_mean,
            image_std: as `dataset.SegmentationDataset`.
        batch_size: the DataLoader's batch size (per process).
        label_conversion: applied to each row before its check (a layout's `ConvertedLabels`), or None.
        shuffle_buffer: samples in the shuffle buffer (1: the stream's own order).
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        image_column: str,
        label_column: str,
        num_labels: int,
        *,
        augmentation: AugmentationConfig | None = None,
        reduce_labels: bool = False,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        seed: int = 0,
        batch_size: int = 1,
        label_conversion: Callable[[dict[str, list]], dict[str, list]] | None = None,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        split_name: str = "train",
        image_mean: tuple[float, ...] = IMAGENET_MEAN,
        image_std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        stream = undecoded_stream(stream, (image_column, label_column))
        if shuffle_buffer > 1:  # shards in a new order each pass, read one at a time (interleaving several costs
            # `datasets` a 5 s pause at the end of each pass, for parquet files)
            stream = stream.shuffle(seed=int(seed), buffer_size=shuffle_buffer, max_buffer_input_shards=1)
        self.stream = stream
        self.image_column, self.label_column = image_column, label_column
        self.num_labels = int(num_labels)
        self.augmentation = augmentation or AugmentationConfig(ignore_index=ignore_index)
        self.reduce_labels, self.ignore_index = reduce_labels, ignore_index
        self.seed, self.batch_size = int(seed), max(int(batch_size), 1)
        self.label_conversion = label_conversion
        self.split_name = split_name
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.check = SampleCheck(image_column, label_column, self.num_labels, ignore_index, reduce_labels, split_name)
        self.start = 0

    def resume_at(self, samples: int) -> None:
        """Start at sample `samples` of the endless stream (counted over all passes) instead of its beginning."""
        self.start = int(samples)

    def rows(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(pass, index in the pass, undecoded row) of the endless stream."""
        for epoch in itertools.count():
            self.stream.set_epoch(epoch)
            count = 0
            # `iter`, not `__iter__`: in a dataloader worker `datasets` would give each worker its own shards.
            for batch in self.stream.iter(batch_size=self.batch_size):
                for values in zip(*batch.values(), strict=True):
                    count += 1
                    yield epoch, count - 1, dict(zip(batch, values, strict=True))
            if count == 0:
                raise DataError(f"The {self.split_name!r} split is empty.")

    def sample(self, epoch: int, index: int, row: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The training sample of `row`, the `index`-th of pass `epoch`."""
        if self.label_conversion is not None:
            row = {key: value[0] for key, value in self.label_conversion({k: [v] for k, v in row.items()}).items()}
        image, label, _ = self.check(row, index)
        rng = np.random.default_rng([self.seed, epoch, index])
        return train_transform(image, label, rng, self.augmentation, self.image_mean, self.image_std)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        for position, (epoch, index, row) in enumerate(self.rows()):
            if position < self.start or (position - self.start) // self.batch_size % workers != worker:
                continue
            yield self.sample(epoch, index, row)
