"""Adding, removing and renaming classes of a ProtoSeg model without training (proto_segformer/class_editing.py)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from rounding import assert_argmax_up_to_ties

from proto_segformer import ProtoSegformerForSemanticSegmentation
from proto_segformer.class_editing import (
    embedding_grid_size,
    pil_to_pixel_values,
    prepare_support,
    subsample_per_class,
    support_cell_labels,
)
from proto_segformer.prototype_math import cluster_prototypes

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def make_model(num_labels: int = 5, **overrides) -> ProtoSegformerForSemanticSegmentation:
    torch.manual_seed(0)
    config = tiny_config(num_labels, classifier_dropout_prob=0.0, drop_path_rate=0.0, **overrides)
    return ProtoSegformerForSemanticSegmentation(config)


def two_colour_image(seed: int = 0, size: int = 32) -> tuple[Image.Image, Image.Image]:
    """A PIL image red on the left half and blue on the right half, and its mask (1 = left, 2 = right)."""
    rng = np.random.default_rng(seed)
    array = np.zeros((size, size, 3), np.int64)
    array[:, : size // 2] = [220, 30, 30]
    array[:, size // 2 :] = [30, 30, 220]
    array = np.clip(array + rng.integers(0, 20, array.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[:, : size // 2] = 1
    mask[:, size // 2 :] = 2
    return Image.fromarray(array), Image.fromarray(mask, mode="L")


def support_tensors(count: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values (N, 3, S, S) of two-colour images and masks (N, S, S) int64 (1 = left half, 2 = right half)."""
    images, masks = zip(*(two_colour_image(seed, size) for seed in range(count)))
    pixel_values = torch.stack([pil_to_pixel_values(image) for image in images])
    return pixel_values, torch.stack([torch.as_tensor(np.array(mask)).long() for mask in masks])


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(model.config.to_dict())


def assert_unchanged(model, before) -> None:
    state, config = before
    after = model.state_dict()
    assert sorted(after) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(after[name], tensor), name
    assert model.config.to_dict() == config


# ----------------------------------------------------------------------------------------------------------------
# add_classes: guarantees


def test_add_classes_appends_prototypes_and_leaves_every_old_tensor_bit_identical():
    model = make_model()
    model.train()
    model.segformer.stages[0].eval()  # a mixed train/eval state must come back exactly
    modes = {name: module.training for name, module in model.named_modules()}
    old_state = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = torch.get_rng_state()
    pixel_values, masks = support_tensors()

    ids = model.add_classes(pixel_values, masks, ["red thing", "blue thing"])

    assert ids == {"red thing": 5, "blue thing": 6}
    assert model.prototypes.shape == (7, 4, 32)
    new_state = model.state_dict()
    assert sorted(new_state) == sorted(old_state)
    for name, tensor in old_state.items():
        if name != "prototypes":
            assert torch.equal(new_state[name], tensor), name  # weights and BatchNorm statistics untouched
    assert torch.equal(new_state["prototypes"][:5], old_state["prototypes"])
    torch.testing.assert_close(model.prototypes.norm(dim=-1), torch.ones(7, 4))
    assert "prototypes" in dict(model.named_buffers()) and "prototypes" not in model._non_persistent_buffers_set
    assert not model.prototypes.requires_grad
    assert model.config.num_labels == 7
    assert model.config.id2label[5] == "red thing" and model.config.id2label[6] == "blue thing"
    assert model.config.label2id == {v: k for k, v in model.config.id2label.items()}
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng_state)  # a private generator: global RNG untouched


def test_new_prototypes_are_the_sinkhorn_clustering_of_the_support_embeddings():
    model = make_model().eval()
    pixel_values, masks = support_tensors()
    model.add_classes(pixel_values, masks, ["red", "blue"], max_pixels_per_class=None, seed=3)

    with torch.no_grad():
        embeddings, _ = model.embed_pixels(pixel_values)
    # 32x32 masks split at column 16: every 4x4 cell lies wholly in one half, cells 0-3 red, 4-7 blue.
    cells = torch.zeros(2, 8, 8, dtype=torch.long)
    cells[:, :, 4:] = 1
    expected, present = cluster_prototypes(
        embeddings.permute(0, 2, 3, 1).reshape(-1, 32),
        cells.reshape(-1),
        num_classes=2,
        num_prototypes=4,
        epsilon=model.config.sinkhorn_epsilon,
        sinkhorn_iterations=model.config.sinkhorn_iterations,
        rounds=10,
        generator=torch.Generator().manual_seed(3),
    )
    assert present.all()
    torch.testing.assert_close(model.prototypes[5:], expected)

    predictions = model(pixel_values).logits.argmax(dim=1)
    assert torch.equal(predictions, cells + 5)  # nearest prototype: each half is its new class


