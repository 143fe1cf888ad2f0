"""The command-line arguments that scripts/evaluate_model.py and scripts/calibrate_unknown.py share: a model, a
labelled split of any data `train.py` reads, and how the model runs over it (as predict runs it). Each script's own
dataclass adds its options to `LabelledDataArguments`; `check_labelled_data_arguments` checks the shared ones before
torch loads. Importing this module loads nothing heavy (the scripts answer `--help` without torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LabelledDataArguments:
    model: str = field(
        metadata={"help": "Model folder (training output, checkpoint-*, assembled repo); evaluate_model.py: or Hub id."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Any data train.py reads: a built-in name (scenes, voc, ...; builtin:<name>), a Hub id, a"
            " save_to_disk folder, a parquet folder or a folder laid out as ADE20K, Cityscapes or COCO-Stuff"
            " distribute it. Default: builtin:scenes."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub data set configuration."})
    split: str = field(default="validation", metadata={"help": "The labelled split to use (train, validation, test)."})
    mode: str = field(
        default="whole",
        metadata={
            "help": "whole (each image as the image processor gives it: full size as train.py evaluates) or slide"
            " (sliding windows of the training crop, mmsegmentation's slide mode, as predict).",
            "choices": ["whole", "slide"],
        },
    )
    batch_size: int = field(default=4, metadata={"help": "Images (whole mode) or windows (slide) per forward pass."})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or auto."})
    crop_size: int | None = field(
        default=None, metadata={"help": "Sliding window side (default: the training crop recorded with the model)."}
    )
    stride: int | None = field(default=None, metadata={"help": "Sliding window step (default: 2/3 of the crop)."})
    reduce_labels: bool | None = field(
        default=None,
        metadata={"help": "ADE20K labels (0 ignored, others - 1). Default: as the model's image processor says."},
    )
    id2label: str | None = field(
        default=None,
        metadata={
            "help": "json file with the data's class names, when the data set holds none (checked against the model's)."
        },
    )
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (default: found by name)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (default: found by name)."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N samples."})
    check_samples: int = field(
        default=200, metadata={"help": "Samples checked before the run (files, sizes, label values); -1: all."}
    )
    train_val_split: float = field(
        default=0.15, metadata={"help": "A data set without validation split: the part of train held out, as train.py."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of that hold-out (train.py's --seed)."})
    builtin_image_size: int | None = field(
        default=None, metadata={"help": "Built-in data: image side (default: the model's training crop, else 64)."}
    )
    builtin_num_validation: int = field(default=200, metadata={"help": "Built-in data: validation images."})
    builtin_seed: int = field(default=0, metadata={"help": "Built-in data: seed of the generated images."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})


def check_labelled_data_arguments(args: LabelledDataArguments, hub_ids: bool = False) -> None:
    """The shared arguments' paths and values, before torch loads. `hub_ids`: `args.model` may be a Hub id (a name
    with a slash that is not a local path is then left to the loading)."""
    import os

    from .preflight import check_dataset_name, check_existing, check_model_folder

    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}.")
    local = os.path.exists(os.path.expanduser(args.model)) or "/" not in args.model or args.model.startswith(".")
    if local or not hub_ids:
        check_model_folder(args.model)
    check_dataset_name(args.dataset_name)
    if args.id2label is not None:
        check_existing(args.id2label, "--id2label", kind="file")
