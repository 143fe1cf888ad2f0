#!/usr/bin/env python
"""Agreement of the bfloat16 similarity option with float32 on a trained model: same-label fraction and mean IoU on
the built-in validation split, same-label fraction on real photos.

    python scripts/benchmark_precision.py --model runs/demo --output_json benchmarks/precision.json

The code: benchmarks/precision.py; the arguments: benchmarks/arguments.py (PrecisionArguments).
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

from benchmarks.arguments import PrecisionArguments  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    (args,) = parse(PrecisionArguments, argv, description=__doc__)
    from benchmarks.precision import run
    from proto_segformer.checkpoint import CheckpointError

    try:
        run(args)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
