"""Training ProtoSegformer with the Hugging Face Trainer.

- `ProtoSegTrainer`: a `Trainer` that logs CE / PPC / PPD separately, evaluates mean IoU with memory independent of
  the data set (each sample's logits are reduced to per-class areas inside the evaluation step), can use a larger
  learning rate for the decoder and projection than for the encoder, and initialises the prototypes from data
  (clustering the embeddings of the first training batches) before step one.
- `MeanIoUMetric`: `compute_metrics` for `batch_eval_metrics=True` (and False): the Hub `mean_iou` values.
- `build_model`: a ProtoSegformer from our checkpoint, a parametric SegFormer checkpoint, a MiT backbone
  checkpoint, or a MiT preset, with config overrides.
- `save_training_outputs`: the output folder (weights, config with auto_map and id2label, custom code, image
  processor, model card, results json files), written into a staging folder and moved into place, card last.

Checkpoints are written into `tmp-checkpoint-N/` and renamed to `checkpoint-N/` once every process has written its
part, so a `checkpoint-N` folder is always complete (`checkpoint_problem` checks one; `newest_complete_checkpoint`
finds the one to resume from). A non-finite loss stops training on every process with `TrainingDivergedError`.
`PROTOSEG_FAULT=<point>[@<step>]` (the test hook `folder_writer.fault_point`) kills the process at a named point of
a save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import PretrainedConfig, Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints

from .checkpoint_folders import (
    CHECKPOINT_PATTERN,
    CHECKPOINT_PREFIX,
    CHECKPOINT_STAGING_PREFIX,
    FINAL_STAGING_DIR,
    MODEL_CARD_FILE,
    TRAINER_STATE_FILE,
    checkpoint_folders,
    checkpoint_problem,
    interrupted_saves,
    is_staging_folder,
    newest_complete_checkpoint,
)
from .configuration_proto_segformer import ProtoSegformerConfig
from .folder_writer import fault_point, publish_files
from .label_maps import upsampled_argmax
from .metrics import metrics_from_areas
from .modeling_proto_segformer import ProtoSegformerForSemanticSegmentation, conversion_summary
from .output_folders import free_bytes, is_disk_full, is_write_failure
from .paths import check_source
from .prototype_math import cluster_prototypes

logger = logging.getLogger(__name__)
assert CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR, "checkpoint_folders.CHECKPOINT_PREFIX differs from transformers'"

# Every ProtoSeg field of the config (the CLI exposes each of them).
PROTOSEG_FIELDS = (
    "num_prototypes_per_class",
    "prototype_dim",
    "prototype_momentum",
    "sinkhorn_epsilon",
    "sinkhorn_iterations",
    "ppc_weight",
    "ppd_weight",
    "ppc_temperature",
    "inference_chunk_size",
)
HEAD_PREFIXES = ("decode_head.", "projection.")
LOSS_PARTS = ("loss_ce", "loss_ppc", "loss_ppd")
LOSS_PART_NAMES = ("CE", "PPC", "PPD")


class ModelInputError(ValueError):
    """A model the user asked for cannot be built or loaded (bad path, wrong kind of checkpoint, bad config value)."""


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite: training stopped (on every process) and nothing more was saved."""


class SaveFailedError(OSError):
    """Writing `what` (a checkpoint, the final model) into `folder` failed (a full disk, most often); raised from
    the write error. Its staging folder was removed; the checkpoints written before are intact."""

    def __init__(self, what: str, folder: str | Path, error: BaseException) -> None:
        super().__init__(f"Could not write {what} into {folder}: {error}")
        self.what, self.folder = what, Path(folder)
        # Measured now, before the half-written files go: torch.save's error has no errno.
        self.disk_full, self.free = is_disk_full(error, folder), free_bytes(folder)


# Config fields that fix the shapes of the weights (and the meaning of the prototypes): a checkpoint resumes only
# into a model that agrees on all of them.
RESUME_FIELDS = (
    "num_labels",
    "num_prototypes_per_class",
    "prototype_dim",
    "decoder_hidden_size",
    "hidden_sizes",
    "depths",
    "num_attention_heads",
    "num_encoder_blocks",
    "sr_ratios",
    "patch_sizes",
    "strides",
    "mlp_ratios",
    "num_channels",
)


