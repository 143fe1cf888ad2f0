"""A torch Dataset over a `datasets.Dataset` split that yields model-ready samples.

`SegmentationDataset[i]` reads sample i (naming it when a file is unreadable), converts the image to RGB, prepares
the label (reduce_labels, checks), and applies the training augmentation or the full-size evaluation transform.
Augmentation randomness is `numpy.random.default_rng([seed, epoch, i])`: independent of the global random state,
of the number of dataloader workers and of the order in which batches are fetched, so an interrupted run that
resumes from a checkpoint sees exactly the augmentations of the run that was never stopped.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch

from .loading import SampleCheck, undecoded
from .transforms import (
    DEFAULT_IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentationConfig,
    eval_transform,
    train_transform,
)


class SegmentationDataset(torch.utils.data.Dataset):
    """Model-ready samples {"pixel_values": (3, H, W) float32, "labels": (H, W) int64} from a `datasets` split.

    Args:
        split: the `datasets.Dataset`.
        image_column, label_column: its columns.
        num_labels: K; label values must lie in [0, K) or be `ignore_index` (after `reduce_labels`).
        train: apply `augmentation` (else: full size, normalisation only).
        augmentation: the SegFormer training recipe parameters.
        seed: seed of the augmentation; call `set_epoch` at each epoch.
        image_mean, image_std: normalisation (of [0, 1] values), from the image processor.
    """

    def __init__(
        self,
        split: datasets.Dataset,
        image_column: str,
        label_column: str,
        num_labels: int,
        *,
        train: bool,
        augmentation: AugmentationConfig | None = None,
        reduce_labels: bool = False,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        seed: int = 0,
        split_name: str | None = None,
        image_mean: tuple[float, ...] = IMAGENET_MEAN,
        image_std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        self.split = split
        self._undecoded = undecoded(split, (image_column, label_column))
        self.image_column = image_column
        self.label_column = label_column
        self.num_labels = int(num_labels)
        self.train = train
        self.augmentation = augmentation or AugmentationConfig(ignore_index=ignore_index)
        self.reduce_labels = reduce_labels
        self.ignore_index = ignore_index
        self.seed = int(seed)
        self.epoch = 0
        self.split_name = split_name or ("train" if train else "validation")
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.check = SampleCheck(
            image_column, label_column, self.num_labels, ignore_index, reduce_labels, self.split_name
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of this epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.split)

    def rng(self, index: int) -> np.random.Generator:
        """The random generator of sample `index` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def load(self, index: int) -> tuple:
        """(PIL image, (H, W) int64 label) of sample `index`, checked (`loading.checked_row`: an error names the
        sample and its file)."""
        image, array, _ = self.check(self._undecoded[index], index)
        return image, array

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = self.load(index)
        if self.train:
            return train_transform(image, label, self.rng(index), self.augmentation, self.image_mean, self.image_std)
        return eval_transform(image, label, self.image_mean, self.image_std)
