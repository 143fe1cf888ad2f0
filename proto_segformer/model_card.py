"""Model cards for trained ProtoSegformer checkpoints, rendered with huggingface_hub's `ModelCard` / `ModelCardData`.

The card's body is the Jinja template `templates/model_card.md` inside the package; its metadata (YAML header)
holds library_name, pipeline_tag, license, tags, datasets, metrics, base_model, widget examples and a `model-index`
with the evaluation results read from the training output (`all_results.json` / `eval_results.json`) and, when
`scripts/evaluate_model.py` wrote one into the model folder, from `evaluation_results.json` (`EVALUATION_FILE`: its
numbers with the test-time setting, mode, scales and flip, in the model-index, and how they were measured in the
Evaluation section).

What the card states is kept next to it in `model_card_inputs.json` (data set, base model, licence, training crop,
classes added after training), so that a card rendered again later (`push_to_hub`, `add_classes`) says the same.

A card shows known fields only: the training arguments of `CARD_TRAINING_ARGS`, the metrics of `KNOWN_METRICS` and
per-class results of the model's classes, each value checked (a finite number, a flag or a short plain name); never
an entry whose name suggests a secret (token, key, password, ...) nor anything that looks like a Hugging Face token.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .distributed_setup import SETUP_KEY, describe_setup

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "model_card.md"
TAGS = ["protoseg", "segformer", "semantic-segmentation", "custom_code", "vision", "image-segmentation"]
DEFAULT_LICENSE = "apache-2.0"
# NVIDIA's SegFormer / MiT weights on the Hub are under NVIDIA's own (non-commercial) licence.
NVIDIA_LICENSE = {
    "license": "other",
    "license_name": "nvidia-segformer",
    "license_link": "https://github.com/NVlabs/SegFormer/blob/master/LICENSE",
}
# Widget examples with the things they show: an example is offered only to a model that has a class for one of them.
WIDGET_EXAMPLES = [
    (
        {
            "src": "https://huggingface.co/datasets/hf-internal-testing/fixtures_ade20k/resolve/main/ADE_val_00000001.jpg",
            "example_title": "House",
        },
        {"house", "building", "wall", "sky", "tree", "window", "roof", "grass"},
    ),
    (
        {"src": "http://images.cocodataset.org/val2017/000000039769.jpg", "example_title": "Cats"},
        {"cat", "cats", "sofa", "couch", "remote"},
    ),
]
# metric key (without the "eval_" prefix) -> (model-index metric type, display name)
KNOWN_METRICS: dict[str, tuple[str, str]] = {
    "mean_iou": ("mean_iou", "Mean IoU"),
    "mean_accuracy": ("mean_accuracy", "Mean Accuracy"),
    "overall_accuracy": ("accuracy", "Overall Accuracy"),
}
BOOKKEEPING = {"loss", "runtime", "samples_per_second", "steps_per_second", "epoch", "step", "model_preparation_time"}
RESULT_FILES = ("all_results.json", "eval_results.json")
# Written by scripts/evaluate_model.py (`evaluation.write_report`) into the model folder: the card's model-index then
# carries its numbers with the test-time setting, and the Evaluation section says how they were measured.
EVALUATION_FILE = "evaluation_results.json"
# summary key of EVALUATION_FILE -> (model-index metric type, display name)
EVALUATION_METRICS: dict[str, tuple[str, str]] = {
    "mIoU": ("mean_iou", "Mean IoU"),
    "mAcc": ("mean_accuracy", "Mean Accuracy"),
    "aAcc": ("accuracy", "Overall Accuracy"),
    "mDice": ("mean_dice", "Mean Dice"),
    "mFscore": ("mean_f1", "Mean F-score"),
    "mPrecision": ("mean_precision", "Mean Precision"),
    "mRecall": ("mean_recall", "Mean Recall"),
}
EVALUATION_CLASS_METRICS = ("iou", "accuracy", "dice", "fscore")
DATA_NAME = re.compile(r"^[\w.:/\-]{1,100}$")  # a built-in name, a Hub id or a relative local path
# Run statistics of train_results.json / all_results.json shown in the card (numbers only).
TRAIN_SUMMARY = ("train_loss", "train_runtime", "epoch")
# Names of entries that may hold a secret, and what a Hugging Face token looks like: neither is ever shown.
SECRET_WORDS = {"token", "secret", "secrets", "password", "passwd", "pwd", "passphrase", "key", "keys", "apikey"}
SECRET_WORDS |= {"credential", "credentials", "auth", "private"}
SECRET_ENDINGS = ("token", "secret", "password", "passwd")  # hubtoken, clientsecret, ...
HF_TOKEN = re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{16,}")
TOKEN_PLACEHOLDER = re.compile(r"^<[A-Z0-9_]+>$")  # TrainingArguments.to_dict writes "<HUB_TOKEN>" for a token
PLAIN_NAME = re.compile(r"^[\w.\-]{0,40}$")  # a value such as "adamw_torch" or "polynomial"
PROTOTYPE_STATS_FILE = "prototype_stats.json"
TRAINING_ARGS_FILE = "training_args.json"
CARD_INPUTS_FILE = "model_card_inputs.json"
# What `write_model_card` records in CARD_INPUTS_FILE and `render_model_card` reads back as defaults.
CARD_INPUTS = (
    "dataset_name",
    "base_model",
    "license",
    "data_note",
    "project_url",
    "crop_size",
    "class_additions",
    "space_repo_id",
)


# ---------------------------------------------------------------------------------------------- reading the output


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def hub_id_or_none(name: str | None) -> str | None:
    """`name` if it can be a Hub repository id ("name" or "owner/name") and is not a local path, else None."""
    if not name or not HUB_ID.match(name) or Path(name).exists():
        return None
    return name


def slug(text: str) -> str:
    """A repository-name-safe version of `text` (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def read_eval_results(output_dir: str | Path) -> dict[str, Any]:
    """Evaluation metrics of a training output: the `eval_*` entries of all_results.json and eval_results.json
    (the latter wins), with the `eval_` prefix removed. Empty when neither file exists."""
    results: dict[str, Any] = {}
    for name in RESULT_FILES:
        path = Path(output_dir) / name
        if path.is_file():
            results.update({k: v for k, v in _read_json(path).items() if k.startswith("eval_")})
    return strip_eval_prefix(results)


def strip_eval_prefix(results: Mapping[str, Any]) -> dict[str, Any]:
    """{"eval_mean_iou": x} -> {"mean_iou": x}; keys without the prefix are kept as they are."""
    return {(k[len("eval_") :] if k.startswith("eval_") else k): v for k, v in results.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def secret_name(name: Any) -> bool:
    """True for an entry name that suggests a secret: a word (split at "_", "-", ".", case changes) such as token,
    key, password, secret, private, auth, or a word ending in token/secret/password. Counts such as
    `include_num_input_tokens_seen` are not secrets."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower()
    words = [word for word in re.split(r"[^a-z0-9]+", spaced) if word]
    return any(word in SECRET_WORDS or word.endswith(SECRET_ENDINGS) for word in words)


def looks_secret(name: Any, value: Any = None) -> bool:
    """True for an entry whose name suggests a secret (hub_token, private_key, password, ...) or whose value holds
    something that looks like a Hugging Face token."""
    return secret_name(name) or (isinstance(value, str) and bool(HF_TOKEN.search(value)))


def card_value(value: Any) -> bool:
    """True for a value a card may show: a flag, a finite number, a short plain name, or a few numbers (a crop)."""
    if isinstance(value, bool) or _is_number(value):
        return True
    if isinstance(value, str):
        return bool(PLAIN_NAME.match(value)) and not HF_TOKEN.search(value)
    if isinstance(value, (list, tuple)):
        return 0 < len(value) <= 4 and all(_is_number(v) for v in value)
    return False


def without_secrets(data: Any, where: str = "") -> tuple[Any, list[str]]:
    """`data` (parsed JSON) without the entries that hold a secret: a string under a secret-like name (other than
    a placeholder such as "<HUB_TOKEN>") or any string that looks like a Hugging Face token; and their names."""
    removed: list[str] = []
    if isinstance(data, dict):
        cleaned = {}
        for key, value in data.items():
            name = f"{where}.{key}" if where else str(key)
            is_secret_string = isinstance(value, str) and value and not TOKEN_PLACEHOLDER.match(value)
            if (is_secret_string and secret_name(key)) or HF_TOKEN.search(str(key)):
                removed.append(name)
                continue
            cleaned[key], inner = without_secrets(value, name)
            removed += inner
        return cleaned, removed
    if isinstance(data, list):
        items = [without_secrets(value, f"{where}[{index}]") for index, value in enumerate(data)]
        return [item for item, _ in items], [name for _, inner in items for name in inner]
    if isinstance(data, str) and HF_TOKEN.search(data):
        return HF_TOKEN.sub("<redacted>", data), [where or "a value"]
    return data, removed


def redact_tokens(text: str, where: str | Path) -> str:
    """`text` with anything that looks like a Hugging Face token replaced (a warning names `where` it came from)."""
    if not HF_TOKEN.search(text):
        return text
    logger.warning("Removed what looks like a Hugging Face token from the model card of %s.", where)
    return HF_TOKEN.sub("<redacted>", text)


def scalar_metrics(eval_results: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """(metric type, display name, value) of the `KNOWN_METRICS` found (finite numbers); other entries are not
    shown (a card shows known fields only; per-class entries go to the table in the body)."""
    results = strip_eval_prefix(eval_results)
    return [(t, n, float(results[k])) for k, (t, n) in KNOWN_METRICS.items() if _is_number(results.get(k))]


def per_class_metrics(eval_results: Mapping[str, Any], id2label: Mapping[int, str]) -> dict[str, dict[str, float]]:
    """{class name: {"iou": x, "accuracy": y}} from `per_category_iou`/`per_category_accuracy` lists or
    `iou_<name>`/`accuracy_<name>` entries of the model's classes; values that are nan are left out."""
    results = strip_eval_prefix(eval_results)
    names = {str(name) for name in id2label.values()}
    table: dict[str, dict[str, float]] = {}
    for metric in ("iou", "accuracy"):
        values = results.get(f"per_category_{metric}")
        if isinstance(values, Sequence) and not isinstance(values, str):
            for index, value in enumerate(values):
                if _is_number(value):
                    table.setdefault(str(id2label.get(index, index)), {})[metric] = float(value)
        for key, value in results.items():
            if key.startswith(f"{metric}_") and key[len(metric) + 1 :] in names and _is_number(value):
                table.setdefault(key[len(metric) + 1 :], {})[metric] = float(value)
    return table


def prototype_tensor_stats(output_dir: Path, id2label: Mapping[int, str]) -> dict[str, Any] | None:
    """`prototype_statistics` (near-duplicates, within-class cosines) of the prototypes in the checkpoint's weights."""
    weights = output_dir / "model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    from .visualization import prototype_statistics

    try:
        with safe_open(str(weights), framework="pt") as handle:
            if "prototypes" not in handle.keys():
                return None
            prototypes = handle.get_tensor("prototypes")
    except Exception as error:  # a corrupt file is reported by the checkpoint checks, not here
        logger.warning("Could not read prototypes from %s: %s", weights, error)
        return None
    return prototype_statistics(prototypes, dict(id2label))


def learnable_parameter_count(output_dir: Path) -> int | None:
    """Parameters in the weights, leaving out `prototypes` and BatchNorm running statistics (not learnable)."""
    weights = output_dir / "model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    total = 0
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for name in handle.keys():
                if name == "prototypes" or name.rsplit(".", 1)[-1] in (
                    "running_mean",
                    "running_var",
                    "num_batches_tracked",
                ):
                    continue
                total += math.prod(handle.get_slice(name).get_shape())
    except Exception:
        return None
    return total


SEGFORMER_CITATION = """@inproceedings{xie2021segformer,
  title     = {SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers},
  author    = {Xie, Enze and Wang, Wenhai and Yu, Zhiding and Anandkumar, Anima and Alvarez, Jose M. and Luo, Ping},
  booktitle = {NeurIPS},
  year      = {2021}
}"""
UPERNET_CITATION = """@inproceedings{xiao2018unified,
  title     = {Unified Perceptual Parsing for Scene Understanding},
  author    = {Xiao, Tete and Liu, Yingcheng and Zhou, Bolei and Jiang, Yuning and Sun, Jian},
  booktitle = {ECCV},
  year      = {2018}
}"""


def architecture_texts(config: Mapping[str, Any]) -> dict[str, str]:
    """The card's words for the model's architecture, from its config.json: `name` (for the repository name),
    `summary` (the summary's subject), `intro`, `row` (the table's Architecture row), `logits_size` and
    `citation` (of the encoder-decoder's paper)."""
    if config.get("model_type") != "protoseg":
        size = mit_size(config)
        return {
            "name": f"protosegformer-{size or 'custom'}",
            "summary": f"A SegFormer ({size or 'custom MiT size'}) semantic segmentation model",
            "intro": "[SegFormer](https://arxiv.org/abs/2105.15203) (Mix Transformer encoder, all-MLP decoder)",
            "row": f"SegFormer (Mix Transformer, hidden sizes {config.get('hidden_sizes')}, depths"
            f" {config.get('depths')}) + ProtoSeg head",
            "logits_size": "H/4, W/4",
            "citation": SEGFORMER_CITATION,
            "tags": [],  # TAGS are this model's
        }
    backbone = config.get("backbone_config") or {}
    kind = backbone.get("backbone") or backbone.get("model_type") or "custom"
    upernet = config.get("decoder_type", "upernet") == "upernet"
    decoder = "UperNet decoder (pyramid pooling + FPN)" if upernet else "SegFormer's all-MLP decoder"
    stages = backbone.get("out_features") or backbone.get("out_indices")
    # The decoder's output stride: the first stage's, the patch size of a ViT (no `depths`), 4 otherwise.
    stride = backbone.get("patch_size") if backbone.get("depths") is None and backbone.get("patch_size") else 4
    return {
        "name": f"protoseg-{kind}".replace("_", "-"),
        "summary": f"A{' UperNet' if upernet else 'n all-MLP decoder'} semantic segmentation model on a {kind}"
        " backbone",
        "tags": ["upernet" if upernet else "segformer-decoder", str(backbone.get("model_type") or kind)],
        "intro": f"a {kind} backbone (transformers' AutoBackbone, stages {stages}) with a {decoder}",
        "row": f"{kind} backbone (stages {stages}) + {decoder} + ProtoSeg head",
        "logits_size": f"H/{stride}, W/{stride}",
        "citation": UPERNET_CITATION if upernet else SEGFORMER_CITATION,
    }


def mit_size(config: Mapping[str, Any]) -> str | None:
    """The MiT encoder size ("mit-b0" ..) matching the config's hidden_sizes and depths, else None (the decoder
    width is reported separately)."""
    from .configuration_proto_segformer import MIT_PRESETS

    for name, preset in MIT_PRESETS.items():
        if all(list(config.get(k) or []) == list(preset[k]) for k in ("hidden_sizes", "depths")):
            return name
    return None


# ------------------------------------------------------------------------------------------------ body sections


def _format_metric(value: float) -> str:
    return f"{100 * value:.2f}" if 0.0 <= value <= 1.0 else f"{value:.4g}"


def read_evaluation(output_dir: str | Path, id2label: Mapping[int, str]) -> dict[str, Any] | None:
    """The known, checked fields of the folder's `EVALUATION_FILE`; None (with a warning) when it is unreadable,
    holds a value a card may not show, or was measured on other classes than the model's (classes added or removed
    since: evaluate again); None without a word when there is none."""
    path = Path(output_dir) / EVALUATION_FILE
    if not path.is_file():
        return None
    try:
        data = _read_json(path)
    except ValueError as error:
        logger.warning("Left %s off the card: %s", path.name, error)
        return None
    rows = [row for row in data.get("per_class") or [] if isinstance(row, dict)]
    if [row.get("name") for row in rows] != [str(id2label[k]) for k in sorted(id2label)]:
        logger.warning("Left %s off the card: it was measured on other classes than the model's.", path.name)
        return None
    dataset, split, mode = data.get("dataset"), data.get("split"), data.get("mode")
    scales, flip = data.get("scales"), data.get("flip")
    checks = (
        isinstance(dataset, str) and bool(DATA_NAME.match(dataset)) and not HF_TOKEN.search(dataset),
        isinstance(split, str) and bool(PLAIN_NAME.match(split)) and bool(split),
        mode in ("whole", "slide"),
        isinstance(scales, list) and 0 < len(scales) <= 16 and all(_is_number(s) and s > 0 for s in scales),
        isinstance(flip, bool),
    )
    if not all(checks):
        logger.warning(
            "Left %s off the card: its data set, split, mode, scales or flip is not a plain value.", path.name
        )
        return None
    metrics = {
        k: float(data["metrics"][k]) for k in EVALUATION_METRICS if _is_number((data.get("metrics") or {}).get(k))
    }
    return {
        "dataset": dataset,
        "split": split,
        "mode": mode,
        "scales": [float(s) for s in scales],
        "flip": flip,
        "num_images": int(data["num_images"]) if _is_number(data.get("num_images")) else None,
        "crop_size": data.get("crop_size") if card_value(data.get("crop_size")) else None,
        "stride": data.get("stride") if card_value(data.get("stride")) else None,
        "metrics": metrics,
        "per_class": [
            {
                "name": str(row["name"]),
                "absent": row.get("absent") is True,
                **{m: float(row[m]) if _is_number(row.get(m)) else None for m in EVALUATION_CLASS_METRICS},
            }
            for row in rows
        ],
    }


def evaluation_setting(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The test-time setting recorded in the model-index (`args` of each metric)."""
    return {"mode": evaluation["mode"], "scales": list(evaluation["scales"]), "flip": evaluation["flip"]}


def evaluation_section(evaluation: Mapping[str, Any], per_class_limit: int = 50) -> str:
    """Markdown: how the evaluation file's numbers were measured, its summary and (up to `per_class_limit` classes)
    its per-class table."""
    scales = ", ".join(f"{s:g}" for s in evaluation["scales"])
    if evaluation["mode"] == "slide" and evaluation.get("crop_size"):
        mode = "sliding windows of {} pixels".format("x".join(str(v) for v in evaluation["crop_size"]))
        if evaluation.get("stride"):
            mode += ", stride {}".format("x".join(str(v) for v in evaluation["stride"]))
    else:
        mode = "whole images" if evaluation["mode"] == "whole" else "sliding windows"
    augmentation = (
        "no test-time augmentation"
        if evaluation["scales"] == [1.0] and not evaluation["flip"]
        else f"test-time augmentation: scales {scales}{' and horizontal flip' if evaluation['flip'] else ''}, softmax"
        " probabilities averaged over the views (as mmsegmentation's SegTTAModel)"
    )
    images = f", {evaluation['num_images']} images" if evaluation.get("num_images") else ""
    lines = [
        f"Measured with `scripts/evaluate_model.py` on `{evaluation['dataset']}` (split `{evaluation['split']}`"
        f"{images}): {mode}, {augmentation}. Metrics as mmsegmentation's `IoUMetric` (means over the classes present;"
        " percentages):",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {EVALUATION_METRICS[k][1]} | {100 * v:.2f} |" for k, v in evaluation["metrics"].items()]
    rows = evaluation["per_class"]
    if 0 < len(rows) <= per_class_limit:
        shown = lambda value: "-" if value is None else f"{100 * value:.2f}"  # noqa: E731
        lines += ["", "| class | IoU | accuracy | Dice | F-score |", "|---|---|---|---|---|"]
        for row in rows:
            values = " | ".join(shown(row[m]) for m in EVALUATION_CLASS_METRICS)
            lines.append(f"| {row['name']}{' (absent from the split)' if row['absent'] else ''} | {values} |")
    return "\n".join(lines)


def results_section(eval_results: Mapping[str, Any], id2label: Mapping[int, str], dataset_text: str) -> str:
    """Markdown: a table of the scalar metrics and, when available, per-class IoU / accuracy."""
    metrics = scalar_metrics(eval_results)
    if not metrics:
        return "No evaluation results were recorded with this checkpoint."
    lines = [f"On the evaluation split of {dataset_text} (values in [0, 1] shown as percentages):", ""]
    lines += ["| metric | value |", "|---|---|"] + [f"| {name} | {_format_metric(v)} |" for _, name, v in metrics]
    per_class = per_class_metrics(eval_results, id2label)
    if per_class:
        lines += ["", "| class | IoU | accuracy |", "|---|---|---|"]
        for name, values in per_class.items():
            iou = _format_metric(values["iou"]) if "iou" in values else "-"
            accuracy = _format_metric(values["accuracy"]) if "accuracy" in values else "-"
            lines.append(f"| {name} | {iou} | {accuracy} |")
    return "\n".join(lines)


# Training arguments worth showing (TrainingArguments fields); CARD_TRAINING_ARGS adds the script settings the
# training records. Nothing else in training_args.json is shown.
SHOWN_TRAINING_ARGS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "optim",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "per_device_eval_batch_size",
    "seed",
    "bf16",
    "fp16",
)
CARD_TRAINING_ARGS = (*SHOWN_TRAINING_ARGS, "crop_size")


def selected_training_args(training_args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments to list in the card: those of `CARD_TRAINING_ARGS` (max_steps unless it is -1, else the
    epochs) whose value `card_value` accepts; any other entry (a path, a token, an unknown key) is left out."""
    chosen = {}
    uses_max_steps = isinstance(training_args.get("max_steps"), int) and training_args["max_steps"] > 0
    for key, value in training_args.items():
        if key not in CARD_TRAINING_ARGS or looks_secret(key, value) or not card_value(value):
            continue
        if key == "max_steps" and not uses_max_steps:
            continue
        if key == "num_train_epochs" and uses_max_steps:  # max_steps overrides the epochs
            continue
        if key in ("warmup_steps", "warmup_ratio") and not value:
            continue
        chosen[key] = value
    return chosen


def training_section(
    training_args: Mapping[str, Any] | None,
    train_results: Mapping[str, Any],
    dataset_text: str,
    data_note: str | None = None,
    distributed_setup: Mapping[str, Any] | None = None,
) -> str:
    """Markdown: the data (and a note on it), the main training arguments, run statistics and the distributed
    setup that ran (`distributed_setup.setup_record`)."""
    lines = [f"Data: {dataset_text}." + (f" {data_note}" if data_note else "")]
    summary = {k: v for k, v in train_results.items() if k in TRAIN_SUMMARY and _is_number(v)}
    shown = selected_training_args(training_args) if training_args else {}
    if shown:
        lines += ["", "| argument | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in shown.items()]
    else:
        lines += ["", "The training arguments were not recorded with this checkpoint."]
    if summary:
        lines += [
            "",
            "Run: " + ", ".join(f"{k} = {v:.4g}" for k, v in summary.items()),
        ]
    if isinstance(distributed_setup, Mapping) and distributed_setup:
        lines += ["", f"Setup: {describe_setup(distributed_setup)}."]
    return "\n".join(lines)


def _shown(value: Any, limit: int = 60) -> str:
    """A value of prototype_stats.json as the card shows it: a number, or a short one-line text without a token;
    "?" for anything else."""
    if _is_number(value):
        return str(value)
    if isinstance(value, str) and len(value) <= limit and "\n" not in value and not HF_TOKEN.search(value):
        return value
    return "?"


def prototype_section(stats: Mapping[str, Any] | None) -> str:
    """Markdown: near-duplicate and unused prototypes (the official release's prototypes collapse; these do not?).
    Every value shown passes `_shown` (numbers and short texts: prototype_stats.json is a file of the folder)."""
    if not stats:
        return ""
    num_classes, num_prototypes = stats["num_classes"], stats["num_prototypes_per_class"]
    if not (isinstance(num_classes, int) and isinstance(num_prototypes, int)):
        return ""
    pairs = num_classes * num_prototypes * (num_prototypes - 1) // 2
    duplicates = stats.get("near_duplicates", [])
    cosine = stats.get("within_class_cosine", {})
    lines = ["### Prototype health", ""]
    threshold = _shown(stats.get("near_duplicate_threshold", 0.95))
    lines.append(
        f"- Near-duplicates (two prototypes of one class with cosine > {threshold}):"
        f" **{len(duplicates)}** of {pairs} within-class pairs"
        + (
            f" (within-class cosine: max {_shown(cosine.get('max'))}, mean {_shown(cosine.get('mean'))})."
            if cosine.get("max") is not None
            else "."
        )
    )
    if duplicates:
        shown = ", ".join(
            f"{_shown(d['class'])} p{_shown(d['prototypes'][0])}~p{_shown(d['prototypes'][1])} ({_shown(d['cosine'])})"
            for d in duplicates[:10]
        )
        lines.append(f"  Pairs: {shown}{', ...' if len(duplicates) > 10 else ''}.")
    usage = stats.get("usage")
    if usage:
        where = f" on {_shown(usage['data'], 200)}" if usage.get("data") else ""
        seen = usage.get("classes_seen", num_classes)
        seen = seen if isinstance(seen, int) else num_classes
        lines.append(
            f"- Unused prototypes{where} (never the nearest prototype of any pixel of their class):"
            f" **{_shown(usage['unused_count'])}** of {seen * num_prototypes}; used by < 1% of their class's pixels:"
            f" {_shown(usage.get('rarely_used_count', 0))}."
        )
        if usage["unused"]:
            shown = ", ".join(f"{_shown(u['class'])} p{_shown(u['prototype'])}" for u in usage["unused"][:20])
            lines.append(f"  Unused: {shown}{', ...' if len(usage['unused']) > 20 else ''}.")
        if usage.get("mean_effective_prototypes") is not None:
            lines.append(
                f"- Effective prototypes per class (exp of the entropy of usage; {num_prototypes} = all used equally,"
                f" 1 = collapsed): mean **{_shown(usage['mean_effective_prototypes'])}**."
            )
    else:
        lines.append("- Usage on data was not measured (run scripts/visualize_prototypes.py to add it).")
    return "\n".join(lines) + "\n"


def base_model_text(base_model: str | None) -> str:
    """Markdown for the "Base model" row: a Hub link, a local starting point, or none."""
    if not base_model:
        return "none (trained from scratch)"
    if hub_id_or_none(base_model):
        return f"[{base_model}](https://huggingface.co/{base_model})"
    return f"a local checkpoint (`{Path(base_model).name}`)"


def pictures_section(pictures: Sequence[tuple[str, str]] | None) -> str:
    """Markdown images for (relative path, caption) pairs."""
    if not pictures:
        return ""
    lines = ["### Pictures", ""]
    for path, caption in pictures:
        lines += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def widget_for_classes(id2label: Mapping[int, str]) -> list[dict[str, str]]:
    """The `WIDGET_EXAMPLES` that show something the model has a class for (by class-name word); none otherwise,
    e.g. for a model of digits."""
    words = {word for name in id2label.values() for word in re.split(r"[^a-z]+", str(name).lower()) if word}
    return [dict(example) for example, shows in WIDGET_EXAMPLES if words & shows]


def _side_by_side(size: Any) -> str | None:
    """ "HxW" for an int, a (height, width) pair or a {"height", "width"} dict; None otherwise."""
    if isinstance(size, bool):
        return None
    if isinstance(size, Mapping) and "height" in size and "width" in size:
        size = (size["height"], size["width"])
    if isinstance(size, int) and size > 0:
        return f"{size}x{size}"
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2 and all(map(_is_number, size)):
        return f"{size[0]}x{size[1]}"
    return None


def training_crop_text(
    crop_size: Any, training_args: Mapping[str, Any] | None, processor_config: Mapping[str, Any] | None
) -> str:
    """The crop training used: `crop_size`, else the training arguments' `crop_size`, else the size of an image
    processor that resizes (it then matches training); "not recorded" rather than a guess."""
    for candidate in (crop_size, (training_args or {}).get("crop_size")):
        text = _side_by_side(candidate)
        if text:
            return text
    if processor_config and processor_config.get("do_resize") is not False:
        text = _side_by_side(processor_config.get("size"))
        if text:
            return text
    return "not recorded with this checkpoint"


def processor_size_text(processor_config: Mapping[str, Any] | None) -> str:
    """The image processor's size, and whether it resizes, for the "How to use" section."""
    text = _side_by_side((processor_config or {}).get("size"))
    if text is None:
        return "unknown: no preprocessor_config.json"
    if processor_config.get("do_resize") is False:
        return f"{text}; it does not resize, so smaller images run at their own resolution"
    return text


def additions_section(class_additions: Sequence[Mapping[str, Any]] | None) -> str:
    """Markdown: the classes added after training (`add_classes`), each with how it was added."""
    if not class_additions:
        return ""
    lines = ["", "### Classes added after training", ""]
    for addition in class_additions:
        ids = addition.get("class_ids") or {}
        named = ", ".join(f"{name} ({ids[name]})" if name in ids else str(name) for name in addition.get("names", []))
        settings = ", ".join(
            f"{key} {addition[key]}"
            for key in ("min_cell_fraction", "max_pixels_per_class", "seed", "image_size")
            if addition.get(key) is not None
        )
        lines.append(
            f"- {named}: from {addition.get('shots', '?')} labelled support image(s), without training, by"
            f" clustering the frozen network's embeddings of their pixels into prototypes (`add_classes`; {settings});"
            f" source model {base_model_text(addition.get('source_model')) if addition.get('source_model') else '?'}."
            " The existing prototypes and weights are unchanged."
        )
    lines += ["", "The added classes were not evaluated: any results below were measured before they were added."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ the card


def build_card_data(
    *,
    model_name: str,
    id2label: Mapping[int, str],
    eval_results: Mapping[str, Any],
    dataset_name: str | None,
    base_model: str | None,
    license: str | None = None,
    widget: list[dict[str, str]] | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> ModelCardData:
    """The card's metadata: library, task, licence, tags, datasets, metrics, base model, widget and model-index.

    `datasets` and `base_model` hold only Hub ids (a built-in or local data set is named in the body and the
    model-index); the model-index lists results only when the data set they were measured on is known. The widget
    defaults to the examples that fit the model's classes (`widget_for_classes`).
    """
    licence = (
        {"license": license}
        if license
        else (
            dict(NVIDIA_LICENSE)
            if base_model and base_model.lower().startswith("nvidia/")
            else {"license": DEFAULT_LICENSE}
        )
    )
    metrics = scalar_metrics(eval_results)
    results = [
        EvalResult(
            task_type="image-segmentation",
            task_name="Semantic Segmentation",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split="validation",
            metric_type=metric_type,
            metric_name=name,
            metric_value=round(value, 6),
        )
        for metric_type, name, value in (metrics if dataset_name else [])
    ]
    if evaluation is not None:
        # The evaluation's numbers replace the training's on the same data set (its validation split).
        same = (dataset_name or "").removeprefix("builtin:") == evaluation["dataset"].removeprefix("builtin:")
        if same and evaluation["split"] == "validation":
            results = []
        results += [
            EvalResult(
                task_type="image-segmentation",
                task_name="Semantic Segmentation",
                dataset_type=evaluation["dataset"],
                dataset_name=evaluation["dataset"],
                dataset_split=evaluation["split"],
                metric_type=EVALUATION_METRICS[key][0],
                metric_name=EVALUATION_METRICS[key][1],
                metric_value=round(value, 6),
                metric_args=evaluation_setting(evaluation),
            )
            for key, value in evaluation["metrics"].items()
        ]
    widget = widget if widget is not None else widget_for_classes(id2label)
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=list(TAGS),
        datasets=[hub_id_or_none(dataset_name)] if hub_id_or_none(dataset_name) else None,
        metrics=sorted({result.metric_type for result in results} | {t for t, _, _ in metrics}) or None,
        base_model=hub_id_or_none(base_model),
        model_name=model_name,
        eval_results=results or None,
        widget=widget or None,
        **licence,
    )


def read_card_inputs(output_dir: str | Path) -> dict[str, Any]:
    """The `CARD_INPUTS` recorded in the folder's `model_card_inputs.json` (empty if there is none)."""
    path = Path(output_dir) / CARD_INPUTS_FILE
    if not path.is_file():
        return {}
    return {k: v for k, v in _read_json(path).items() if k in CARD_INPUTS and v is not None}


def resolve_card_inputs(output_dir: str | Path, **given: Any) -> dict[str, Any]:
    """The `CARD_INPUTS` for a card of `output_dir`: those `given` (not None) win over the folder's
    `model_card_inputs.json`, so re-rendering a card keeps what the first rendering knew."""
    unknown = set(given) - set(CARD_INPUTS)
    if unknown:
        raise TypeError(f"Unknown card inputs {sorted(unknown)}; expected some of {CARD_INPUTS}.")
    inputs = read_card_inputs(output_dir)
    inputs.update({k: v for k, v in given.items() if v is not None})
    for key in [k for k, v in inputs.items() if isinstance(v, str) and HF_TOKEN.search(v)]:
        logger.warning("Card input %s of %s looks like a Hugging Face token; left out of the card.", key, output_dir)
        del inputs[key]
    return inputs


def space_note(space_repo_id: str | None) -> str:
    """The card's sentence linking to the model's demo Space ("" without one)."""
    if not space_repo_id:
        return ""
    return (
        f"**Try it in the browser:** the [{space_repo_id} Space](https://huggingface.co/spaces/{space_repo_id}) shows"
        " the segmentation and the prototype assignment map of an uploaded image.\n\n"
    )


def render_model_card(
    output_dir: str | Path,
    *,
    dataset_name: str | None = None,
    eval_results: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    training_args: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    prototype_stats: Mapping[str, Any] | None = None,
    pictures: Sequence[tuple[str, str]] | None = None,
    widget: list[dict[str, str]] | None = None,
    project_url: str | None = None,
    data_note: str | None = None,
    crop_size: int | Sequence[int] | None = None,
    class_additions: Sequence[Mapping[str, Any]] | None = None,
    space_repo_id: str | None = None,
    template_path: str | Path | None = None,
    distributed_setup: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The model card of the saved model in `output_dir` (needs its config.json) as a `ModelCard`.

    Missing inputs are read from the folder: dataset_name, base_model, license, data_note, project_url, crop_size
    and class_additions from model_card_inputs.json (written with the previous card), eval results from
    all_results.json / eval_results.json, training arguments from training_args.json, prototype statistics from
    prototype_stats.json (written by scripts/visualize_prototypes.py) or, for near-duplicates only, from the
    prototypes in model.safetensors.

    Args:
        output_dir: folder with config.json (and normally model.safetensors, preprocessor_config.json and the
            training output's all_results.json / eval_results.json).
        dataset_name: the training data (a Hub dataset id, or the name of a built-in data set).
        eval_results: metrics (with or without the `eval_` prefix); default: read from the folder.
        base_model: the Hub id (or local path) of the checkpoint training started from (e.g. "nvidia/mit-b0").
        training_args: the training settings (e.g. TrainingArguments.to_dict() plus script settings); the main ones
            are listed in the card, and all are saved as training_args.json. Default: training_args.json if
            present.
        repo_id: "owner/name" used in the usage snippets; a placeholder if None.
        license: licence id; default apache-2.0, or NVIDIA's licence for an nvidia/ base model.
        prototype_stats: `visualization.prototype_statistics` output; default: prototype_stats.json if present,
            else near-duplicate statistics of the stored prototypes.
        pictures: (relative path, caption) of pictures to show in the card.
        widget: widget examples [{"src": url, "example_title": title}]; default: `widget_for_classes`.
        project_url: link to the proto_segformer code, if public.
        data_note: a sentence on the data shown after it in the Training section (e.g. how the evaluation split
            relates to the training data).
        crop_size: the training crop (side, or (height, width)); default: training_args["crop_size"].
        class_additions: the classes added after training, one dict per `add_classes` run (names, class_ids,
            shots, min_cell_fraction, max_pixels_per_class, seed, image_size, source_model).
        space_repo_id: "owner/name" of the Gradio Space that demonstrates the model (`space.write_space`); the card
            links to it.
        template_path: the Jinja template of the card body (default: the packaged `templates/model_card.md`).
        distributed_setup: the setup training ran with (`distributed_setup.setup_record`: processes, machines,
            DDP / FSDP / DeepSpeed, precision); default: the "distributed_setup" entry of all_results.json or
            train_results.json.
    """
    output_dir = Path(output_dir)
    config_path = output_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"Cannot write a model card: {output_dir} has no config.json (save the model first).")
    inputs = resolve_card_inputs(
        output_dir,
        dataset_name=dataset_name,
        base_model=base_model,
        license=license,
        data_note=data_note,
        project_url=project_url,
        crop_size=crop_size,
        class_additions=class_additions,
        space_repo_id=space_repo_id,
    )
    dataset_name, base_model, project_url = (
        inputs.get("dataset_name"),
        inputs.get("base_model"),
        inputs.get("project_url"),
    )
    class_additions = inputs.get("class_additions")
    config = _read_json(config_path)
    id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    num_labels = len(id2label) or int(config.get("num_labels", 0))
    results = strip_eval_prefix(eval_results) if eval_results is not None else read_eval_results(output_dir)
    if training_args is None and (output_dir / TRAINING_ARGS_FILE).is_file():
        training_args = _read_json(output_dir / TRAINING_ARGS_FILE)
    if prototype_stats is None and (output_dir / PROTOTYPE_STATS_FILE).is_file():
        prototype_stats = _read_json(output_dir / PROTOTYPE_STATS_FILE)
    if prototype_stats is None:
        prototype_stats = prototype_tensor_stats(output_dir, id2label)
    train_results = {}
    for name in ("train_results.json", "all_results.json"):
        if (output_dir / name).is_file():
            recorded = _read_json(output_dir / name)
            train_results.update({k: v for k, v in recorded.items() if k.startswith(("train_", "epoch"))})
            if distributed_setup is None and isinstance(recorded.get(SETUP_KEY), Mapping):
                distributed_setup = recorded[SETUP_KEY]

    architecture = architecture_texts(config)
    dataset_text = f"`{dataset_name}`" if dataset_name else "data that was not recorded with this checkpoint"
    name = (
        repo_id.split("/")[-1]
        if repo_id
        else slug(architecture["name"] + (f"-{dataset_name.split('/')[-1]}" if dataset_name else ""))
    )
    evaluation = read_evaluation(output_dir, id2label)
    card_data = build_card_data(
        evaluation=evaluation,
        model_name=name,
        id2label=id2label,
        eval_results={} if class_additions else results,  # results of the classes before the additions
        dataset_name=dataset_name,
        base_model=base_model,
        license=inputs.get("license"),
        widget=widget,
    )
    # The architecture's tags in place of SegFormer's (TAGS lists the SegFormer model's).
    if architecture["tags"]:
        card_data.tags = [tag for tag in card_data.tags if tag != "segformer"] + architecture["tags"]
    processor_path = output_dir / "preprocessor_config.json"
    processor_config = _read_json(processor_path) if processor_path.is_file() else None
    num_parameters = learnable_parameter_count(output_dir)
    template = Path(template_path) if template_path else TEMPLATE_PATH
    if not template.is_file():
        raise FileNotFoundError(
            f"Model card template {template} is missing: it ships inside the package (proto_segformer/templates);"
            " reinstall the package."
        )
    embedding_dim = config.get("prototype_dim") or config.get("decoder_hidden_size")
    summary = (
        f"{architecture['summary']} with a ProtoSeg prototype classifier"
        f" ({num_labels} classes x {config.get('num_prototypes_per_class')} prototypes), trained on {dataset_text}."
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        title=name,
        summary=summary,
        repo_id=repo_id or f"<namespace>/{name}",
        num_labels=num_labels,
        architecture_intro=architecture["intro"],
        architecture_row=architecture["row"],
        architecture_citation=architecture["citation"],
        logits_size=architecture["logits_size"],
        num_prototypes=config.get("num_prototypes_per_class"),
        embedding_dim=embedding_dim,
        config=config,
        crop_size=training_crop_text(inputs.get("crop_size"), training_args, processor_config),
        processor_size=processor_size_text(processor_config),
        num_parameters=f"{num_parameters:,}" if num_parameters is not None else "unknown",
        base_model_text=base_model_text(base_model),
        class_list=", ".join(f"{k}: {v}" for k, v in sorted(id2label.items())),
        additions_section=additions_section(class_additions),
        widget_note=": the widget examples in the metadata only work once the model runs somewhere that allows"
        " `trust_remote_code`"
        if card_data.widget
        else "",
        dataset_text=dataset_text,
        space_note=space_note(inputs.get("space_repo_id")),
        project_text=f"the [`proto_segformer`]({project_url}) implementation"
        if project_url
        else "the `proto_segformer` implementation",
        training_section=training_section(
            training_args, train_results, dataset_text, inputs.get("data_note"), distributed_setup
        ),
        results_section=results_section(results, id2label, dataset_text)
        if evaluation is None
        else (results_section(results, id2label, dataset_text) + "\n\n" if scalar_metrics(results) else "")
        + evaluation_section(evaluation),
        prototype_section=prototype_section(prototype_stats),
        pictures_section=pictures_section(pictures),
    )
    content = str(card)
    cleaned = redact_tokens(content, output_dir)  # the last guard: nothing that looks like a token is published
    return card if cleaned == content else ModelCard(cleaned)


def write_model_card(output_dir: str | Path, *, filename: str = "README.md", **inputs: Any) -> Path:
    """Write the model card (`README.md`) into `output_dir`, which holds a saved model; return its path.

    The keyword arguments are those of `render_model_card` (documented there).
    dataset_name, base_model, license, data_note, project_url, crop_size, class_additions and space_repo_id default
    to those in the folder's model_card_inputs.json, which is (re)written with the card so that a later rendering
    keeps them.
    When `training_args` is given (a training run writing the card of the model it just trained), the inputs given
    are the whole truth: files a previous run left in the folder (model_card_inputs.json, training_args.json) are
    not read, and are replaced.
    """
    unknown = sorted(set(inputs) - set(inspect.signature(render_model_card).parameters) - {"output_dir"})
    if unknown:
        raise TypeError(f"write_model_card() got unexpected keyword arguments: {', '.join(unknown)}")
    training_args = inputs.get("training_args")
    if training_args is not None:
        (Path(output_dir) / CARD_INPUTS_FILE).unlink(missing_ok=True)
        # Kept next to the card so that a later re-render (push_to_hub) lists the same arguments.
        (Path(output_dir) / TRAINING_ARGS_FILE).write_text(json.dumps(training_args, indent=2, default=str) + "\n")
    remembered = resolve_card_inputs(output_dir, **{name: inputs.pop(name, None) for name in CARD_INPUTS})
    card = render_model_card(output_dir, **inputs, **remembered)
    path = Path(output_dir) / filename
    card.save(path)
    (Path(output_dir) / CARD_INPUTS_FILE).write_text(json.dumps(remembered, indent=2, default=str) + "\n")
    return path
