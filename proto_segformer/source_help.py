"""`--help` and the flag check of scripts/train.py without importing torch: the options read from the source files.

The training parser (`run_training.build_parser`) is an `HfArgumentParser` over ModelArguments and
DataTrainingArguments (proto_segformer/run_training.py) and transformers' TrainingArguments. Importing those loads
torch, datasets and the Trainer (5-17 s); their fields are plain dataclass fields, so the help is made from the
source files with Python's `ast` instead (names, types, defaults, help texts, choices), with the defaults
build_parser sets. About 0.3 s. tests/test_cli.py checks that it lists exactly the options and defaults of the real
parser, so the two cannot drift apart. Only the standard library is imported here.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED = object()  # the default of a field without one


@dataclass(frozen=True)
class SourceField:
    """A dataclass field as written in its source file."""

    name: str
    annotation: str
    default: Any  # the value when it is a literal (or an expression over module literals), else its source text
    help: str
    choices: tuple | None = None


@functools.cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


class _ModuleNames(dict):
    """A source module's literal constants; names it imports from sibling modules resolve on first use."""

    def __init__(self, path: Path):
        super().__init__()
        self.imports: dict[str, tuple[Path, str]] = {}
        for node in _parse(path).body:
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                package_dir = path.parent
                for _ in range(node.level - 1):
                    package_dir = package_dir.parent
                base = package_dir.joinpath(*node.module.split("."))
                source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = (source, alias.name)
            targets, value = [], None
            if isinstance(node, ast.Assign):
                targets, value = [t.id for t in node.targets if isinstance(t, ast.Name)], node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                targets, value = [node.target.id], node.value
            if targets:
                try:
                    self.update(dict.fromkeys(targets, ast.literal_eval(value)))
                except ValueError:
                    pass

    def __missing__(self, name: str) -> Any:
        if name in self.imports:
            source, original = self.imports[name]
            if source.is_file():
                names = module_names(source)
                if original in names:
                    return names[original]
        raise KeyError(name)


@functools.cache
def module_names(path: Path) -> _ModuleNames:
    return _ModuleNames(path)


_SAFE_BUILTINS = {"sorted": sorted, "list": list, "tuple": tuple, "len": len, "str": str, "repr": repr}


def _render(node: ast.expr, names: dict) -> Any:
    """The value of a literal, or of an expression (an f-string, `sorted(NAME)`) over the module's literal constants;
    failing that, the expression's source text."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    try:
        code = compile(ast.Expression(node), "<help>", "eval")
        return eval(code, {"__builtins__": _SAFE_BUILTINS}, names)  # our own and transformers' installed source
    except Exception:
        return ast.unparse(node)


def dataclass_fields_from_source(path: str | Path, class_name: str) -> list[SourceField]:
    """The init fields of dataclass `class_name` defined in the source file `path`, in order, without importing it."""
    path = Path(path).resolve()
    names = module_names(path)
    classes = [node for node in _parse(path).body if isinstance(node, ast.ClassDef) and node.name == class_name]
    if not classes:
        raise LookupError(f"No class {class_name} in {path}.")
    fields = []
    for node in classes[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        annotation = ast.unparse(node.annotation)
        if annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        default, help_text, choices = REQUIRED, "", None
        value = node.value
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
            keywords = {keyword.arg: keyword.value for keyword in value.keywords}
            if "init" in keywords and _render(keywords["init"], names) is False:
                continue
            if "default" in keywords:
                default = _render(keywords["default"], names)
            elif "default_factory" in keywords:
                factory = keywords["default_factory"]
                if isinstance(factory, ast.Lambda):
                    default = _render(factory.body, names)
                elif isinstance(factory, ast.Name) and factory.id in ("list", "dict", "tuple"):
                    default = {"list": [], "dict": {}, "tuple": ()}[factory.id]
                else:
                    default = f"{ast.unparse(factory)}()"
            metadata = keywords.get("metadata")
            if isinstance(metadata, ast.Dict):
                pairs = zip(metadata.keys, metadata.values)
                entries = {key.value: item for key, item in pairs if isinstance(key, ast.Constant)}
                help_text = str(_render(entries["help"], names)) if "help" in entries else ""
                rendered = _render(entries["choices"], names) if "choices" in entries else None
                choices = tuple(rendered) if isinstance(rendered, (list, tuple)) else None
        elif value is not None:
            default = _render(value, names)
        fields.append(SourceField(node.target.id, annotation, default, help_text, choices))
    return fields


def dataclass_fields(cls: type) -> list[SourceField]:
    """The init fields of an imported dataclass, as SourceField."""
    fields = []
    for spec in dataclasses.fields(cls):
        if not spec.init:
            continue
        if spec.default is not dataclasses.MISSING:
            default = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        else:
            default = REQUIRED
        annotation = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", str(spec.type))
        choices = tuple(spec.metadata["choices"]) if spec.metadata.get("choices") else None
        fields.append(SourceField(spec.name, annotation, default, spec.metadata.get("help", ""), choices))
    return fields


def help_from_fields(
    prog: str, description: str, groups: Sequence[tuple[str, list[SourceField]]], defaults: dict[str, Any]
) -> str:
    """argparse's help for the `--name` options of `groups` of source fields; `defaults` override the fields'."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    for title, fields in groups:
        group = parser.add_argument_group(title)
        for spec in fields:
            default = defaults.get(spec.name, spec.default)
            text = spec.help if default is REQUIRED else f"{spec.help} (default: {default})"
            negation = [flag for flag in option_strings(spec) if flag.startswith("--no_")]
            if negation:
                text += f"; {negation[0]} turns it off"
            metavar = None if spec.choices else spec.annotation.replace("%", "%%")
            group.add_argument(
                f"--{spec.name}",
                metavar=metavar,
                choices=spec.choices,
                help=text.replace("%", "%%"),
                required=default is REQUIRED,
            )
    return parser.format_help()


