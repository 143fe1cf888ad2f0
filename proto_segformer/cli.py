"""Command-line parsing shared by every script: no prefix matching, and an unknown flag is a one-line error that
names the closest real flags.

argparse takes any unambiguous prefix of a flag by default (`--reduce_label` silently means `--reduce_labels`,
`--max_step` means `--max_steps`), and `HfArgumentParser` turns an unknown flag into a `ValueError` traceback. The
`ArgumentParser` here is an `HfArgumentParser` with `allow_abbrev=False` whose errors are one line, exit code 2:

    train.py: error: unknown flag --reduce_lables; did you mean --reduce_labels? (--help lists every option)

Importing this module loads nothing heavy; `ArgumentParser` loads `transformers.HfArgumentParser` on first use
(about 1 s, no torch). `parse` answers `--help` from the dataclass fields before that, so a script that parses its
arguments before importing anything else answers `--help` in about 0.1 s. `check_flags` serves scripts/train.py,
which checks its flags before loading torch.

Failures after parsing are one line too: `run_main` answers Ctrl-C with `prog: interrupted...` and exit code 130
(no traceback), and `exit_if_write_failure` a failed write (a full disk) with the folder, the cause and what is
intact, exit code 1. The paths are checked by `proto_segformer.preflight` before torch loads.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a command stopped with Ctrl-C


def closest_flags(flag: str, known: Iterable[str], count: int = 2) -> list[str]:
    """The known flags closest to a mistyped one, best first: the flags it abbreviates if any, else difflib's
    closest (ratio >= 0.6, within 0.1 of the best). The `--a-b` alias HfArgumentParser adds beside `--a_b` counts
    once, in the underscore spelling."""
    spellings = {option.replace("-", "_"): option for option in sorted(set(known))}
    typed = flag.replace("-", "_")
    prefixed = sorted(name for name in spellings if name.startswith(typed) and name != typed)
    if prefixed:
        return [spellings[name] for name in prefixed[:count]]
    scored = sorted(
        ((difflib.SequenceMatcher(None, typed, name).ratio(), name) for name in spellings), key=lambda x: -x[0]
    )
    best = scored[0][0] if scored else 0.0
    return [spellings[name] for ratio, name in scored[:count] if ratio >= 0.6 and ratio >= best - 0.1]


def _is_flag(text: str) -> bool:
    if not text.startswith("-") or text == "-":
        return False
    try:
        float(text)  # a negative number is a value, not a flag
    except ValueError:
        return True
    return False


def unknown_arguments_message(remaining: Sequence[str], known: Iterable[str]) -> str:
    """One sentence naming each unknown flag (with the closest known flags) or stray value in `remaining`."""
    known = list(known)
    flags = [text.split("=", 1)[0] for text in remaining if _is_flag(text)]
    parts = []
    for flag in flags:
        matches = closest_flags(flag, known)
        hint = f"; did you mean {' or '.join(matches)}?" if matches else ""
        parts.append(f"unknown flag {flag}{hint}")
    if not flags:
        parts.append(f"unexpected argument(s) {' '.join(remaining)}")
    return "; ".join(parts)


def usage_error(prog: str, message: str) -> NoReturn:
    """One line on stderr, exit code 2 (argparse's code for usage errors); no multi-line usage dump."""
    sys.stderr.write(f"{prog}: error: {message} (--help lists every option)\n")
    raise SystemExit(2)


def check_flags(prog: str, args: Sequence[str], known: Iterable[str]) -> None:
    """`usage_error` naming the flags of `args` that are not in `known` (and the closest known ones), if any."""
    known = set(known)
    unknown = [text for text in args if _is_flag(text) and text.split("=", 1)[0] not in known]
    if unknown:
        usage_error(prog, unknown_arguments_message(unknown, [flag for flag in known if flag.startswith("--")]))


def exit_interrupted(message: str = "interrupted.") -> NoReturn:
    """Ctrl-C: one line on stderr (`prog: message`), exit code 130, no traceback."""
    sys.stderr.write(f"{os.path.basename(sys.argv[0])}: {message}\n")
    raise SystemExit(INTERRUPTED_EXIT_CODE)


def run_main(main: Callable[..., Any], *args: Any, interrupted: str = "interrupted.") -> NoReturn:
    """`sys.exit(main(*args))`, with Ctrl-C answered by `exit_interrupted(interrupted)`."""
    try:
        code = main(*args)
    except KeyboardInterrupt:
        exit_interrupted(interrupted)
    raise SystemExit(code)


def exit_if_write_failure(error: BaseException, folder: str, what: str, intact: str) -> None:
    """When `error` is a failed write (a full disk above all: `output_folders.is_write_failure`), one line on stderr
    naming `folder`, the cause and `intact` (what is unchanged, how to go on), exit code 1; otherwise return (the
    caller re-raises)."""
    from .output_folders import is_write_failure, write_failure_message

    if is_write_failure(error):
        sys.stderr.write(f"error: {write_failure_message(error, folder, what, intact)}\n")
        raise SystemExit(1)


def parse(dataclass_types: Any, args: Sequence[str] | None = None, description: str | None = None) -> tuple:
    """The command line parsed into instances of `dataclass_types` by `ArgumentParser`. `--help` is answered from the
    dataclasses' fields without importing transformers (about 0.1 s instead of 1-3 s); `description`: its first
    paragraph heads the help."""
    types = list(dataclass_types) if isinstance(dataclass_types, (list, tuple)) else [dataclass_types]
    argv = sys.argv[1:] if args is None else list(args)
    if any(arg in ("-h", "--help") for arg in argv):
        from .source_help import dataclass_fields, help_from_fields

        prog = os.path.basename(sys.argv[0])
        groups = [(cls.__name__, dataclass_fields(cls)) for cls in types]
        print(help_from_fields(prog, (description or "").strip().split("\n\n")[0], groups, {}))
        raise SystemExit(0)
    return _argument_parser_class()(types).parse_args_into_dataclasses(args=argv)


@functools.cache
def _argument_parser_class() -> type:
    from transformers import HfArgumentParser

    class ArgumentParser(HfArgumentParser):
        """`HfArgumentParser` without prefix matching; unknown flags and bad values end in a one-line error (exit 2),
        unknown flags reported first (before argparse complains about a required flag the typo left out)."""

        __module__, __qualname__ = __name__, "ArgumentParser"

        def __init__(self, dataclass_types: Any = None, **kwargs):
            kwargs.setdefault("allow_abbrev", False)
            super().__init__(dataclass_types, **kwargs)

        def parse_args_into_dataclasses(self, args=None, return_remaining_strings: bool = False, **kwargs):
            if not return_remaining_strings:
                check_flags(self.prog, sys.argv[1:] if args is None else args, self._option_string_actions)
            *outputs, remaining = super().parse_args_into_dataclasses(
                args=args, return_remaining_strings=True, **kwargs
            )
            if return_remaining_strings:
                return (*outputs, remaining)
            if remaining:
                self.error(unknown_arguments_message(remaining, self._option_string_actions))
            return tuple(outputs)

        def parse_args(self, args=None, namespace=None):
            check_flags(self.prog, sys.argv[1:] if args is None else args, self._option_string_actions)
            namespace, remaining = self.parse_known_args(args, namespace)
            if remaining:
                self.error(unknown_arguments_message(remaining, self._option_string_actions))
            return namespace

        def error(self, message: str) -> NoReturn:
            usage_error(self.prog, message)

    return ArgumentParser


if TYPE_CHECKING:
    from transformers import HfArgumentParser as ArgumentParser  # noqa: F401


def __getattr__(name: str) -> Any:
    if name == "ArgumentParser":  # built on first use: importing transformers takes about a second
        return _argument_parser_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
