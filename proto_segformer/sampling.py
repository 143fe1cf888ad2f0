"""Per-class random subsampling: keep at most N uniformly drawn entries of each class, all classes at once.

Used by the prototype initialisation before training (`prototype_init.py`) and by adding classes without training
(`class_editing.py`). Only torch: it may travel as remote code beside the files that import it.
"""

from __future__ import annotations

import torch


def per_class_sample(
    classes: torch.Tensor, num_classes: int, max_per_class: int | None, generator: torch.Generator
) -> torch.Tensor:
    """Indices of at most `max_per_class` uniformly drawn entries of each class of `classes` (N,) (all: None).

    The indices come grouped by class (classes in increasing order) and in random order within a class: each entry
    gets a random rank within its class (one float64 uniform draw per entry from `generator`), and the entries
    ranked below `max_per_class` are kept.
    """
    if max_per_class is None:
        return torch.arange(classes.shape[0], device=classes.device)
    noise = torch.rand(classes.shape[0], generator=generator, dtype=torch.float64).to(classes.device)
    order = torch.argsort(classes.double() + noise)
    counts = torch.bincount(classes, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(classes.shape[0], device=classes.device) - starts[classes[order]]
    return order[rank < max_per_class]
