"""Every script's command line as a user types it: misspelled flags are one-line errors that name the closest real
flag (no prefix matching), and `--help` answers fast and lists every option."""

from __future__ import annotations

import dataclasses
import os
import re
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
        "benchmark_startup.py",
        "benchmark_unknown.py",
        "calibrate_unknown.py",
        "evaluate_model.py",
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
        ("benchmark_startup.py", ["--run", "1"], "--runs"),
        ("benchmark_unknown.py", ["--quik"], "--quick"),
        ("calibrate_unknown.py", ["--model", "m", "--dataset_nme", "x"], "--dataset_name"),
        ("evaluate_model.py", ["--model", "m", "--dataset_nme", "x"], "--dataset_name"),
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
    (tmp_path / "m").mkdir()
    (tmp_path / "support").mkdir()
    for support, message in [
        ("suport", "error: The --support_dir path 'suport' does not exist. Did you mean 'support'?"),
        ("support", "error: support/images does not exist: the support folder needs images/ and masks/."),
    ]:
        code, stdout, stderr, _ = run_script(
            "add_classes.py", "--model_dir", "m", "--support_dir", support, "--names", "a", "--output_dir", "o",
            cwd=tmp_path,
        )  # fmt: skip
        assert code == 2
        assert stderr.strip().splitlines() == [message]


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


@pytest.mark.slow
def test_benchmark_precision_names_a_missing_model_in_one_line(tmp_path):
    code, stdout, stderr, _ = run_script("benchmark_precision.py", "--model", "runs/nope", cwd=tmp_path)
    assert code == 2 and stderr.strip().splitlines()[-1] == "error: Checkpoint folder 'runs/nope' does not exist."
    assert "Traceback" not in stdout + stderr


# ------------------------------------------------------------------------------- paths, output folders, Ctrl-C, disk

POISON = 'raise ImportError("torch was imported before the paths were checked")\n'


