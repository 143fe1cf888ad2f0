"""transformers' model conventions, as stock SegFormer honours them: save/load, batching, determinism, training with
gradient checkpointing, hidden states (all or selected stages) and attentions, attention back-ends, loading in
another dtype; and what the remote code (the files `auto_map` ships) may hold."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from rounding import assert_argmax_up_to_ties
from transformers import SegformerConfig, SegformerForSemanticSegmentation
from transformers.dynamic_module_utils import get_imports, get_relative_imports

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer.hub import custom_code_files

NO_DROPOUT = {
    "classifier_dropout_prob": 0.0,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "drop_path_rate": 0.0,
}


@pytest.fixture(scope="module")
def model() -> ProtoSegformerForSemanticSegmentation:
    torch.manual_seed(0)
    return ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=6)).eval()


def _pixels(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_save_and_load_give_the_same_outputs(model, tmp_path):
    pixel_values = _pixels(2, 3, 64, 64)
    model.save_pretrained(tmp_path)
    loaded = ProtoSegformerForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.prototypes, model.prototypes)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values).logits, model(pixel_values).logits)


def test_batched_logits_equal_one_image_at_a_time_and_eval_is_deterministic(model):
    pixel_values = _pixels(3, 3, 64, 96, seed=1)
    with torch.no_grad():
        batched = model(pixel_values).logits
        again = model(pixel_values).logits
        single = torch.cat([model(pixel_values[i : i + 1]).logits for i in range(3)])
    assert torch.equal(batched, again)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_hidden_states_and_attentions_have_segformers_shapes():
    # Attention weights come from the eager attention (with SDPA, as for SegFormer, there are none to return).
    torch.manual_seed(0)
    model = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=6)).eval()
    model.set_attn_implementation("eager")
    output = model(_pixels(2, 3, 64, 64), output_hidden_states=True, output_attentions=True)
    config = model.config
    assert [tuple(h.shape) for h in output.hidden_states] == [
        (2, size, 64 // stride, 64 // stride) for size, stride in zip(config.hidden_sizes, (4, 8, 16, 32))
    ]
    assert len(output.attentions) == sum(config.depths)
    assert output.attentions[0].shape[:2] == (2, config.num_attention_heads[0])
    plain = model(_pixels(2, 3, 64, 64))
    assert plain.hidden_states is None and plain.attentions is None


@pytest.mark.parametrize("selection", [[0, 2], [-1], 1])
def test_output_hidden_states_selects_stages_like_segformer(model, selection):
    config = SegformerConfig(**{k: v for k, v in tiny_config(num_labels=6).to_dict().items() if k != "model_type"})
    stock = SegformerForSemanticSegmentation(config).eval()
    pixel_values = _pixels(1, 3, 64, 64)
    ours = model(pixel_values, output_hidden_states=selection).hidden_states
    theirs = stock(pixel_values, output_hidden_states=selection).hidden_states
    assert [h is None for h in ours] == [h is None for h in theirs]
    assert sum(h is not None for h in ours) == (1 if isinstance(selection, int) else len(selection))
    everything = model(pixel_values, output_hidden_states=True).hidden_states
    for picked, full in zip(ours, everything):
        assert picked is None or torch.equal(picked, full)


@pytest.mark.parametrize("implementation", ["eager", "flex_attention"])
def test_attention_back_ends_of_segformer_give_the_same_logits(implementation):
    torch.manual_seed(0)
    model = ProtoSegformerForSemanticSegmentation(tiny_config(num_labels=6)).eval()
    for flag in ("_supports_sdpa", "_supports_flash_attn", "_supports_flex_attn", "_supports_attention_backend"):
        assert getattr(type(model), flag) == getattr(SegformerForSemanticSegmentation, flag)
    pixel_values = _pixels(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(pixel_values).logits
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        torch.testing.assert_close(model(pixel_values).logits, reference, atol=1e-4, rtol=0)


def test_gradient_checkpointing_gives_the_same_loss_gradients_and_update():
    torch.manual_seed(0)
    config = tiny_config(num_labels=4, **NO_DROPOUT)
    plain = ProtoSegformerForSemanticSegmentation(config).train()
    checkpointed = ProtoSegformerForSemanticSegmentation(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing
    pixel_values = _pixels(2, 3, 64, 64, seed=3)
    labels = torch.randint(0, 4, (2, 64, 64), generator=torch.Generator().manual_seed(4))
    losses = []
    for model in (plain, checkpointed):
        output = model(pixel_values=pixel_values, labels=labels)
        output.loss.backward()
        losses.append(output.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    grads = dict(plain.named_parameters())
    for name, parameter in checkpointed.named_parameters():
        assert parameter.grad is not None, name
        torch.testing.assert_close(parameter.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(checkpointed.prototypes, plain.prototypes, atol=1e-6, rtol=0)
    assert not torch.equal(plain.prototypes, ProtoSegformerForSemanticSegmentation(config).prototypes)


def test_loading_in_bfloat16_keeps_float32_prototypes_and_scores_in_bfloat16(model, tmp_path):
    model.save_pretrained(tmp_path)
    half = ProtoSegformerForSemanticSegmentation.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    # Running means: a momentum step of 1 - 0.999 is below bfloat16's resolution, so the buffer stays float32.
    assert half.prototypes.dtype == torch.float32
    assert torch.equal(half.prototypes, model.prototypes)
    pixel_values = _pixels(1, 3, 64, 64, seed=5)
    with torch.no_grad():
        logits = half(pixel_values.bfloat16()).logits
        reference = model(pixel_values).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, atol=0.3, rtol=0)
    assert_argmax_up_to_ties(logits.float().argmax(dim=1), reference, dim=1, atol=0.3)


# ----------------------------------------------------------------------------------------------------------------
# Remote code: what running and training the model need, nothing else, and no network access

SHIPPED = {
    "configuration_proto_segformer.py",
    "local_paths.py",
    "modeling_proto_segformer.py",
    "prototype_kernels.py",
    "prototype_head.py",
    "prototype_math.py",
    "transformers_changes.py",
}
NETWORK_MODULES = {"socket", "urllib", "http", "requests", "httpx", "aiohttp"}


def test_remote_code_is_the_model_only_and_never_reaches_the_network():
    files = custom_code_files()
    assert {path.name for path in files} == SHIPPED
    for path in files:
        # What transformers' remote-code check (`check_imports`) requires: never the package (the class-editing
        # methods import it inside try/except), never a network library; sibling files by single-dot imports only.
        required = set(get_imports(path))
        assert not required & (NETWORK_MODULES | {"proto_segformer"}), (path.name, required)
        assert {f"{name}.py" for name in get_relative_imports(path)} <= SHIPPED, path.name
        assert "from .." not in path.read_text(), path.name


# The public API (README, "Public API"): what users import. Every other module is internal and declares no `__all__`.
PUBLIC_API = {
    "proto_segformer": [
        "BACKBONE_PRESETS",
        "MIT_PRESETS",
        "ProtoSegConfig",
        "ProtoSegForSemanticSegmentation",
        "ProtoSegPreTrainedModel",
        "ProtoSegformerConfig",
        "ProtoSegformerForSemanticSegmentation",
        "ProtoSegformerPreTrainedModel",
        "ProtoSegformerSemanticSegmenterOutput",
        "mit_preset",
    ],
    "proto_segformer.configuration_proto_segformer": ["MIT_PRESETS", "ProtoSegformerConfig", "mit_preset"],
    "proto_segformer.configuration_protoseg": [
        "BACKBONE_PRESETS",
        "DECODER_TYPES",
        "ProtoSegConfig",
        "backbone_preset",
    ],
    "proto_segformer.modeling_protoseg": [
        "ProtoSegForSemanticSegmentation",
        "ProtoSegPreTrainedModel",
        "ProtoSegUperNetDecoder",
    ],
    "proto_segformer.modeling_proto_segformer": [
        "ProtoSegformerDecodeHead",
        "ProtoSegformerForSemanticSegmentation",
        "ProtoSegformerPreTrainedModel",
        "ProtoSegformerProjection",
        "ProtoSegformerSemanticSegmenterOutput",
    ],
    "proto_segformer.data": [
        "BUILTIN_DATASETS",
        "FolderLayout",
        "IGNORE_INDEX",
        "build_builtin_dataset",
        "find_folder_layout",
        "load_dataset_any",
    ],
    "proto_segformer.metrics": ["MEAN_IOU_PATH", "ConfusionMatrix", "load_mean_iou", "mean_iou", "metrics_from_areas"],
    "proto_segformer.segmenter": ["InferenceOptions", "Prediction", "Segmenter"],
}


def test_only_the_public_modules_declare_all_and_their_names_import():
    import ast
    import importlib
    from pathlib import Path

    import proto_segformer

    package = Path(proto_segformer.__file__).resolve().parent
    declaring = set()
    for path in package.rglob("*.py"):
        if "templates" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        if any(
            isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "__all__" for target in node.targets)
            for node in tree.body
        ):
            parts = path.relative_to(package).with_suffix("").parts
            declaring.add(".".join(("proto_segformer", *parts)).removesuffix(".__init__"))
    assert declaring == set(PUBLIC_API)
    for module_name, names in PUBLIC_API.items():
        module = importlib.import_module(module_name)
        assert sorted(module.__all__) == sorted(names), module_name
        for name in names:
            assert getattr(module, name) is not None
