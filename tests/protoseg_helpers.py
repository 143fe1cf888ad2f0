"""Tiny random backbones for ProtoSegForSemanticSegmentation tests, and timm in a subprocess beside a CPU-only torch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
from transformers import ConvNextConfig, Dinov2Config, ResNetConfig, SwinConfig, TimmBackboneConfig

from proto_segformer import ProtoSegConfig

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def tiny_backbone(kind: str):
    """A backbone config of a few thousand parameters: feature maps at strides 4-32 (DINOv2: all at its patch, 8)."""
    if kind == "resnet":
        return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], out_features=STAGES)
    if kind == "swin":
        return SwinConfig(
            image_size=64, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=2, out_features=STAGES
        )
    if kind == "convnext":
        return ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], out_features=STAGES)
    if kind == "dinov2":
        return Dinov2Config(
            hidden_size=16,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=32,
            patch_size=8,
            image_size=64,
            out_indices=[1, 2, 3, 4],
        )
    if kind == "hrnet":
        return TimmBackboneConfig(backbone="hrnet_w18", use_pretrained_backbone=False, out_indices=[1, 2, 3, 4])
    raise ValueError(kind)


def tiny_protoseg_config(kind: str = "resnet", num_labels: int = 5, **overrides) -> ProtoSegConfig:
    fields = {
        "backbone_config": tiny_backbone(kind),
        "decoder_hidden_size": 16,
        "prototype_dim": 8,
        "num_prototypes_per_class": 3,
        "num_labels": num_labels,
        **overrides,
    }
    return ProtoSegConfig(**fields)


# Run first in a process that imports timm: PyPI's torchvision wheel, installed with `--no-deps` beside the pinned CPU
# torch, cannot load its compiled ops, and its import (which transformers and timm both do) then fails registering fake
# kernels of `torchvision::nms` / `qnms`, ops HRNet never uses. Where the ops library does not load, the two schemas
# are declared (no kernels) so that the import goes through.
TORCHVISION_PREAMBLE = """
import glob, importlib.util, os, torch
_spec = importlib.util.find_spec("torchvision")
if _spec is not None:
    _ops = glob.glob(os.path.join(os.path.dirname(_spec.origin), "_C*.so"))
    try:
        torch.ops.load_library(_ops[0])
    except (OSError, IndexError):
        _schemas = torch.library.Library("torchvision", "FRAGMENT")
        for _op in ("nms", "qnms"):
            _schemas.define(_op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
"""
# Where timm and torchvision are installed apart from the environment (`pip install --no-deps --target DIR timm
# torchvision`, as .ci/run does): installed into the environment, the mismatched torchvision would break every
# process's `import transformers` (transformers imports torchvision when it is present).
TIMM_PATH_VARIABLE = "PROTOSEG_TIMM_PATH"


def timm_environment() -> dict[str, str]:
    """The environment of a subprocess that can import timm (skips the test when timm is nowhere)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    extra = os.environ.get(TIMM_PATH_VARIABLE)
    if extra and os.path.isdir(os.path.join(extra, "timm")):
        env["PYTHONPATH"] = os.pathsep.join([extra, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    elif importlib.util.find_spec("timm") is not None:
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    else:
        pytest.skip(
            f"timm is not installed (the `timm` extra; here: pip install --no-deps --target DIR timm torchvision and"
            f" {TIMM_PATH_VARIABLE}=DIR)"
        )
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_with_timm(code: str, cwd) -> dict:
    """Run `code` in a fresh interpreter that can import timm; return the JSON its last output line holds."""
    done = subprocess.run(
        [sys.executable, "-c", TORCHVISION_PREAMBLE + textwrap.dedent(code)],
        cwd=cwd,
        env=timm_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
