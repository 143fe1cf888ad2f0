"""Prediction over files: collect the input files, plan and check the output files once per run (never an input,
never a file the library did not write or that was changed since), read each image, predict it with a `Segmenter`,
write its pictures atomically and keep the output folder's manifest (the SHA-256 of every file written).

`predict_files` is what `scripts/predict.py` runs; the pictures come from `pictures.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .image_decoding import to_rgb_array
from .output_folders import OutputError, check_output_folder, is_write_failure
from .pictures import colour_overlay, index_png, label_png, prototype_colormap, prototype_overlay
from .segmenter import Prediction, Segmenter, check_prediction_size

if TYPE_CHECKING:
    from .explanations import Explainer

logger = logging.getLogger(__name__)


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file by `image_decoding.to_rgb_array` (the decoder training uses: EXIF
    orientation applied, transparency on white, 16-bit and float samples scaled by their range). Raises `OSError`
    if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb_array(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = str(error).replace(f" '{path}'", "").replace(str(path), "<file>")
        raise OSError(f"not a readable image ({type(error).__name__}: {reason})") from error


def output_paths(output_dir: Path, stem: str) -> dict[str, Path]:
    """Where `save_prediction` writes the outputs of the image named `stem`."""
    return {
        "label": output_dir / f"{stem}_label.png",
        "overlay": output_dir / f"{stem}_overlay.jpg",
        "prototype": output_dir / f"{stem}_prototype.png",
        "prototype_overlay": output_dir / f"{stem}_prototype_overlay.jpg",
        "explanation": output_dir / f"{stem}_explanation.png",
        "explanation_json": output_dir / f"{stem}_explanation.json",
    }


def save_image(picture: Image.Image, path: Path, on_written: Callable[[Path], None] | None = None, **options) -> Path:
    """Save `picture` to `path` atomically (a temporary file in the same folder, then `os.replace`): a crash leaves
    the old file or the new one, never half of it. The format follows `path`'s suffix. `on_written(temporary)` is
    called once the temporary file is complete, before the rename (to record its checksum)."""
    from .safe_files import atomic_write

    file_format = Image.registered_extensions()[path.suffix.lower()]

    def write(temporary: Path) -> None:
        picture.save(temporary, format=file_format, **options)
        if on_written is not None:
            on_written(temporary)

    return atomic_write(path, write)


def prediction_pictures(
    prediction: Prediction, image: np.ndarray, id2label: dict[int, str], num_prototypes: int
) -> dict[str, tuple[Image.Image, dict[str, Any]]]:
    """{kind: (picture, save options)} of one image's outputs (the kinds of `output_paths`), rendered in memory."""
    pictures: dict[str, tuple[Image.Image, dict[str, Any]]] = {
        "label": (label_png(prediction.label_map, len(id2label)), {}),
        "overlay": (
            Image.fromarray(colour_overlay(image, prediction.label_map, id2label, unknown_map=prediction.unknown_map)),
            {"quality": 90},
        ),
    }
    if prediction.prototype_map is not None:
        raw = index_png(prediction.prototype_map, num_prototypes, prototype_colormap(num_prototypes))
        overlay = prototype_overlay(
            image, prediction.label_map, prediction.prototype_map, num_prototypes, id2label=id2label
        )
        pictures["prototype"] = (raw, {})
        pictures["prototype_overlay"] = (Image.fromarray(overlay), {"quality": 90})
    return pictures


