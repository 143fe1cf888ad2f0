#!/usr/bin/env python
"""Benchmark: add classes to a trained model from 1, 5 and 20 labelled images, without training, against a
parametric SegFormer with a new classifier row per class.

    python scripts/benchmark_add_classes.py --quick      # < 10 minutes on 2 CPU cores
    python scripts/benchmark_add_classes.py              # the full run (about 20 minutes)

The protocol and the code: benchmarks/add_classes.py; the arguments: benchmarks/arguments.py.
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

from benchmarks.arguments import AddClassesBenchmarkArguments  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse(AddClassesBenchmarkArguments, argv, description=__doc__)
    from benchmarks.add_classes import main

    return main(args)


if __name__ == "__main__":
    main()
