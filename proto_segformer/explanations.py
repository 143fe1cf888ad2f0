"""Case-based explanations: for each prototype, the training patches nearest to it, stored with the model.

A pixel takes the class of its nearest prototype; the patches of training images whose pixels are most similar to
that prototype show what the decision rests on (as Deep Nearest Centroids explains a centroid by its samples). The
patches come from the atlas's matching (`visualization.match_prototypes`: for each prototype, the pixel of its class
most similar to it in each image, at most one patch per image) and are kept in `prototype_patches.safetensors`
beside `model.safetensors`: small JPEG crops (the matched pixel ringed, as in the atlas), the source of each, its
similarity, and two fingerprints that say which model they belong to:

- per prototype, the SHA-256 of its float32 values: `remove_classes` and `add_classes` leave the other prototypes
  as they were, so the file stays right for them (a class added later has no patches, and says so); training
  further moves every prototype, and the file is then stale;
- the network's (every weight but the prototypes): patches found with another encoder are stale too.

A stale file, or a prototype without patches, is one clear line (`ExplanationError`) naming the command that writes
the file again (`scripts/visualize_prototypes.py --patches_output`). The Space reads the file with its own copy of
the fingerprint functions (`templates/space/app.py`; a test checks that both agree).

Layout of the file (safetensors): tensors `jpeg_bytes` (uint8, all JPEGs end to end), `jpeg_offsets` (int64, P + 1),
`class_ids`, `prototype_ids`, `ranks` (int64, P) and `similarities` (float32, P); metadata `format`
(`FORMAT`), `network` (the network fingerprint), `entries` (JSON: per patch its prototype fingerprint, class name
and source), `data` (what the patches were drawn from) and `patch_size`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

PATCHES_FILE = "prototype_patches.safetensors"
FORMAT = "proto_segformer.prototype_patches/1"
PATCH_QUALITY = 90  # JPEG quality of the stored patches
REWRITE_HINT = (
    "write it again with python scripts/visualize_prototypes.py --model <model> --split train"
    " --patches_output <model>/" + PATCHES_FILE
)


class ExplanationError(ValueError):
    """An explanation that cannot be given: a stale or unreadable patches file, a prototype without patches."""


# ---------------------------------------------------------------------------------------------------- fingerprints


def prototype_fingerprints(prototypes: torch.Tensor) -> list[str]:
    """(K * M) hex strings: per prototype of (K, M, D), in row-major order, the first 16 hex digits of the SHA-256 of
    its float32 values (little-endian)."""
    import torch

    values = prototypes.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    rows = values.reshape(-1, values.shape[-1])
    return [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in rows]


def network_fingerprint(model: torch.nn.Module) -> str:
    """The first 16 hex digits of the SHA-256 of every state-dict entry but `prototypes` (names sorted; floating
    values as float32, others as int64): what training changes and `add_classes` / `remove_classes` do not."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name == "prototypes" or name.endswith(".prototypes"):
            continue
        floating = tensor.is_floating_point()
        values = tensor.detach().to("cpu", torch.float32 if floating else torch.int64).contiguous().numpy()
        digest.update(name.encode())
        digest.update(values.astype("<f4" if floating else "<i8", copy=False).tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- the patches


@dataclass
class PatchEntry:
    """One stored patch: of prototype `prototype` of class `class_id` (named `class_name` when stored), its
    `rank`-th best match (0 = best), found in `source` with cosine similarity `similarity`; `jpeg` the picture."""

    class_id: int
    prototype: int
    rank: int
    similarity: float
    fingerprint: str
    class_name: str
    source: str
    jpeg: bytes

    def picture(self) -> Image.Image:
        """The patch as an RGB image."""
        with Image.open(io.BytesIO(self.jpeg)) as image:
            return image.convert("RGB")

    def record(self) -> dict:
        """JSON-ready: class, prototype, rank, similarity, source."""
        return {
            "class": self.class_name,
            "class_id_when_stored": self.class_id,
            "prototype": self.prototype,
            "rank": self.rank,
            "similarity": round(self.similarity, 4),
            "source": self.source,
        }


@dataclass
class PrototypePatches:
    """The contents of a patches file: the entries, the network fingerprint, what data they come from."""

    entries: list[PatchEntry]
    network: str
    data: str
    patch_size: int

    def by_fingerprint(self) -> dict[str, list[PatchEntry]]:
        """{prototype fingerprint: its entries, best first}."""
        table: dict[str, list[PatchEntry]] = {}
        for entry in sorted(self.entries, key=lambda e: e.rank):
            table.setdefault(entry.fingerprint, []).append(entry)
        return table


def jpeg_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=PATCH_QUALITY)
    return buffer.getvalue()


