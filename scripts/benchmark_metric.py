#!/usr/bin/env python
"""Speed of the packaged mean IoU against a plain per-image numpy implementation.

    python scripts/benchmark_metric.py [--images 500] [--size 512] [--classes 150]

The code: benchmarks/metric.py; the arguments: benchmarks/arguments.py (MetricArguments).
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

from benchmarks.arguments import MetricArguments  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    (args,) = parse(MetricArguments, argv, description=__doc__)
    from benchmarks.metric import run

    return run(args)


if __name__ == "__main__":
    main()
