"""The saves of a training run: crash-safe checkpoint folders and the final output folder.

- `CheckpointSavingTrainer`: the `Trainer`'s checkpoints are written into `tmp-checkpoint-N/` and renamed to
  `checkpoint-N/` once every process has written its part, so a `checkpoint-N` folder is always complete
  (`checkpoint_problem` checks one; `newest_complete_checkpoint` finds the one to resume from); a checkpoint's
  weights load through `from_pretrained` (`model_building.load_checkpoint_weights`). `trainer.ProtoSegTrainer`
  builds on it. On several machines, the first save checks the disk against --save_on_each_node
  (`check_shared_disk`); with it, the first process of every machine writes complete checkpoints and the final model
  (transformers' `save_pretrained` writes on global rank 0 only), buffers taken from process 0 (`sync_buffers`).
- `save_training_outputs`: the output folder (weights, config with auto_map and id2label, custom code, image
  processor, model card, results json files), written into a staging folder and moved into place, card last.

A failed write (a full disk) is `SaveFailedError`. `PROTOSEG_FAULT=<point>[@<step>]` (the test hook
`folder_writer.fault_point`) kills the process at a named point of a save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .checkpoint_folders import (
    CHECKPOINT_PREFIX,
    CHECKPOINT_STAGING_PREFIX,
    FINAL_STAGING_DIR,
    MODEL_CARD_FILE,
    TRAINER_STATE_FILE,
)
from .distributed_setup import SETUP_KEY, DistributedSetupError, machine_count, shared_disk_problem
from .folder_writer import fault_point, publish_files
from .model_building import load_checkpoint_weights
from .output_folders import free_bytes, is_disk_full, is_write_failure

logger = logging.getLogger(__name__)
assert CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR, "checkpoint_folders.CHECKPOINT_PREFIX differs from transformers'"


SHARED_DISK_WAIT_S = 5.0  # how long another machine looks for the main process's new folder (network disks lag)


def visible(folder: Path, wait_s: float = SHARED_DISK_WAIT_S) -> bool:
    """Whether `folder`, just created by another machine's process, shows up here within `wait_s` seconds (listing
    its parent refreshes a network file system's view)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            if folder.name in os.listdir(folder.parent) and folder.is_dir():
                return True
        except OSError:  # no parent folder on this machine
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


class SaveFailedError(OSError):
    """Writing `what` (a checkpoint, the final model) into `folder` failed (a full disk, most often); raised from
    the write error. Its staging folder was removed; the checkpoints written before are intact."""

    def __init__(self, what: str, folder: str | Path, error: BaseException) -> None:
        super().__init__(f"Could not write {what} into {folder}: {error}")
        self.what, self.folder = what, Path(folder)
        # Measured now, before the half-written files go: torch.save's error has no errno.
        self.disk_full, self.free = is_disk_full(error, folder), free_bytes(folder)


class CheckpointSavingTrainer(Trainer):
    """A `Trainer` whose checkpoint folders are complete or absent (see the module docstring), and whose resume and
    best-model loads go through `from_pretrained` (checkpoint names, not in-memory names)."""

    _checkpoint_staging: Path | None = None  # set while _save_checkpoint runs
    _disk_checked = False  # whether the machines' view of the output folder was checked (at the first save)

    def check_shared_disk(self, staging: Path) -> None:
        """At the first save of a run on several machines: whether every machine sees the folder the main process
        creates (a shared disk), against --save_on_each_node (`distributed_setup.shared_disk_problem`). Every
        process takes part; `DistributedSetupError` on every process when they do not match."""
        if self._disk_checked:
            return
        self._disk_checked = True
        if self.args.world_size == 1 or machine_count(os.environ, self.args.world_size) == 1:
            return
        import torch

        if self.args.process_index == 0:
            staging.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        node_main = self.args.local_process_index == 0 and self.args.process_index != 0
        sees = visible(staging) if node_main else True
        flags = torch.tensor([[int(node_main and not sees), int(node_main and sees)]], device=self.args.device)
        blind, sharing = (int(value) for value in self.accelerator.gather(flags).sum(0).tolist())
        problem = shared_disk_problem(blind, sharing, bool(self.args.save_on_each_node), staging.parent)
        if problem is not None:
            if self.args.process_index == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise DistributedSetupError(problem)

    def sync_buffers(self) -> None:
        """Every process takes the buffers of process 0 (BatchNorm's running statistics; the prototypes are equal
        already). DDP broadcasts them before each forward, so after the last one they differ: with
        --save_on_each_node every machine saves the same model."""
        import torch.distributed as dist

        if self.args.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)

    @contextlib.contextmanager
    def _writes_on_this_machine(self) -> Iterator[None]:
        """transformers' `save_pretrained` writes on global rank 0 only, whatever its `is_main_process` says: with
        --save_on_each_node the first process of every machine writes its machine's copy (weights, config)."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        other_machine = self.args.save_on_each_node and self.args.should_save and self.args.process_index != 0
        if not other_machine or not hasattr(model, "should_save_on_this_rank"):
            yield
            return
        model.should_save_on_this_rank = lambda is_main_process: is_main_process
        try:
            yield
        finally:
            del model.should_save_on_this_rank

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        with self._writes_on_this_machine():
            super()._save(output_dir, state_dict=state_dict)

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
        self.check_shared_disk(staging)
        self.sync_buffers()
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
    distributed_setup: Mapping[str, Any] | None = None,
) -> Path:
    """Write the output folder: model.safetensors, config.json (auto_map, id2label), the custom-code files,
    preprocessor_config.json, trainer_state.json, train/eval/all results json files and the model card README.md.
    `distributed_setup` (`distributed_setup.setup_record`) goes into train_results.json and all_results.json under
    "distributed_setup", and into the card.

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
    if isinstance(trainer, CheckpointSavingTrainer):
        trainer.check_shared_disk(staging)  # when no checkpoint was saved before
        trainer.sync_buffers()
    try:
        trainer.save_model(str(staging))
        if should_save:
            fault_point("final-save:after-weights")
            if image_processor is not None:
                image_processor.save_pretrained(str(staging))
            results: dict[str, Any] = {}
            setup = {SETUP_KEY: dict(distributed_setup)} if distributed_setup is not None else {}
            for split, metrics in (("train", train_metrics), ("eval", eval_metrics)):
                if metrics is not None:
                    metrics = {**metrics, **setup} if split == "train" else metrics
                    _write_json(staging / f"{split}_results.json", metrics)
                    results.update(metrics)
            results.update(setup)
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
                distributed_setup=distributed_setup,
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
