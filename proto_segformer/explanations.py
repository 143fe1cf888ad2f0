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

import numpy as np
import torch
from PIL import Image

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
    values = prototypes.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    rows = values.reshape(-1, values.shape[-1])
    return [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in rows]


def network_fingerprint(model: torch.nn.Module) -> str:
    """The first 16 hex digits of the SHA-256 of every state-dict entry but `prototypes` (names sorted; floating
    values as float32, others as int64): what training changes and `add_classes` / `remove_classes` do not."""
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
    entries: Sequence[PatchEntry], title: str, patch_size: int, caption_height: int = 14
) -> Image.Image:
    """A strip: a title line, then the patches side by side, each captioned with its similarity."""
    from PIL import ImageDraw

    from .visualization import _font, fit_text

    font = _font(11)
    gap, header = 4, 18
    width = max(len(entries) * (patch_size + gap) + gap, 240)
    picture = Image.new("RGB", (width, header + patch_size + caption_height + gap), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((gap, 3), fit_text(title, font, width - 2 * gap), fill=(0, 0, 0), font=font)
    for index, entry in enumerate(entries):
        left = gap + index * (patch_size + gap)
        patch = entry.picture()
        if patch.size != (patch_size, patch_size):
            patch = patch.resize((patch_size, patch_size), Image.BILINEAR)
        picture.paste(patch, (left, header))
        draw.text((left, header + patch_size + 1), f"sim {entry.similarity:.3f}", fill=(60, 60, 60), font=font)
    return picture
