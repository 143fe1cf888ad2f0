"""ProtoSeg head versus the parametric head: latency, training-step time, peak memory and FLOPs.

For each preset and class count K, the same encoder / backbone and decoder are built twice, from the same config and
the same initial weights (benchmarks/twins.py): a MiT preset as transformers' `SegformerForSemanticSegmentation`
(parametric: a 1x1 classifier) and as `ProtoSegformerForSemanticSegmentation` (M prototypes per class, projection to
D); a backbone preset (resnet-18, swin-tiny, ...: UperNet's PPM + FPN decoder) as transformers'
`UperNetForSemanticSegmentation` (no auxiliary head) and as `ProtoSegForSemanticSegmentation`. transformers' UperNet
upsamples its logits to the input size inside `forward` (SegFormer and ProtoSeg return them at stride 4), so its
inference call includes that (B, K, H, W) upsampling and ProtoSeg's does not. Measured:

- inference latency: batch 1, 512x512, eval mode, `torch.inference_mode()`;
- training step: batch 2, 256x256, random labels, forward + backward + AdamW step;
- peak memory of each of these calls, above the memory held just before the call (weights, optimiser state,
  inputs). CPU: each model runs in a fresh subprocess; after one warm-up call, freed heap pages are returned to the
  OS (`malloc_trim`), the kernel's peak-RSS counter is reset (`/proc/self/clear_refs`), and the peak is
  `VmHWM` after the call minus `VmRSS` before it. CUDA: `torch.cuda.max_memory_allocated` minus
  `torch.cuda.memory_allocated` before the call;
- FLOPs of the same calls counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and
  attention; elementwise work such as the loss's upsampling is not counted). Their ratio is the arithmetic floor
  of the time ratio: the similarity costs B*h*w*K*M*D multiply-adds where the classifier costs B*h*w*K*C, and the
  projection adds two 1x1 convolutions.

Timings interleave the two models (parametric, ProtoSeg, parametric, ...) after one warm-up call each and report
medians. On a shared machine they are noisy; the JSON records the load average before and after.

    python scripts/benchmark.py --quick                                            # mit-b0, K = 19, 150, 847
    python scripts/benchmark.py --presets mit-b0 mit-b2 --num_labels 19 150 847 --output_json benchmarks/cpu.json
    python scripts/benchmark.py --quick --prototype_dim 64                        # a smaller D, for speed
    python scripts/benchmark.py --presets resnet-18 swin-tiny --num_labels 19 150 847   # ProtoSeg vs UperNet
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import PretrainedConfig

from proto_segformer.model_building import model_for, preset_config
from proto_segformer.prototype_kernels import SIMILARITY_DTYPES, measured_head_blocks, prototype_logits
from proto_segformer.prototype_math import l2_normalize

from .arguments import SpeedArguments
from .twins import HEADS, parametric_model, twin_pair

# Each memory probe runs the entry point again in a fresh subprocess (--memory_probe).
ENTRY_POINT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"

MODEL_KINDS = HEADS
# Targets of issue 5 (CPU, 2 threads, mit-b0, M = 10, D = decoder width): ratio ProtoSeg / parametric.
TARGETS = {
    "inference_ms": {19: 1.30, 150: 1.30, 847: 2.50},
    "train_step_ms": {19: 1.40, 150: 1.40, 847: 1.50},
    "inference_peak_mb": {19: 1.30, 150: 1.30, 847: 1.30},
}


@dataclass
class Setting:
    """One configuration: which preset, class count and device, and the sizes of the measured calls."""

    preset: str
    num_labels: int
    device: str
    num_prototypes_per_class: int = 10
    prototype_dim: int | None = None
    inference_size: int = 512
    train_size: int = 256
    train_batch_size: int = 2
    similarity_dtype: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# Models and calls


def protoseg_config(setting: Setting) -> PretrainedConfig:
    """The ProtoSeg config of a setting: `ProtoSegformerConfig` for a MiT preset, `ProtoSegConfig` (UperNet decoder)
    for a backbone preset, as `scripts/train.py --model_preset` builds them."""
    overrides = {
        "num_prototypes_per_class": setting.num_prototypes_per_class,
        "prototype_dim": setting.prototype_dim,
        "similarity_dtype": setting.similarity_dtype,
    }
    return preset_config(setting.preset, overrides, {"num_labels": setting.num_labels})


def build_model(kind: str, setting: Setting) -> torch.nn.Module:
    """The parametric twin or the ProtoSeg model of the setting's preset, seeded identically (one of them: a memory
    probe's process holds one model)."""
    config = protoseg_config(setting)
    torch.manual_seed(0)
    model = parametric_model(config) if kind == "parametric" else model_for(config)
    return model.to(setting.device)


