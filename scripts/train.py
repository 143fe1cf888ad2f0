#!/usr/bin/env python
"""Train a ProtoSegformer with the Hugging Face Trainer.

    python scripts/train.py --output_dir runs/demo                       # built-in offline data, a few CPU minutes
    python scripts/train.py --dataset_name scene_parse_150 --reduce_labels --model_name_or_path nvidia/mit-b0 ...
    accelerate launch scripts/train.py ...                               # several processes / GPUs
    python scripts/train.py --output_dir runs/demo --resume_from_checkpoint last   # continue an interrupted run

Every option: `python scripts/train.py --help` (model, data and all TrainingArguments).
"""

import os
import sys

try:
    from proto_segformer.run_training import main
except ImportError:  # running from a source checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from proto_segformer.run_training import main

if __name__ == "__main__":
    main()