def test_same_seed_same_prototypes_and_subsampling_keeps_at_most_the_cap():
    pixel_values, masks = support_tensors()
    first, second, capped = make_model(), make_model(), make_model()
    first.add_classes(pixel_values, masks, ["red", "blue"], seed=1)
    second.add_classes(pixel_values, masks, ["red", "blue"], seed=1)
    assert torch.equal(first.prototypes, second.prototypes)
    capped.add_classes(pixel_values, masks, ["red", "blue"], seed=1, max_pixels_per_class=5)
    assert not torch.equal(capped.prototypes, first.prototypes)

    classes = torch.tensor([0, 1, 1, 0, 2, 1, 1, 1, 0])
    kept = subsample_per_class(classes, 3, 2, torch.Generator().manual_seed(0))
    assert torch.equal(kept, torch.unique(kept))  # sorted, no repeats
    assert torch.bincount(classes[kept], minlength=3).tolist() == [2, 2, 1]


def test_pil_images_are_normalised_like_segformer_image_processor_and_give_the_same_prototypes():
    image, mask = two_colour_image()
    expected = (torch.as_tensor(np.array(image)).permute(2, 0, 1).float() / 255 - IMAGENET_MEAN) / IMAGENET_STD
    torch.testing.assert_close(pil_to_pixel_values(image), expected)

    from_pil, from_tensor = make_model(), make_model()
    from_pil.add_classes([image], [mask], ["red", "blue"])
    from_tensor.add_classes(expected[None], torch.as_tensor(np.array(mask)).long()[None], ["red", "blue"])
    torch.testing.assert_close(from_pil.prototypes, from_tensor.prototypes)


def test_image_size_resizes_pil_images_bilinearly_and_their_masks_by_nearest_neighbour():
    image, mask = two_colour_image(size=48)
    ((pixel_values, resized_mask),) = prepare_support([image], [mask], 2, image_size=(32, 24))
    assert pixel_values.shape == (3, 32, 24) and resized_mask.shape == (32, 24)
    expected_image = pil_to_pixel_values(image.resize((24, 32), Image.Resampling.BILINEAR))
    torch.testing.assert_close(pixel_values, expected_image)
    expected_mask = torch.as_tensor(np.array(mask.resize((24, 32), Image.Resampling.NEAREST))).long()
    assert torch.equal(resized_mask, expected_mask)
    assert torch.equal(torch.unique(resized_mask), torch.tensor([1, 2]))

    model = make_model()
    model.add_classes([image], [mask], ["red", "blue"], image_size=(32, 32))
    assert model.config.num_labels == 7


def test_a_cell_counts_only_when_enough_of_its_pixels_carry_the_class():
    mask = torch.zeros(8, 12, dtype=torch.long)
    mask[0:4, 0:4] = 1  # cell (0, 0): 16/16 of class 1
    mask[0:3, 4:8] = 2  # cell (0, 1): 12/16 of class 2, the rest left out
    mask[0:2, 8:12] = 1  # cell (0, 2): 8/16 of class 1
    mask[4:8, 0:4] = 2
    mask[4, 0:4] = 1  # cell (1, 0): 12/16 class 2, 4/16 class 1
    assert embedding_grid_size(8, 12, patch_size=7, stride=4) == (2, 3)
    assert embedding_grid_size(30, 33, patch_size=7, stride=4) == (8, 9)  # ceil(H/4), as SegFormer's patch embed
    cells = support_cell_labels(mask, (2, 3), num_names=2, min_fraction=0.75)
    assert cells.tolist() == [[0, 1, -1], [1, -1, -1]]
    strict = support_cell_labels(mask, (2, 3), num_names=2, min_fraction=1.0)
    assert strict.tolist() == [[0, -1, -1], [-1, -1, -1]]