def save_prediction(
    prediction: Prediction,
    image: np.ndarray,
    output_dir: str | Path,
    stem: str,
    id2label: dict[int, str],
    num_prototypes: int,
    on_written: Callable[[Path, Path], None] | None = None,
) -> list[Path]:
    """Write the label PNG, the overlay and (if computed) the prototype map PNG and its overlay; return the paths.

    `{stem}_prototype.png` holds, per pixel, the prototype index in [0, M) of the pixel's predicted class (read it
    with the label PNG: class k, prototype m): a palette PNG for M <= 256, else 16-bit. Every picture is rendered
    before the first file is written (an error writes nothing), and every file is written atomically
    (`save_image`); `on_written(path, temporary)` is called for each file before it is renamed into place.
    A prediction whose size is not the image's is refused (`check_prediction_size`).
    """
    check_prediction_size(prediction, image.shape[:2])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(output_dir, stem)
    written = []
    for kind, (picture, options) in prediction_pictures(prediction, image, id2label, num_prototypes).items():
        path = paths[kind]
        hook = (lambda temporary, path=path: on_written(path, temporary)) if on_written is not None else None
        written.append(save_image(picture, path, on_written=hook, **options))
    return written


# --------------------------------------------------------------------------------------------- files and folders

GLOB_CHARACTERS = set("*?[")


def collect_inputs(inputs: Sequence[str | Path], recursive: bool = False) -> list[Path]:
    """Files named by `inputs`: files, folders (every non-hidden file in them) and glob patterns, deduplicated.

    Non-image files are kept here (they are reported and skipped when read). A path that does not exist and is not a
    glob raises `FileNotFoundError`; a glob that matches nothing is logged.
    """
    found: list[Path] = []
    for entry in inputs:
        text = str(entry)
        if any(c in GLOB_CHARACTERS for c in text) and not Path(text).exists():
            from glob import glob

            matches = sorted(Path(p) for p in glob(text, recursive=recursive) if Path(p).is_file())
            if not matches:
                logger.warning("The pattern %r matches no file.", text)
            found += matches
        elif Path(text).is_dir():
            pattern = "**/*" if recursive else "*"
            found += sorted(
                p
                for p in Path(text).glob(pattern)
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(text).parts)
            )
        elif Path(text).is_file():
            found.append(Path(text))
        else:
            raise FileNotFoundError(f"Input {text!r} is neither a file, a folder nor a glob pattern that exists.")
    unique: dict[Path, None] = {}
    for path in found:
        unique.setdefault(path.resolve(), None)
    return list(unique)


def unique_stem(path: Path, used: set[str]) -> str:
    """The file name without suffix, made unique among `used` (adds _1, _2 ...), and recorded in `used`."""
    stem, index = path.stem, 1
    while stem in used:
        stem, index = f"{path.stem}_{index}", index + 1
    used.add(stem)
    return stem


# Records, in an output folder, the files prediction wrote there and the SHA-256 of each as written: only those
# files, with those bytes, may be replaced by a later run (a file edited since is the user's).
PREDICTIONS_MANIFEST = ".proto_segformer_predictions.json"
# While a run writes, it appends "<sha256> <name>" here before each file is renamed into place (a killed run's
# files are then still recognised); folded into the manifest at the end of the run, then removed.
PREDICTIONS_JOURNAL = ".proto_segformer_predictions.journal"
MANIFEST_WRITER = "predict_files"


@dataclass
class OutputRecords:
    """What an output folder records about the files prediction wrote there.

    files: the names listed in the manifest; hashes: {name: SHA-256} from the manifest (None: a manifest of an
    older version that recorded no hashes); journal: {name: hashes} a run appended but did not fold in (a run that
    was killed).
    """

    files: set[str]
    hashes: dict[str, str] | None
    journal: dict[str, set[str]]

    @classmethod
    def read(cls, output_dir: str | Path) -> OutputRecords:
        from .safe_files import read_manifest, read_manifest_hashes

        manifest = Path(output_dir) / PREDICTIONS_MANIFEST
        files = read_manifest(manifest)
        hashes = read_manifest_hashes(manifest) if files is not None else {}
        journal: dict[str, set[str]] = {}
        path = Path(output_dir) / PREDICTIONS_JOURNAL
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                digest, _, name = line.partition(" ")
                if len(digest) == 64 and name:  # a line cut short by a kill is left out
                    journal.setdefault(name, set()).add(digest)
        return cls(set(files or []), hashes, journal)

    def accepted(self, name: str) -> set[str]:
        """The contents (SHA-256) that a file of this name had when prediction wrote it."""
        recorded = {self.hashes[name]} if self.hashes and name in self.hashes else set()
        return recorded | self.journal.get(name, set())

    def verdict(self, path: Path) -> str | None:
        """None if the existing file `path` is one prediction wrote, unchanged; else why it may not be replaced:
        "foreign" (not written by prediction), "edited" (changed since) or "unverifiable" (listed without a
        checksum: by an older version of predict, which recorded none)."""
        from .safe_files import file_sha256

        name = path.name
        if name not in self.files and name not in self.journal:
            return "foreign"
        accepted = self.accepted(name)
        if not accepted:
            return "unverifiable"
        return None if file_sha256(path) in accepted else "edited"


