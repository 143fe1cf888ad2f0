#!/usr/bin/env python
"""Train a ProtoSegformer with the Hugging Face Trainer.

    python scripts/train.py --output_dir runs/demo                       # built-in offline data, a few CPU minutes
    python scripts/train.py --dataset_name scene_parse_150 --reduce_labels --model_name_or_path nvidia/mit-b0 ...
    accelerate launch scripts/train.py ...                               # several processes / GPUs
    python scripts/train.py --output_dir runs/demo --resume_from_checkpoint last   # continue an interrupted run

Every option: `python scripts/train.py --help` (model, data and all TrainingArguments). The help and the check for
unknown flags read the options from the source files, so both answer before torch loads.
"""

import os
import sys

try:
    import proto_segformer  # noqa: F401
except ImportError:  # running from a source checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

if __name__ == "__main__":
    from proto_segformer.cli import check_flags
    from proto_segformer.source_help import training_flags, training_help, wants_help

    prog, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
    if wants_help(argv):
        print(training_help(argv, prog=prog))
        sys.exit(0)
    if not (len(argv) == 1 and argv[0].endswith(".json")):  # a json file of arguments is checked by the parser
        check_flags(prog, argv, training_flags())
    from proto_segformer.run_training import main

    main()