def test_the_extended_model_trains_like_any_other_with_the_new_class_ids():
    model = make_model()
    pixel_values, masks = support_tensors()
    model.add_classes(pixel_values, masks, ["red", "blue"])
    model.train()
    labels = masks + 4  # 5 = red, 6 = blue
    before = model.prototypes.clone()
    output = model(pixel_values, labels=labels)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert not torch.equal(model.prototypes[5:], before[5:])  # the new classes' prototypes now update in training
    assert torch.equal(model.prototypes[:5], before[:5])  # absent classes do not


# ----------------------------------------------------------------------------------------------------------------
# add_classes: errors leave the model unchanged


def _support():
    return support_tensors()


ERROR_CASES = {
    "existing name": (lambda p, m: (p, m, ["LABEL_2", "blue"]), {}, r"already has classes named \['LABEL_2'\]"),
    "duplicated name": (lambda p, m: (p, m, ["red", "red"]), {}, r"contains \['red'\] more than once"),
    "empty name": (lambda p, m: (p, m, ["red", " "]), {}, "empty class name"),
    "name with a newline": (lambda p, m: (p, m, ["red", "blue\nsky"]), {}, r"holds the control character\(s\) '\\n'"),
    "name with a tab": (lambda p, m: (p, m, ["red\tx", "blue"]), {}, r"holds the control character\(s\) '\\t'"),
    "no pixel of a class": (
        lambda p, m: (p, torch.where(m == 2, 0, m), ["red", "blue"]),
        {},
        r"no pixel of the new classes \['blue'\]",
    ),
    "too thin for the grid": (
        lambda p, m: (p, torch.where((m == 2) & (torch.arange(32) % 4 != 0)[None, None, :], 0, m), ["red", "blue"]),
        {},
        r"No 4x4 embedding cell is at least 75% covered by the new classes 'blue' \(256 pixels\)",
    ),
    "image and mask sizes differ": (
        lambda p, m: (p, m[:, :, :28], ["red", "blue"]),
        {},
        "is 32x32 .* masks\\[0\\] is 32x28",
    ),
    "different counts": (lambda p, m: (p, m[:1], ["red", "blue"]), {}, "Got 2 images but 1 masks"),
    "mask value without a name": (lambda p, m: (p, m, ["red"]), {}, r"values \[2\] outside \[0, 1\]"),
    "float masks": (lambda p, m: (p, m.float(), ["red", "blue"]), {}, "integer class numbers"),
    "uint8 pixel values": (lambda p, m: (p.to(torch.uint8), m, ["red", "blue"]), {}, "must be floating point"),
    "three-dimensional pixel values": (lambda p, m: (p[0], m, ["red", "blue"]), {}, r"shape \(N, 3, H, W\)"),
    "non-finite pixel values": (
        lambda p, m: (p.index_fill(1, torch.tensor([0]), float("nan")), m, ["r", "b"]),
        {},
        "NaN",
    ),
    "no names": (lambda p, m: (p, m, []), {}, "names is empty"),
    "bad min_cell_fraction": (lambda p, m: (p, m, ["red", "blue"]), {"min_cell_fraction": 0.5}, r"\(0.5, 1\]"),
    "image_size with pixel values": (lambda p, m: (p, m, ["red", "blue"]), {"image_size": (16, 16)}, "PIL images"),
    "pixel values below the encoder's smallest input": (
        lambda p, m: (p[:, :, :8, :8].contiguous(), m[:, :8, :8], ["red", "blue"]),
        {},
        r"images\[0\] is too small: 8x8 .* this model's encoder needs at least 29x29",
    ),
    "PIL images resized below the encoder's smallest input": (
        lambda p, m: ([two_colour_image(0)[0]], [two_colour_image(0)[1]], ["red", "blue"]),
        {"image_size": (16, 16)},
        r"16x16 .* after resizing to image_size; this model's encoder needs at least 29x29",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_gets_a_clear_error_and_the_model_is_unchanged(case):
    make_arguments, options, message = ERROR_CASES[case]
    model = make_model()
    model.train()
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=message):
        model.add_classes(*make_arguments(*_support()), **options)
    assert_unchanged(model, before)
    assert model.training and all(module.training for module in model.modules())


def test_a_new_class_id_equal_to_the_ignore_index_is_refused():
    model = make_model(semantic_loss_ignore_index=6)
    before = snapshot(model)
    with pytest.raises(ValueError, match="would give a class the id 6, which is config.semantic_loss_ignore_index"):
        model.add_classes(*_support(), ["red", "blue"])
    assert_unchanged(model, before)


def test_an_error_inside_the_network_restores_training_flags_and_changes_nothing():
    model = make_model()
    model.train()
    before = snapshot(model)
    pixel_values, masks = _support()
    wrong_channels = torch.cat([pixel_values, pixel_values[:, :1]], dim=1)  # 4 channels: patch embedding fails
    with pytest.raises((ValueError, RuntimeError)):
        model.add_classes(wrong_channels, masks, ["red", "blue"])
    assert_unchanged(model, before)
    assert all(module.training for module in model.modules())


# ----------------------------------------------------------------------------------------------------------------
# remove_classes and rename_class


def test_remove_classes_drops_prototypes_and_shifts_later_ids_down():
    model = make_model().eval()
    model.config.id2label = {i: name for i, name in enumerate(["sky", "road", "car", "tree", "person"])}
    model.config.label2id = {name: i for i, name in model.config.id2label.items()}
    old_prototypes = model.prototypes.clone()
    pixel_values, _ = support_tensors()
    old_scores = model(pixel_values).logits

    mapping = model.remove_classes(["road", "tree"])

    assert mapping == {0: 0, 2: 1, 4: 2}
    assert torch.equal(model.prototypes, old_prototypes[[0, 2, 4]])
    assert model.config.id2label == {0: "sky", 1: "car", 2: "person"}
    assert model.config.label2id == {"sky": 0, "car": 1, "person": 2}
    assert model.config.num_labels == 3
    assert "prototypes" in model.state_dict()
    new_predictions = model(pixel_values).logits.argmax(dim=1)
    assert_argmax_up_to_ties(new_predictions, old_scores[:, [0, 2, 4]], dim=1, atol=1e-5)  # nearest remaining class


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["LABEL_1", "cat"], r"Unknown class names \['cat'\]"),
        (["LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"], "would leave 1 class"),
        (["LABEL_1", "LABEL_1"], "more than once"),
        ([], "names is empty"),
    ],
)
def test_remove_classes_errors_leave_the_model_unchanged(names, message):
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.remove_classes(names)
    assert_unchanged(model, before)