def refusal_message(output_dir: str | Path, refused: dict[str, list[str]]) -> str:
    """One line: which existing outputs are not replaced, why, and what to do."""

    def listing(paths: list[str]) -> str:
        more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
        return ", ".join(paths[:5]) + more

    reasons = []
    if refused.get("foreign"):
        reasons.append(f"{listing(refused['foreign'])}, not written by an earlier prediction there")
    if refused.get("edited"):
        reasons.append(f"{listing(refused['edited'])}, changed since prediction wrote them (edited by hand?)")
    if refused.get("unverifiable"):
        reasons.append(
            f"{listing(refused['unverifiable'])}, written by an older version of predict that kept no checksums, so"
            " an edit cannot be ruled out"
        )
    return (
        f"{output_dir} already holds {'; and '.join(reasons)}; not overwriting anything. Choose another --output_dir,"
        " or move or delete those files to predict them again."
    )


def plan_outputs(
    paths: Sequence[Path], output_dir: str | Path, prototype_maps: bool, explain: bool = False
) -> dict[Path, dict[str, Path]]:
    """{input: {kind: output path}}: where `predict_files` writes each input's outputs (stems made unique)."""
    used: set[str] = set()
    kinds = ("label", "overlay", "prototype", "prototype_overlay") if prototype_maps else ("label", "overlay")
    kinds += ("explanation", "explanation_json") if explain else ()
    plan = {}
    for path in paths:
        outputs = output_paths(Path(output_dir), unique_stem(Path(path), used))
        plan[Path(path)] = {kind: outputs[kind] for kind in kinds}
    return plan


def prepare_outputs(
    paths: Sequence[Path], output_dir: str | Path, prototype_maps: bool, explain: bool = False
) -> dict[Path, dict[str, Path]]:
    """Check the output folder and the planned outputs of `paths` before any work; return the plan.

    `OutputError` when the folder is a file or not writable, when an output would replace an input (e.g. the output
    folder is the input folder and holds `cat.jpg` and `cat_label.png`), or when an output file exists that may not
    be replaced (`OutputRecords.verdict`): one that an earlier prediction did not write, one changed since it was
    written (its SHA-256 is not the one recorded: a user's edit), or one listed by an older version without
    checksums. Nothing is replaced but files prediction wrote, unchanged.
    """
    check_output_folder(output_dir)
    plan = plan_outputs(paths, output_dir, prototype_maps, explain)
    inputs = {Path(path).resolve() for path in paths}
    planned = [target for outputs in plan.values() for target in outputs.values()]
    records = OutputRecords.read(output_dir)
    clashes = sorted({target for target in planned if target.resolve() in inputs})
    if clashes:
        earlier = any(target.name in records.files for target in clashes)
        raise OutputError(
            f"Writing the predictions into {output_dir} would overwrite input file(s):"
            f" {', '.join(map(str, clashes[:5]))}"
            + (" (outputs of an earlier prediction there are inputs now)" if earlier else "")
            + ". Choose another --output_dir."
        )
    refused: dict[str, list[str]] = {}
    for target in planned:
        verdict = records.verdict(target) if target.exists() else None
        if verdict is not None:
            refused.setdefault(verdict, []).append(str(target))
    if refused:
        raise OutputError(refusal_message(output_dir, {k: sorted(v) for k, v in refused.items()}))
    return plan


