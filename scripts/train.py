#!/usr/bin/env python
"""Train a ProtoSegformer with the Hugging Face Trainer.

    python scripts/train.py --output_dir runs/demo                       # built-in offline data, a few CPU minutes
    python scripts/train.py --dataset_name scene_parse_150 --reduce_labels --model_name_or_path nvidia/mit-b0 ...
    accelerate launch scripts/train.py ...                               # several processes / GPUs

Every option: `python scripts/train.py --help` (model, data and all TrainingArguments; read from the source files,
so it answers without loading torch).
"""

import os
import sys

try:
    import proto_segformer  # noqa: F401
except ImportError:  # running from a source checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from proto_segformer.source_help import training_help, wants_help

    if wants_help(sys.argv[1:]):
        print(training_help(sys.argv[1:], prog=os.path.basename(sys.argv[0])))
        sys.exit(0)
    from proto_segformer.run_training import main

    main()