def test_rename_class_changes_only_the_label_maps():
    model = make_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.rename_class("LABEL_3", "bicycle") == 3
    assert model.config.id2label[3] == "bicycle" and model.config.label2id["bicycle"] == 3
    assert "LABEL_3" not in model.config.label2id and model.config.num_labels == 5
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Unknown class names \['LABEL_3'\]"):
        model.rename_class("LABEL_3", "x")
    with pytest.raises(ValueError, match=r"already has classes named \['LABEL_0'\]"):
        model.rename_class("bicycle", "LABEL_0")
    with pytest.raises(ValueError, match="empty class name"):
        model.rename_class("bicycle", "")
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------------------------
# Save, reload, remote code, pipeline

REPO = Path(__file__).resolve().parents[1]
REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["proto_segformer"] = None  # the package must not be importable: only the saved remote code
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

    folder, image_path = sys.argv[1], sys.argv[2]
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    segmenter = pipeline("image-segmentation", model=model, image_processor=processor)
    image = Image.open(image_path)
    labels = sorted(segment["label"] for segment in segmenter(image))
    try:  # the editing methods are not remote code: they need the package
        model.rename_class("blue thing", "navy thing")
    except ImportError as error:
        without_package = str(error)
    del sys.modules["proto_segformer"]  # now the package is there: the remote-code model's methods use it
    sys.path.insert(0, sys.argv[3])
    model.rename_class("blue thing", "navy thing")
    renamed = sorted(segment["label"] for segment in segmenter(image))
    mask = torch.zeros(1, 32, 32, dtype=torch.long)
    mask[:, :8] = 1
    added = model.add_classes(torch.randn(1, 3, 32, 32), mask, ["top strip"])
    print(json.dumps({
        "module": type(model).__module__, "labels": labels, "renamed": renamed, "added": added,
        "without_package": without_package,
        "num_labels": model.config.num_labels, "prototypes": list(model.prototypes.shape),
    }))
    """
)


@pytest.mark.slow
def test_extended_model_round_trips_through_safetensors_remote_code_and_the_pipeline(tmp_path):
    from transformers import SegformerImageProcessorPil

    model = make_model().eval()
    image, mask = two_colour_image()
    model.add_classes([image], [mask], ["red thing", "blue thing"])
    folder = tmp_path / "extended"
    model.save_pretrained(folder)
    SegformerImageProcessorPil(do_resize=False).save_pretrained(folder)
    assert (folder / "prototype_math.py").exists() and not (folder / "class_editing.py").exists()

    reloaded = ProtoSegformerForSemanticSegmentation.from_pretrained(folder).eval()
    assert torch.equal(reloaded.prototypes, model.prototypes)
    assert reloaded.config.id2label == model.config.id2label and reloaded.config.label2id == model.config.label2id
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    pixel_values = pil_to_pixel_values(image)[None]
    assert torch.equal(reloaded(pixel_values).logits, model(pixel_values).logits)

    image_path = tmp_path / "image.png"
    image.save(image_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder), str(image_path), str(REPO)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")
    assert report["labels"] == ["blue thing", "red thing"]
    assert report["renamed"] == ["navy thing", "red thing"]
    assert report["without_package"].startswith("model.rename_class needs the proto_segformer package")
    assert report["added"] == {"top strip": 7}
    assert report["num_labels"] == 8 and report["prototypes"] == [8, 4, 32]


# ----------------------------------------------------------------------------------------------------------------
# scripts/add_classes.py


def load_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def write_support_folder(folder, count: int = 2) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for index in range(count):
        image, mask = two_colour_image(seed=index, size=40)
        image.save(folder / "images" / f"scene{index}.jpg", quality=95)
        mask.save(folder / "masks" / f"scene{index}.png")


@pytest.mark.parametrize("with_processor", [True, False])
def test_add_classes_script_saves_an_extended_model(tmp_path, with_processor):
    from transformers import SegformerImageProcessorPil

    script = load_script("add_classes")
    model_dir, support_dir, output_dir = tmp_path / "model", tmp_path / "support", tmp_path / "out"
    model = make_model()
    model.save_pretrained(model_dir)
    if with_processor:
        SegformerImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    write_support_folder(support_dir)

    arguments = script.AddClassesArguments(
        model_dir=str(model_dir), support_dir=str(support_dir), names=["red", "blue"], output_dir=str(output_dir)
    )
    assert script.main(arguments) == {"red": 5, "blue": 6}

    extended = ProtoSegformerForSemanticSegmentation.from_pretrained(output_dir)
    assert extended.config.id2label[5] == "red" and extended.config.id2label[6] == "blue"
    assert torch.equal(extended.prototypes[:5], model.prototypes)
    assert (output_dir / "preprocessor_config.json").exists() == with_processor
    image, _ = two_colour_image(seed=0, size=40)
    size = (32, 32) if with_processor else None
    pixel_values = pil_to_pixel_values(image, size)[None]
    predictions = extended.eval()(pixel_values).logits.argmax(dim=1)
    assert set(predictions[0, :, :3].unique().tolist()) == {5} and set(predictions[0, :, -3:].unique().tolist()) == {6}


@pytest.mark.parametrize("with_processor", [False, True])
def test_add_classes_names_a_support_image_below_the_encoder_minimum_in_one_line(tmp_path, with_processor):
    """An 8x8 support image is a one-line error naming the file and the minimum (the encoder's smallest input,
    `model.min_input_size`: 29 for mit-b0's shape, what predict reports too), not a convolution traceback."""
    from transformers import SegformerImageProcessorPil

    from proto_segformer.add_classes import AddClassesError, add_classes_from_folder

    model_dir, support_dir = tmp_path / "model", tmp_path / "support"
    model = make_model()
    model.save_pretrained(model_dir)
    if with_processor:  # a processor that keeps the image size: the model sees 8x8
        SegformerImageProcessorPil(do_resize=False).save_pretrained(model_dir)
    (support_dir / "images").mkdir(parents=True)
    (support_dir / "masks").mkdir()
    image, mask = two_colour_image(size=8)
    image.save(support_dir / "images" / "tiny.png")
    mask.save(support_dir / "masks" / "tiny.png")
    with pytest.raises(AddClassesError) as caught:
        add_classes_from_folder(model_dir, support_dir, ["red", "blue"], tmp_path / "out")
    message = str(caught.value)
    assert str(support_dir / "images" / "tiny.png") in message and "8x8" in message and "at least 29x29" in message
    assert "\n" not in message and model.min_input_size == 29
    assert not (tmp_path / "out").exists()


def test_class_names_with_control_characters_are_refused_before_anything_is_read(tmp_path):
    script = load_script("add_classes")
    arguments = script.AddClassesArguments(
        model_dir=str(tmp_path / "no_model"),
        support_dir=str(tmp_path / "no_support"),
        names=["red", "sky\nblue"],
        output_dir=str(tmp_path / "out"),
    )
    message = r"names contains the class name 'sky\\nblue', which holds the control character\(s\) '\\n'"
    with pytest.raises(ValueError, match=message):
        script.main(arguments)
    assert not (tmp_path / "out").exists()
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'\\x1b'"):
        model.rename_class("LABEL_1", "bold\x1b[1m")
    assert_unchanged(model, before)


def test_add_classes_script_names_unmatched_files(tmp_path):
    from proto_segformer.add_classes import support_pairs

    write_support_folder(tmp_path)
    (tmp_path / "masks" / "scene1.png").rename(tmp_path / "masks" / "other.png")
    with pytest.raises(ValueError, match=r"images without a mask \['scene1'\], masks without an image \['other'\]"):
        support_pairs(tmp_path)
    with pytest.raises(FileNotFoundError, match="needs images/ and masks/"):
        support_pairs(tmp_path / "missing")


def folder_bytes(folder) -> dict[str, bytes | None]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))
    }