class OutputLog:
    """The manifest of one prediction run: planned names are listed before any is written; each file's SHA-256 is
    appended to the journal before its rename (`record`) and the manifest is rewritten with all hashes at `close`."""

    def __init__(self, output_dir: Path, planned: Iterable[str]) -> None:
        from .safe_files import file_sha256, write_manifest

        self.output_dir = output_dir
        records = OutputRecords.read(output_dir)
        self.files = records.files | set(planned)
        self.hashes = dict(records.hashes or {})
        for name, accepted in records.journal.items():  # a killed run's files, as they are now
            path = output_dir / name
            if path.is_file() and (digest := file_sha256(path)) in accepted:
                self.hashes[name] = digest
        write_manifest(self.manifest, self.files, written_by=MANIFEST_WRITER, hashes=self.hashes)
        self.journal_path.unlink(missing_ok=True)
        self.journal = self.journal_path.open("a")
        self.pending: dict[str, str] = {}

    @property
    def manifest(self) -> Path:
        return self.output_dir / PREDICTIONS_MANIFEST

    @property
    def journal_path(self) -> Path:
        return self.output_dir / PREDICTIONS_JOURNAL

    def record(self, path: Path, temporary: Path) -> None:
        """Journal the content of `temporary`, about to become `path`."""
        from .safe_files import file_sha256

        digest = file_sha256(temporary)
        self.journal.write(f"{digest} {path.name}\n")
        self.journal.flush()
        self.pending[path.name] = digest

    def written(self, path: Path) -> None:
        """`path` is in place with the content last recorded for it."""
        if path.name in self.pending:
            self.hashes[path.name] = self.pending.pop(path.name)

    def close(self) -> None:
        """Record the hashes (also of files renamed into place before an error) in the manifest; drop the journal."""
        from .safe_files import file_sha256, write_manifest

        self.journal.close()
        for name, digest in self.pending.items():
            path = self.output_dir / name
            if path.is_file() and file_sha256(path) == digest:
                self.hashes[name] = digest
        write_manifest(self.manifest, self.files, written_by=MANIFEST_WRITER, hashes=self.hashes)
        self.journal_path.unlink(missing_ok=True)


@dataclass
class PredictSummary:
    """Outcome of `predict_files`: written outputs per input, skipped inputs with the reason, and timing."""

    written: dict[Path, list[Path]]
    skipped: list[tuple[Path, str]]
    seconds: float
    pixels: int

    @property
    def images_per_second(self) -> float:
        return len(self.written) / self.seconds if self.seconds > 0 else float("nan")


