"""Every script's command line as a user types it: misspelled flags are one-line errors that name the closest real
flag (no prefix matching), and `--help` answers fast and lists every option."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proto_segformer.cli import closest_flags, unknown_arguments_message

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(path.name for path in (ROOT / "scripts").glob("*.py"))
# A generous bound for a loaded CI machine; measured: 0.3-0.6 s on 2 cores at load average 3-5.
HELP_SECONDS = 10.0


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: float = 300) -> tuple[int, str, str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "120"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - started


def test_every_script_is_listed():
    assert SCRIPTS == [
        "add_classes.py",
        "benchmark.py",
        "benchmark_add_classes.py",
        "benchmark_metric.py",
        "benchmark_precision.py",
        "benchmark_quality.py",
        "export_onnx.py",
        "make_card_pictures.py",
        "predict.py",
        "push_to_hub.py",
        "train.py",
        "visualize_prototypes.py",
    ]


# ------------------------------------------------------------------------------------------------ misspelled flags


@pytest.mark.parametrize(
    "args, message",
    [
        (["--reduce_lables"], "unknown flag --reduce_lables; did you mean --reduce_labels?"),
        (["--reduce_label"], "unknown flag --reduce_label; did you mean --reduce_labels?"),  # once a prefix match
        (["--max_step", "20"], "unknown flag --max_step; did you mean --max_steps?"),  # once a prefix match
        (["--ouptut_dir", "runs/x"], "unknown flag --ouptut_dir; did you mean --output_dir?"),
    ],
)
def test_train_misspelled_flag_is_a_one_line_error(tmp_path, args, message):
    code, stdout, stderr, seconds = run_script("train.py", "--output_dir", str(tmp_path / "run"), *args, cwd=tmp_path)
    assert code == 2, stderr
    assert stderr.strip().splitlines() == [f"train.py: error: {message} (--help lists every option)"]
    assert "Traceback" not in stdout + stderr
    assert not (tmp_path / "run").exists()  # nothing started
    print(f"train.py {' '.join(args)}: exit {code} in {seconds:.1f} s")


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("predict.py", ["--model", "m", "--inputs", "a", "--output_dir", "o", "--batch", "2"], "--batch_size"),
        ("predict.py", ["--model", "m", "--inputs", "a", "--output_dir", "o", "--prototype_map"], "--prototype_maps"),
        ("push_to_hub.py", ["--model", "m", "--repoid", "a/b"], "--repo_id"),
        ("add_classes.py", ["--model_dir", "m", "--support", "s", "--names", "a"], "--support_dir"),
        ("visualize_prototypes.py", ["--model", "m", "--num_image", "3"], "--num_images"),
        ("make_card_pictures.py", ["--modle", "m"], "--model"),
        ("benchmark.py", ["--quick", "--repeat", "1"], "--repeats"),
        ("benchmark_add_classes.py", ["--quik"], "--quick"),
        ("benchmark_metric.py", ["--image", "3"], "--images"),
        ("benchmark_quality.py", ["--quick", "--ablatoins", "M-1"], "--ablations"),
        ("benchmark_precision.py", ["--model", "m", "--num_valdation", "3"], "--num_validation"),
        (
            "predict.py",
            ["--model", "m", "--inputs", "a", "--output_dir", "o", "--similarity", "x"],
            "--similarity_dtype",
        ),
    ],
)
def test_every_script_names_the_closest_flag(script, args, message, tmp_path):
    code, stdout, stderr, _ = run_script(script, *args, cwd=tmp_path)
    assert code == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"{script}: error: unknown flag ") and f"did you mean {message}?" in line, line
    assert "Traceback" not in stdout + stderr


def test_closest_flags_prefers_the_abbreviated_flag_and_the_underscore_spelling():
    known = ["--reduce_labels", "--reduce-labels", "--check_samples", "--max_steps", "--max-steps", "--max_scale"]
    assert closest_flags("--reduce_lables", known) == ["--reduce_labels"]
    assert closest_flags("--reduce_label", known) == ["--reduce_labels"]
    assert closest_flags("--max-step", known) == ["--max_steps"]
    assert closest_flags("--zzz", known) == []
    assert unknown_arguments_message(["--zzz", "1"], known) == "unknown flag --zzz"
    assert unknown_arguments_message(["--max_step=3"], known) == "unknown flag --max_step; did you mean --max_steps?"
    assert unknown_arguments_message(["stray"], known) == "unexpected argument(s) stray"


def test_a_bad_value_is_a_one_line_error(tmp_path):
    code, _, stderr, _ = run_script("predict.py", "--model", "m", "--inputs", "a", "--output_dir", "o", "--mode", "x")
    assert code == 2
    assert stderr.strip().splitlines() == [
        "predict.py: error: argument --mode: invalid choice: 'x' (choose from 'auto', 'whole', 'slide')"
        " (--help lists every option)"
    ]


def test_add_classes_bad_input_is_a_one_line_error(tmp_path):
    code, stdout, stderr, _ = run_script(
        "add_classes.py", "--model_dir", "m", "--support_dir", "none", "--names", "a", "--output_dir", "o", cwd=tmp_path
    )
    assert code == 2
    assert stderr.strip().splitlines() == [
        "error: none/images does not exist: the support folder needs images/ and masks/."
    ]


# -------------------------------------------------------------------------------------------------------- --help


def expected_options(script: str) -> list[str]:
    """Options every script's help must list: the fields of its arguments dataclass(es)."""
    if script == "train.py":
        from transformers import TrainingArguments

        names = [field.name for field in dataclasses.fields(TrainingArguments) if field.init]
        assert len(names) > 100
        return ["--reduce_labels", "--model_name_or_path", "--builtin_num_train"] + [f"--{name}" for name in names]
    sys.path.append(str(ROOT))
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"help_{script[:-3]}", ROOT / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    classes = [
        value for value in vars(module).values() if dataclasses.is_dataclass(value) and value.__name__.endswith("s")
    ]
    assert classes, script
    return [f"--{field.name}" for cls in classes for field in dataclasses.fields(cls)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_fast_and_lists_every_option(script, tmp_path):
    code, stdout, stderr, seconds = run_script(script, "--help", cwd=tmp_path)
    assert code == 0, stderr
    listed = {word.rstrip(",") for word in stdout.split() if word.startswith("--")}
    missing = [option for option in expected_options(script) if option not in listed]
    assert not missing, missing
    assert "Traceback" not in stderr and "warn" not in stderr.lower(), stderr
    print(f"{script} --help: {seconds:.2f} s")
    assert seconds < HELP_SECONDS


def test_train_help_and_flag_check_from_source_match_the_real_parser():
    """train.py's help and flag check (read from the source files) know exactly the real parser's flags and show its
    defaults."""
    from proto_segformer.run_training import build_parser
    from proto_segformer.source_help import REQUIRED, module_names, training_fields, training_flags, training_sources

    fields = training_fields()
    constants = module_names(training_sources()[0])
    for argv, demo in (([], True), (["--dataset_name", "x"], False)):
        parser = build_parser(argv)
        assert training_flags() == set(parser._option_string_actions)
        defaults = {**constants["COMMON_DEFAULTS"], **(constants["BUILTIN_DEMO_DEFAULTS"] if demo else {})}
        # dataloader_pin_memory: build_parser turns it off without an accelerator (the help says transformers' True);
        # debug: HfArgumentParser shows None for the field's "".
        different = []
        for spec in fields:
            shown = defaults.get(spec.name, spec.default)
            actual = parser.get_default(spec.name)
            if shown is REQUIRED or spec.name in ("dataloader_pin_memory", "debug"):
                continue
            if str(shown) != str(getattr(actual, "value", actual)):
                different.append((spec.name, shown, actual))
        assert not different


def test_parse_fills_the_dataclass_and_refuses_prefixes(capsys):
    from proto_segformer.cli import ArgumentParser, parse

    @dataclasses.dataclass
    class Options:
        max_steps: int = dataclasses.field(default=1, metadata={"help": "Steps."})
        reduce_labels: bool = dataclasses.field(default=False, metadata={"help": "Shift labels."})

    assert parse(Options, ["--max_steps", "3", "--reduce_labels"]) == (Options(max_steps=3, reduce_labels=True),)
    assert ArgumentParser(Options).parse_args_into_dataclasses(args=[]) == (Options(),)
    with pytest.raises(SystemExit) as exit_info:
        parse(Options, ["--max_step", "3"])
    assert exit_info.value.code == 2
    assert "unknown flag --max_step; did you mean --max_steps?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        parse(Options, ["--help"])
    assert exit_info.value.code == 0
    assert "--max_steps int Steps. (default: 1)" in " ".join(capsys.readouterr().out.split())


def test_benchmark_precision_names_a_missing_model_in_one_line(tmp_path):
    code, stdout, stderr, _ = run_script("benchmark_precision.py", "--model", "runs/nope", cwd=tmp_path)
    assert code == 2 and stderr.strip().splitlines()[-1] == "error: Checkpoint folder 'runs/nope' does not exist."
    assert "Traceback" not in stdout + stderr
