"""Every place where this model changes transformers' own behaviour, in one file.

The modelling file calls these four functions and nothing else of the kind. Each changes a table or a logger that
belongs to transformers, so each is small, says why it is needed, and is inert for every other model:

- `register_checkpoint_layout`: a weight renaming for our class in transformers' conversion table, so that SegFormer
  checkpoints load and ours are written in SegFormer's layout;
- `declare_image_segmentation_support`: our model type in the table the image-segmentation pipeline checks;
- `install_output_capturing_hooks`: transformers' lazily installed encoder hooks, installed at construction instead
  so that `torch.compile(fullgraph=True)` works on a fresh model;
- `held_load_report`: a logger filter holding back transformers' load report while `from_pretrained` decides whether
  it is news (our one-line messages replace it when it is not).

Like the modelling file, this travels with a saved model as remote code: torch, transformers and the standard library.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from torch import nn
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.models.auto import modeling_auto


def register_checkpoint_layout(class_name: str) -> None:
    """Read and write the decoder's stage projections under SegFormer's checkpoint names.

    SegFormer checkpoints (transformers 4.x and 5.x alike) store them as `decode_head.linear_c.*`; transformers 5 calls
    the in-memory module `linear_projections` and renames on load for `SegformerForSemanticSegmentation` only. The
    same renaming registered for `class_name` lets parametric checkpoints load into it, and ours use the common layout.
    """
    register_checkpoint_conversion_mapping(
        class_name,
        [WeightRenaming("decode_head.linear_c.", "decode_head.linear_projections.")],
        overwrite=True,
    )


def declare_image_segmentation_support(model_type: str, class_name: str) -> None:
    """Tell transformers' image-segmentation pipeline that `class_name` is a semantic-segmentation model.

    The pipeline accepts a model when its class name is a value of `MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES`
    (it checks a copy of that dict, so classes registered with `AutoModelForSemanticSegmentation.register` are not
    seen) and otherwise logs "The model ... is not supported for image-segmentation". The modelling file calls this
    whenever it is imported: from the package and as remote code (a model folder's copy, loaded through its auto_map).
    The entry is inert elsewhere: transformers' lazy auto mappings only use model types that `CONFIG_MAPPING_NAMES`
    also lists.
    """
    names = getattr(modeling_auto, "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES", None)
    if names is not None:
        names.setdefault(model_type, class_name)


def install_output_capturing_hooks(encoder: nn.Module) -> None:
    """Install now the output-capturing hooks transformers 5 installs on the encoder's first call.

    It installs them under a `threading.Lock`, which torch.compile cannot trace, so without this a fresh model fails
    `torch.compile(model, fullgraph=True)` ("Unsupported context manager"; stock SegFormer does). The hooks are the
    same either way; transformers without this helper installs nothing lazily, and nothing is done.
    """
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:
        return
    maybe_install_capturing_hooks(encoder)


class HeldReport:
    """transformers' load report, held back until the load's outcome says whether it is news."""

    def __init__(self, class_name: str) -> None:
        self.marker = f"{class_name} LOAD REPORT"
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.marker in str(record.msg):
            self.records.append(record)
            return False
        return True

    def discard(self) -> None:
        """Drop the held report (our own message says what it would have said)."""
        self.records.clear()

    def release(self) -> None:
        """Log the held report now, as transformers would have."""
        records, self.records = self.records, []
        for record in records:
            logging.getLogger(record.name).handle(record)


@contextmanager
def held_load_report(class_name: str):
    """Hold back transformers' load report of `class_name` (logged by transformers.modeling_utils) for the block;
    records not discarded are logged when the block ends. Yields the `HeldReport`."""
    held = HeldReport(class_name)
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(held)
    try:
        yield held
    finally:
        report_logger.removeFilter(held)
        held.release()
