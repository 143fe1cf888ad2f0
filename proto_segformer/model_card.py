"""Model cards for trained ProtoSegformer checkpoints (stub: the publishing work renders the full card)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_model_card(
    output_dir: str | Path,
    *,
    dataset_name: str | None = None,
    eval_results: dict[str, Any] | None = None,
    base_model: str | None = None,
    training_args: dict[str, Any] | None = None,
) -> Path:
    """Write `README.md` (the model card) into `output_dir`, which holds a saved model; return its path."""
    output_dir = Path(output_dir)
    config = json.loads((output_dir / "config.json").read_text())
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-segmentation",
        "tags: [protoseg, segformer, semantic-segmentation, custom_code]",
        "---",
        f"# ProtoSegformer ({config.get('num_labels')} classes)",
        "",
        f"Trained on: {dataset_name or 'built-in data'}",
        "",
        "```json",
        json.dumps(eval_results or {}, indent=2),
        "```",
    ]
    path = output_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