def divergence_message(step: int, values: torch.Tensor, learning_rate: float) -> str:
    """The error for a non-finite loss: `values` (processes, 1 or 4) holds each process's loss (and CE, PPC, PPD
    when the model reports them)."""
    finite = torch.isfinite(values[:, 0])
    bad_rank = 0 if bool(finite.all()) else int((~finite).nonzero()[0, 0])
    loss, parts = values[bad_rank, 0].item(), values[bad_rank, 1:]
    known = [(name, value.item()) for name, value in zip(LOSS_PART_NAMES, parts)]
    bad_terms = [name for name, value in known if not math.isfinite(value)]
    where = f" on process {bad_rank}" if values.shape[0] > 1 else ""
    terms = ", ".join(f"{name} {value:.4g}" for name, value in known)
    culprit = f"; non-finite: {', '.join(bad_terms)}" if bad_terms else ""
    detail = f" ({terms}{culprit})" if known else ""
    return (
        f"Training diverged at step {step}: the loss is {loss}{where}{detail}. Training stopped; no final"
        f" model was saved (checkpoints written before step {step} are kept). Lower the learning rate (now"
        f" {learning_rate:g}: try --learning_rate {learning_rate / 10:g}) or add warm-up (--warmup_steps), then start"
        " again or resume from an earlier checkpoint."
    )


# ---------------------------------------------------------------------------------------------------------- metrics


