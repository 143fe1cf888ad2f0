"""Seconds from the command to the first training step, on an ADE20K-style folder of 3,000 image/label pairs.

    python scripts/benchmark_startup.py           # makes <tmp>/proto_segformer_startup/ade3000 on first use
    python scripts/benchmark_startup.py --folder DIR --images 3000 --runs 2 --baseline ../main_checkout

The folder: `images/training/*.jpg` and `annotations/training/*.png` (512x384, label values 0..10, read with
--reduce_labels), 100 validation pairs and an `id2label.json`. Each run is `python scripts/train.py --dataset_name
FOLDER --max_steps 1 ...` in a fresh process and a fresh output folder; the time to the first step is when the
Trainer logs "Running training" (the line just before its first step), the time of the step itself follows it.
Every line printed carries the load average (`os.getloadavg`), as the project's timings do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .arguments import StartupArguments

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
# A model small enough that the first step is not what is measured (the data start-up is).
TINY_MODEL = [
    "--config_overrides",
    "hidden_sizes=[8,16,24,32],depths=[1,1,1,1],num_attention_heads=[1,1,1,1]",
    "--decoder_hidden_size",
    "32",
    "--prototype_dim",
    "16",
    "--num_prototypes_per_class",
    "2",
]


def make_ade_folder(folder: Path, num_train: int, num_validation: int = 100, size=(512, 384), seed: int = 0) -> Path:
    """An ADE20K-style folder of random blocky scenes (JPEG images, PNG labels 0..NUM_CLASSES, 0 = 'other');
    reused when it exists with the same number of images."""
    marker = folder / "made.json"
    spec = {"num_train": num_train, "num_validation": num_validation, "size": list(size), "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder
    rng = np.random.default_rng(seed)
    width, height = size
    for split, count in (("training", num_train), ("validation", num_validation)):
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        (folder / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            cells = rng.integers(0, NUM_CLASSES + 1, size=(height // 64, width // 64), dtype=np.uint8)
            label = np.kron(cells, np.ones((64, 64), dtype=np.uint8))
            palette = rng.integers(0, 256, size=(NUM_CLASSES + 1, 3), dtype=np.uint8)
            image = palette[label] + rng.integers(0, 20, size=(height, width, 3), dtype=np.uint8)
            name = f"ADE_{split}_{index:08d}"
            Image.fromarray(image).save(folder / "images" / split / f"{name}.jpg", quality=85)
            Image.fromarray(label).save(folder / "annotations" / split / f"{name}.png")
    names = {i: f"class_{i}" for i in range(NUM_CLASSES)}
    (folder / "id2label.json").write_text(json.dumps(names))
    marker.write_text(json.dumps(spec))
    return folder


def time_to_first_step(folder: Path, extra: list[str], repo: Path = REPO) -> dict[str, float]:
    """One run of `repo`'s scripts/train.py: seconds to the "Running training" line and to the end of the process."""
    with tempfile.TemporaryDirectory() as output:
        command = [sys.executable, str(repo / "scripts" / "train.py"), "--dataset_name", str(folder)]
        command += ["--output_dir", output, "--max_steps", "1", "--reduce_labels", "--crop_size", "64"]
        command += ["--per_device_train_batch_size", "2", "--eval_strategy", "no", "--do_eval", "false"]
        command += ["--save_strategy", "no", "--dataloader_num_workers", "0", *TINY_MODEL, *extra]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(repo)}
        start = time.monotonic()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        first_step = None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if first_step is None and "Running training" in line:
                first_step = time.monotonic() - start
        process.wait()
        total = time.monotonic() - start
    if process.returncode != 0 or first_step is None:
        raise SystemExit("the run failed:\n" + "".join(lines[-30:]))
    return {"seconds_to_first_step": round(first_step, 2), "seconds_total": round(total, 2)}


def run(args: StartupArguments) -> None:
    """Time the runs (`time_to_first_step`), this checkout's and `args.baseline`'s in turns; one JSON line each."""
    root = Path(args.folder) if args.folder else Path(tempfile.gettempdir()) / "proto_segformer_startup"
    folder = make_ade_folder(root / f"ade{args.images}", args.images)
    extra = [] if args.check_samples is None else ["--check_samples", str(args.check_samples)]
    versions = {"this": REPO} if args.baseline is None else {"baseline": Path(args.baseline).resolve(), "this": REPO}
    for index in range(args.runs):
        seconds = {}
        for name, repo in versions.items():
            result = time_to_first_step(folder, extra, repo)
            seconds[name] = result["seconds_to_first_step"]
            load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
            print(json.dumps({"run": index, "version": name, "images": args.images, **result, "load_average": load}))
        if len(seconds) == 2:
            ratio = round(seconds["this"] / seconds["baseline"], 3)
            print(json.dumps({"run": index, "first_step_this_over_baseline": ratio}))