def saved_model_with_extras(folder):
    """A saved 5-class model with what a training output holds beside it: a checkpoint, results, a note."""
    from transformers import SegformerImageProcessorPil

    model = make_model()
    model.save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    (folder / "checkpoint-3").mkdir()
    (folder / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    (folder / "all_results.json").write_text('{"eval_mean_iou": 0.5}')
    (folder / "notes.txt").write_text("mine")
    return model


def run_add_classes(tmp_path, model_dir, output_dir, *extra, env=None):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "add_classes.py"
    command = [sys.executable, str(script), "--model_dir", str(model_dir), "--support_dir", str(tmp_path / "support")]
    command += ["--names", "red", "blue", "--output_dir", str(output_dir), *extra]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    )


def test_add_classes_into_the_input_model_needs_a_flag(tmp_path):
    from proto_segformer.add_classes import AddClassesError, add_classes_from_folder

    model_dir = tmp_path / "model"
    saved_model_with_extras(model_dir)
    write_support_folder(tmp_path / "support")
    before = folder_bytes(model_dir)
    with pytest.raises(AddClassesError, match="is the input model .*pass --overwrite_model"):
        add_classes_from_folder(model_dir, tmp_path / "support", ["red", "blue"], model_dir)
    with pytest.raises(AddClassesError, match="is not empty"):
        add_classes_from_folder(model_dir, tmp_path / "support", ["red", "blue"], tmp_path / "support")
    assert folder_bytes(model_dir) == before