def segmentation_areas(predictions: torch.Tensor, labels: torch.Tensor, num_labels: int, ignore_index: int):
    """Per-sample areas (B, 3, K) int64: intersection, predicted area, reference area of each class.

    Same definitions as the Hub `mean_iou` metric: pixels labelled `ignore_index` are left out; a reference value
    outside [0, K) counts in no reference area, while the prediction at that pixel still counts.
    """
    batch = predictions.shape[0]
    predictions = predictions.reshape(batch, -1).long()
    labels = labels.reshape(batch, -1).long()
    keep = labels != ignore_index
    offsets = torch.arange(batch, device=labels.device)[:, None] * num_labels

    def count(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        flat = (values + offsets)[mask]
        return torch.bincount(flat, minlength=batch * num_labels).view(batch, num_labels)

    label_in_range = keep & (labels >= 0) & (labels < num_labels)
    prediction_in_range = keep & (predictions >= 0) & (predictions < num_labels)
    intersection = count(labels, label_in_range & (predictions == labels))
    return torch.stack([intersection, count(predictions, prediction_in_range), count(labels, label_in_range)], dim=1)


class MeanIoUMetric:
    """`compute_metrics` for the Trainer: sums per-sample areas batch by batch (`batch_eval_metrics=True`) or all at
    once, and returns mean_iou, mean_accuracy, overall_accuracy (and per-class iou_<name> / accuracy_<name> when
    there are at most `per_category_limit` classes).
    """

    def __init__(self, id2label: Mapping[int, str], per_category_limit: int = 32) -> None:
        self.id2label = {int(k): v for k, v in id2label.items()}
        self.num_labels = len(self.id2label)
        self.per_category_limit = per_category_limit
        self.areas = np.zeros((3, self.num_labels), dtype=np.float64)

    def __call__(self, eval_prediction, compute_result: bool = True) -> dict[str, float] | None:
        areas = eval_prediction.predictions
        if isinstance(areas, tuple | list):
            areas = areas[0]
        if isinstance(areas, torch.Tensor):
            areas = areas.detach().cpu().numpy()
        areas = np.asarray(areas, dtype=np.float64)
        if areas.ndim != 3 or areas.shape[1:] != (3, self.num_labels):
            raise ValueError(
                f"MeanIoUMetric expects per-sample areas of shape (N, 3, {self.num_labels}) from ProtoSegTrainer's"
                f" evaluation, got {areas.shape}."
            )
        self.areas += areas.sum(axis=0)
        if not compute_result:
            return None
        intersection, predicted, reference = self.areas
        result = metrics_from_areas(intersection, predicted + reference - intersection, predicted, reference)
        self.areas[...] = 0.0
        metrics = {name: float(result[name]) for name in ("mean_iou", "mean_accuracy", "overall_accuracy")}
        if self.num_labels <= self.per_category_limit:
            for index, name in self.id2label.items():
                metrics[f"iou_{name}"] = float(result["per_category_iou"][index])
                metrics[f"accuracy_{name}"] = float(result["per_category_accuracy"][index])
        return metrics


# ----------------------------------------------------------------------------------------------------------- model


def _mit_weights_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The SegFormer fields of a checkpoint's config (drops the parametric head's and the wrapper's keys)."""
    drop = {"architectures", "auto_map", "model_type", "transformers_version", "id2label", "label2id", "num_labels"}
    return {k: v for k, v in config_dict.items() if k not in drop and not k.startswith("_")}


def _checkpoint_config(model_name_or_path, config_dict, overrides, label_fields, id2label, hub_kwargs):
    """(ProtoSegformerConfig, whether the classes are the checkpoint's, a description) for a checkpoint's config."""
    model_type = config_dict.get("model_type")
    if model_type == "proto_segformer":
        same_classes = {int(k): v for k, v in (config_dict.get("id2label") or {}).items()} == id2label
        config = ProtoSegformerConfig.from_pretrained(model_name_or_path, **hub_kwargs, **overrides, **label_fields)
        return config, same_classes, "ProtoSegformer checkpoint"
    if model_type == "segformer":
        config = ProtoSegformerConfig(**{**_mit_weights_config(config_dict), **overrides, **label_fields})
        architectures = config_dict.get("architectures") or ["SegformerModel"]
        return config, False, f"{architectures[0]} checkpoint"
    raise ModelInputError(
        f"{model_name_or_path!r} holds a {model_type!r} model; expected a proto_segformer or segformer checkpoint"
        " (a MiT backbone such as nvidia/mit-b0, or a SegFormer such as nvidia/segformer-b0-finetuned-ade-512-512)."
    )


def model_summary(config: PretrainedConfig) -> str:
    """A few words on a model's size: 'MiT widths [8, 16, 24, 32], decoder 32, 3 prototypes x 16 per class'."""
    dim = getattr(config, "prototype_dim", None) or config.decoder_hidden_size
    return (
        f"MiT widths {list(config.hidden_sizes)}, decoder {config.decoder_hidden_size},"
        f" {config.num_prototypes_per_class} prototypes x {dim} per class"
    )


def resume_config_problem(checkpoint: str | Path, config: PretrainedConfig) -> str | None:
    """Why the checkpoint cannot be resumed into a model of `config` (the `RESUME_FIELDS` and class names that
    differ, with the fix), or None."""
    try:
        saved = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # checkpoint_problem has looked at it; loading reports anything else
    current = config.to_dict()
    differing = [
        f"{name} {saved.get(name)} there, {current.get(name)} now"
        for name in RESUME_FIELDS
        if saved.get(name) != current.get(name)
    ]
    names = [{str(k): str(v) for k, v in (dict_.get("id2label") or {}).items()} for dict_ in (saved, current)]
    if saved.get("num_labels") == current.get("num_labels") and names[0] != names[1]:
        differing.append("the class names (id2label)")
    if not differing:
        return None
    return (
        f"--resume_from_checkpoint {checkpoint} holds a model of another configuration: {'; '.join(differing)}."
        " Resume with the options the run was started with (see its config.json and training_args.json), or"
        " start a new run in another --output_dir."
    )


def check_model_source(model_name_or_path: str, cache_dir: str | None = None) -> None:
    """`ModelInputError` at once (one line) for a local-looking path that does not exist or a Hub id that cannot be
    fetched (not cached, Hub unreachable): `proto_segformer.paths.check_source`."""
    try:
        check_source(model_name_or_path, cache_dir=cache_dir)
    except OSError as error:
        raise ModelInputError(str(error)) from error


def build_model(
    *,
    model_name_or_path: str | None,
    model_preset: str | None,
    id2label: Mapping[int, str],
    overrides: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
    revision: str = "main",
    token: str | bool | None = None,
) -> tuple[ProtoSegformerForSemanticSegmentation, str]:
    """A ProtoSegformer for the classes `id2label`, and a description of where its weights came from.

    `model_name_or_path` (local folder or Hub id) may hold: our checkpoint (its prototypes are kept when the classes
    are the same, re-initialised otherwise), a parametric SegFormer checkpoint (`SegformerForSemanticSegmentation`:
    encoder and decoder load, the classifier is dropped), or a MiT backbone (`SegformerForImageClassification` /
    `SegformerModel`: the encoder loads). Without it, `model_preset` ("mit-b0" .. "mit-b5") builds a model from
    scratch. `overrides` set any config field (ProtoSeg fields, decoder_hidden_size, dropouts, ...).
    """
    id2label = {int(k): str(v) for k, v in id2label.items()}
    label_fields = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}, "num_labels": len(id2label)}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if model_name_or_path is None:
        try:
            config = ProtoSegformerConfig.from_preset(model_preset or "mit-b0", **overrides, **label_fields)
        except (ValueError, TypeError) as error:
            raise ModelInputError(f"Invalid model configuration: {error}") from error
        return ProtoSegformerForSemanticSegmentation(config), f"{model_preset or 'mit-b0'} preset, random init"

    hub_kwargs = {"cache_dir": cache_dir, "revision": revision, "token": token}
    check_model_source(model_name_or_path, cache_dir)
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(model_name_or_path, **hub_kwargs)
    except OSError as error:
        raise ModelInputError(
            f"Could not load a model config from {model_name_or_path!r}: {error}. Give a folder with config.json"
            " (our checkpoint, a SegFormer checkpoint, or a MiT backbone) or a Hub id (needs the network)."
        ) from error
    model_type = config_dict.get("model_type")
    try:
        config, same_classes, source = _checkpoint_config(
            model_name_or_path, config_dict, overrides, label_fields, id2label, hub_kwargs
        )
    except (ValueError, TypeError) as error:
        if isinstance(error, ModelInputError):
            raise
        raise ModelInputError(f"Invalid model configuration: {error}") from error
    try:
        model, loading_info = ProtoSegformerForSemanticSegmentation.from_pretrained(
            model_name_or_path,
            config=config,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            **hub_kwargs,
        )
    except ValueError as error:  # e.g. a ProtoSeg checkpoint without prototypes
        raise ModelInputError(str(error)) from error
    mismatched = [str(m[0]) if isinstance(m, tuple | list) else str(m) for m in loading_info.get("mismatched_keys", [])]
    if model_type == "proto_segformer" and not same_classes:
        logger.info("The classes differ from the checkpoint's: prototypes start from random unit vectors.")
        if not any("prototypes" in m for m in mismatched):
            with torch.no_grad():
                model.prototypes.copy_(torch.nn.functional.normalize(torch.randn_like(model.prototypes), dim=-1))
    missing_encoder = [k for k in loading_info.get("missing_keys", []) if k.startswith("segformer.")]
    if missing_encoder:
        raise ModelInputError(
            f"{model_name_or_path!r} does not hold SegFormer encoder weights (missing e.g. {missing_encoder[:3]})."
        )
    if model_type == "segformer":
        missing, unexpected = set(loading_info["missing_keys"]), set(loading_info["unexpected_keys"])
        num_loaded = len(model.state_dict()) - len(missing) - len(mismatched)
        return model, f"{source}: {conversion_summary(model_name_or_path, missing, unexpected, num_loaded)}"
    return model, f"{source} {model_name_or_path}"


