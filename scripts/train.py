#!/usr/bin/env python
"""Train a ProtoSegformer with the Hugging Face Trainer.

    python scripts/train.py --output_dir runs/demo                       # built-in offline data, a few CPU minutes
    python scripts/train.py --dataset_name scene_parse_150 --reduce_labels --model_name_or_path nvidia/mit-b0 ...
    accelerate launch scripts/train.py ...                               # several processes / GPUs
    python scripts/train.py --output_dir runs/demo --resume_from_checkpoint last   # continue an interrupted run

Every option: `python scripts/train.py --help` (model, data and all TrainingArguments). The help and the check for
unknown flags read the options from the source files, and the paths are checked (a mistyped folder, a read-only
--output_dir), so all of these answer before torch loads. Ctrl-C stops with one line saying how to resume.
"""

import os
import sys

try:
    import proto_segformer  # noqa: F401
except ImportError:  # running from a source checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


def run() -> None:
    """--help, the flags and the paths (data, model, checkpoint, output folder) before torch loads, then training."""
    from proto_segformer.cli import check_flags, exit_interrupted
    from proto_segformer.preflight import check_failed, check_training_command
    from proto_segformer.source_help import training_flags, training_help, wants_help

    prog, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
    if wants_help(argv):
        print(training_help(argv, prog=prog))
        sys.exit(0)
    if not (len(argv) == 1 and argv[0].endswith(".json")):  # a json file of arguments is checked by the parser
        check_flags(prog, argv, training_flags())
    if check_failed(check_training_command, argv):
        sys.exit(2)
    try:
        from proto_segformer.run_training import main
    except KeyboardInterrupt:
        exit_interrupted("interrupted before training started; nothing was written.")
    main()  # Ctrl-C during the run: one line saying how to resume, exit code 130


if __name__ == "__main__":
    run()