def build_models(setting: Setting) -> dict[str, torch.nn.Module]:
    """Both models of a setting, with the same encoder / backbone and decoder weights (`twins.twin_pair`)."""
    protoseg = build_model("protoseg", setting)
    return {"parametric": twin_pair(protoseg, seed=0), "protoseg": protoseg}


def inference_input(setting: Setting) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    size = setting.inference_size
    return torch.randn(1, 3, size, size, generator=generator).to(setting.device)


def training_batch(setting: Setting) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    shape = (setting.train_batch_size, setting.train_size, setting.train_size)
    pixel_values = torch.randn(shape[0], 3, *shape[1:], generator=generator)
    labels = torch.randint(0, setting.num_labels, shape, generator=generator)
    return pixel_values.to(setting.device), labels.to(setting.device)


def make_inference_call(model: torch.nn.Module, setting: Setting):
    model.eval()
    pixel_values = inference_input(setting)

    def call() -> None:
        with torch.inference_mode():
            model(pixel_values=pixel_values)

    return call


def make_training_call(model: torch.nn.Module, setting: Setting):
    model.train()
    pixel_values, labels = training_batch(setting)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def call() -> None:
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return call


MAKERS = {"inference": make_inference_call, "training": make_training_call}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# Measurements


def interleaved_medians(calls: dict[str, callable], device: str, repeats: int) -> dict[str, dict[str, float]]:
    """Wall-clock milliseconds of each call (median, min, max, all), timed in turns (call them once before).

    `cpu_median` is the median CPU time of this process during the call (all threads, OpenMP spin-waits included):
    a second view, less sensitive to other processes taking the cores when running on one thread.
    """
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            synchronize(device)
            wall[name].append((time.perf_counter() - start) * 1000.0)
            cpu[name].append((time.process_time() - start_cpu) * 1000.0)
    return {
        name: {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "all": values,
            "cpu_median": statistics.median(cpu[name]),
        }
        for name, values in wall.items()
    }


def count_flops(call) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def cpu_peak_memory_mb(call) -> dict[str, float]:
    """Peak RSS growth of one call (after a warm-up call), in MiB: VmHWM after minus VmRSS before."""
    call()
    _release_freed_memory()
    before = _proc_status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    call()
    peak = _proc_status_mb("VmHWM")
    return {"peak_mb": peak - before, "process_peak_mb": peak, "held_before_mb": before}


def cuda_peak_memory_mb(call, device: str) -> dict[str, float]:
    call()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mb": (peak - before) / 2**20, "process_peak_mb": peak / 2**20, "held_before_mb": before / 2**20}


def run_memory_probe(probe: dict) -> dict[str, dict[str, float]]:
    """In this (fresh) process: peak memory of one model's inference call, then of its training step."""
    setting = Setting(**probe["setting"])
    torch.set_num_threads(probe["threads"])
    model = build_model(probe["kind"], setting)
    results = {}
    for mode, make in MAKERS.items():
        call = make(model, setting)
        if setting.device == "cpu":
            results[mode] = cpu_peak_memory_mb(call)
        else:
            results[mode] = cuda_peak_memory_mb(call, setting.device)
        del call
        _release_freed_memory()
    return results


def peak_memory_in_subprocess(kind: str, setting: Setting, threads: int) -> dict[str, dict[str, float]]:
    probe = json.dumps({"kind": kind, "setting": dataclasses.asdict(setting), "threads": threads})
    command = [sys.executable, str(ENTRY_POINT), "--memory_probe", probe]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
        ),
    }
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"memory probe {kind} {setting} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure_setting(setting: Setting, args: SpeedArguments) -> dict:
    """Every figure of one configuration for both models."""
    models = build_models(setting)
    record: dict = {"setting": dataclasses.asdict(setting), "flops": {}, "time_ms": {}, "peak_memory": {}}
    for mode, make in MAKERS.items():
        calls = {kind: make(model, setting) for kind, model in models.items()}
        for call in calls.values():  # warm-up (the first inference call also measures the head's block shapes)
            call()
        # Counting FLOPs runs each call once more.
        record["flops"][mode] = {kind: count_flops(call) for kind, call in calls.items()}
        record["time_ms"][mode] = interleaved_medians(calls, setting.device, args.repeats)
        del calls
    del models
    gc.collect()
    if args.measure_memory:
        for kind in MODEL_KINDS:
            if setting.device == "cpu":
                probe = peak_memory_in_subprocess(kind, setting, args.threads)
            else:
                probe = run_memory_probe(
                    {"kind": kind, "setting": dataclasses.asdict(setting), "threads": args.threads}
                )
            for mode, values in probe.items():
                record["peak_memory"].setdefault(mode, {})[kind] = values
    record["ratios"] = ratios(record)
    return record


