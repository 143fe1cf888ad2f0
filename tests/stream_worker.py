"""Worker for tests/test_streaming.py: the streamed training DataLoader as the Trainer prepares it (accelerate,
gloo, 2 processes); each process writes the numbers of the samples it received to <folder>/rank<r>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # tests/

from test_streaming import numbered_stream, sample_number  # noqa: E402

from proto_segformer.data.transforms import pad_collate  # noqa: E402


def main(folder: str) -> None:
    accelerator = Accelerator(cpu=True)
    stream = numbered_stream(count=11, batch_size=2)
    loader = accelerator.prepare(torch.utils.data.DataLoader(stream, batch_size=2, collate_fn=pad_collate))
    numbers = []
    for batch, _ in zip(loader, range(6)):
        numbers += [sample_number(labels) for labels in batch["labels"]]
    path = Path(folder) / f"rank{accelerator.process_index}.json"
    path.write_text(json.dumps(numbers))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