# ------------------------------------------------------------------------------------------ prototype initialisation


@torch.no_grad()
def collect_class_embeddings(
    model: ProtoSegformerForSemanticSegmentation,
    batches,
    max_pixels_per_class: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit embeddings (N, D) and classes (N,) of labelled pixels of `batches` ({"pixel_values", "labels"}), the
    labels downsampled to the embedding grid by nearest neighbour; at most `max_pixels_per_class` per class (random).
    """
    ignore_index = model.config.semantic_loss_ignore_index
    num_labels = model.config.num_labels
    device = model.prototypes.device
    all_embeddings, all_classes = [], []
    for batch in batches:
        pixel_values = batch["pixel_values"].to(device)
        embeddings, _ = model.embed_pixels(pixel_values)
        _, dim, height, width = embeddings.shape
        labels = F.interpolate(batch["labels"][:, None].float().to(device), size=(height, width), mode="nearest")
        labels = labels.long().view(-1)
        valid = (labels != ignore_index) & (labels >= 0) & (labels < num_labels)
        all_embeddings.append(embeddings.permute(0, 2, 3, 1).reshape(-1, dim)[valid].float())
        all_classes.append(labels[valid])
    if not all_embeddings:
        return torch.zeros(0, model.config.embedding_dim, device=device), torch.zeros(
            0, dtype=torch.long, device=device
        )
    embeddings, classes = torch.cat(all_embeddings), torch.cat(all_classes)
    # Keep at most max_pixels_per_class per class: random rank within the class, all classes at once.
    noise = torch.rand(classes.shape[0], generator=generator, dtype=torch.float64).to(device)
    order = torch.argsort(classes.double() + noise)
    counts = torch.bincount(classes, minlength=num_labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(classes.shape[0], device=device) - starts[classes[order]]
    keep = order[rank < max_pixels_per_class]
    return embeddings[keep], classes[keep]


def _gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor with a variable first dimension from every process (identity without distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    largest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((largest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])


@torch.no_grad()
def initialize_prototypes_from_data(
    model: ProtoSegformerForSemanticSegmentation,
    batches,
    *,
    max_pixels_per_class: int = 2000,
    rounds: int = 10,
    seed: int = 0,
) -> torch.Tensor:
    """Set the prototypes of every class seen in `batches` to the spherical k-means (with Sinkhorn equipartition,
    `proto_segformer.prototype_math.cluster_prototypes`) of its pixel embeddings; classes not seen keep theirs.

    The model embeds in eval mode (no dropout, BatchNorm running statistics untouched). Under torch.distributed each
    process embeds its own batches, the embeddings are gathered, and every process clusters the same pixels with the
    same seed; rank 0's result is broadcast so all processes hold identical prototypes. Returns the (K,) mask of
    classes that were initialised.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(int(seed))
    embeddings, classes = collect_class_embeddings(model, batches, max_pixels_per_class, generator)
    embeddings, classes = _gather_variable(embeddings), _gather_variable(classes)
    config = model.config
    centers, present = cluster_prototypes(
        embeddings,
        classes,
        config.num_labels,
        config.num_prototypes_per_class,
        epsilon=config.sinkhorn_epsilon,
        sinkhorn_iterations=config.sinkhorn_iterations,
        rounds=rounds,
        generator=torch.Generator().manual_seed(int(seed) + 1),
    )
    prototypes = torch.where(present[:, None, None], centers.to(model.prototypes), model.prototypes)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(prototypes, src=0)
        dist.broadcast(present, src=0)
    model.prototypes.copy_(prototypes)
    model.train(was_training)
    return present


# ---------------------------------------------------------------------------------------------------------- trainer


class EpochCallback(TrainerCallback):
    """Tells the training data set which epoch starts (its augmentation depends on (seed, epoch, index))."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))


class ResumeLogCallback(TrainerCallback):
    """Logs, as a resumed run starts, the checkpoint and the step it continues from: 'Resumed from checkpoint-4
    (step 4 of 6).'"""

    def __init__(self, checkpoint_name: str) -> None:
        self.checkpoint_name = checkpoint_name

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            logger.info("Resumed from %s (step %d of %d).", self.checkpoint_name, state.global_step, state.max_steps)


class RankPrototypesCallback(TrainerCallback):
    """Writes each process's prototypes at the end of training to `<folder>/prototypes_rank<r>.pt` (a check that
    all processes hold the same prototypes)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.prototypes.detach().cpu().clone(), self.folder / f"prototypes_rank{rank}.pt")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' info logs (a loaded model's whole config) and progress bars off for the block."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(max(verbosity, hf_logging.WARNING))
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_checkpoint_weights(model: torch.nn.Module, checkpoint_dir: str | Path) -> None:
    """Load the weights (and prototypes, BatchNorm statistics) of a saved checkpoint folder into `model`, strictly.

    Trainer's own resume path calls `load_state_dict(saved_state, strict=False)`, but the saved names are not the
    in-memory names: transformers 5 writes SegFormer encoders and decoders under their checkpoint names
    (`segformer.encoder.block.*`, `decode_head.linear_c.*`) through registered conversion mappings, so most
    weights would be skipped in silence. Loading through `from_pretrained` applies the same conversions.
    """
    with quiet_transformers():  # not the whole config and a progress bar at every resume
        loaded, info = type(model).from_pretrained(str(checkpoint_dir), output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise RuntimeError(f"The checkpoint {checkpoint_dir} does not match the model: {problems}.")
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded


class ProtoSegTrainer(Trainer):
    """`Trainer` for `ProtoSegformerForSemanticSegmentation`.

    Args (besides the Trainer's):
        head_learning_rate_multiplier: the decoder and projection train with `learning_rate` times this (SegFormer
            uses 10 when fine-tuning a pretrained encoder).
        prototype_init_batches: before step one of a fresh run (not a resumed one), initialise the prototypes by
            clustering the embeddings of this many training batches per process (0: keep the model's prototypes).
        prototype_init_max_pixels: at most this many pixels per class (per process) go into that clustering.

    Logs `loss_ce`, `loss_ppc`, `loss_ppd` (means since the last log, averaged over processes) next to `loss`.
    `evaluate()` reduces each sample's logits to per-class areas inside the evaluation step (use `MeanIoUMetric` as
    `compute_metrics`), so memory does not grow with the data set; `predict()` returns logits as usual.
    """

    loss_is_scaled_for_ga = False  # the model's loss is a per-batch mean

    def __init__(
        self,
        *args,
        head_learning_rate_multiplier: float = 1.0,
        prototype_init_batches: int = 0,
        prototype_init_max_pixels: int = 2000,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.head_learning_rate_multiplier = float(head_learning_rate_multiplier)
        self.prototype_init_batches = int(prototype_init_batches)
        self.prototype_init_max_pixels = int(prototype_init_max_pixels)
        self._loss_parts = torch.zeros(len(LOSS_PARTS), device=self.args.device)
        self._loss_parts_count = 0
        self._step_loss_parts: torch.Tensor | None = None
        self._evaluating_areas = False
        self._checkpoint_staging: Path | None = None
        if self.args.world_size > 1:
            # DDP compares the strides of a depthwise convolution's weight gradient (C, 1, 3, 3) with its bucket's
            # including the dimension of size 1, where strides carry no meaning: the layouts are the same (autograd's
            # own layout check skips size-1 dimensions), the warning is a false alarm.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        if self.train_dataset is not None and hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(EpochCallback(self.train_dataset))

    # ------------------------------------------------------------------ optimiser
    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.head_learning_rate_multiplier == 1.0:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, parameter in opt_model.named_parameters():
            if parameter.requires_grad:
                groups.setdefault((name.startswith(HEAD_PREFIXES), name in decay), []).append(parameter)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        base = self.args.learning_rate
        parameter_groups = [
            {
                "params": parameters,
                "weight_decay": self.args.weight_decay if is_decay else 0.0,
                "lr": base * self.head_learning_rate_multiplier if is_head else base,
            }
            for (is_head, is_decay), parameters in sorted(groups.items())
        ]
        self.optimizer = optimizer_cls(parameter_groups, **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ loss and logging
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(pixel_values=inputs["pixel_values"], labels=inputs.get("labels"))
        # getattr: a parametric SegformerForSemanticSegmentation (scripts/benchmark_quality.py) has no loss parts.
        if model.training and getattr(outputs, "loss_ce", None) is not None:
            parts = torch.stack([outputs.loss_ce, outputs.loss_ppc, outputs.loss_ppd]).detach().float()
            self._loss_parts = self._loss_parts.to(parts.device) + parts
            self._loss_parts_count += 1
            self._step_loss_parts = parts
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._step_loss_parts = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._stop_if_diverged(loss)
        return loss

    def _stop_if_diverged(self, loss: torch.Tensor) -> None:
        """Raise `TrainingDivergedError` on every process when the loss of any process is not finite. Every process
        takes part in the same gather each step (no process can leave while another waits in a collective)."""
        parts = self._step_loss_parts
        values = loss.detach().float().reshape(1)
        if parts is not None:
            values = torch.cat([values, parts.to(values.device)])
        values = values[None]
        if self.accelerator.num_processes > 1:
            values = self.accelerator.gather(values)
        if bool(torch.isfinite(values[:, 0]).all()):
            return
        step = self.state.global_step + 1
        raise TrainingDivergedError(divergence_message(step, values.cpu(), float(self.args.learning_rate)))

    # ------------------------------------------------------------------ schedule
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        warmup = self.args.get_warmup_steps(num_training_steps)
        if self.lr_scheduler is None and 0 < num_training_steps <= warmup:
            clipped = num_training_steps - 1
            log = logger.warning if self.is_world_process_zero() else logger.debug
            log(
                "Warm-up of %d steps is not shorter than the %d training steps: warm-up clipped to %d steps.",
                warmup,
                num_training_steps,
                clipped,
            )
            self.args.warmup_steps = clipped
        return super().create_scheduler(num_training_steps, optimizer)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._loss_parts_count > 0:
            means = self._loss_parts / self._loss_parts_count
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            for name, value in zip(LOSS_PARTS, means.tolist()):
                logs[name] = round(value, 6)
            self._loss_parts = torch.zeros_like(self._loss_parts)
            self._loss_parts_count = 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, *args, **kwargs):
        self._evaluating_areas = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._evaluating_areas = False

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not self._evaluating_areas or "labels" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(pixel_values=inputs["pixel_values"], labels=labels)
        loss = outputs.loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        config = self.accelerator.unwrap_model(model).config
        predictions = upsampled_argmax(outputs.logits, tuple(labels.shape[-2:]))
        areas = segmentation_areas(predictions, labels, config.num_labels, config.semantic_loss_ignore_index)
        # The areas carry everything the metric needs; a per-sample placeholder stands in for the labels.
        return loss, areas, torch.zeros(labels.shape[0], device=labels.device)

    # ------------------------------------------------------------------ checkpoints
    def _get_output_dir(self, trial) -> str:
        if self._checkpoint_staging is not None:  # inside _save_checkpoint: the Trainer writes into the staging folder
            return str(self._checkpoint_staging)
        return super()._get_output_dir(trial)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        fault_point("checkpoint-save:after-weights", self.state.global_step)
        super()._save_optimizer_and_scheduler(output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into `tmp-checkpoint-N/checkpoint-N` by every process and renamed to
        `checkpoint-N` once all have finished: a `checkpoint-N` folder is always complete."""
        run_dir = Path(self._get_output_dir(trial))
        step = self.state.global_step
        name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
        staging = run_dir / f"{CHECKPOINT_STAGING_PREFIX}{name}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)  # left by an interrupted save of this library
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        except BaseException as error:  # a full disk, Ctrl-C: the half-written checkpoint goes, the others stay
            failure = SaveFailedError(name, run_dir, error) if is_write_failure(error) else None
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if failure is not None:
                raise failure from error
            raise
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()
        staged, final = staging / name, run_dir / name
        best_is_staged = self.state.best_model_checkpoint == str(staged)
        if best_is_staged:  # the Trainer recorded the staging path: the checkpoint's own path is the final one
            self.state.best_model_checkpoint = str(final)
        if self.args.should_save:
            if best_is_staged:
                self.state.save_to_json(str(staged / TRAINER_STATE_FILE))
            fault_point("checkpoint-save:before-rename", step)
            if final.exists():  # a checkpoint of the same step, e.g. from before a resume: replaced
                os.replace(final, staging / "replaced")
            os.replace(staged, final)
            fault_point("checkpoint-save:after-rename", step)
            shutil.rmtree(staging)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _plain_weights_file(self, folder: str | None) -> Path | None:
        if folder is None or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return None
        path = Path(folder) / "model.safetensors"
        return path if path.is_file() else None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        weights = self._plain_weights_file(resume_from_checkpoint) if model is None else None
        if weights is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Loading model from %s.", resume_from_checkpoint)
        load_checkpoint_weights(self.model, weights.parent)

    def _load_best_model(self):
        weights = self._plain_weights_file(self.state.best_model_checkpoint)
        if weights is None:
            return super()._load_best_model()
        logger.info("Loading best model from %s.", self.state.best_model_checkpoint)
        load_checkpoint_weights(self.model, weights.parent)

    # ------------------------------------------------------------------ prototype initialisation
    def initialize_prototypes(self) -> torch.Tensor:
        """Cluster the embeddings of `prototype_init_batches` training batches per process into the prototypes."""
        dataset = self.train_dataset
        rank = self.args.process_index
        world = self.args.world_size
        batch_size = self.args.per_device_train_batch_size
        count = min(len(dataset), self.prototype_init_batches * batch_size * world)
        indices = list(range(rank, count, world))
        if not indices:
            raise ValueError("The training data set is empty: cannot initialise the prototypes from data.")
        subset = torch.utils.data.Subset(dataset, indices)
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=self.data_collator)
        model = self.model
        present = initialize_prototypes_from_data(
            model, loader, max_pixels_per_class=self.prototype_init_max_pixels, seed=self.args.seed
        )
        logger.info(
            "Initialised the prototypes of %d of %d classes from %d samples per process.",
            int(present.sum()),
            present.numel(),
            len(indices),
        )
        return present

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.prototype_init_batches > 0 and not resume_from_checkpoint:
            self.initialize_prototypes()
        if isinstance(resume_from_checkpoint, str | Path):
            state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / TRAINER_STATE_FILE))
            if 0 < self.args.max_steps <= state.global_step:
                # The Trainer would take one more step before checking max_steps: load the checkpoint instead.
                logger.info("%s is at step %d: nothing left to train.", resume_from_checkpoint, state.global_step)
                self._load_from_checkpoint(str(resume_from_checkpoint))
                self.state = state
                return TrainOutput(state.global_step, float("nan"), {})  # no metrics: nothing was trained
            self.add_callback(ResumeLogCallback(Path(resume_from_checkpoint).name))
        return super().train(resume_from_checkpoint, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------- outputs


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(dict(data), indent=4, sort_keys=True) + "\n")