def measure_onnxruntime(setting: Setting, args: SpeedArguments) -> dict:
    """ProtoSeg inference latency (batch 1, CPU) in PyTorch and exported to ONNX under ONNX Runtime (same threads),
    timed in turns, with the largest logit difference between the two."""
    import onnxruntime

    from proto_segformer.export import export_onnx, export_program

    model = build_model("protoseg", setting).eval()
    pixel_values = inference_input(setting)
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model, Path(folder) / "model.onnx", program=export_program(model))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"pixel_values": pixel_values.numpy()}
    with torch.inference_mode():
        reference = model(pixel_values=pixel_values).logits
    (logits,) = session.run(["logits"], feed)
    calls = {"pytorch": make_inference_call(model, setting), "onnxruntime": lambda: session.run(["logits"], feed)}
    for call in calls.values():
        call()
    return {
        "time_ms": interleaved_medians(calls, "cpu", args.repeats),
        "max_abs_logit_difference": float((torch.from_numpy(logits) - reference).abs().max()),
    }


def format_onnxruntime_table(records: list[dict]) -> str:
    header = "| preset | K | input | PyTorch ms | ONNX Runtime ms | ratio ORT / PyTorch | max logit difference |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for record in records:
        setting, figures = record["setting"], record.get("onnxruntime")
        if figures is None:
            continue
        times = figures["time_ms"]
        pytorch, ort = times["pytorch"]["median"], times["onnxruntime"]["median"]
        size = setting["inference_size"]
        lines.append(
            f"| {setting['preset']} | {setting['num_labels']} | 1x3x{size}x{size} | {pytorch:.0f} | {ort:.0f}"
            f" | {ort / pytorch:.2f} | {figures['max_abs_logit_difference']:.1e} |"
        )
    return "\n".join(lines)


# Products (rows x D @ D x columns) on which the best matmul rate is measured: cache-sized ones and the large square
# one the issue names (4096 x 4096 outputs); the best is taken.
MATMUL_PROBE_SHAPES = ((512, 2048), (1024, 1024), (1024, 2048), (2048, 2048), (4096, 4096))


def matmul_probes(dim: int, dtype: torch.dtype, device: str) -> dict[str, tuple[callable, int]]:
    """{name: (call, FLOPs)} of `torch.mm` with inner dimension `dim` on each of MATMUL_PROBE_SHAPES."""
    generator = torch.Generator().manual_seed(3)
    probes = {}
    for rows, columns in MATMUL_PROBE_SHAPES:
        left = torch.randn(rows, dim, generator=generator).to(device=device, dtype=dtype)
        right = torch.randn(dim, columns, generator=generator).to(device=device, dtype=dtype)
        out = torch.empty(rows, columns, device=device, dtype=dtype)
        probes[f"{rows}x{dim}@{dim}x{columns}"] = (
            lambda a=left, b=right, o=out: torch.mm(a, b, out=o),
            2 * rows * columns * dim,
        )
    return probes


