#!/usr/bin/env python
"""Seconds from `scripts/train.py` to its first training step on an ADE20K-style folder of 3,000 image pairs.

    python scripts/benchmark_startup.py [--images 3000] [--runs 2] [--folder DIR]

The code and the folder it generates: benchmarks/startup.py.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path.append(ROOT)  # benchmarks/ lives in the source tree, beside the package (appended: an installed package wins)

from benchmarks.startup import main  # noqa: E402

if __name__ == "__main__":
    main()