def collect_prototype_patches(
    model,
    matches,
    samples: Sequence,
    sources: Sequence[str],
    id2label: dict[int, str],
    *,
    top_n: int = 3,
    patch_size: int = 64,
    data_description: str = "",
) -> PrototypePatches:
    """The `top_n` best patches (from different images) of every prototype of `model` with a match in `matches`
    (`visualization.match_prototypes` over `samples`, whose names are `sources`), cropped as the atlas crops them."""
    from .visualization import match_patch, network_view

    if top_n < 1:
        raise ValueError(f"Patches per prototype must be at least 1, got {top_n}.")
    if len(sources) != len(samples):
        raise ValueError(f"{len(sources)} source names for {len(samples)} images.")
    fingerprints = prototype_fingerprints(model.prototypes)
    num_classes, num_prototypes = matches.usage.shape
    best_images, best_scores = matches.best(top_n)
    views: dict[int, np.ndarray] = {}
    entries = []
    for k in range(num_classes):
        for m in range(num_prototypes):
            for rank in range(best_images.shape[-1]):
                score = float(best_scores[k, m, rank])
                if not np.isfinite(score):
                    continue
                index = int(best_images[k, m, rank])
                if index not in views:
                    views[index] = network_view(samples[index][0], matches.input_sizes[index])
                patch = match_patch(matches, views[index], index, k, m, patch_size)
                entries.append(
                    PatchEntry(
                        k,
                        m,
                        rank,
                        score,
                        fingerprints[k * num_prototypes + m],
                        str(id2label.get(k, k)),
                        str(sources[index]),
                        jpeg_bytes(patch),
                    )
                )
    if not entries:
        raise ValueError("No prototype has a match in these images (no pixel of any class): nothing to store.")
    return PrototypePatches(entries, network_fingerprint(model), data_description, patch_size)


