"""Training ProtoSegformer with the Hugging Face Trainer.

- `ProtoSegTrainer`: a `Trainer` that logs CE / PPC / PPD separately, evaluates mean IoU with memory independent of
  the data set (each sample's logits are reduced to per-class areas inside the evaluation step), can use a larger
  learning rate for the decoder and projection than for the encoder, and initialises the prototypes from data
  (clustering the embeddings of the first training batches) before step one.
- `MeanIoUMetric`: `compute_metrics` for `batch_eval_metrics=True` (and False): the Hub `mean_iou` values.
- `build_model`: a ProtoSegformer from our checkpoint, a parametric SegFormer checkpoint, a MiT backbone
  checkpoint, or a MiT preset, with config overrides.
- `save_training_outputs`: the output folder (weights, config with auto_map and id2label, custom code, image
  processor, model card, results json files).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import PretrainedConfig, Trainer, TrainerCallback

from .configuration_proto_segformer import ProtoSegformerConfig
from .inference import upsampled_argmax
from .metrics import metrics_from_areas
from .modeling_proto_segformer import ProtoSegformerForSemanticSegmentation, conversion_summary
from .paths import check_source
from .prototypes import cluster_prototypes

logger = logging.getLogger(__name__)

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


class ModelInputError(ValueError):
    """A model the user asked for cannot be built or loaded (bad path, wrong kind of checkpoint, bad config value)."""


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
    `proto_segformer.prototypes.cluster_prototypes`) of its pixel embeddings; classes not seen keep theirs.

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


class RankPrototypesCallback(TrainerCallback):
    """Writes each process's prototypes at the end of training to `<folder>/prototypes_rank<r>.pt` (a check that
    all processes hold the same prototypes)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.prototypes.detach().cpu().clone(), self.folder / f"prototypes_rank{rank}.pt")


def load_checkpoint_weights(model: torch.nn.Module, checkpoint_dir: str | Path) -> None:
    """Load the weights (and prototypes, BatchNorm statistics) of a saved checkpoint folder into `model`, strictly.

    Trainer's own resume path calls `load_state_dict(saved_state, strict=False)`, but the saved names are not the
    in-memory names: transformers 5 writes SegFormer encoders and decoders under their checkpoint names
    (`segformer.encoder.block.*`, `decode_head.linear_c.*`) through registered conversion mappings, so most
    weights would be skipped in silence. Loading through `from_pretrained` applies the same conversions.
    """
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
        self._evaluating_areas = False
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
        return (outputs.loss, outputs) if return_outputs else outputs.loss

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
        return super().train(resume_from_checkpoint, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------- outputs


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
    preprocessor_config.json, train/eval/all results json files and the model card README.md (written last)."""
    from .model_card import write_model_card

    output_dir = Path(output_dir)
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        if image_processor is not None:
            image_processor.save_pretrained(str(output_dir))
        if train_metrics is not None:
            trainer.save_metrics("train", dict(train_metrics))
        if eval_metrics is not None:
            trainer.save_metrics("eval", dict(eval_metrics))
        args = trainer.args.to_dict()
        if extra_card_args:
            args.update(extra_card_args)
        write_model_card(
            output_dir,
            dataset_name=dataset_name,
            eval_results=dict(eval_metrics) if eval_metrics is not None else None,
            base_model=base_model,
            training_args=json.loads(json.dumps(args, default=str)),
        )
    trainer.accelerator.wait_for_everyone()
    return output_dir


__all__ = [
    "PROTOSEG_FIELDS",
    "EpochCallback",
    "MeanIoUMetric",
    "ProtoSegTrainer",
    "RankPrototypesCallback",
    "build_model",
    "collect_class_embeddings",
    "initialize_prototypes_from_data",
    "load_checkpoint_weights",
    "save_training_outputs",
    "segmentation_areas",
    "upsampled_argmax",
]
