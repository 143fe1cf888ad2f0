"""Command-line training of ProtoSegformer (the logic behind `scripts/train.py`).

Modelled on transformers' `examples/pytorch/semantic-segmentation/run_semantic_segmentation.py`: `HfArgumentParser`
over `ModelArguments`, `DataTrainingArguments` and the full `TrainingArguments`; the Trainer underneath; runs as
`python scripts/train.py ...` and as `accelerate launch scripts/train.py ...`.

With no `--dataset_name` it trains on the built-in offline data set "scenes" with the demo defaults of
`BUILTIN_DEMO_DEFAULTS` (every one of them can still be overridden on the command line).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import HfArgumentParser, SegformerImageProcessorPil, TrainingArguments

from .checkpoint_folders import (
    FINAL_STAGING_DIR,
    MODEL_CARD_FILE,
    ResumeError,
    checkpoint_folders,
    find_resume_checkpoint,
    interrupted_saves,
    listing,
    newest_complete_checkpoint,
    read_trainer_state,
)
from .cli import INTERRUPTED_EXIT_CODE, ArgumentParser, exit_interrupted
from .configuration_proto_segformer import MIT_PRESETS
from .configuration_protoseg import BACKBONE_PRESET_NAMES
from .data.builtin import build_builtin_dataset
from .data.dataset import SegmentationDataset
from .data.layouts import find_folder_layout
from .data.loading import (
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN_CANDIDATES,
    DataError,
    check_split,
    ensure_validation_split,
    id2label_from_dataset,
    infer_num_labels,
    load_dataset_any,
    parse_builtin_name,
    read_id2label_file,
    resolve_column,
)
from .data.streaming import StreamingSegmentationDataset, load_streaming
from .data.transforms import DEFAULT_IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, AugmentationConfig, pad_collate
from .distributed_setup import (
    SETUP_KEY,
    DistributedSetupError,
    accelerator_available,
    check_launch,
    check_trainer,
    precision_problem,
)
from .distributed_setup import setup_record as distributed_setup_record
from .model_building import (
    PROTOSEG_FIELDS,
    ModelInputError,
    ModelSource,
    build_model,
    model_summary,
    read_model_source,
    resume_config_problem,
)
from .output_folders import write_failure_message
from .preflight import check_failed, check_training_command
from .trainer import ProtoSegTrainer, RankPrototypesCallback, TrainingDivergedError
from .trainer_metrics import MeanIoUMetric
from .training import SaveFailedError, save_training_outputs
from .unknown_calibration import calibrate_after_training

logger = logging.getLogger(__name__)

# Files whose presence makes an output folder look like a finished run.
FINAL_OUTPUT_FILES = (
    "model.safetensors",
    "config.json",
    "preprocessor_config.json",
    "README.md",
    "all_results.json",
    "eval_results.json",
    "train_results.json",
)
# Every other file a run writes at the top of its output folder (--overwrite_output_dir removes these names only, and
# the custom-code copies of `hub.custom_code_files`).
OTHER_OUTPUT_FILES = (
    "trainer_state.json",
    "training_args.bin",
    "training_args.json",
    "prototype_stats.json",
    "prototype_patches.safetensors",  # visualize_prototypes --patches_output (explanations.PATCHES_FILE)
)

# Defaults that differ from TrainingArguments' for every run (a segmentation run, evaluated with mean IoU).
COMMON_DEFAULTS: dict[str, Any] = {
    "do_train": True,
    "do_eval": True,
    "remove_unused_columns": False,
    "batch_eval_metrics": True,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "logging_steps": 10,
    "logging_nan_inf_filter": False,  # a NaN loss shows as nan (training stops on it anyway)
    "ddp_find_unused_parameters": False,  # every parameter takes part in every step
    "lr_scheduler_type": "polynomial",
    "learning_rate": 6e-5,
    "weight_decay": 0.01,
    "warmup_steps": 0.05,
    "per_device_eval_batch_size": 1,
    "optim": "adamw_torch",
    "report_to": "none",
}

# With the built-in data (no --dataset_name): a run that shows learning on 2 CPU cores in a few minutes. A slim
# mit-b0 (decoder width 128, D = 64, 5 prototypes per class), trained from scratch on 64x64 scenes.
BUILTIN_DEMO_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "max_steps": 300,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 50,
    "warmup_steps": 20,  # clipped (with a note) when --max_steps is not longer
    "eval_strategy": "steps",
    "eval_steps": 150,
    "save_strategy": "steps",  # a checkpoint at each evaluation (and at the end): resumable
    "save_steps": 150,
    "logging_steps": 25,
    "decoder_hidden_size": 128,
    "prototype_dim": 64,
    "num_prototypes_per_class": 5,
    "crop_size": 64,
    # One intra-op thread: with two, a 2-core machine shared with other jobs ran 17x slower (60 steps: 229 s vs 14 s).
    "torch_threads": 1,
}


# With --streaming: the Trainer sees no epochs (the stream repeats without end), so nothing is done "each epoch".
STREAMING_DEFAULTS: dict[str, Any] = {"eval_strategy": "no", "save_strategy": "steps"}


@dataclass
class ModelArguments:
    """Which model to train: a checkpoint (ours, a parametric SegFormer or UperNet, a MiT or other backbone) or a
    preset (a MiT size or a backbone)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local folder or Hub id of a ProtoSegformer or ProtoSeg checkpoint, a parametric SegFormer"
            " checkpoint (e.g. nvidia/segformer-b0-finetuned-ade-512-512), a MiT backbone (e.g. nvidia/mit-b0), a"
            " parametric UperNet checkpoint (e.g. openmmlab/upernet-convnext-tiny) or a backbone AutoBackbone builds"
            " (e.g. microsoft/resnet-50, facebook/dinov2-small)."
            " Without it, --model_preset builds a model from scratch."
        },
    )
    model_preset: str = field(
        default="mit-b0",
        metadata={
            "help": "The model when training from scratch (random init, offline): a MiT size for ProtoSegformer, one"
            f" of {sorted(MIT_PRESETS)}, or a backbone for ProtoSeg with a UperNet decoder, one of"
            f" {list(BACKBONE_PRESET_NAMES)} (hrnet-*: the timm extra)."
        },
    )
    decoder_type: str | None = field(
        default=None,
        metadata={
            "help": "The decoder of a backbone preset or checkpoint (ProtoSeg): upernet (PPM + FPN, the default) or"
            " mlp (SegFormer's all-MLP decoder).",
            "choices": ["upernet", "mlp"],
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Any other config fields, as 'name=value,name=value' (e.g. 'drop_path_rate=0.2')."},
    )
    decoder_hidden_size: int | None = field(default=None, metadata={"help": "Decoder width (SegFormer field)."})
    classifier_dropout_prob: float | None = field(default=None, metadata={"help": "Decoder dropout."})
    drop_path_rate: float | None = field(default=None, metadata={"help": "Stochastic depth of the encoder."})
    num_prototypes_per_class: int | None = field(default=None, metadata={"help": "M, prototypes per class."})
    prototype_dim: int | None = field(default=None, metadata={"help": "D, embedding width (default: decoder)."})
    prototype_momentum: float | None = field(default=None, metadata={"help": "mu of the prototype update."})
    sinkhorn_epsilon: float | None = field(default=None, metadata={"help": "Sinkhorn-Knopp epsilon."})
    sinkhorn_iterations: int | None = field(default=None, metadata={"help": "Sinkhorn-Knopp iterations."})
    ppc_weight: float | None = field(default=None, metadata={"help": "Weight of the PPC loss."})
    ppd_weight: float | None = field(default=None, metadata={"help": "Weight of the PPD loss."})
    ppc_temperature: float | None = field(default=None, metadata={"help": "Temperature of the PPC loss."})
    inference_chunk_size: int | None = field(default=None, metadata={"help": "Memory bound at inference."})
    prototype_init_batches: int = field(
        default=0,
        metadata={
            "help": "Initialise the prototypes before step one by clustering the embeddings of this many training"
            " batches per process (0: keep the model's prototypes). Not done when resuming."
        },
    )
    prototype_init_max_pixels: int = field(
        default=2000, metadata={"help": "Pixels per class (per process) used by the prototype initialisation."}
    )
    head_learning_rate_multiplier: float = field(
        default=1.0,
        metadata={"help": "The decoder and projection learn with learning_rate times this (SegFormer: 10)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache Hub downloads."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models / data sets."})

    def config_fields(self) -> dict[str, Any]:
        """The config overrides given on the command line."""
        fields = {
            name: getattr(self, name)
            for name in (
                "decoder_hidden_size",
                "decoder_type",
                "classifier_dropout_prob",
                "drop_path_rate",
                *PROTOSEG_FIELDS,
            )
            if getattr(self, name) is not None
        }
        fields.update(parse_config_overrides(self.config_overrides))
        return fields


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on, and the training augmentation."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path: a DatasetDict saved with save_to_disk, a folder of parquet files, an"
            " ADE20K-style folder (images/<split>/*.jpg, annotations/<split>/*.png), or a Cityscapes (leftImg8bit/,"
            " gtFine/), COCO-Stuff-164k or COCO-Stuff-10k folder as distributed (labels converted to train ids)."
            " A built-in offline data set by its name, or as 'builtin:<name>' when a local folder has that name"
            " (scenes, scenes-shape, scenes-large, scenes-large-digits, scenes-fashion, voc, arc2017); none:"
            " builtin:scenes."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub data set configuration."})
    image_column_name: str | None = field(
        default=None, metadata={"help": f"Image column (default: the first of {list(IMAGE_COLUMN_CANDIDATES)})."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": f"Label column (default: the first of {list(LABEL_COLUMN_CANDIDATES)})."}
    )
    id2label: str | None = field(
        default=None,
        metadata={
            "help": "json file with the class names ({'0': 'wall', ...} or a list). Default: from the data set's"
            " features or its id2label.json, else from the model checkpoint, else class_<i>."
        },
    )
    reduce_labels: bool = field(
        default=False,
        metadata={"help": "Label 0 becomes the ignore index and every other label shifts down by one (ADE20K)."},
    )
    train_val_split: float | None = field(
        default=0.15, metadata={"help": "Fraction of train held out for validation when there is no such split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation samples."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the training split as a stream (a datasets IterableDataset) from a Hub id, a parquet folder"
            " or a data set folder: nothing is copied into the datasets cache. Needs --max_steps; evaluation and"
            " saving go by steps. A parquet or Hub validation split is read into memory (see --max_eval_samples)."
        },
    )
    check_samples: int | None = field(
        default=100,
        metadata={
            "help": "Before training, read the first N samples of each split and check them (files, sizes, label"
            " values), shared between the processes; -1 checks every sample. Every sample is checked again when it"
            " is read, and a bad one stops training with an error naming its file."
        },
    )
    crop_size: int | None = field(
        default=None, metadata={"help": "Training crop side (default 512; the built-in data: its image size)."}
    )
    base_size: int | None = field(
        default=None, metadata={"help": "Short side before the random resize ratio (default: the crop size)."}
    )
    min_scale: float = field(default=0.5, metadata={"help": "Smallest random resize ratio."})
    max_scale: float = field(default=2.0, metadata={"help": "Largest random resize ratio."})
    cat_max_ratio: float = field(default=0.75, metadata={"help": "Re-draw crops where a class covers more."})
    photometric_distortion: bool = field(default=True, metadata={"help": "Random brightness/contrast/colour."})
    hue_delta: float | None = field(
        default=None,
        metadata={
            "help": "Hue jitter (+-, OpenCV units; default 18; 0 for the built-in scenes, whose colours matter)."
        },
    )
    builtin_num_train: int = field(default=2000, metadata={"help": "Built-in data: training images."})
    builtin_num_validation: int = field(default=200, metadata={"help": "Built-in data: validation images."})
    builtin_image_size: int = field(default=64, metadata={"help": "Built-in data: image side."})
    builtin_seed: int = field(default=0, metadata={"help": "Built-in data: seed of the generated images."})
    builtin_long_tail: float | None = field(
        default=None,
        metadata={
            "help": "Built-in scenes: Zipf exponent of the training class frequencies (0: uniform; default 1 for"
            " scenes-large and scenes-large-digits, 0 otherwise)."
        },
    )
    torch_threads: int | None = field(
        default=None,
        metadata={"help": "torch intra-op CPU threads per process (default: torch's; the built-in demo: 1)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in an --output_dir that holds a run: first DELETES that run's model files and its"
            " checkpoint-* folders (only files this library writes; anything else in the folder stays)."
        },
    )
    save_rank_prototypes: bool = field(
        default=False,
        metadata={"help": "Write each process's final prototypes to <output_dir>/rank_prototypes/ (a check)."},
    )


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """'a=1,b=0.5,c=[1,2],d=true' -> {'a': 1, 'b': 0.5, 'c': [1, 2], 'd': True} (values parsed as json if they can)."""
    if not text:
        return {}
    result: dict[str, Any] = {}
    depth, start, parts = 0, 0, []
    for i, char in enumerate(text):
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    for part in filter(None, (p.strip() for p in parts)):
        if "=" not in part:
            raise ValueError(f"--config_overrides: {part!r} is not of the form name=value.")
        name, value = (s.strip() for s in part.split("=", 1))
        try:
            result[name] = json.loads(value)
        except json.JSONDecodeError:
            result[name] = value
    return result


def _given(argv: list[str], name: str) -> bool:
    """Whether the flag `--name` is on the command line (or a key of the json file given instead)."""
    if len(argv) == 1 and argv[0].endswith(".json") and os.path.isfile(argv[0]):
        try:
            return name in json.loads(Path(argv[0]).read_text())
        except ValueError:
            return False
    return any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in argv)


def build_parser(argv: list[str]) -> HfArgumentParser:
    """The parser, with the project's defaults (and the demo defaults when no --dataset_name is given).

    `--save_steps N` without `--save_strategy` means saving every N steps (the Trainer would ignore it otherwise)."""
    parser = ArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    defaults = dict(COMMON_DEFAULTS)
    if not torch.cuda.is_available():
        defaults["dataloader_pin_memory"] = False  # pinning needs an accelerator (and warns without one)
    if not _given(argv, "dataset_name"):
        defaults.update(BUILTIN_DEMO_DEFAULTS)
    if _given(argv, "streaming"):  # a stream has no epochs: the final evaluation, a checkpoint every --save_steps
        defaults.update(STREAMING_DEFAULTS)
    if _given(argv, "save_steps") and not _given(argv, "save_strategy"):
        defaults["save_strategy"] = "steps"
    parser.set_defaults(**defaults)
    return parser


# ----------------------------------------------------------------------------------------------------------- data


@dataclass
class PreparedData:
    """The data of a run: the two data sets the Trainer reads, the class names, a name for the card, the crop."""

    train: SegmentationDataset | StreamingSegmentationDataset
    validation: SegmentationDataset
    id2label: dict[int, str]
    dataset_label: str
    crop_size: int


def _builtin_data(builtin: str, data_args: DataTrainingArguments, training_args: TrainingArguments):
    """(DatasetDict, id2label) of a built-in data set."""
    if data_args.id2label is not None:
        raise DataError("--id2label cannot rename the classes of a built-in data set.")
    with training_args.main_process_first():
        try:
            return build_builtin_dataset(
                builtin,
                num_train=data_args.builtin_num_train,
                num_validation=data_args.builtin_num_validation,
                image_size=data_args.builtin_image_size,
                seed=data_args.builtin_seed,
                long_tail=data_args.builtin_long_tail,
            )
        except (ValueError, FileNotFoundError) as error:  # bad builtin_* values, a missing optional package
            raise DataError(f"builtin:{builtin}: {error}") from error


def _named_data(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TrainingArguments):
    """(DatasetDict with a validation split, image column, label column) of --dataset_name."""
    with training_args.main_process_first():
        dataset = load_dataset_any(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    dataset = ensure_validation_split(dataset, data_args.train_val_split, training_args.seed)
    return (dataset, *_columns(dataset, data_args))


def _columns(dataset: datasets.DatasetDict, data_args: DataTrainingArguments) -> tuple[str, str]:
    """(image column, label column) of the training split, which the validation split must have too."""
    columns = dataset["train"].column_names
    image_column = resolve_column(
        columns, data_args.image_column_name, IMAGE_COLUMN_CANDIDATES, "image", "--image_column_name"
    )
    label_column = resolve_column(
        columns, data_args.label_column_name, LABEL_COLUMN_CANDIDATES, "label", "--label_column_name"
    )
    missing = [c for c in (image_column, label_column) if c not in dataset["validation"].column_names]
    if missing:
        raise DataError(
            f"The 'validation' split has no column {missing[0]!r}; its columns are"
            f" {dataset['validation'].column_names}."
        )
    return image_column, label_column


def _class_names(
    dataset, label_column: str, image_column: str, data_args: DataTrainingArguments, checkpoint_id2label, ignore_index
) -> dict[int, str]:
    """The classes of --dataset_name: --id2label, else the data set's, else the checkpoint's, else class_<i> up to
    the largest label value of the first training samples."""
    if data_args.id2label is not None:
        return read_id2label_file(data_args.id2label)
    id2label = id2label_from_dataset(dataset, data_args.dataset_name, label_column) or checkpoint_id2label
    if id2label is not None:
        return id2label
    for split_name in ("train", "validation"):
        if len(dataset[split_name]) == 0:
            raise DataError(f"The {split_name!r} split is empty.")
    num_labels = infer_num_labels(dataset["train"], image_column, label_column, data_args.reduce_labels, ignore_index)
    logger.warning(
        "No class names found (pass --id2label FILE.json): using %d classes class_0..class_%d, from the"
        " largest label value in the first training samples.",
        num_labels,
        num_labels - 1,
    )
    return {i: f"class_{i}" for i in range(num_labels)}


def _first_samples(dataset, data_args: DataTrainingArguments):
    """--max_train_samples and --max_eval_samples applied."""
    for split_name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None:
            dataset[split_name] = dataset[split_name].select(range(min(limit, len(dataset[split_name]))))
    return dataset


def _crop_size(builtin: str | None, data_args: DataTrainingArguments) -> int:
    """--crop_size, by default the built-in data's image size or 512; at least 32 (SegFormer's smallest input)."""
    default = data_args.builtin_image_size if builtin is not None else 512
    crop_size = data_args.crop_size or default
    if crop_size < 32:
        raise DataError(
            f"--crop_size {crop_size} is too small: SegFormer's spatial-reduction attention needs inputs of at least"
            " 32x32 pixels."
        )
    return crop_size


def _augmentation(builtin: str | None, crop_size: int, data_args: DataTrainingArguments, ignore_index: int):
    """The training augmentation (no hue jitter on the built-in scenes, whose colours name the classes)."""
    hue_delta = data_args.hue_delta
    if hue_delta is None:
        hue_delta = 0.0 if builtin and builtin.startswith("scenes") else 18.0
    return AugmentationConfig(
        crop_size=(crop_size, crop_size),
        base_size=data_args.base_size,
        min_scale=data_args.min_scale,
        max_scale=data_args.max_scale,
        cat_max_ratio=data_args.cat_max_ratio,
        photometric_distortion=data_args.photometric_distortion,
        hue_delta=hue_delta,
        ignore_index=ignore_index,
    )


def prepare_data(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    training_args: TrainingArguments,
    *,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    checkpoint_id2label: dict[int, str] | None = None,
) -> PreparedData:
    """Load, split, name and check the data (raises `DataError` naming any problem), and wrap it for the Trainer.

    `ignore_index`: the model's `config.semantic_loss_ignore_index` (label value left out; crops are padded with
    it). `checkpoint_id2label`: the class names of the checkpoint trained from, used when the data name none."""
    # 1. The data set, its columns and its classes.
    if data_args.streaming:
        check_streaming_options(data_args, training_args)
    builtin = parse_builtin_name(data_args.dataset_name)
    if builtin is not None:
        if data_args.dataset_name == builtin:
            message = "--dataset_name %s: no local folder of that name; using the built-in data set builtin:%s."
            logger.info(message, builtin, builtin)
        dataset, id2label = _builtin_data(builtin, data_args, training_args)
        image_column, label_column, dataset_label = "image", "label", f"builtin:{builtin}"
    else:
        layout = find_folder_layout(data_args.dataset_name)  # Cityscapes, COCO-Stuff: options that contradict it
        if layout is not None:
            layout.check_options(data_args.reduce_labels, ignore_index)
        if data_args.streaming:
            return _streamed_data(model_args, data_args, training_args, ignore_index, checkpoint_id2label)
        dataset, image_column, label_column = _named_data(model_args, data_args, training_args)
        id2label = _class_names(dataset, label_column, image_column, data_args, checkpoint_id2label, ignore_index)
        dataset_label = data_args.dataset_name
    # 2. The samples used, checked before training (files, sizes, label values).
    dataset = _first_samples(dataset, data_args)
    _check_data(dataset, image_column, label_column, id2label, data_args, training_args, ignore_index)
    # 3. The training augmentation and the two data sets the Trainer reads.
    crop_size = _crop_size(builtin, data_args)
    common = _dataset_options(image_column, label_column, id2label, data_args, training_args, ignore_index)
    augmentation = _augmentation(builtin, crop_size, data_args, ignore_index)
    train = SegmentationDataset(dataset["train"], train=True, augmentation=augmentation, split_name="train", **common)
    validation = SegmentationDataset(dataset["validation"], train=False, split_name="validation", **common)
    return PreparedData(train, validation, id2label, dataset_label, crop_size)


def _check_data(dataset, image_column, label_column, id2label, data_args, training_args, ignore_index) -> None:
    """The first --check_samples of each split checked (`check_split`), shared between the processes (each checks
    its share: no process waits, none repeats another's work); every sample is checked again as it is read."""
    if len(id2label) < 2:
        raise DataError(f"ProtoSeg needs at least 2 classes; id2label has {len(id2label)}: {id2label}.")
    limit = None if data_args.check_samples is None or data_args.check_samples < 0 else data_args.check_samples
    for split_name in ("train", "validation"):
        check_split(
            dataset[split_name],
            split_name,
            image_column,
            label_column,
            num_labels=len(id2label),
            ignore_index=ignore_index,
            reduce_labels=data_args.reduce_labels,
            max_samples=limit,
            rank=training_args.process_index,
            world_size=training_args.world_size,
            progress=training_args.process_index == 0 and not training_args.disable_tqdm,
        )


def _dataset_options(image_column, label_column, id2label, data_args, training_args, ignore_index) -> dict[str, Any]:
    """The options the training and the validation data set share."""
    return {
        "image_column": image_column,
        "label_column": label_column,
        "num_labels": len(id2label),
        "reduce_labels": data_args.reduce_labels,
        "ignore_index": ignore_index,
        "seed": training_args.data_seed if training_args.data_seed is not None else training_args.seed,
    }


def check_streaming_options(data_args: DataTrainingArguments, training_args: TrainingArguments) -> None:
    """--streaming with options it cannot honour is a `DataError` naming the fix."""
    if parse_builtin_name(data_args.dataset_name) is not None:
        raise DataError(
            "--streaming reads --dataset_name (a Hub id, a parquet folder or a data set folder); the built-in data"
            " sets are made in memory: leave --streaming out."
        )
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise DataError(
            "--streaming reads a stream of unknown length, whose epochs cannot be counted: give the length of"
            " training with --max_steps N."
        )
    for name, steps in (("eval_strategy", "eval_steps"), ("save_strategy", "save_steps")):
        if getattr(training_args, name) == "epoch":
            raise DataError(
                f"--{name} epoch: with --streaming the Trainer sees no epochs (the stream repeats without end); use"
                f" --{name} steps --{steps} N."
            )


def _streamed_data(model_args, data_args, training_args, ignore_index, checkpoint_id2label) -> PreparedData:
    """`prepare_data` with --streaming: the training split as a `StreamingSegmentationDataset` (see
    `data.streaming`), the validation split as a `SegmentationDataset`."""
    with training_args.main_process_first():
        streamed = load_streaming(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
            max_eval_samples=data_args.max_eval_samples,
            head_size=max(200, data_args.check_samples or 0),
        )
    if streamed.validation is None:
        raise DataError(
            "The data set has no validation split, and a stream cannot be split by --train_val_split: give a data set"
            " with a validation split (or train without --streaming)."
        )
    dataset = datasets.DatasetDict({"train": streamed.train_rows, "validation": streamed.validation})
    image_column, label_column = _columns(dataset, data_args)
    id2label = _class_names(dataset, label_column, image_column, data_args, checkpoint_id2label, ignore_index)
    dataset = _first_samples(dataset, data_args)
    _check_data(dataset, image_column, label_column, id2label, data_args, training_args, ignore_index)
    crop_size = _crop_size(None, data_args)
    common = _dataset_options(image_column, label_column, id2label, data_args, training_args, ignore_index)
    stream = streamed.train
    if data_args.max_train_samples is not None:
        stream = stream.take(data_args.max_train_samples)
    train = StreamingSegmentationDataset(
        stream,
        augmentation=_augmentation(None, crop_size, data_args, ignore_index),
        batch_size=training_args.per_device_train_batch_size,
        label_conversion=streamed.label_conversion,
        **common,
    )
    validation = SegmentationDataset(dataset["validation"], train=False, split_name="validation", **common)
    return PreparedData(train, validation, id2label, data_args.dataset_name, crop_size)


# --------------------------------------------------------------------------------------------------- output folder


def resolve_resume(output_dir: Path, resume: str | None) -> str | None:
    """--resume_from_checkpoint: "last"/"true" is the newest complete checkpoint-N in `output_dir` (naming the
    incomplete ones skipped); an explicit folder must be a complete checkpoint (`find_resume_checkpoint`)."""
    if resume is None:
        return None
    try:
        checkpoint, skipped = find_resume_checkpoint(output_dir, resume)
    except ResumeError as error:
        raise DataError(str(error)) from error
    for path, reason in skipped:
        logger.warning("Skipping the incomplete checkpoint %s: %s.", path, reason)
    if resume.lower() in ("last", "true"):
        logger.info("Resuming from %s.", checkpoint)
        return str(checkpoint)
    return resume


class RunFinished(Exception):
    """--resume_from_checkpoint of a run that is finished: nothing to train, nothing is changed (the message)."""


def finished_run_message(output_dir: Path, checkpoint: Path, training_args: TrainingArguments) -> str | None:
    """Why resuming `checkpoint` has nothing to do, if so: `output_dir` holds a finished run (model and card),
    `checkpoint` is its last step, and the requested length (--max_steps, else --num_train_epochs) is not longer."""
    if not ((output_dir / MODEL_CARD_FILE).is_file() and (output_dir / "model.safetensors").is_file()):
        return None
    run_state, state = read_trainer_state(output_dir), read_trainer_state(checkpoint)
    if run_state is None or state is None:
        return None
    step, last_step = int(state.get("global_step", 0)), int(run_state.get("global_step", -1))
    if step < last_step:
        return None  # an earlier checkpoint of the run: training it again was asked for
    if training_args.max_steps > 0:
        target, longer = f"--max_steps {training_args.max_steps}", training_args.max_steps > step
    else:
        epochs, trained_epochs = training_args.num_train_epochs, float(run_state.get("num_train_epochs") or 0)
        target = f"--num_train_epochs {epochs:g}"
        longer = epochs > trained_epochs or step < int(run_state.get("max_steps") or 0)
    if longer:
        return None
    return (
        f"{output_dir} holds a finished run: {checkpoint.name} is its last step (step {step}, {target}). Nothing to"
        " resume; its model and results are unchanged. To train it further, resume with a larger --max_steps (or"
        " --num_train_epochs)."
    )


def output_dir_contents(output_dir: Path) -> dict[str, list[Path]]:
    """What a run left in `output_dir`: final output files, checkpoint-N folders, staging folders of interrupted
    saves."""
    return {
        "final": [output_dir / name for name in FINAL_OUTPUT_FILES if (output_dir / name).exists()],
        "checkpoints": checkpoint_folders(output_dir),
        "interrupted": interrupted_saves(output_dir),
    }


def library_files(output_dir: Path) -> list[Path]:
    """The files and folders of `output_dir` that a run of this library writes (and nothing else): the final output
    files, the custom-code copies, checkpoint-N and staging folders, rank_prototypes/prototypes_rank*.pt."""
    from .hub import custom_code_files
    from .model_types import MODEL_TYPES

    code = {path.name for model_type in MODEL_TYPES for path in custom_code_files(model_type)}
    names = set(FINAL_OUTPUT_FILES) | set(OTHER_OUTPUT_FILES) | code
    found = [output_dir / name for name in sorted(names) if (output_dir / name).is_file()]
    found += checkpoint_folders(output_dir) + interrupted_saves(output_dir)
    ranks = output_dir / "rank_prototypes"
    found += sorted(ranks.glob("prototypes_rank*.pt")) if ranks.is_dir() else []
    return found


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for folder in {path.parent for path in paths if path.parent.name == "rank_prototypes"}:
        if not any(folder.iterdir()):
            folder.rmdir()


def prepare_output_dir(training_args: TrainingArguments, data_args: DataTrainingArguments) -> str | None:
    """Resolve --resume_from_checkpoint (see `resolve_resume`) and refuse to start a fresh run in a folder that
    holds a run (finished, interrupted, or only checkpoints), naming --resume_from_checkpoint and
    --overwrite_output_dir (which deletes that run's files, and only those)."""
    output_dir = Path(training_args.output_dir)
    resume = resolve_resume(output_dir, training_args.resume_from_checkpoint)
    if resume is not None:
        finished = finished_run_message(output_dir, Path(resume), training_args)
        if finished is not None:
            raise RunFinished(finished)
        stale = interrupted_saves(output_dir)  # the staging folders of this library's interrupted saves
        with training_args.main_process_first(desc="removing staging folders"):
            if training_args.process_index == 0 and stale:
                logger.warning("Removing the staging folders of interrupted saves: %s.", listing(stale))
                _remove(stale)
        return resume
    if not training_args.do_train or not output_dir.is_dir():
        return None
    contents = output_dir_contents(output_dir)
    if not any(contents.values()):
        return None
    if data_args.overwrite_output_dir:
        removed = library_files(output_dir)
        with training_args.main_process_first(desc="removing the previous run"):
            if training_args.process_index == 0:
                _remove(removed)
        logger.warning("--overwrite_output_dir: deleted the previous run in %s (%s).", output_dir, listing(removed))
        return None
    raise DataError(refusal_message(output_dir, contents))


def refusal_message(output_dir: Path, contents: dict[str, list[Path]]) -> str:
    """Why a fresh run does not start in `output_dir`, and the options (what each one does)."""
    finished = (output_dir / MODEL_CARD_FILE).exists() and any(p.name == "model.safetensors" for p in contents["final"])
    checkpoint, _ = newest_complete_checkpoint(output_dir)
    if finished:
        state = f"a finished run ({listing(contents['final'])})"
    elif contents["final"] or any(p.name == FINAL_STAGING_DIR for p in contents["interrupted"]):
        state = "a run whose final save was interrupted (no model card)"
    else:
        state = "an unfinished run"
    if contents["checkpoints"]:
        state += f" with checkpoints {listing(contents['checkpoints'])}"
    options = []
    if checkpoint is not None:
        options.append(f"continue it from {checkpoint.name} with --resume_from_checkpoint last")
    options.append(
        "delete it and start over with --overwrite_output_dir (deletes its model files and checkpoint-* folders)"
    )
    options.append("or pick another --output_dir")
    return f"{output_dir} already holds {state}. Options: " + "; ".join(options) + "."


def image_processor_for(model_args: ModelArguments, reduce_labels: bool) -> SegformerImageProcessorPil:
    """The processor that reproduces the evaluation transform: full size (no resize), the checkpoint's
    normalisation (ImageNet's by default), reduce_labels as trained."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if model_args.model_name_or_path is not None:
        try:
            source = SegformerImageProcessorPil.from_pretrained(
                model_args.model_name_or_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision
            )
            mean, std = tuple(source.image_mean), tuple(source.image_std)
        except OSError:
            pass
    return SegformerImageProcessorPil(
        do_resize=False, image_mean=list(mean), image_std=list(std), do_reduce_labels=reduce_labels
    )


# ------------------------------------------------------------------------------------------------------------ main


def _set_up_process(data_args: DataTrainingArguments, training_args: TrainingArguments) -> None:
    """Log levels (this package, transformers, datasets) and --torch_threads."""
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    datasets.utils.logging.set_verbosity(training_args.get_process_log_level())
    logging.getLogger("proto_segformer").setLevel(training_args.get_process_log_level())  # all of the package
    if data_args.torch_threads is not None:
        if data_args.torch_threads < 1:
            raise DataError(f"--torch_threads must be >= 1, got {data_args.torch_threads}.")
        torch.set_num_threads(data_args.torch_threads)


def model_ignore_index(source: ModelSource | None, overrides: dict[str, Any]) -> int:
    """The model's `semantic_loss_ignore_index`, known before it is built: --config_overrides', else the checkpoint's
    config.json's, else the config default. The data are padded with it and the metric leaves it out."""
    value = overrides.get("semantic_loss_ignore_index")
    if value is None and source is not None:
        value = source.config.get("semantic_loss_ignore_index")
    return DEFAULT_IGNORE_INDEX if value is None else int(value)


def run_training(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TrainingArguments
) -> dict[str, Any]:
    """Train and evaluate; returns {"train": metrics, "eval": metrics, "output_dir": path}. The steps, in order."""
    start = time.monotonic()
    _set_up_process(data_args, training_args)
    # The distributed mode asked for is the one that runs (one line otherwise), checked before any folder is touched.
    check_launch(os.environ, training_args)

    # 1. The checkpoint to start from: a mistyped path fails at once, before the data are read; config.json is read
    #    here, once (its classes, its ignore index, then the model's config).
    source = None
    if model_args.model_name_or_path is not None:
        source = read_model_source(
            model_args.model_name_or_path, model_args.cache_dir, model_args.model_revision, model_args.token
        )
    overrides = model_args.config_fields()
    ignore_index = model_ignore_index(source, overrides)

    # 2. The output folder: the checkpoint to resume from, or a fresh start (a folder holding a run is refused).
    resume = prepare_output_dir(training_args, data_args)

    # 3. The data, with the normalisation of the image processor saved with the model.
    checkpoint_id2label = source.id2label() if source is not None else None
    data = prepare_data(
        model_args, data_args, training_args, ignore_index=ignore_index, checkpoint_id2label=checkpoint_id2label
    )
    image_processor = image_processor_for(model_args, data_args.reduce_labels)
    data.train.image_mean, data.train.image_std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
    data.validation.image_mean, data.validation.image_std = data.train.image_mean, data.train.image_std

    # 4. The model. Its random initialisation comes from the seed too (the Trainer seeds only when it is created).
    if training_args.full_determinism:
        transformers.enable_full_determinism(training_args.seed)
    else:
        transformers.set_seed(training_args.seed)
    model, description = build_model(
        model_name_or_path=model_args.model_name_or_path,
        model_preset=model_args.model_preset,
        id2label=data.id2label,
        overrides=overrides,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        source=source,
    )
    if model.config.semantic_loss_ignore_index != ignore_index:  # e.g. null in the checkpoint's config.json
        raise ModelInputError(
            f"The model's semantic_loss_ignore_index is {model.config.semantic_loss_ignore_index!r}: give the label"
            " value to leave out with --config_overrides semantic_loss_ignore_index=N."
        )
    if resume is not None:
        problem = resume_config_problem(resume, model.config)
        if problem is not None:
            raise ModelInputError(problem)
        description = f"{model_summary(model.config)}, resuming {Path(resume).name} of {training_args.output_dir}"
    logger.info("Model: %s; %d classes; data: %s", description, len(data.id2label), data.dataset_label)

    # 5. Train, evaluate, save.
    return _train_and_save(model_args, data_args, training_args, model, data, image_processor, resume, start)


def _train_and_save(model_args, data_args, training_args, model, data, image_processor, resume, start):
    """Train (from `resume` if given), evaluate and write the output folder; Ctrl-C from here on is
    `TrainingInterrupted` with the step reached."""
    callbacks = []
    if data_args.save_rank_prototypes:
        callbacks.append(RankPrototypesCallback(Path(training_args.output_dir) / "rank_prototypes"))
    trainer = ProtoSegTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train if training_args.do_train else None,
        eval_dataset=data.validation if training_args.do_eval else None,
        data_collator=functools.partial(pad_collate, ignore_index=model.config.semantic_loss_ignore_index),
        compute_metrics=MeanIoUMetric(data.id2label),
        callbacks=callbacks,
        head_learning_rate_multiplier=model_args.head_learning_rate_multiplier,
        prototype_init_batches=model_args.prototype_init_batches,
        prototype_init_max_pixels=model_args.prototype_init_max_pixels,
    )
    check_trainer(os.environ, trainer)  # FSDP / DeepSpeed asked for and active
    setup = distributed_setup_record(trainer)
    results: dict[str, Any] = {"output_dir": training_args.output_dir, SETUP_KEY: setup}
    train_metrics = None
    try:
        if training_args.do_train:
            train_result = trainer.train(resume_from_checkpoint=resume)
            # Nothing left to train (a resumed run at its last step): the results of the training stay.
            train_metrics = dict(train_result.metrics) or previous_results(training_args.output_dir, "train")
            results["train"] = train_metrics
        eval_metrics = None
        if training_args.do_eval:
            eval_metrics = trainer.final_evaluation()
            results["eval"] = eval_metrics
            # Every process runs the same forwards over the whole split (a sharded model gathers its weights in
            # each), so each holds the same threshold; the main process saves it with the config.
            calibrate_after_training(
                model, image_processor, data.validation, data.crop_size, training_args.per_device_eval_batch_size
            )
        save_training_outputs(
            trainer,
            training_args.output_dir,
            image_processor=image_processor,
            train_metrics=train_metrics,
            eval_metrics=eval_metrics,
            dataset_name=data.dataset_label,
            base_model=model_args.model_name_or_path,
            extra_card_args={"crop_size": data.crop_size},
            distributed_setup=setup,
        )
    except KeyboardInterrupt:
        raise TrainingInterrupted(trainer.state.global_step) from None
    if training_args.process_index == 0:
        print(run_summary(training_args.output_dir, eval_metrics, time.monotonic() - start, trainer.state.global_step))
    return results


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def run_summary(output_dir: str, eval_metrics: dict[str, Any] | None, seconds: float, steps: int) -> str:
    """The last lines of a run: where the model is, its validation scores, the time, and what to run next."""
    scripts = Path(sys.argv[0]).parent if Path(sys.argv[0]).name == "train.py" else Path("scripts")
    lines = [f"Training done in {_duration(seconds)} ({steps} steps). Model: {output_dir}"]
    if eval_metrics is not None and "eval_mean_iou" in eval_metrics:
        lines.append(
            f"Validation: mean IoU {eval_metrics['eval_mean_iou']:.3f}, pixel accuracy"
            f" {eval_metrics['eval_overall_accuracy']:.3f} (per class: {Path(output_dir) / 'eval_results.json'})"
        )
    lines += [
        "Next:",
        f"  python {scripts / 'predict.py'} --model {output_dir} --inputs IMAGES_OR_FOLDER --output_dir predictions",
        f"  python {scripts / 'push_to_hub.py'} --model {output_dir} --repo_id YOU/NAME",
    ]
    return "\n".join(lines)


def previous_results(output_dir: str | Path, split: str) -> dict[str, Any] | None:
    """The `<split>_results.json` an earlier save wrote into `output_dir`, if readable."""
    try:
        results = json.loads((Path(output_dir) / f"{split}_results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and results else None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run: the global step reached (None before training started)."""

    def __init__(self, step: int | None) -> None:
        super().__init__(step)
        self.step = step


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same options with --resume_from_checkpoint last."""
    script = sys.argv[0] if Path(sys.argv[0]).name == "train.py" else "scripts/train.py"
    launcher = ["accelerate", "launch"] if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ["python"]
    if len(argv) == 1 and argv[0].endswith(".json"):
        return f'{shlex.join([*launcher, script, argv[0]])} with "resume_from_checkpoint": "last" in {argv[0]}'
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in ("--resume_from_checkpoint", "--resume-from-checkpoint"):
            skip = "=" not in arg
            continue
        kept.append(arg)
    return shlex.join([*launcher, script, *kept, "--resume_from_checkpoint", "last"])


def _resume_hint(output_dir: str, argv: list[str]) -> str:
    checkpoint, _ = newest_complete_checkpoint(output_dir)
    if checkpoint is None:
        return "no checkpoint was saved yet: run the command again to start over"
    return f"resume with: {resume_command(argv)} (continues from {checkpoint.name})"


def interrupted_message(step: int | None, output_dir: str, argv: list[str]) -> str:
    """One line for Ctrl-C: where the run stopped and how to continue it."""
    if step is None:
        return "interrupted before training started; nothing was trained: run the command again to start."
    return f"interrupted at step {step}; {_resume_hint(output_dir, argv)}."


def save_failed_message(error: SaveFailedError, argv: list[str]) -> str:
    """One line for a failed save (a full disk, most often): the folder, the cause, what is intact, how to go on."""
    checkpoint, _ = newest_complete_checkpoint(error.folder)
    if checkpoint is None:
        intact = "No checkpoint was saved before; free some space and run the command again."
    else:
        intact = (
            f"The checkpoints saved before are intact (newest: {checkpoint.name}); free some space, then"
            f" {_resume_hint(str(error.folder), argv)}."
        )
    cause = error.__cause__ or error
    return write_failure_message(cause, error.folder, error.what, intact, disk_full=error.disk_full, free=error.free)


def error_line(error: Exception) -> str:
    """The message of `error`; for one a dataloader worker raised (torch re-raises it with the worker's traceback
    as its message), the original message alone."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of scripts/train.py. User errors (data, arguments) exit with a one-paragraph message; Ctrl-C
    with one line saying how to resume (exit code 130); a failed save (a full disk) with one line (exit code 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if check_failed(check_training_command, argv):  # scripts/train.py did it before torch loaded, main() may not
        raise SystemExit(2)
    problem = precision_problem(argv, accelerator_available())  # transformers would answer with a traceback
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    parser = build_parser(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    first = training_args.process_index == 0
    try:
        return run_training(model_args, data_args, training_args)
    except (DataError, ModelInputError, DistributedSetupError) as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunFinished as finished:
        if first:
            print(finished)
        raise SystemExit(0) from None
    except KeyboardInterrupt as interrupt:
        if not first:
            raise SystemExit(INTERRUPTED_EXIT_CODE) from None
        step = interrupt.step if isinstance(interrupt, TrainingInterrupted) else None
        exit_interrupted(interrupted_message(step, training_args.output_dir, argv))
    except SaveFailedError as error:
        if first:
            print(f"error: {save_failed_message(error, argv)}", file=sys.stderr)
        raise SystemExit(1) from None
    except TrainingDivergedError as error:  # raised on every process at the same step
        if training_args.process_index == 0:
            print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
