#!/usr/bin/env python
"""Unknown pixels: an open-set version of the built-in scenes (the last item classes never appear in training images,
they appear at test time); ProtoSeg's unknown scores (max_similarity, margin, spread, k-NN) against the parametric
SegFormer's (max softmax probability, max logit, energy), both trained on the same data and budget: pixel AUROC, AP
and FPR at 95 % TPR, known-class mIoU, 3 seeds; then ProtoSeg's calibrated rejection and classes added with
add_classes on unrelated photos. Prints the README table and writes JSON.

    python scripts/benchmark_unknown.py            # 2 shared CPU cores, about 20 min: 3 seeds x 2 heads
    python scripts/benchmark_unknown.py --quick    # one seed, a few steps: checks the code, not the numbers

The code: benchmarks/unknown.py.
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

from benchmarks.unknown import UnknownBenchmarkArguments  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse(UnknownBenchmarkArguments, argv, description=__doc__)
    from benchmarks.unknown import main

    return main(args)


if __name__ == "__main__":
    main()