def save_training_outputs(
    trainer: Trainer,
    output_dir: str | Path,
    *,
    image_processor=None,
    train_metrics: Mapping[str, Any] | None = None,
    eval_metrics: Mapping[str, Any] | None = None,
    dataset_name: str | None = None,
    base_model: str | None = None,
    extra_card_args: Mapping[str, Any] | None = None,
) -> Path:
    """Write the output folder: model.safetensors, config.json (auto_map, id2label), the custom-code files,
    preprocessor_config.json, trainer_state.json, train/eval/all results json files and the model card README.md.

    Everything is written into `<output_dir>/tmp-final-save/` first and then moved into `output_dir`, the model card
    last: a kill at any moment leaves either no card (an unfinished run, resumable from its checkpoints) or the whole
    output. Every process must call this (saving may be collective). A failed write (a full disk) removes the
    staging folder and raises `SaveFailedError`."""
    from .model_card import write_model_card

    output_dir = Path(output_dir)
    staging = output_dir / FINAL_STAGING_DIR
    should_save = trainer.args.should_save
    if should_save and staging.exists():
        shutil.rmtree(staging)  # left by an interrupted final save of this library
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staging))
        if should_save:
            fault_point("final-save:after-weights")
            if image_processor is not None:
                image_processor.save_pretrained(str(staging))
            results: dict[str, Any] = {}
            for split, metrics in (("train", train_metrics), ("eval", eval_metrics)):
                if metrics is not None:
                    _write_json(staging / f"{split}_results.json", metrics)
                    results.update(metrics)
            if results:
                _write_json(staging / "all_results.json", results)
            trainer.state.save_to_json(str(staging / TRAINER_STATE_FILE))
            args = trainer.args.to_dict()
            if extra_card_args:
                args.update(extra_card_args)
            write_model_card(
                staging,
                dataset_name=dataset_name,
                eval_results=dict(eval_metrics) if eval_metrics is not None else None,
                base_model=base_model,
                training_args=json.loads(json.dumps(args, default=str)),
            )
            publish_files(staging, output_dir, last=MODEL_CARD_FILE)
    except Exception as error:  # a full disk: the checkpoints stay, resuming writes the final save again
        failure = SaveFailedError("the final model", output_dir, error) if is_write_failure(error) else None
        if should_save:
            shutil.rmtree(staging, ignore_errors=True)
        if failure is not None:
            raise failure from error
        raise
    trainer.accelerator.wait_for_everyone()
    return output_dir


__all__ = [
    "CHECKPOINT_PATTERN",
    "PROTOSEG_FIELDS",
    "checkpoint_folders",
    "interrupted_saves",
    "is_staging_folder",
    "EpochCallback",
    "TrainingDivergedError",
    "checkpoint_problem",
    "newest_complete_checkpoint",
    "MeanIoUMetric",
    "ProtoSegTrainer",
    "RankPrototypesCallback",
    "ResumeLogCallback",
    "SaveFailedError",
    "build_model",
    "model_summary",
    "quiet_transformers",
    "resume_config_problem",
    "collect_class_embeddings",
    "initialize_prototypes_from_data",
    "load_checkpoint_weights",
    "save_training_outputs",
    "segmentation_areas",
    "upsampled_argmax",
]
