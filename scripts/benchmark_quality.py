#!/usr/bin/env python
"""Quality: ProtoSeg against transformers' parametric SegFormer, same preset, initial weights, data, augmentation,
optimiser, schedule and seeds, trained through scripts/train.py's code; prints mIoU (mean ± std over seeds), pixel
accuracy, training time and learnable parameters, and writes JSON.

    python scripts/benchmark_quality.py --quick                # 2 CPU cores, < 10 min: both data sets, 3 seeds
    python scripts/benchmark_quality.py                        # 2 CPU cores, < 60 min
    python scripts/benchmark_quality.py --large --device cuda  # a GPU: larger images and model, 5 seeds
    python scripts/benchmark_quality.py --quick --ablate       # + every ProtoSeg ablation (quality.ABLATIONS)
    python scripts/benchmark_quality.py --resummarize benchmarks/quality_quick.json   # statistics again, no training

The code: benchmarks/run_quality.py and benchmarks/quality.py; the arguments: benchmarks/arguments.py.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
try:
    from proto_segformer.cli import parse
except ImportError:  # a source checkout that is not pip-installed
    sys.path.insert(0, ROOT)
    from proto_segformer.cli import parse
sys.path.append(ROOT)  # benchmarks/ lives in the source tree, beside the package (appended: an installed package wins)

from benchmarks.arguments import QualityArguments  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse(QualityArguments, argv, description=__doc__)
    from benchmarks.run_quality import main

    return main(args)


if __name__ == "__main__":
    main()