def head_efficiency(setting: Setting, repeats: int) -> dict:
    """Achieved FLOP/s of the inference head (similarity, max over prototypes, class LayerNorm: `prototype_logits`
    on a batch-1 embedding map of the inference size) as a fraction of the best `torch.mm` rate of the same dtype and
    D on cache-sized products (MATMUL_PROBE_SHAPES, the best shape). The head and the products are timed in turns
    (at least 5 rounds, the best time of each), so a machine whose speed drifts affects both alike."""
    config = protoseg_config(setting)
    dim, classes, count = config.embedding_dim, setting.num_labels, setting.num_prototypes_per_class
    side = setting.inference_size // 4
    generator = torch.Generator().manual_seed(4)
    # Channels-last unit embeddings, as the projection returns them; unit prototypes.
    embeddings = l2_normalize(torch.randn(1, side, side, dim, generator=generator)).permute(0, 3, 1, 2)
    prototypes = l2_normalize(torch.randn(classes, count, dim, generator=generator))
    embeddings, prototypes = embeddings.to(setting.device), prototypes.to(setting.device)
    similarity_dtype = SIMILARITY_DTYPES.get(setting.similarity_dtype)
    matmul_dtype = similarity_dtype or torch.float32

    def head() -> None:
        with torch.inference_mode():
            prototype_logits(embeddings, prototypes, similarity_dtype=similarity_dtype)

    probes = matmul_probes(dim, matmul_dtype, setting.device)
    calls = {"head": head, **{name: call for name, (call, _) in probes.items()}}
    for call in calls.values():  # warm-up (the head's first call also measures its block shapes)
        call()
    times = interleaved_medians(calls, setting.device, max(5, repeats))
    head_flops_count = 2 * side * side * classes * count * dim
    head_gflops = head_flops_count / (times["head"]["min"] / 1000) / 1e9
    rates = {name: flops / (times[name]["min"] / 1000) / 1e9 for name, (_, flops) in probes.items()}
    best = max(rates, key=rates.get)
    blocks = [
        shape
        for key, shape in measured_head_blocks().items()
        if key[1:5] == (dim, classes, count, matmul_dtype) and key[5] == torch.get_num_threads()
    ]
    return {
        "dtype": str(matmul_dtype).replace("torch.", ""),
        "head_ms": times["head"]["min"],
        "head_gflops": head_gflops,
        "best_matmul_gflops": rates[best],
        "best_matmul_shape": best,
        "matmul_gflops": rates,
        "efficiency": head_gflops / rates[best],
        "block_shape": blocks[0] if blocks else None,
    }