@pytest.mark.slow
def test_add_classes_killed_mid_save_leaves_the_model_intact(tmp_path):
    from proto_segformer.checkpoint import load_model

    model_dir = tmp_path / "model"
    model = saved_model_with_extras(model_dir)
    write_support_folder(tmp_path / "support")
    before = folder_bytes(model_dir)
    killed = run_add_classes(
        tmp_path, model_dir, model_dir, "--overwrite_model", env={"PROTOSEG_FAULT": "add-classes:after-weights"}
    )
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL after the new weights were written
    assert folder_bytes(model_dir) == before
    reloaded = load_model(model_dir)
    assert reloaded.config.num_labels == 5 and torch.equal(reloaded.prototypes, model.prototypes)

    done = run_add_classes(tmp_path, model_dir, model_dir, "--overwrite_model")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["new_class_ids"] == {"red": 5, "blue": 6}
    extended = load_model(model_dir)
    assert extended.config.num_labels == 7 and torch.equal(extended.prototypes[:5], model.prototypes)
    after = folder_bytes(model_dir)
    for kept in ("checkpoint-3/trainer_state.json", "all_results.json", "notes.txt"):
        assert after[kept] == before[kept], kept
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and ".saving-" in leftovers[0]  # the killed run's staging folder, not the model


def test_add_classes_card_lists_the_added_classes(tmp_path):
    from huggingface_hub import ModelCard

    from proto_segformer.add_classes import AddClassesSettings, add_classes_from_folder
    from proto_segformer.model_card import write_model_card

    model_dir = tmp_path / "model"
    saved_model_with_extras(model_dir)
    write_model_card(model_dir, dataset_name="builtin:scenes", crop_size=32)
    write_support_folder(tmp_path / "support")
    settings = AddClassesSettings(min_cell_fraction=0.8, seed=3)
    add_classes_from_folder(model_dir, tmp_path / "support", ["red", "blue"], tmp_path / "out", settings=settings)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "### Classes added after training" in card.text
    assert "- red (5), blue (6): from 2 labelled support image(s)" in card.text
    assert "min_cell_fraction 0.8" in card.text and "seed 3" in card.text
    assert "source model a local checkpoint (`model`)" in card.text
    assert "trained on `builtin:scenes`" in card.text and "| Training crop | 32x32 |" in card.text
    assert "5: red, 6: blue" in card.text
    assert not card.data.eval_results  # the source's results do not cover the added classes
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.endswith(".py")) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "model_card_inputs.json",
        "preprocessor_config.json",
    ]


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/add_classes.py (scripts/benchmark_add_classes.py): the pieces that produce its numbers


