"""Quality: ProtoSeg against transformers' parametric SegFormer, same preset, initial weights, data, augmentation,
optimiser, schedule and seeds, trained through scripts/train.py's code; prints mIoU (mean ± std over seeds), pixel
accuracy, training time and learnable parameters, and writes JSON.

    python scripts/benchmark_quality.py --quick                # 2 CPU cores, < 10 min: both data sets, 3 seeds
    python scripts/benchmark_quality.py                        # 2 CPU cores, < 60 min
    python scripts/benchmark_quality.py --large --device cuda  # a GPU: larger images and model, 5 seeds
    python scripts/benchmark_quality.py --quick --ablate       # + every ProtoSeg ablation (quality.ABLATIONS)
    python scripts/benchmark_quality.py --quick --datasets scenes --model_preset resnet-18 \
        --train_options per_device_train_batch_size=8          # ProtoSeg vs UperNetForSemanticSegmentation
    python scripts/benchmark_quality.py --quick --ablations M-1,init-from-data --datasets scenes-large
    python scripts/benchmark_quality.py --resummarize benchmarks/quality_quick.json   # statistics again, no training
    python scripts/benchmark_quality.py --ablations M-1 --datasets scenes-large --seeds 0 \
        --reuse benchmarks/quality_full.json    # baseline runs taken from the full result: only M-1 trains

This module: from parsed arguments (benchmarks/arguments.py) to the result file; the machinery: benchmarks/quality.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from proto_segformer.run_training import parse_config_overrides

from .arguments import QualityArguments
from .quality import (
    ABLATIONS,
    DATASETS,
    MODES,
    ComparisonSettings,
    QualityInputError,
    compare,
    describe_budget,
    format_comparison,
    format_table,
    reusable_runs,
    run_comparison,
    summarize,
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
        if args.model_preset is not None:
            if "model_preset" in requested:
                raise QualityInputError("--model_preset and --train_options model_preset=... exclude each other.")
            check_model_preset(args.model_preset, train_options.get("decoder_type"))
            train_options["model_preset"] = args.model_preset
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
    datasets = tuple(d.strip() for d in args.datasets.split(",") if d.strip()) if args.datasets else DATASETS
    # The mode's per-data-set options (e.g. a longer schedule for scenes-large) yield to --train_options.
    dataset_options = {
        name: {k: v for k, v in options.items() if k not in requested}
        for name, options in MODES[mode].get("dataset_train_args", {}).items()
        if name in datasets
    }
    return ComparisonSettings(datasets, seeds, train_options, variants, mode, dataset_options), device


def check_model_preset(name: str, decoder_type: str | None) -> None:
    """A clear error for a preset scripts/train.py does not know, or a ProtoSeg model without a parametric twin."""
    from proto_segformer.configuration_protoseg import BACKBONE_PRESETS
    from proto_segformer.model_building import preset_names

    key = name.lower().replace("_", "-")
    if key not in preset_names() and "mit-" + key not in preset_names():
        raise QualityInputError(f"Unknown --model_preset {name!r}; choose one of {', '.join(preset_names())}.")
    if key in BACKBONE_PRESETS and decoder_type not in (None, "upernet"):
        raise QualityInputError(
            f"decoder_type={decoder_type} has no parametric twin in transformers (UperNetForSemanticSegmentation has"
            " the UperNet decoder): leave decoder_type at upernet."
        )


def default_output(settings: ComparisonSettings) -> Path:
    ablated = "_ablations" if len(settings.variants) > 1 else ""
    preset = settings.train_options.get("model_preset")
    suffix = f"_{preset}" if preset else ""
    return Path(__file__).resolve().parent / f"quality{ablated}_{settings.mode}{suffix}.json"


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
    for line in describe_budget(result):
        print(line)
    print()
    print(format_table(result["summary"]))
    print()
    print(format_comparison(result["comparison"]))
    print(f"\n{result['wall_seconds']:.0f} s in all; written to {output}")


def main(args: QualityArguments) -> dict:
    """Resummarize a result file, or run the comparison and write its result file; user errors exit with code 2."""
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