def write_prototype_patches(path: str | Path, patches: PrototypePatches) -> Path:
    """Write `patches` to `path` (safetensors, the module's layout) atomically: a crash leaves the old file or the
    new one."""
    from safetensors.numpy import save_file

    from .safe_files import atomic_write

    jpegs = [entry.jpeg for entry in patches.entries]
    offsets = np.zeros(len(jpegs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(j) for j in jpegs])
    tensors = {
        "jpeg_bytes": np.frombuffer(b"".join(jpegs), dtype=np.uint8).copy(),
        "jpeg_offsets": offsets,
        "class_ids": np.array([e.class_id for e in patches.entries], dtype=np.int64),
        "prototype_ids": np.array([e.prototype for e in patches.entries], dtype=np.int64),
        "ranks": np.array([e.rank for e in patches.entries], dtype=np.int64),
        "similarities": np.array([e.similarity for e in patches.entries], dtype=np.float32),
    }
    entries = [{"fingerprint": e.fingerprint, "class": e.class_name, "source": e.source} for e in patches.entries]
    metadata = {
        "format": FORMAT,
        "network": patches.network,
        "entries": json.dumps(entries),
        "data": patches.data,
        "patch_size": str(patches.patch_size),
    }
    return atomic_write(Path(path), lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def read_prototype_patches(path: str | Path) -> PrototypePatches:
    """The contents of a patches file; `ExplanationError` (one line) for a file that is not one."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ExplanationError(
                    f"{path} is not a prototype patches file (format {metadata.get('format')!r}, expected"
                    f" {FORMAT!r}); {REWRITE_HINT}."
                )
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        records = json.loads(metadata["entries"])
        data = tensors["jpeg_bytes"].tobytes()
        offsets = tensors["jpeg_offsets"]
        entries = [
            PatchEntry(
                int(tensors["class_ids"][i]),
                int(tensors["prototype_ids"][i]),
                int(tensors["ranks"][i]),
                float(tensors["similarities"][i]),
                str(record["fingerprint"]),
                str(record["class"]),
                str(record["source"]),
                data[int(offsets[i]) : int(offsets[i + 1])],
            )
            for i, record in enumerate(records)
        ]
        return PrototypePatches(entries, metadata["network"], metadata.get("data", ""), int(metadata["patch_size"]))
    except ExplanationError:
        raise
    except FileNotFoundError as error:
        raise ExplanationError(f"{path} does not exist; {REWRITE_HINT}.") from error
    except Exception as error:  # a truncated or foreign file: one line, never a stack trace
        raise ExplanationError(
            f"{path} cannot be read as a prototype patches file ({type(error).__name__}: {error}); {REWRITE_HINT}."
        ) from error


# ------------------------------------------------------------------------------------------------- explaining


class PatchLookup:
    """The patches of a file matched to a model's prototypes by fingerprint.

    Built by `for_model`, which refuses a stale file: one made with another network (trained further since) or
    whose prototypes are none of the model's. `entries(k, m)` are the patches of prototype m of class k, best first;
    a prototype the file does not know (a class added after the file was written) is an `ExplanationError`.
    """

    def __init__(self, patches: PrototypePatches, fingerprints: list[str], num_prototypes: int, id2label, path) -> None:
        self.patches = patches
        self.fingerprints = fingerprints
        self.num_prototypes = num_prototypes
        self.id2label = id2label
        self.path = path
        self.table = patches.by_fingerprint()

    @classmethod
    def for_model(cls, model, path: str | Path) -> PatchLookup:
        path = Path(path)
        patches = read_prototype_patches(path)
        if patches.network != network_fingerprint(model):
            raise ExplanationError(
                f"{path} is stale: it was made with another network than this model's (trained further since?);"
                f" {REWRITE_HINT}."
            )
        fingerprints = prototype_fingerprints(model.prototypes)
        table = patches.by_fingerprint()
        if not any(fingerprint in table for fingerprint in fingerprints):
            raise ExplanationError(f"{path} is stale: none of its prototypes is one of this model's; {REWRITE_HINT}.")
        id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
        return cls(patches, fingerprints, int(model.prototypes.shape[1]), id2label, path)

    def entries(self, k: int, m: int) -> list[PatchEntry]:
        found = self.table.get(self.fingerprints[k * self.num_prototypes + m])
        if not found:
            raise ExplanationError(
                f"{self.path} holds no patches of prototype {m} of class {self.id2label.get(k, k)!r} (a class added"
                f" after the file was written, or no pixel of it in the images the file was made from); {REWRITE_HINT}."
            )
        return found


def explanation_picture(
    entries: Sequence[PatchEntry], title: str, patch_size: int, query: Image.Image | None = None
) -> Image.Image:
    """The title (wrapped), then side by side: `query` (the explained pixel's neighbourhood, captioned "this image")
    when given, and the patches, each captioned with its similarity; every tile shown at `patch_size` pixels."""
    from PIL import ImageDraw

    from .visualization import _font, wrap_text

    font = _font(11)
    gap, line = 4, 14
    tiles = [(query, "this image")] if query is not None else []
    tiles += [(entry.picture(), f"sim {entry.similarity:.3f}") for entry in entries]
    width = max(len(tiles) * (patch_size + gap) + gap, 240)
    lines = wrap_text(title, font, width - 2 * gap)
    header = gap + line * len(lines)
    picture = Image.new("RGB", (width, header + patch_size + line + gap), "white")
    draw = ImageDraw.Draw(picture)
    for index, text in enumerate(lines):
        draw.text((gap, gap + index * line), text, fill=(0, 0, 0), font=font)
    for index, (tile, caption) in enumerate(tiles):
        left = gap + index * (patch_size + gap)
        if tile.size != (patch_size, patch_size):
            tile = tile.resize((patch_size, patch_size), Image.BILINEAR)
        picture.paste(tile, (left, header))
        draw.text((left, header + patch_size + 1), caption, fill=(60, 60, 60), font=font)
    return picture


# ------------------------------------------------------------------------------------------- explaining a prediction


def parse_pixel(text: str) -> tuple[int, int]:
    """(x, y) from "X,Y" (column, row in image pixels, from the top-left corner); `ValueError` (one line) else."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        x, y = (int(part) for part in parts)
    except ValueError:
        raise ValueError(f"--explain_pixel takes X,Y (two whole numbers: column, row), got {text!r}.") from None
    if x < 0 or y < 0:
        raise ValueError(f"--explain_pixel {text}: column and row count from 0 (the top-left pixel is 0,0).")
    return x, y


def grid_positions(
    size: tuple[int, int], grid: tuple[int, int], covered: tuple[int, int], scale: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """For an image of `size` (H, W) whose `scale`-sized input lies in the `covered` input of an embedding grid of
    `grid` (h, w) cells: the grid row of each image row and the grid column of each image column, as the label and
    prototype maps take them (`segmenter.grid_to_prediction`, torch's "nearest")."""
    (height, width), (grid_h, grid_w) = size, grid
    scaled = (round(covered[0] * height / scale[0]), round(covered[1] * width / scale[1]))
    rows = np.minimum(np.arange(height) * grid_h // scaled[0], grid_h - 1)
    cols = np.minimum(np.arange(width) * grid_w // scaled[1], grid_w - 1)
    return rows, cols


class Explainer:
    """Explains one pixel (`pixel` = (x, y)) or one class (`class_id`) of each predicted image: the prototype that
    won there, its cosine similarity, and the training patches of that prototype (`PatchLookup`)."""

    def __init__(self, segmenter, lookup: PatchLookup, pixel: tuple[int, int] | None, class_id: int | None) -> None:
        if (pixel is None) == (class_id is None):
            raise ValueError("Explain either a pixel (--explain_pixel) or a class (--explain_class), not both.")
        self.segmenter = segmenter
        self.lookup = lookup
        self.pixel = pixel
        self.class_id = class_id

    @classmethod
    def for_segmenter(
        cls, segmenter, patches_path: str | Path, pixel: str | None = None, class_name: str | None = None
    ) -> Explainer:
        """Checks the request and the patches file (`PatchLookup.for_model`) before any image is predicted."""
        from .class_editing import class_ids

        if (pixel is None) == (class_name is None):
            raise ValueError("Explain either a pixel (--explain_pixel) or a class (--explain_class), not both.")
        position = parse_pixel(pixel) if pixel is not None else None
        class_id = None
        if class_name is not None:
            names = [segmenter.id2label[k] for k in range(len(segmenter.id2label))]
            (class_id,) = class_ids(names, [class_name])
        return cls(segmenter, PatchLookup.for_model(segmenter.model, patches_path), position, class_id)

    def explain(self, image: np.ndarray, label_map: np.ndarray) -> tuple[dict, Image.Image]:
        """(JSON-ready record, picture) for one image (H, W, 3) and its predicted label map (H, W); an
        `ExplanationError` (one line) for a pixel outside the image or a prototype the patches file does not know."""
        import torch
        import torch.nn.functional as F

        height, width = image.shape[:2]
        if self.pixel is not None and not (self.pixel[0] < width and self.pixel[1] < height):
            raise ExplanationError(
                f"--explain_pixel {self.pixel[0]},{self.pixel[1]} is outside this image of {width}x{height} pixels"
                f" (x in 0..{width - 1}, y in 0..{height - 1})."
            )
        logits, embeddings, covered, scale = self.segmenter.image_grid(image, with_embeddings=True)
        rows, cols = grid_positions((height, width), tuple(embeddings.shape[1:]), covered, scale)
        prototypes = F.normalize(self.segmenter.model.prototypes.detach().float().to(embeddings.device), dim=-1)
        if self.pixel is not None:
            x, y = self.pixel
            k = int(label_map[y, x])
            rejected = not 0 <= k < prototypes.shape[0]  # rejected as unknown (the ignore value): its class before
            if rejected:
                from .label_maps import upsampled_argmax

                scaled = (round(covered[0] * height / scale[0]), round(covered[1] * width / scale[1]))
                k = int(upsampled_argmax(logits[0], scaled, (height, width))[y, x])
            similarities = prototypes[k] @ embeddings[:, rows[y], cols[x]].float()
            m = int(similarities.argmax())
            record = {"pixel": {"x": x, "y": y}, "class": self.lookup.id2label.get(k, str(k)), "class_id": k}
            record["rejected_as_unknown"] = rejected
            record.update({"prototype": m, "similarity": round(float(similarities[m]), 4)})
            title = f"pixel ({x},{y}): {record['class']}, prototype {m}, similarity {record['similarity']:.3f}"
        else:
            k = self.class_id
            grid = torch.einsum("md,dhw->mhw", prototypes[k], embeddings.float())  # (M, h, w)
            per_pixel = grid[:, torch.as_tensor(rows)][:, :, torch.as_tensor(cols)].cpu().numpy()  # (M, H, W)
            winners = per_pixel.argmax(axis=0)
            mask = label_map == k
            count = int(mask.sum())
            if count:
                shares = np.bincount(winners[mask], minlength=per_pixel.shape[0]) / count
                m = int(shares.argmax())
                candidates = np.where(mask & (winners == m), per_pixel[m], -np.inf)
            else:  # not predicted here: the class's prototype closest to any pixel
                m = int(np.unravel_index(per_pixel.argmax(), per_pixel.shape)[0])
                candidates = per_pixel[m]
            y, x = (int(v) for v in np.unravel_index(np.argmax(candidates), candidates.shape))
            name = self.lookup.id2label.get(k, str(k))
            record = {"class": name, "class_id": k, "predicted_pixels": count, "prototype": m}
            record["share_of_class_pixels"] = round(float(shares[m]), 4) if count else None
            record.update({"pixel": {"x": x, "y": y}, "similarity": round(float(per_pixel[m, y, x]), 4)})
            won = f"prototype {m} won {100 * shares[m]:.0f}% of {count} pixels" if count else "not predicted"
            title = f"{name}: {won}; pixel ({x},{y}) similarity {record['similarity']:.3f}"
        threshold = getattr(self.segmenter.model.config, "unknown_threshold", None)  # set by calibration
        record["unknown_threshold"] = threshold
        record["known"] = None if threshold is None else bool(record["similarity"] >= threshold)
        if record.get("rejected_as_unknown"):  # the prediction's rejection decided (its score, upsampled)
            record["known"] = False
        entries = self.lookup.entries(k, m)
        record["patches"] = [entry.record() for entry in entries]
        record["patches_file"] = str(self.lookup.path)
        record["patches_data"] = self.lookup.patches.data
        return record, self.picture(image, (x, y), entries, title)

    def picture(self, image: np.ndarray, pixel: tuple[int, int], entries, title: str) -> Image.Image:
        """The explained pixel's neighbourhood (ringed; a quarter of the image's shorter side, as the training
        patches are cut from the network's view) beside the training patches of the prototype that won, at least 96
        pixels a tile."""
        from .visualization import crop_patch, mark_centre

        size = max(96, self.lookup.patches.patch_size)
        crop = max(8, int(round(min(image.shape[:2]) * 0.25)))
        query = Image.fromarray(crop_patch(image, (pixel[1], pixel[0]), crop)).resize((size, size), Image.BILINEAR)
        return explanation_picture(entries, f"{title}. Training patches of the prototype:", size, mark_centre(query))