def format_efficiency_table(records: list[dict]) -> str:
    header = (
        "| preset | K | dtype | head ms | head GFLOP/s | best matmul GFLOP/s (shape) | efficiency"
        " | block (pixels, classes) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for record in records:
        setting, figures = record["setting"], record.get("head_efficiency")
        if figures is None:
            continue
        block = figures["block_shape"]
        lines.append(
            f"| {setting['preset']} | {setting['num_labels']} | {figures['dtype']} | {figures['head_ms']:.1f}"
            f" | {figures['head_gflops']:.0f} | {figures['best_matmul_gflops']:.0f} ({figures['best_matmul_shape']})"
            f" | {figures['efficiency']:.2f} | {'default' if block is None else tuple(block)} |"
        )
    return "\n".join(lines)


def head_flops(setting: Setting) -> dict[str, int]:
    """Analytic multiply-adds of the heads at inference (per image batch 1): classifier vs projection + similarity
    (at stride 4, the decoder's output stride for MiT, ResNet, Swin and ConvNeXt)."""
    config = protoseg_config(setting)
    pixels = (setting.inference_size // 4) ** 2
    width, dim, classes = config.decoder_hidden_size, config.embedding_dim, setting.num_labels
    return {
        "classifier_macs": pixels * classes * width,
        "projection_macs": pixels * (width * width + width * dim),
        "similarity_macs": pixels * classes * setting.num_prototypes_per_class * dim,
    }


def ratios(record: dict) -> dict[str, float]:
    """ProtoSeg / parametric for each figure, and the FLOP ratio (the arithmetic floor) of each call."""
    out = {}
    for mode, key in (("inference", "inference"), ("training", "train_step")):
        times = record["time_ms"][mode]
        out[f"{key}_ms"] = times["protoseg"]["median"] / times["parametric"]["median"]
        out[f"{key}_cpu_ms"] = times["protoseg"]["cpu_median"] / times["parametric"]["cpu_median"]
        flops = record["flops"][mode]
        out[f"{key}_flops"] = flops["protoseg"] / flops["parametric"]
        memory = record["peak_memory"].get(mode)
        if memory:
            out[f"{key}_peak_mb"] = memory["protoseg"]["peak_mb"] / memory["parametric"]["peak_mb"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Report


def machine_description(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": os.getloadavg(),
    }


def _memory_cells(memory: dict, ratio: dict, mode: str) -> tuple[str, str]:
    if mode not in memory:
        return "n/a", "n/a"
    values = memory[mode]
    key = "inference_peak_mb" if mode == "inference" else "train_step_peak_mb"
    return f"{values['parametric']['peak_mb']:.0f} / {values['protoseg']['peak_mb']:.0f}", f"{ratio[key]:.2f}"


def format_table(records: list[dict]) -> str:
    """One row per configuration: medians in ms / MiB, ratio ProtoSeg/parametric, and the FLOP-ratio floor."""
    header = (
        "| preset | K | device | inference ms (param / proto) | ratio | cpu-time ratio | FLOP floor"
        " | train step ms (param / proto) | ratio | cpu-time ratio | FLOP floor"
        " | inference peak MiB (param / proto) | ratio | train peak MiB (param / proto) | ratio |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for record in records:
        setting, r = record["setting"], record["ratios"]
        t_inf, t_train = record["time_ms"]["inference"], record["time_ms"]["training"]
        memory = record["peak_memory"]

        mem_inf, mem_inf_ratio = _memory_cells(memory, r, "inference")
        mem_train, mem_train_ratio = _memory_cells(memory, r, "training")
        lines.append(
            f"| {setting['preset']} | {setting['num_labels']} | {setting['device']}"
            f" | {t_inf['parametric']['median']:.0f} / {t_inf['protoseg']['median']:.0f}"
            f" | {r['inference_ms']:.2f} | {r['inference_cpu_ms']:.2f} | {r['inference_flops']:.2f}"
            f" | {t_train['parametric']['median']:.0f} / {t_train['protoseg']['median']:.0f}"
            f" | {r['train_step_ms']:.2f} | {r['train_step_cpu_ms']:.2f} | {r['train_step_flops']:.2f}"
            f" | {mem_inf} | {mem_inf_ratio} | {mem_train} | {mem_train_ratio} |"
        )
    return "\n".join(lines)


def target_report(records: list[dict]) -> list[str]:
    """The issue's targets (CPU, mit-b0, M = 10, D = decoder width) against the measured ratios."""
    lines = []
    for record in records:
        setting = record["setting"]
        default_head = setting["num_prototypes_per_class"] == 10 and setting["prototype_dim"] is None
        default_sizes = (setting["inference_size"], setting["train_size"], setting["train_batch_size"]) == (512, 256, 2)
        if setting["device"] != "cpu" or setting["preset"] != "mit-b0" or not (default_head and default_sizes):
            continue
        for figure, by_k in TARGETS.items():
            target, measured = by_k.get(setting["num_labels"]), record["ratios"].get(figure)
            if target is not None and measured is not None:
                verdict = "met" if measured <= target else "NOT met"
                lines.append(f"K={setting['num_labels']} {figure}: {measured:.2f} (target <= {target:.2f}) {verdict}")
    return lines


def devices_to_run(requested: list[str]) -> list[str]:
    devices = []
    for device in requested:
        if device == "auto":
            devices += ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        else:
            devices.append(device)
    return list(dict.fromkeys(devices))


def run(args: SpeedArguments) -> list[dict]:
    """Every figure the arguments ask for (or, with --memory_probe, one probe's peak memory as a JSON line)."""
    if args.memory_probe is not None:
        print(json.dumps(run_memory_probe(json.loads(args.memory_probe))))
        return []
    torch.set_num_threads(args.threads)
    machine = machine_description(args.threads)
    records = []
    started = time.perf_counter()
    for device in devices_to_run(args.device):
        for preset in args.presets:
            for num_labels in args.num_labels:
                setting = Setting(
                    preset=preset,
                    num_labels=num_labels,
                    device=device,
                    num_prototypes_per_class=args.num_prototypes_per_class,
                    prototype_dim=args.prototype_dim,
                    inference_size=args.inference_size,
                    train_size=args.train_size,
                    train_batch_size=args.train_batch_size,
                    similarity_dtype=args.similarity_dtype,
                )
                record = measure_setting(setting, args)
                record["head_macs_inference"] = head_flops(setting)
                record["head_efficiency"] = head_efficiency(setting, args.repeats)
                if args.onnxruntime and device == "cpu":
                    record["onnxruntime"] = measure_onnxruntime(setting, args)
                records.append(record)
                print(format_table([record]).splitlines()[-1], flush=True)
    machine["load_average_end"] = os.getloadavg()
    machine["wall_seconds"] = time.perf_counter() - started
    print()
    print(format_table(records))
    print(
        f"\n{machine['cpu']}, {args.threads} threads, torch {machine['torch']}, {machine['date']};"
        f" load average {machine['load_average_start'][0]:.1f} -> {machine['load_average_end'][0]:.1f};"
        f" {args.repeats} interleaved repeats, medians; {machine['wall_seconds']:.0f} s."
    )
    for line in target_report(records):
        print(line)
    print("\nInference head efficiency (head FLOP/s / best matmul FLOP/s of the same dtype and D, this process):\n")
    print(format_efficiency_table(records))
    if any("onnxruntime" in record for record in records):
        print("\nONNX Runtime vs PyTorch, ProtoSeg inference on the CPU (medians):\n")
        print(format_onnxruntime_table(records))
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine, "arguments": dataclasses.asdict(args), "command": sys.argv, "results": records}
        path.write_text(json.dumps(payload, indent=2))
    return records
