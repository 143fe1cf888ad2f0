"""`ProtoSegTrainer`: the Hugging Face `Trainer` for ProtoSegformer, and the callbacks it uses.

What it changes in the Trainer, each where no callback can: a larger learning rate for the decoder and projection
(`create_optimizer`), CE / PPC / PPD logged next to the loss (`compute_loss`, `log`), training stopped on every
process at a non-finite loss (`training_step`: `TrainingDivergedError`), warm-up clipped to the run's length and
DeepSpeed's ZeRO optimizers scheduled through the torch optimizer they wrap (`create_scheduler`), evaluation reduced
to per-class areas inside the step (`prediction_step`, with `trainer_metrics.MeanIoUMetric` as `compute_metrics`), a
finished checkpoint not trained again (`train`). The callbacks: the data set's epoch (its augmentation), the
prototypes initialised from data before step one of a fresh run, a line on the step a resumed run continues from,
each process's final prototypes (a check). The crash-safe checkpoint folders come from
`training.CheckpointSavingTrainer`.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerState
from transformers.trainer_utils import TrainOutput

from .checkpoint_folders import TRAINER_STATE_FILE
from .label_maps import upsampled_argmax
from .prototype_init import initialize_prototypes_from_dataset
from .trainer_metrics import segmentation_areas
from .training import CheckpointSavingTrainer

logger = logging.getLogger(__name__)

HEAD_PREFIXES = ("decode_head.", "projection.")
LOSS_PARTS = ("loss_ce", "loss_ppc", "loss_ppd")
LOSS_PART_NAMES = ("CE", "PPC", "PPD")


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite: training stopped (on every process) and nothing more was saved."""


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


def _has_defaults(optimizer) -> bool:
    try:
        return isinstance(optimizer.defaults, dict)
    except AttributeError:
        return False


def schedulable_optimizer(optimizer):
    """The optimizer a learning-rate schedule can drive: `optimizer`, or for DeepSpeed's ZeRO optimizers (which
    have no `defaults`, read by transformers' polynomial and cosine schedules: "'DeepSpeedZeroOptimizer' object has
    no attribute 'defaults'") the torch optimizer they wrap, whose `param_groups` they share and step."""
    inner = optimizer
    while inner is not None and not _has_defaults(inner):
        inner = getattr(inner, "optimizer", None)
    return optimizer if inner is None else inner


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


class PrototypeInitCallback(TrainerCallback):
    """Before step one of a fresh run (not a resumed one), the prototypes become the clustered embeddings of the
    trainer's first `prototype_init_batches` training batches per process (`prototype_init`)."""

    def __init__(self, trainer: ProtoSegTrainer) -> None:
        self.dataset, self.collate_fn = trainer.train_dataset, trainer.data_collator
        self.batches, self.max_pixels = trainer.prototype_init_batches, trainer.prototype_init_max_pixels

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0:  # resumed: the checkpoint holds the prototypes
            return
        initialize_prototypes_from_dataset(
            model,
            self.dataset,
            self.collate_fn,
            batches=self.batches,
            batch_size=args.per_device_train_batch_size,
            max_pixels_per_class=self.max_pixels,
            seed=args.seed,
            rank=args.process_index,
            world_size=args.world_size,
        )


class ProtoSegTrainer(CheckpointSavingTrainer):
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
        self._last_evaluation: tuple[int, dict[str, float]] | None = None
        if self.args.world_size > 1:
            # DDP compares the strides of a depthwise convolution's weight gradient (C, 1, 3, 3) with its bucket's
            # including the dimension of size 1, where strides carry no meaning: the layouts are the same (autograd's
            # own layout check skips size-1 dimensions), the warning is a false alarm.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        if self.train_dataset is not None and hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(EpochCallback(self.train_dataset))
        if self.prototype_init_batches > 0 and self.train_dataset is not None:
            self.add_callback(PrototypeInitCallback(self))

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
        if self.lr_scheduler is None:
            optimizer = schedulable_optimizer(self.optimizer if optimizer is None else optimizer)
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
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._evaluating_areas = True
        try:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._evaluating_areas = False
        if eval_dataset is None and metric_key_prefix == "eval":
            self._last_evaluation = (self.state.global_step, dict(metrics))
        return metrics

    def final_evaluation(self) -> dict[str, float]:
        """The evaluation of the model as trained: the one the run just made at its last step (the epoch-end or
        step evaluation of the final step), else a new one. With --max_steps the last step also ends an epoch; the
        Trainer evaluated there, and evaluating again would give the same numbers at twice the cost."""
        last = self._last_evaluation
        if last is not None and last[0] == self.state.global_step and not self.args.load_best_model_at_end:
            logger.info("Final evaluation: the evaluation of step %d.", self.state.global_step)
            return dict(self._last_evaluation[1])
        return self.evaluate()

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

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        """A stream (`data.streaming.StreamingSegmentationDataset`, --streaming) starts at the sample the checkpoint
        reached, skipping the rows before it undecoded; other data skip the batches as the Trainer does. Process 0
        reads the stream for all processes (accelerate's dispatching): `num_batches` batches of each process."""
        dataset = self.train_dataset
        if not hasattr(dataset, "resume_at"):
            return super().get_resumed_dataloader(dataloader, num_batches)
        dataset.resume_at(num_batches * self.args.per_device_train_batch_size * self.args.world_size)
        return dataloader

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
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
