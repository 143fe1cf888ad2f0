#!/usr/bin/env python
"""ProtoSeg head versus the parametric SegFormer head: latency, training-step time, peak memory and FLOPs.

    python scripts/benchmark.py --quick                                            # mit-b0, K = 19, 150, 847
    python scripts/benchmark.py --presets mit-b0 mit-b2 --num_labels 19 150 847 --output_json benchmarks/cpu.json
    python scripts/benchmark.py --quick --prototype_dim 64                        # a smaller D, for speed

The protocol and the code: benchmarks/speed.py; the arguments: benchmarks/arguments.py (SpeedArguments).
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

from benchmarks.arguments import SpeedArguments  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    (args,) = parse(SpeedArguments, argv, description=__doc__)
    from benchmarks.speed import run

    return run(args)


if __name__ == "__main__":
    main()