def run_without_torch(script: str, *args: str, cwd: Path, prefix: list[str] | None = None) -> tuple[int, str]:
    """`script` with a `torch` that cannot be imported first on the path: an error it reports came before torch
    would have loaded (6-27 s on a loaded machine). (exit code, stdout + stderr)."""
    poison = cwd / ".poison"
    (poison / "torch").mkdir(parents=True, exist_ok=True)
    (poison / "torch" / "__init__.py").write_text(POISON)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(poison), str(ROOT)])}
    command = [*(prefix or []), sys.executable, str(ROOT / "scripts" / script), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    return done.returncode, done.stdout + done.stderr


def read_only_prefix(folder: Path) -> list[str] | None:
    """A command prefix under which `folder` is read-only: a private read-only bind mount (root, where `unshare`
    may), else the folder made read-only with chmod (which binds everyone but root); None when neither works."""
    script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    try:
        probe = subprocess.run(["unshare", "-m", "sh", "-c", script, str(folder), "touch", str(folder / "probe")],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if probe.returncode == 0 or "Read-only file system" not in probe.stderr:
        return None
    return ["unshare", "-m", "sh", "-c", script, str(folder)]


def script_commands(workspace: Path, out: Path) -> dict[str, list[str]]:
    """Each script writing into `out` (a folder, or a file in it), its other paths valid."""
    return {
        "train.py": ["--output_dir", str(out / "run"), "--max_steps", "2"],
        "predict.py": ["--model", "model", "--inputs", "photo.png", "--output_dir", str(out / "predictions")],
        "export_onnx.py": ["--model", "model", "--output_dir", str(out / "onnx")],
        "add_classes.py": ["--model_dir", "model", "--support_dir", "support", "--names", "a"]
        + ["--output_dir", str(out / "plus")],
        "push_to_hub.py": ["--model", "model", "--local_dir", str(out / "repo")],
        "visualize_prototypes.py": ["--model", "model", "--output", str(out / "atlas.png")],
    }


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    for folder in ("model", "support", "runs/demo"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "photo.png").write_bytes(b"")
    (tmp_path / "card.md").write_text("# card\n")
    return tmp_path


OUTPUT_SCRIPTS = sorted(script_commands(Path("w"), Path("o")))
FLAGS = {
    **dict.fromkeys(["train.py", "predict.py", "export_onnx.py", "add_classes.py"], "--output_dir"),
    "push_to_hub.py": "--local_dir",
    "visualize_prototypes.py": "--output",
}


@pytest.mark.parametrize("script", OUTPUT_SCRIPTS)
def test_an_output_folder_that_is_a_file_is_refused_before_torch_loads(script, workspace):
    taken = workspace / "taken"
    taken.write_text("a file")
    code, output = run_without_torch(script, *script_commands(workspace, taken)[script], cwd=workspace)
    (line,) = output.strip().splitlines()
    ends = (f"{taken} is a file.", f"{taken} ({FLAGS[script]}) is a file; choose a folder (it is created if needed).")
    assert code == 2 and line.startswith("error: ") and line.endswith(ends), output
    assert taken.read_text() == "a file"
    if script == "train.py":  # the folder itself a file: on main, FileExistsError after loading torch and the data
        code, output = run_without_torch(script, "--output_dir", str(taken), cwd=workspace)
        assert code == 2 and output.strip() == (
            f"error: The output folder {taken} (--output_dir) is a file; choose a folder (it is created if needed)."
        ), output


@pytest.mark.parametrize("script", OUTPUT_SCRIPTS)
def test_a_read_only_output_folder_is_refused_before_any_work(script, workspace):
    """On main, train.py found a read-only --output_dir at its first checkpoint (the training until then lost), the
    other scripts after loading torch and the model."""
    locked = workspace / "locked"
    locked.mkdir()
    prefix = read_only_prefix(locked)
    if prefix is None:
        pytest.skip("no way to make a folder read-only for root here (unshare/mount not permitted)")
    commands = [script_commands(workspace, locked)[script]]
    if script == "train.py":  # the folder itself read-only: on main found at the first checkpoint, after training
        commands.append(["--output_dir", str(locked), "--max_steps", "2"])
    try:
        for command in commands:
            code, output = run_without_torch(script, *command, cwd=workspace, prefix=prefix)
            (line,) = output.strip().splitlines()
            assert code == 2 and line.startswith(f"error: The output folder {locked}"), output
            assert f"({FLAGS[script]}) is not writable" in line, line
            assert line.endswith(("Read-only file system.", "Permission denied.")), line
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("predict.py", ["--model", "runs/demoo", "--inputs", "photo.png", "--output_dir", "o"],
         "The --model path 'runs/demoo' does not exist. Did you mean 'runs/demo'?"),
        ("predict.py", ["--model", "model", "--inputs", "photos.png", "--output_dir", "o"],
         "The --inputs path 'photos.png' does not exist. Did you mean 'photo.png'?"),
        ("export_onnx.py", ["--model", "runs/demoo", "--output_dir", "o"],
         "The --model path 'runs/demoo' does not exist. Did you mean 'runs/demo'?"),
        ("add_classes.py", ["--model_dir", "modle", "--support_dir", "support", "--names", "a", "--output_dir", "o"],
         "The --model_dir path 'modle' does not exist. Did you mean 'model'?"),
        ("push_to_hub.py", ["--model", "runs/demoo", "--local_dir", "o"],
         "The --model path 'runs/demoo' does not exist. Did you mean 'runs/demo'?"),
        ("push_to_hub.py", ["--model", "model", "--local_dir", "o", "--card", "crad.md"],
         "The --card path 'crad.md' does not exist. Did you mean 'card.md'?"),
        ("visualize_prototypes.py", ["--model", "runs/demoo"],
         "The --model path 'runs/demoo' does not exist. Did you mean 'runs/demo'?"),
        ("visualize_prototypes.py", ["--model", "model", "--dataset", "scenez"],
         "--dataset 'scenez' is neither a folder nor a built-in data set; did you mean 'scenes'?"),
    ],
)  # fmt: skip
def test_a_mistyped_path_is_answered_before_torch_loads_with_close_matches(script, args, message, workspace):
    code, output = run_without_torch(script, *args, cwd=workspace)
    assert code == 2 and output.strip().splitlines() == [f"error: {message}"], output
    assert not (workspace / "o").exists()