def training_sources() -> tuple[Path, Path]:
    """proto_segformer/run_training.py and the installed transformers' training_args.py (found, not imported)."""
    transformers_spec = importlib.util.find_spec("transformers")
    if transformers_spec is None or not transformers_spec.submodule_search_locations:
        raise ImportError("transformers is not installed: pip install 'transformers>=5'.")
    training_args = Path(list(transformers_spec.submodule_search_locations)[0]) / "training_args.py"
    return Path(__file__).resolve().parent / "run_training.py", training_args


def training_help(argv: Sequence[str], prog: str = "train.py") -> str:
    """The help of `run_training.build_parser(argv)`: model, data and training options with build_parser's defaults
    (the demo's when there is no --dataset_name)."""
    run_training, training_args = training_sources()
    constants = module_names(run_training)
    defaults = dict(constants["COMMON_DEFAULTS"])
    if not any(arg == "--dataset_name" or arg.startswith("--dataset_name=") for arg in argv):
        defaults.update(constants["BUILTIN_DEMO_DEFAULTS"])
    description = (ast.get_docstring(_parse(run_training)) or "").split("\n\n")[0]
    groups = [
        ("model (ModelArguments)", dataclass_fields_from_source(run_training, "ModelArguments")),
        ("data (DataTrainingArguments)", dataclass_fields_from_source(run_training, "DataTrainingArguments")),
        ("training (TrainingArguments)", dataclass_fields_from_source(training_args, "TrainingArguments")),
    ]
    return help_from_fields(prog, description, groups, defaults)


def training_fields() -> list[SourceField]:
    """The fields of run_training.build_parser's dataclasses, in its order."""
    run_training, training_args = training_sources()
    return [
        *dataclass_fields_from_source(run_training, "ModelArguments"),
        *dataclass_fields_from_source(run_training, "DataTrainingArguments"),
        *dataclass_fields_from_source(training_args, "TrainingArguments"),
    ]


def option_strings(spec: SourceField) -> list[str]:
    """The flags HfArgumentParser makes for a field: `--a_b`, `--a-b`, and `--no_a_b`, `--no-a-b` for a bool
    field that defaults to True."""
    flags = [f"--{spec.name}"] + ([f"--{spec.name.replace('_', '-')}"] if "_" in spec.name else [])
    if spec.default is True and spec.annotation in ("bool", "bool | None", "Optional[bool]"):
        flags += [f"--no_{spec.name}", f"--no-{spec.name.replace('_', '-')}"]
    return flags


def training_flags() -> set[str]:
    """Every flag scripts/train.py accepts."""
    return {"-h", "--help", *(flag for spec in training_fields() for flag in option_strings(spec))}


def wants_help(argv: Sequence[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in argv)
