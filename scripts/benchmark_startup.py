#!/usr/bin/env python
"""Seconds from `scripts/train.py` to its first training step on an ADE20K-style folder of 3,000 image pairs.

    python scripts/benchmark_startup.py [--images 3000] [--runs 2] [--folder DIR] [--baseline OTHER_CHECKOUT]

The code and the folder it generates: benchmarks/startup.py; the arguments: benchmarks/arguments.py
(StartupArguments).
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

from benchmarks.arguments import StartupArguments  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    (args,) = parse(StartupArguments, argv, description=__doc__)
    from benchmarks.startup import run

    return run(args)


if __name__ == "__main__":
    main()
