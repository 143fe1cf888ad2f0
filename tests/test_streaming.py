"""--streaming: the training split as a `datasets.IterableDataset` (data/streaming.py): its order across passes and
workers, resuming at the right sample, nothing in the datasets cache, the options it refuses, two processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from test_layouts import cityscapes
from train_helpers import REPO, TINY_ARGS, clean_env

from proto_segformer.data.loading import load_dataset_any
from proto_segformer.data.streaming import StreamingSegmentationDataset
from proto_segformer.data.transforms import AugmentationConfig, pad_collate
from proto_segformer.run_training import main

NUM_SAMPLES = 5


def numbered_split(count: int = NUM_SAMPLES, size: int = 32) -> datasets.Dataset:
    """Samples whose label map is their number (and whose image is its shade): a crop still says which it is."""
    images = [Image.fromarray(np.full((size, size, 3), 40 * i % 256, np.uint8)) for i in range(count)]
    labels = [Image.fromarray(np.full((size, size), i, np.uint8)) for i in range(count)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def numbered_stream(count: int = NUM_SAMPLES, batch_size: int = 2) -> StreamingSegmentationDataset:
    return StreamingSegmentationDataset(
        numbered_split(count).to_iterable_dataset(),
        "image",
        "label",
        num_labels=count,
        augmentation=AugmentationConfig(crop_size=(32, 32)),
        seed=0,
        batch_size=batch_size,
        shuffle_buffer=4,
    )


def sample_number(labels: torch.Tensor) -> int:
    values = labels[labels != 255].unique()
    assert values.numel() == 1
    return int(values)


def first(dataset, count: int) -> list[dict[str, torch.Tensor]]:
    iterator = iter(dataset)
    return [next(iterator) for _ in range(count)]


def test_each_pass_holds_each_sample_once_and_a_resumed_stream_continues_where_it_stopped() -> None:
    samples = first(numbered_stream(), 13)  # 2.6 passes of 5 samples
    numbers = [sample_number(sample["labels"]) for sample in samples]
    assert sorted(numbers[:5]) == sorted(numbers[5:10]) == list(range(NUM_SAMPLES))
    resumed = numbered_stream()
    resumed.resume_at(7)  # in the second pass
    for expected, got in zip(samples[7:], first(resumed, 6), strict=True):
        assert torch.equal(expected["pixel_values"], got["pixel_values"])
        assert torch.equal(expected["labels"], got["labels"])


def test_dataloader_workers_return_the_stream_in_its_order() -> None:
    # Worker w of W decodes batches w, w + W, ...; the DataLoader takes one batch from each worker in turn.
    expected = torch.stack([sample["pixel_values"] for sample in first(numbered_stream(batch_size=2), 8)])
    loader = torch.utils.data.DataLoader(
        numbered_stream(batch_size=2), batch_size=2, num_workers=2, collate_fn=pad_collate
    )
    batches = [batch["pixel_values"] for batch, _ in zip(loader, range(4))]
    assert torch.equal(torch.cat(batches), expected)


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_streaming_refuses_what_it_cannot_do(tmp_path: Path, capsys) -> None:
    folder = cityscapes(tmp_path / "cityscapes")
    base = ["--output_dir", str(tmp_path / "out"), "--streaming", *TINY_ARGS]
    message = _fails([*base, "--dataset_name", str(folder)], capsys)
    assert "unknown length" in message and "--max_steps N" in message
    message = _fails([*base, "--dataset_name", str(folder), "--max_steps", "2", "--eval_strategy", "epoch"], capsys)
    assert "--eval_strategy epoch" in message and "--eval_strategy steps --eval_steps N" in message
    message = _fails([*base, "--max_steps", "2"], capsys)
    assert "built-in data sets are made in memory: leave --streaming out" in message
    assert not (tmp_path / "out" / "model.safetensors").exists()


def parquet_folder(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    numbered_split(6).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    numbered_split(3).to_parquet(str(root / "data" / "validation-00000-of-00001.parquet"))
    return root


def _files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


def test_a_streamed_parquet_folder_trains_and_copies_nothing_into_the_cache(tmp_path: Path) -> None:
    folder = parquet_folder(tmp_path / "parquet")
    cache = tmp_path / "cache"
    output = tmp_path / "run"
    argv = ["--dataset_name", str(folder), "--streaming", "--max_steps", "3", "--cache_dir", str(cache)]
    results = main([*argv, "--output_dir", str(output), "--save_strategy", "no", "--crop_size", "32", *TINY_ARGS])
    assert results["train"]["train_loss"] > 0 and 0.0 <= results["eval"]["eval_mean_iou"] <= 1.0
    assert len(json.loads((output / "config.json").read_text())["id2label"]) == 6  # from the labels: 0..5
    assert sum(path.stat().st_size for path in _files(cache)) == 0  # (datasets leaves an empty lock file)
    # Without --streaming the folder is copied into the cache, as `datasets` does (the test would see a copy).
    load_dataset_any(str(folder), cache_dir=str(tmp_path / "cache2"))
    assert any(path.suffix == ".arrow" for path in _files(tmp_path / "cache2"))
    # A save_to_disk folder streams from its own Arrow files.
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": numbered_split(6), "validation": numbered_split(3)}).save_to_disk(str(saved))
    argv[1] = str(saved)
    results = main(
        [*argv, "--output_dir", str(tmp_path / "run2"), "--save_strategy", "no", "--crop_size", "32", *TINY_ARGS]
    )
    assert results["train"]["train_loss"] > 0 and sum(path.stat().st_size for path in _files(cache)) == 0


def test_a_hub_id_that_cannot_be_reached_is_one_line(tmp_path: Path, capsys) -> None:
    argv = ["--dataset_name", "someone/no-such-data", "--streaming", "--max_steps", "2", "--output_dir"]
    message = _fails([*argv, str(tmp_path / "out"), *TINY_ARGS], capsys)
    assert message.startswith("error: ") and "someone/no-such-data" in message and "Traceback" not in message


def test_a_resumed_streaming_run_ends_with_the_model_of_the_run_never_stopped(tmp_path: Path) -> None:
    # A Cityscapes folder (labels converted as read): 4 training images, batches of 2, 5 steps = 2.5 passes. The
    # run resumed at step 2 must read on from sample 4 of the stream (pass 2) to end with the same bytes.
    folder = cityscapes(tmp_path / "cityscapes")
    argv = ["--dataset_name", str(folder), "--streaming", "--max_steps", "5", "--save_steps", "2", "--seed", "0"]
    argv += ["--crop_size", "32", *TINY_ARGS, "--per_device_train_batch_size", "2"]
    main([*argv, "--output_dir", str(tmp_path / "whole")])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", resumed / "checkpoint-2")
    main([*argv, "--output_dir", str(resumed), "--resume_from_checkpoint", "last"])
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert (resumed / "model.safetensors").read_bytes() == whole
    history = json.loads((resumed / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [5]  # the final evaluation, once


@pytest.mark.slow
def test_two_processes_see_each_sample_once_per_pass(tmp_path: Path) -> None:
    # accelerate's dispatching, as the Trainer prepares the training DataLoader: process 0 reads the stream, each
    # process gets its share of every batch. 11 samples, batches of 2 per process, 6 steps = 24 samples.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    command += [str(REPO / "tests" / "stream_worker.py"), str(tmp_path)]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert all(len(numbers) == 12 for numbers in seen)  # the same number of batches on each process
    in_order = [n for step in range(6) for rank in range(2) for n in seen[rank][2 * step : 2 * step + 2]]
    assert sorted(in_order[:11]) == list(range(11))  # the first pass: each sample once, on one process or the other
    assert sorted(in_order[11:22]) == list(range(11))  # the second pass too
    assert seen[0][:2] != seen[1][:2]


@pytest.mark.slow
def test_two_processes_train_on_a_stream_and_resume(tmp_path: Path) -> None:
    from test_train_multiprocess import launch

    folder = cityscapes(tmp_path / "cityscapes")
    argv = ["--dataset_name", str(folder), "--streaming", "--max_steps", "4", "--save_steps", "2", "--seed", "0"]
    argv += ["--crop_size", "32", "--save_rank_prototypes", *TINY_ARGS, "--per_device_train_batch_size", "1"]
    whole = launch([*argv, "--output_dir", "whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", resumed / "checkpoint-2")
    result = launch([*argv, "--output_dir", "resumed", "--resume_from_checkpoint", "last"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for output in (tmp_path / "whole", resumed):
        ranks = [torch.load(output / "rank_prototypes" / f"prototypes_rank{r}.pt") for r in range(2)]
        assert torch.equal(ranks[0], ranks[1])
    assert (resumed / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
