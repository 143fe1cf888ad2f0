#!/usr/bin/env python
"""Quality: ProtoSeg against transformers' parametric SegFormer, same preset, initial weights, data, augmentation,
optimiser, schedule and seeds, trained through scripts/train.py's code; prints mIoU (mean ± std over seeds), pixel
accuracy, training time and learnable parameters, and writes JSON.

    python scripts/benchmark_quality.py --quick                # 2 CPU cores, < 10 min: both data sets, 3 seeds
    python scripts/benchmark_quality.py                        # 2 CPU cores, < 60 min
    python scripts/benchmark_quality.py --large --device cuda  # a GPU: larger images and model, 5 seeds
    python scripts/benchmark_quality.py --quick --ablate       # + every ProtoSeg ablation (quality.ABLATIONS)
    python scripts/benchmark_quality.py --quick --ablations M-1,init-from-data --datasets scenes-large
    python scripts/benchmark_quality.py --resummarize benchmarks/quality_quick.json   # statistics again, no training
    python scripts/benchmark_quality.py --ablations M-1 --datasets scenes-large --seeds 0 \
        --reuse benchmarks/quality_full.json    # baseline runs taken from the full result: only M-1 trains

Logic: proto_segformer/quality.py.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    import proto_segformer  # noqa: F401
except ImportError:  # a source checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import HfArgumentParser

from proto_segformer.quality import (
    ABLATIONS,
    DATASETS,
    MODES,
    ComparisonSettings,
    QualityInputError,
    compare,
    format_comparison,
    format_table,
    reusable_runs,
    run_comparison,
    summarize,
)
from proto_segformer.run_training import parse_config_overrides


@dataclass
class QualityArguments:
    quick: bool = field(default=False, metadata={"help": "The quick mode (2 CPU cores, under 10 minutes)."})
    large: bool = field(default=False, metadata={"help": "The large mode, for a GPU (use with --device cuda)."})
    datasets: str = field(default=",".join(DATASETS), metadata={"help": "Built-in data sets, comma-separated."})
    seeds: str | None = field(default=None, metadata={"help": "Seeds, comma-separated (default: the mode's)."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto (cuda when available)."})
    ablate: bool = field(default=False, metadata={"help": f"Also run every ProtoSeg ablation: {sorted(ABLATIONS)}."})
    ablations: str | None = field(default=None, metadata={"help": "Only these ablations (comma-separated)."})
    train_options: str | None = field(
        default=None,
        metadata={"help": "scripts/train.py options for every run, 'name=value,...' (e.g. 'max_steps=200')."},
    )
    workers: int | None = field(
        default=None, metadata={"help": "Runs at a time (default: 2 on CPU, each on one thread; 1 on a GPU)."}
    )
    threads: int | None = field(default=None, metadata={"help": "torch threads per run (default 1 on CPU)."})
    reuse: str | None = field(
        default=None,
        metadata={
            "help": "Earlier result JSONs (comma-separated) made with the same options: their runs that this comparison"
            " would repeat (e.g. the parametric baseline and the default ProtoSeg) are taken as they are instead of"
            " trained again (the first file wins)."
        },
    )
    resummarize: str | None = field(
        default=None,
        metadata={"help": "Recompute the summary and comparison of an existing JSON file from its runs (no training)."},
    )
    output: str | None = field(
        default=None, metadata={"help": "JSON file (default: benchmarks/quality[_ablations]_<mode>.json)."}
    )


def build_settings(args: QualityArguments) -> tuple[ComparisonSettings, str]:
    """The comparison settings and the device the arguments ask for (clear errors for bad values)."""
    if args.quick and args.large:
        raise QualityInputError("--quick and --large exclude each other.")
    mode = "quick" if args.quick else "large" if args.large else "full"
    device = args.device
    if device not in ("auto", "cpu", "cuda"):
        raise QualityInputError(f"--device must be cpu, cuda or auto, got {device!r}.")
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise QualityInputError("--device cuda: no CUDA device is available here; use --device cpu.")
    train_options = dict(MODES[mode]["train_args"])
    train_options["use_cpu"] = device == "cpu"
    try:
        requested = parse_config_overrides(args.train_options)
        train_options.update(requested)
        seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else tuple(MODES[mode]["seeds"])
    except ValueError as error:
        raise QualityInputError(f"Bad --seeds or --train_options: {error}") from error
    variants: dict[str, dict] = {"default": {}}
    if args.ablate or args.ablations:
        names = [n.strip() for n in args.ablations.split(",")] if args.ablations else list(ABLATIONS)
        unknown = [n for n in names if n not in ABLATIONS]
        if unknown:
            raise QualityInputError(f"Unknown ablation(s) {unknown}; choose from {', '.join(ABLATIONS)}.")
        variants.update({n: ABLATIONS[n] for n in names})
    datasets = tuple(d.strip() for d in args.datasets.split(",") if d.strip())
    # The mode's per-data-set options (e.g. a longer schedule for scenes-large) yield to --train_options.
    dataset_options = {
        name: {k: v for k, v in options.items() if k not in requested}
        for name, options in MODES[mode].get("dataset_train_args", {}).items()
        if name in datasets
    }
    return ComparisonSettings(datasets, seeds, train_options, variants, mode, dataset_options), device


def default_output(settings: ComparisonSettings) -> Path:
    ablated = "_ablations" if len(settings.variants) > 1 else ""
    return Path(__file__).resolve().parent.parent / "benchmarks" / f"quality{ablated}_{settings.mode}.json"


def read_result(path: str) -> dict:
    """A benchmark_quality result file (clear errors for a missing or unreadable one)."""
    source = Path(path)
    if not source.is_file():
        raise QualityInputError(f"{path} is not a file.")
    try:
        return json.loads(source.read_text())
    except json.JSONDecodeError as error:
        raise QualityInputError(f"{path} is not a benchmark_quality result ({error}).") from error


def resummarize(path: str, output: str | None) -> dict:
    """Recompute `summary` and `comparison` of a result file from its `runs` (e.g. after the statistics changed)."""
    result = read_result(path)
    try:
        result["summary"], result["comparison"] = summarize(result["runs"]), compare(result["runs"])
    except (KeyError, TypeError) as error:
        raise QualityInputError(f"{path} is not a benchmark_quality result ({error}).") from error
    target = Path(output or path)
    target.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def print_result(result: dict, output: Path) -> None:
    print()
    print(format_table(result["summary"]))
    print()
    print(format_comparison(result["comparison"]))
    print(f"\n{result['wall_seconds']:.0f} s in all; written to {output}")


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(QualityArguments).parse_args_into_dataclasses(args=argv)
    if args.resummarize:
        try:
            result = resummarize(args.resummarize, args.output)
        except QualityInputError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        print_result(result, Path(args.output or args.resummarize))
        return result
    try:
        settings, device = build_settings(args)
        workers = args.workers or (2 if device == "cpu" else 1)
        threads = args.threads or (1 if device == "cpu" else None)
        print(
            f"mode {settings.mode} on {device}: {len(settings.datasets)} data sets x {len(settings.seeds)} seeds x"
            f" (parametric + {len(settings.variants)} ProtoSeg variants), {workers} at a time",
            flush=True,
        )
        reused = {}
        for path in args.reuse.split(",") if args.reuse else []:
            for run in reusable_runs(settings, read_result(path.strip())):
                reused.setdefault((run["dataset"], run["head"], run["variant"], run["seed"]), run)
        reuse = list(reused.values())
        result = run_comparison(
            settings, workers=workers, threads=threads, log=lambda line: print(line, flush=True), reuse=reuse
        )
    except QualityInputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    output = Path(args.output) if args.output else default_output(settings)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print_result(result, output)
    return result


if __name__ == "__main__":
    main()
