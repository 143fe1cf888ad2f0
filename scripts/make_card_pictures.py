"""Pictures and card of a checkpoint trained on built-in data: a prediction panel, a prototype atlas, statistics.

    python scripts/make_card_pictures.py --model runs/demo --dataset scenes --output_dir model_cards/demo

Writes into --output_dir: predictions.png or .jpg (rows: validation images; columns: image, ground truth, prediction
overlay, prototype assignment map), prototype_atlas.png, prototype_stats.json (also copied into the model folder,
where the card and push_to_hub pick it up) and README.md, the model card rendered with these pictures.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from proto_segformer.cli import parse


@dataclass
class PictureArguments:
    model: str = field(metadata={"help": "Checkpoint folder trained on a built-in data set."})
    output_dir: str = field(metadata={"help": "Folder for the pictures and the card (e.g. model_cards/<name>)."})
    dataset: str = field(default="scenes", metadata={"help": "Built-in data set the model was trained on."})
    image_size: int | None = field(
        default=None,
        metadata={"help": "Side of the built-in images (default: the model's training crop; 64 if none is recorded)."},
    )
    num_panel_images: int = field(default=4, metadata={"help": "Validation images (rows) in predictions.png."})
    num_atlas_images: int = field(default=100, metadata={"help": "Validation images searched for the atlas."})
    scale: float = field(default=3.0, metadata={"help": "Display scale of the panel pictures (scenes are small)."})
    atlas_split: str = field(
        default="validation", metadata={"help": "Split searched for the atlas ('train' for voc/arc2017: one photo)."}
    )
    panel_format: str = field(default="png", metadata={"help": "png or jpg (photos compress better as jpg)."})
    seed: int = field(default=1, metadata={"help": "Seed of the validation images (differs from training's)."})
    repo_id: str | None = field(default=None, metadata={"help": "Hub id used in the card's snippets."})
    base_model: str | None = field(default=None, metadata={"help": "Hub id of the starting checkpoint, if any."})
    data_note: str | None = field(default=None, metadata={"help": "A sentence on the data for the card."})


def rescale(array, factor: float, nearest: bool):
    """An image (H, W, 3) or label map (H, W) resized by `factor` (nearest for label maps)."""
    import numpy as np
    from PIL import Image

    if factor == 1:
        return array
    size = (max(1, round(array.shape[1] * factor)), max(1, round(array.shape[0] * factor)))
    if nearest:
        values = array.astype(np.int32) if array.ndim == 2 else array  # label maps as 32-bit, images as they are
        return np.asarray(Image.fromarray(values).resize(size, Image.NEAREST)).astype(array.dtype)
    return np.asarray(Image.fromarray(array).resize(size, Image.BILINEAR))


def main(argv: list[str] | None = None) -> int:
    (args,) = parse(PictureArguments, argv, description=__doc__)

    from proto_segformer.checkpoint import CheckpointError
    from proto_segformer.data import build_builtin_dataset
    from proto_segformer.model_card import render_model_card
    from proto_segformer.pictures import class_colormap, colour_overlay, prototype_overlay
    from proto_segformer.segmenter import InferenceOptions, Segmenter
    from proto_segformer.training_crop import training_crop_size
    from proto_segformer.visualization import DatasetSamples, build_prototype_atlas, prediction_panel

    try:
        segmenter = Segmenter.from_pretrained(args.model, options=InferenceOptions(mode="whole", prototype_maps=True))
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data, id2label = build_builtin_dataset(
        args.dataset,
        num_train=args.num_atlas_images if args.atlas_split == "train" else 1,
        num_validation=args.num_atlas_images,
        image_size=args.image_size or training_crop_size(args.model) or 64,  # the images it was trained on
        seed=args.seed,
    )
    samples = DatasetSamples(data["validation"])
    atlas_samples = DatasetSamples(data[args.atlas_split])
    num_prototypes = int(segmenter.model.prototypes.shape[1])

    rows = []
    panel_samples = [samples[i] for i in range(min(args.num_panel_images, len(samples)))]
    predictions = segmenter.predict([image for image, _ in panel_samples])
    for (image, label), prediction in zip(panel_samples, predictions):
        big_image = rescale(image, args.scale, nearest=args.scale > 1)
        big_label = rescale(label, args.scale, nearest=True)  # 255 (ignored): the neutral ignore colour
        big_prediction = rescale(prediction.label_map, args.scale, nearest=True)
        big_prototypes = rescale(prediction.prototype_map, args.scale, nearest=True)
        rows.append(
            [
                big_image,
                class_colormap(len(segmenter.id2label))[big_label],
                colour_overlay(big_image, big_prediction, segmenter.id2label, alpha=0.6),
                prototype_overlay(
                    big_image, big_prediction, big_prototypes, num_prototypes, id2label=segmenter.id2label
                ),
            ]
        )
    panel = prediction_panel(rows, ["image", "ground truth", "prediction", "prototype matched"], scale=1)
    panel_name = f"predictions.{args.panel_format}"
    panel.save(output_dir / panel_name, **({"optimize": True} if args.panel_format == "png" else {"quality": 85}))

    description = f"{len(atlas_samples)} {args.atlas_split} images of the built-in '{args.dataset}' data"
    atlas = build_prototype_atlas(
        segmenter.model, segmenter.processor, atlas_samples, data_description=description, progress=True
    )
    atlas.image.save(output_dir / "prototype_atlas.png", optimize=True)
    stats_text = json.dumps(atlas.statistics, indent=2) + "\n"
    (output_dir / "prototype_stats.json").write_text(stats_text)
    (Path(args.model) / "prototype_stats.json").write_text(stats_text)

    card = render_model_card(
        args.model,
        dataset_name=f"builtin:{args.dataset}",
        base_model=args.base_model,
        repo_id=args.repo_id,
        prototype_stats=atlas.statistics,
        data_note=args.data_note,
        pictures=[
            (
                panel_name,
                "Validation images: ground truth, prediction overlay, and which prototype of the"
                " predicted class each pixel matched (the class colour, darkest = prototype 0, lightest ="
                " prototype M-1; class borders in white)",
            ),
            (
                "prototype_atlas.png",
                f"Prototype atlas: per class (row) and prototype (column), the {args.atlas_split} patch whose pixel"
                " is nearest to the prototype (ringed); under it the prototype's share of its class's pixels",
            ),
        ],
    )
    card.save(output_dir / "README.md")
    usage = atlas.statistics["usage"]
    print(f"Wrote {output_dir}/{panel_name}, prototype_atlas.png, prototype_stats.json, README.md")
    print(
        f"Prototypes: unused {usage['unused_count']} of {usage['classes_seen'] * num_prototypes},"
        f" near-duplicates {len(atlas.statistics['near_duplicates'])},"
        f" mean effective prototypes per class {usage['mean_effective_prototypes']} of {num_prototypes}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