def run_interrupted(script: str, patch: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`script` run as a user runs it, the function `patch` ('module:name') replaced by one that sends the process
    SIGINT (Ctrl-C) when called."""
    module, name = patch.split(":")
    code = (
        "import os, runpy, signal, sys, importlib\n"
        f"module = importlib.import_module({module!r})\n"
        f"setattr(module, {name!r}, lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGINT))\n"
        f"sys.argv = [{str(ROOT / 'scripts' / script)!r}, *sys.argv[1:]]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    "script, patch, args, message",
    [
        ("export_onnx.py", "proto_segformer.checkpoint:validate_checkpoint",
         ["--model", "model", "--output_dir", "onnx"],
         "export_onnx.py: interrupted; the output folder is unchanged."),
        ("predict.py", "proto_segformer.prediction_files:collect_inputs",
         ["--model", "model", "--inputs", "photo.png", "--output_dir", "out"],
         "predict.py: interrupted; the outputs written so far are complete, each file whole."),
        ("add_classes.py", "proto_segformer.add_classes:add_classes_from_folder",
         ["--model_dir", "model", "--support_dir", "support", "--names", "a", "--output_dir", "plus"],
         "add_classes.py: interrupted; the existing files are unchanged."),
    ],
)  # fmt: skip
def test_ctrl_c_is_one_line_and_exit_code_130(script, patch, args, message, workspace):
    done = run_interrupted(script, patch, args, workspace)
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [message], done.stderr[-2000:]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    import torch
    from conftest import tiny_config
    from transformers import SegformerImageProcessorPil

    from proto_segformer import ProtoSegformerForSemanticSegmentation

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "model"
    ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=3)).save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def script_main(script: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        module = __import__(script.removesuffix(".py"))
    finally:
        sys.path.pop(0)
    return module.main


ENOSPC = OSError(28, "No space left on device")


@pytest.mark.parametrize(
    "script, target, message",
    [
        ("export_onnx.py", "proto_segformer.export.export_onnx", "Could not write the ONNX export into {out}: the"
         " disk is full (N free). {out} is unchanged."),
        ("predict.py", "proto_segformer.prediction_files.save_prediction", "Could not write the predictions into"
         " {out}: the disk is full (N free). The outputs written before are complete (each file is written whole); free"
         " some space and run the same command again."),
        ("push_to_hub.py", "proto_segformer.folder_writer.write_manifest", "Could not write the repository into"
         " {out}: the disk is full (N free). An earlier assembly there is unchanged; free some space and run it"
         " again."),
    ],
)  # fmt: skip
def test_a_full_disk_is_one_line_naming_the_folder(script, target, message, saved_model, tmp_path, capsys):
    from unittest import mock

    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    argv = {
        "export_onnx.py": ["--model", str(saved_model), "--output_dir", str(out)],
        "predict.py": ["--model", str(saved_model), "--inputs", str(tmp_path / "photo.png"), "--output_dir", str(out),
                       "--no_progress"],
        "push_to_hub.py": ["--model", str(saved_model), "--local_dir", str(out)],
    }[script]  # fmt: skip
    with mock.patch(target, side_effect=ENOSPC), pytest.raises(SystemExit) as exit_info:
        script_main(script)(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]  # besides progress bars
    assert "Traceback" not in err
    assert re.sub(r"\([\d.]+ (B|KiB|MiB|GiB) free\)", "(N free)", line) == "error: " + message.format(out=out), line
    if script != "predict.py":
        assert not out.exists()


def test_write_failures_are_told_apart_from_other_errors(tmp_path, monkeypatch):
    import shutil

    import torch

    from proto_segformer import output_folders
    from proto_segformer.output_folders import is_disk_full, is_write_failure, write_failure_message

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with pytest.raises(RuntimeError) as torch_error:  # torch 2.13: "[enforce fail at inline_container.cc:672] ..."
        torch.save({"weights": torch.zeros(10000)}, "/dev/full")
    with pytest.raises(OSError) as os_error:
        Path("/dev/full").write_text("x" * 100000)
    assert is_write_failure(torch_error.value) and is_write_failure(os_error.value)
    assert not is_write_failure(ValueError("bad value")) and not is_write_failure(FileNotFoundError(2, "missing"))
    assert is_disk_full(os_error.value, tmp_path)  # errno 28, whatever the free space
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(output_folders.shutil, "disk_usage", lambda path: usage._replace(free=2**40))
    assert not is_disk_full(torch_error.value, tmp_path)  # no errno: plenty of space means another cause
    assert "RuntimeError: [enforce fail at inline_container.cc" in write_failure_message(
        torch_error.value, tmp_path, "x", ""
    )
    monkeypatch.setattr(output_folders.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    assert is_disk_full(torch_error.value, tmp_path)
    assert write_failure_message(torch_error.value, tmp_path, "checkpoint-4", "Intact.") == (
        f"Could not write checkpoint-4 into {tmp_path}: the disk is full (1000 B free). Intact."
    )