def test_benchmark_class_layout_puts_held_out_classes_last_in_the_given_order():
    from benchmarks import add_classes as benchmark

    id2label = {0: "background", 1: "a", 2: "b", 3: "c", 4: "d"}
    table, old, final = benchmark.class_layout(id2label, [3, 1])
    assert old == {0: "background", 1: "b", 2: "d"}
    assert final == {0: "background", 1: "b", 2: "d", 3: "c", 4: "a"}
    assert table[[0, 1, 2, 3, 4, 255]].tolist() == [0, 4, 1, 3, 2, 255]
    with pytest.raises(ValueError, match="held_out must be distinct item class ids"):
        benchmark.class_layout(id2label, [0])


def test_benchmark_summary_separates_new_class_iou_and_old_class_damage():
    from benchmarks import add_classes as benchmark

    # 2 old classes, 1 new; rows = true class, columns = prediction.
    counts = torch.tensor([[8, 0, 2], [0, 10, 0], [1, 1, 6]])
    summary = benchmark.summarise(counts, num_old=2)
    assert summary["new_iou"] == pytest.approx([6 / 10])
    assert summary["old_miou_all_pixels"] == pytest.approx((8 / 11 + 10 / 11) / 2)
    assert summary["old_miou_old_pixels"] == pytest.approx((8 / 10 + 10 / 10) / 2)  # held-out pixels dropped
    assert summary["all_miou"] == pytest.approx((8 / 11 + 10 / 11 + 6 / 10) / 3)


def test_benchmark_parametric_row_fit_keeps_old_rows_and_learns_the_support_region():
    from conftest import TINY
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from benchmarks import add_classes as benchmark

    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(SegformerConfig(num_labels=3, **TINY)).eval()
    model.decode_head.batch_norm.running_var.fill_(1e-4)  # features of a trained scale (a fresh one's are ~0.01)
    pixel_values, masks = support_tensors(count=1)
    masks = torch.where(masks == 2, 1, 0)  # the new class is the blue right half
    args = benchmark.AddClassesBenchmarkArguments(row_fit_steps=100)
    extended = benchmark.fit_new_rows(model, list(pixel_values), list(masks), ["blue"], args)

    old, new = model.decode_head.classifier, extended.decode_head.classifier
    assert new.out_channels == 4 and extended.config.id2label[3] == "blue"
    assert torch.equal(new.weight[:3], old.weight) and torch.equal(new.bias[:3], old.bias)
    for name, tensor in model.state_dict().items():
        if "classifier" not in name:
            assert torch.equal(extended.state_dict()[name], tensor), name
    with torch.no_grad():
        predictions = extended(pixel_values=pixel_values).logits.argmax(dim=1)[0]
    assert (predictions[:, 5:] == 3).all() and (predictions[:, :3] != 3).all()
