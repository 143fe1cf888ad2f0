"""The arguments of the benchmark entry points (scripts/benchmark*.py), in a module without heavy imports so that
each script answers `--help` fast and parses its arguments before loading torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class SpeedArguments:
    """scripts/benchmark.py: speed and memory of ProtoSeg against the parametric head."""

    presets: list[str] = field(
        default_factory=lambda: ["mit-b0", "mit-b2"],
        metadata={
            "help": "MiT presets (mit-b0 .. mit-b5: against SegformerForSemanticSegmentation) or backbone presets"
            " (resnet-18, swin-tiny, ...: scripts/train.py --model_preset; against UperNetForSemanticSegmentation)."
        },
    )
    num_labels: list[int] = field(default_factory=lambda: [19, 150, 847], metadata={"help": "Class counts K."})
    device: list[str] = field(
        default_factory=lambda: ["auto"],
        metadata={"help": "cpu, cuda, or auto (the CPU, and CUDA when available)."},
    )
    repeats: int = field(default=3, metadata={"help": "Timed calls per model and figure (medians are reported)."})
    threads: int = field(default=2, metadata={"help": "torch.set_num_threads on the CPU."})
    quick: bool = field(default=False, metadata={"help": "mit-b0 only."})
    output_json: str | None = field(default=None, metadata={"help": "Write every figure to this JSON file."})
    num_prototypes_per_class: int = field(default=10, metadata={"help": "M."})
    prototype_dim: int | None = field(default=None, metadata={"help": "D (default: the decoder width)."})
    inference_size: int = field(default=512, metadata={"help": "Inference image side (batch 1)."})
    train_size: int = field(default=256, metadata={"help": "Training crop side."})
    train_batch_size: int = field(default=2, metadata={"help": "Training batch size."})
    measure_memory: bool = field(default=True, metadata={"help": "Measure peak memory (CPU: one subprocess each)."})
    memory_probe: str | None = field(default=None, metadata={"help": "Internal: run one memory probe (JSON)."})
    similarity_dtype: str | None = field(
        default=None,
        metadata={"help": "ProtoSeg's inference similarity dtype: bfloat16 for the reduced-precision option."},
    )
    onnxruntime: bool = field(
        default=False,
        metadata={"help": "Also time ProtoSeg inference exported to ONNX under ONNX Runtime vs PyTorch (CPU; [onnx])."},
    )

    def __post_init__(self) -> None:
        import importlib.util

        import torch

        from proto_segformer.configuration_proto_segformer import mit_preset
        from proto_segformer.configuration_protoseg import BACKBONE_PRESETS

        if self.onnxruntime and any(importlib.util.find_spec(name) is None for name in ("onnxruntime", "onnxscript")):
            raise ValueError("--onnxruntime needs the [onnx] extra: pip install onnx onnxscript onnxruntime.")

        if self.quick:
            self.presets = ["mit-b0"]
        for preset in self.presets:
            if preset.lower().replace("_", "-") not in BACKBONE_PRESETS:
                try:
                    mit_preset(preset)
                except ValueError:
                    raise ValueError(
                        f"Unknown preset {preset!r}; choose a MiT size (mit-b0 .. mit-b5) or a backbone preset"
                        f" ({', '.join(BACKBONE_PRESETS)})."
                    ) from None
        if any(k < 2 for k in self.num_labels):
            raise ValueError(f"--num_labels must all be >= 2, got {self.num_labels}.")
        if self.repeats < 1 or self.threads < 1:
            raise ValueError("--repeats and --threads must be >= 1.")
        unknown = set(self.device) - {"auto", "cpu", "cuda"}
        if unknown:
            raise ValueError(f"--device takes cpu, cuda or auto, got {sorted(unknown)}.")
        if "cuda" in self.device and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch.cuda.is_available() is False.")


# benchmark_add_classes --quick: a narrow MiT (b0 layout, 1 block per stage) on 64-pixel scenes, a few hundred steps.
ADD_CLASSES_QUICK = {
    "num_train": 1000,
    "num_validation": 100,
    "support_pool": 240,
    "max_steps": 1200,
    "repeats": 2,
    "hidden_sizes": [16, 32, 64, 128],
    "decoder_hidden_size": 64,
    "output_dir": "runs/benchmark_add_classes_quick",
}


@dataclass
class AddClassesBenchmarkArguments:
    """scripts/benchmark_add_classes.py: adding classes from few images, ProtoSeg against a parametric row."""

    quick: bool = field(default=False, metadata={"help": "Small models and data: < 10 minutes on 2 CPU cores."})
    held_out: list[int] = field(
        default_factory=lambda: [8, 9, 10], metadata={"help": "Label ids of the held-out item classes."}
    )
    shots: list[int] = field(default_factory=lambda: [1, 5, 20], metadata={"help": "Support images per class."})
    repeats: int = field(default=3, metadata={"help": "Support draws per shot count (results: mean and std)."})
    num_train: int = field(default=2000, metadata={"help": "Training scenes."})
    num_validation: int = field(default=200, metadata={"help": "Validation scenes."})
    support_pool: int = field(default=400, metadata={"help": "Scenes the support images are drawn from."})
    image_size: int = field(default=64, metadata={"help": "Side of the square scenes."})
    dataset: str = field(
        default="scenes",
        metadata={"help": "'scenes' (digit class told by colour family and shape) or 'scenes-shape' (shape only)."},
    )
    item_scale: list[float] = field(
        default_factory=list,
        metadata={"help": "(min, max) digit side as a fraction of the image; empty: the data set's (0.3, 0.5)."},
    )
    augment_scale: list[float] = field(
        default_factory=lambda: [1.0, 1.0], metadata={"help": "Random resize ratio range of the training crops."}
    )
    photometric_distortion: bool = field(default=False, metadata={"help": "Random brightness/contrast/colour."})
    hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 160, 256], metadata={"help": "MiT widths."})
    depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1], metadata={"help": "MiT blocks per stage."})
    decoder_hidden_size: int = field(default=128, metadata={"help": "Decoder width (= D, the embedding width)."})
    max_steps: int = field(default=2000, metadata={"help": "Training steps of each model."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate (from scratch)."})
    min_cell_fraction: float = field(default=0.75, metadata={"help": "Support cell coverage threshold (both)."})
    min_support_pixels: int = field(default=60, metadata={"help": "A support image shows >= this many pixels."})
    row_fit_steps: int = field(default=300, metadata={"help": "Adam steps fitting the parametric new rows."})
    row_fit_learning_rate: float = field(default=0.05, metadata={"help": "Learning rate of those steps."})
    row_fit_weight_decay: float = field(default=1e-3, metadata={"help": "L2 penalty on the new rows."})
    seed: int = field(default=0, metadata={"help": "Seed of data, training and support draws."})
    num_threads: int = field(
        default=1,
        metadata={"help": "torch threads (0: torch's default). 1 is far faster on a CPU shared with other jobs."},
    )
    output_dir: str = field(default="runs/benchmark_add_classes", metadata={"help": "Checkpoints and JSON."})
    reuse_models: bool = field(
        default=False, metadata={"help": "Load the trained models saved in output_dir by an earlier run."}
    )

    def __post_init__(self) -> None:
        if self.quick:  # quick values replace the defaults, never a value given on the command line
            for name, value in ADD_CLASSES_QUICK.items():
                if getattr(self, name) == _default(name):
                    setattr(self, name, value)


def _default(name: str):
    spec = AddClassesBenchmarkArguments.__dataclass_fields__[name]
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


@dataclass
class QualityArguments:
    """scripts/benchmark_quality.py: quality of ProtoSeg against the parametric head (benchmarks/quality.py)."""

    quick: bool = field(default=False, metadata={"help": "The quick mode (2 CPU cores, under 10 minutes)."})
    large: bool = field(default=False, metadata={"help": "The large mode, for a GPU (use with --device cuda)."})
    datasets: str | None = field(
        default=None,
        metadata={"help": "Built-in data sets, comma-separated (default: benchmarks/quality.py's DATASETS)."},
    )
    seeds: str | None = field(default=None, metadata={"help": "Seeds, comma-separated (default: the mode's)."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto (cuda when available)."})
    model_preset: str | None = field(
        default=None,
        metadata={
            "help": "scripts/train.py's --model_preset for both heads (default: the built-in demo's, mit-b0): a MiT"
            " size (against SegformerForSemanticSegmentation) or a backbone preset such as resnet-18 or swin-tiny"
            " (ProtoSeg with the UperNet decoder, against UperNetForSemanticSegmentation)."
        },
    )
    ablate: bool = field(
        default=False, metadata={"help": "Also run every ProtoSeg ablation (ABLATIONS in benchmarks/quality.py)."}
    )
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
        default=None,
        metadata={"help": "JSON file (default: benchmarks/quality[_ablations]_<mode>[_<model_preset>].json)."},
    )


@dataclass
class MetricArguments:
    """scripts/benchmark_metric.py: speed of the packaged mean IoU against the plain per-image numpy one."""

    images: int = field(default=500, metadata={"help": "Label maps."})
    size: int = field(default=512, metadata={"help": "Side of the square maps."})
    classes: int = field(default=150, metadata={"help": "Classes."})
    evaluate_images: int = field(
        default=500, metadata={"help": "Maps timed through evaluate.load(...).compute (scaled to --images)."}
    )


@dataclass
class StartupArguments:
    """scripts/benchmark_startup.py: seconds from scripts/train.py to its first step on a folder of 3,000 pairs."""

    images: int = field(default=3000, metadata={"help": "Training image pairs of the generated folder."})
    runs: int = field(default=2, metadata={"help": "Runs (of each version, interleaved)."})
    folder: str | None = field(
        default=None, metadata={"help": "Where the folder is made (default: <tmp>/proto_segformer_startup)."}
    )
    baseline: str | None = field(
        default=None,
        metadata={"help": "Another checkout of the repository (e.g. of main): its runs alternate with this one's."},
    )
    check_samples: int | None = field(default=None, metadata={"help": "--check_samples of the runs (default: theirs)."})


@dataclass
class PrecisionArguments:
    """scripts/benchmark_precision.py: agreement of the bfloat16 similarity option with float32."""

    model: str = field(metadata={"help": "A trained checkpoint folder (e.g. runs/demo)."})
    dataset: str = field(default="scenes", metadata={"help": "Built-in data set of the validation images."})
    num_validation: int = field(default=200, metadata={"help": "Validation images (the demo's split: 200)."})
    image_size: int | None = field(
        default=None,
        metadata={"help": "Side of the built-in images (default: the model's training crop; 64 if none is recorded)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the built-in data (the demo's: 0)."})
    batch_size: int = field(default=16, metadata={"help": "Images or windows per forward pass."})
    num_threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's choice)."})
    output_json: str | None = field(default=None, metadata={"help": "Write the figures to this JSON file."})