def failure_reason(error: BaseException) -> str:
    """One line for a skipped image: the error's type and first line."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def predict_batch(segmenter: Segmenter, images: list[np.ndarray]) -> list[Prediction | BaseException]:
    """The predictions of `images`; if the batch fails, each image alone, so that one image's error (returned in
    its place) does not cost the others theirs."""
    try:
        return list(segmenter.predict(images))
    except Exception as error:
        if len(images) == 1:
            return [error]
    results: list[Prediction | BaseException] = []
    for image in images:
        try:
            results.append(segmenter.predict([image])[0])
        except Exception as error:
            results.append(error)
    return results


def save_explanation(
    record: dict[str, Any],
    picture: Image.Image,
    paths: dict[str, Path],
    on_written: Callable[[Path, Path], None] | None = None,
) -> list[Path]:
    """Write an explanation's picture and JSON (`explanations.Explainer.explain`) atomically, as `save_prediction`
    writes its files; return the paths."""
    import json

    from .safe_files import atomic_write

    def hook(path: Path):
        return (lambda temporary: on_written(path, temporary)) if on_written is not None else None

    written = [save_image(picture, paths["explanation"], on_written=hook(paths["explanation"]))]
    text = json.dumps(record, indent=2) + "\n"

    def write(temporary: Path) -> None:
        temporary.write_text(text)
        if on_written is not None:
            on_written(paths["explanation_json"], temporary)

    written.append(atomic_write(paths["explanation_json"], write))
    return written


def predict_files(
    segmenter: Segmenter,
    paths: Sequence[Path],
    output_dir: str | Path,
    progress: bool = True,
    plan: dict[Path, dict[str, Path]] | None = None,
    explainer: Explainer | None = None,
) -> PredictSummary:
    """Predict every image in `paths` in batches and write its outputs (see `save_prediction`) into `output_dir`.

    The outputs are checked first (`prepare_outputs`: never an input, never a file an earlier prediction did not
    write or that was changed since; `plan` is its result when the caller checked them already, before loading the
    model, so that they are checked once per run) and listed in the folder's manifest before they are written,
    each atomically; the manifest then records each file's SHA-256. An image that cannot be read, predicted or
    rendered is skipped with a warning and its reason, listed in the summary: it never stops the batch (its
    pictures are all rendered before the first of its files is written); a failed write (a full disk:
    `output_folders.is_write_failure`) stops the run, the files written before complete. Every image of at least
    one pixel is predicted (small ones are padded, `Segmenter`). A progress bar (tqdm) runs over the files when
    `progress`.
    With an `explainer` (`explanations.Explainer`), each image also gets `<stem>_explanation.png` and `.json`: the
    prototype that won at the pixel (or for the class) and its training patches; an image the explanation does not
    fit (the pixel outside it) is skipped with the reason, nothing of it written.
    """
    import time

    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    if plan is None:
        plan = prepare_outputs(paths, output_dir, segmenter.options.prototype_maps, explainer is not None)
    output_dir.mkdir(parents=True, exist_ok=True)
    log = OutputLog(output_dir, [target.name for outputs in plan.values() for target in outputs.values()])
    written: dict[Path, list[Path]] = {}
    skipped: list[tuple[Path, str]] = []
    pixels = 0
    num_prototypes = int(segmenter.model.config.num_prototypes_per_class)
    start = time.perf_counter()
    bar = tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress)

    def skip(path: Path, reason: str) -> None:
        logger.warning("Skipping %s: %s", path, reason)
        skipped.append((path, reason))

    def on_written(path: Path, temporary: Path) -> None:
        log.record(path, temporary)

    try:
        batch_size = segmenter.options.batch_size
        for offset in range(0, len(paths), batch_size):
            batch: list[tuple[Path, np.ndarray]] = []
            for path in paths[offset : offset + batch_size]:
                try:
                    batch.append((path, read_image(path)))
                except OSError as error:
                    skip(path, str(error))
                    bar.update(1)
            if not batch:
                continue
            results = predict_batch(segmenter, [image for _, image in batch])
            for (path, image), result in zip(batch, results):
                bar.update(1)
                if isinstance(result, BaseException):
                    skip(path, f"could not be predicted ({failure_reason(result)})")
                    continue
                stem = plan[Path(path)]["label"].name[: -len("_label.png")]
                explanation = None
                if explainer is not None:
                    try:
                        explanation = explainer.explain(image, result.label_map)
                    except ValueError as error:  # the pixel outside this image, a prototype without patches
                        skip(path, f"not explained ({error})")
                        continue
                    explanation[0]["image"] = Path(path).name
                try:
                    files = save_prediction(
                        result, image, output_dir, stem, segmenter.id2label, num_prototypes, on_written=on_written
                    )
                    if explanation is not None:
                        files += save_explanation(*explanation, plan[Path(path)], on_written=on_written)
                except (ValueError, RuntimeError, OSError) as error:
                    if is_write_failure(error):  # a full disk fails every image after it too: stop, one line
                        raise
                    skip(path, f"could not be written ({failure_reason(error)})")
                    continue
                for file in files:
                    log.written(file)
                written[path] = files
                pixels += image.shape[0] * image.shape[1]
    finally:
        bar.close()
        log.close()
    return PredictSummary(written, skipped, time.perf_counter() - start, pixels)
