"""Publish a trained ProtoSegformer: assemble a complete Hugging Face Hub repository folder and upload it in one commit.

The repository holds everything needed to use the model without the `proto_segformer` package:

- `model.safetensors`: the weights, including the `prototypes` buffer (K, M, D);
- `config.json` with `auto_map` (AutoConfig / AutoModel / AutoModelForSemanticSegmentation) and the custom-code
  files it points to (`configuration_proto_segformer.py`, `modeling_proto_segformer.py` and their local imports);
- `preprocessor_config.json` (the image processor);
- `README.md`: the model card (`model_card.py`);
- `handler.py` (+ `requirements.txt`): the Inference Endpoints custom handler (`endpoint_handler.py`), with
  `image_decoding.py`, the package's image decoder it imports;
- the training output's result files (all_results.json, eval_results.json, train_results.json, ...) and the
  evaluation of scripts/evaluate_model.py (evaluation_results.json, shown on the card), the card's
  inputs (model_card_inputs.json) and pictures.

The folder is assembled beside the destination and put in place in one step (`hub_folders.assemble_folder`).
`.proto_segformer_assembly.json` lists the files an assembly wrote: `overwrite` replaces only those and refuses a
folder that holds anything else (a training output, a `.git`, a user's files), or one that overlaps the checkpoint.
A full disk while assembling is a one-line `HubError`; the destination is then as it was.

Nothing from outside the model folder enters the repository unless the user named it (`--pictures`, `--card`):
every file is copied by `safe_files.copy_into_upload`, which refuses a link that leads outside the model folder
(the training output; for a `checkpoint-*` folder, the training output that holds it) and anything that is not a
regular file (a FIFO, a device). A refused model file (config, weights, image processor, code) stops the push
before anything is written; a refused optional file (results, training arguments, card inputs, the training card)
is left out with a one-line warning. The card lists only known fields, never a token (`model_card.py`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, get_token

from .hub_folders import HubError, assemble_folder, check_repo_id, copy_image_decoder
from .model_card import (
    CARD_INPUTS_FILE,
    EVALUATION_FILE,
    PROTOTYPE_STATS_FILE,
    RESULT_FILES,
    TRAINING_ARGS_FILE,
    redact_tokens,
    without_secrets,
    write_model_card,
)
from .safe_files import RefusedFile, copy_into_upload, is_within, open_for_upload, read_for_upload

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
HANDLER_SOURCE = PACKAGE_DIR / "endpoint_handler.py"
HANDLER_NAME = "handler.py"
# The one image decoder, copied byte-identical beside handler.py (and a Space's app.py), which import it by name.
# Extra packages an Inference Endpoint installs from the repository (the code needs transformers 5).
ENDPOINT_REQUIREMENTS = "transformers>=5.0,<6\nsafetensors>=0.4\npillow\n"
# Optional files of a training output copied into the repository when present (the checkpoint folder, else the
# training output holding it); one that is refused is left out with a warning.
SIDECAR_FILES = (
    *RESULT_FILES,
    "train_results.json",
    EVALUATION_FILE,
    PROTOTYPE_STATS_FILE,
    TRAINING_ARGS_FILE,
    CARD_INPUTS_FILE,
)


@dataclass
class PushResult:
    """What `push_to_hub` did: the assembled folder, the files in it (relative paths) and the commit URL if uploaded."""

    local_dir: Path
    files: list[str]
    repo_id: str | None = None
    commit_url: str | None = None
    space_dir: Path | None = None
    space_files: list[str] | None = None
    space_repo_id: str | None = None
    space_commit_url: str | None = None


def require_token(token: str | None = None) -> str:
    """The given token, or the one huggingface_hub finds (HF_TOKEN, `hf auth login`); `HubError` if there is none."""
    token = token or get_token()
    if not token:
        raise HubError(
            "No Hugging Face token found: log in with `hf auth login`, set HF_TOKEN, or pass --token."
            " Use --dry_run (or --local_dir) to assemble the repository folder without uploading."
        )
    return token


def custom_code_files(model_type: str = "proto_segformer") -> list[Path]:
    """The package's source files the remote code of `model_type` needs: its modelling file and everything it imports
    locally (`model_types.modeling_file`)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from .model_types import modeling_file

    modeling = modeling_file(model_type)
    return [modeling, *sorted(Path(p) for p in get_relative_import_files(str(modeling)))]


def model_folder(source: Path) -> Path:
    """The folder whose files may enter the repository: the training output `source`, or for a `checkpoint-*`
    folder the training output that holds it (its image processor and results are read from there)."""
    return source.parent if source.name.startswith("checkpoint-") else source


def sidecar_source(folder: Path, name: str) -> Path | None:
    """`folder/name`, or for a `checkpoint-*` folder `folder.parent/name`, if there is anything of that name (a
    link or a FIFO too: `copy_into_upload` then says why it is refused); never a file outside the model folder."""
    for candidate in dict.fromkeys((folder, model_folder(folder))):
        if os.path.lexists(candidate / name):
            return candidate / name
    return None


def skipped(path: Path, error: RefusedFile) -> None:
    """The one-line warning for an optional file that is left out."""
    logger.warning("Skipped %s: %s; continuing without it.", path.name, error)


def copy_optional(source: Path, destination: Path, root: Path) -> bool:
    """`copy_into_upload` of an optional file of the model folder `root`; a refused file is skipped with a warning.
    A JSON file's entries that hold a secret (a token, a key, a password) are removed from the copy."""
    try:
        copy_into_upload(source, destination, root)
    except RefusedFile as error:
        skipped(source, error)
        return False
    if destination.suffix == ".json":
        remove_json_secrets(destination)
    return True


def remove_json_secrets(path: Path) -> None:
    """Rewrite the JSON file `path` (in the folder being assembled) without the entries `without_secrets` finds."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    cleaned, removed = without_secrets(data)
    if removed:
        path.write_text(json.dumps(cleaned, indent=2) + "\n")
        logger.warning("Removed %s from the published %s: they hold secrets.", ", ".join(removed), path.name)


def model_file_paths(source: Path) -> list[Path]:
    """The files of the checkpoint `source` that loading reads (config, weights, index, image processor)."""
    names = ("config.json", "preprocessor_config.json")
    found = [
        path
        for path in sorted(source.iterdir())
        if path.name in names or path.name.endswith((".safetensors", ".safetensors.index.json"))
    ]
    root = model_folder(source)
    if root != source and not os.path.lexists(source / names[1]) and os.path.lexists(root / names[1]):
        found.append(root / names[1])
    return found


def check_model_files(source: Path) -> None:
    """Refuse, before any work, a checkpoint whose config, weights or image processor is a link leading outside the
    model folder or not a regular file: their contents are loaded and published (`HubError`, nothing written)."""
    if not source.is_dir():
        return  # validate_checkpoint says what is wrong
    root = model_folder(source)
    for path in model_file_paths(source):
        try:
            with open_for_upload(path, root):
                pass
        except RefusedFile as error:
            raise HubError(
                f"Refused {path.name}: {error}. Publishing stopped (nothing was written): copy the real file into"
                f" {root} if it is the model's."
            ) from error


def card_defaults(source: Path) -> dict[str, Any]:
    """dataset_name, base_model and license of a training output written before model_card_inputs.json existed,
    read from its card's metadata (the data set from `datasets` or, for a built-in or local one, the model-index),
    so that re-rendering the card for the Hub keeps them; empty if the folder records its card inputs (the card
    then reads them itself) or has no readable card."""
    from huggingface_hub import ModelCard

    found = sidecar_source(source, "README.md")
    if found is None or sidecar_source(source, CARD_INPUTS_FILE) is not None:
        return {}
    try:
        text = read_for_upload(found, model_folder(source)).decode("utf-8")
    except RefusedFile as error:
        skipped(found, error)
        return {}
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        data = ModelCard(text, ignore_metadata_errors=True).data
    except Exception:
        return {}
    datasets = data.datasets if isinstance(data.datasets, list) else [data.datasets] if data.datasets else []
    evaluated = [r.dataset_name for r in data.eval_results or [] if r.dataset_name not in (None, "built-in")]
    base_model = data.base_model[0] if isinstance(data.base_model, list) and data.base_model else data.base_model
    license = data.license if data.license not in (None, "other") else None
    defaults = {
        "dataset_name": datasets[0] if datasets else evaluated[0] if evaluated else None,
        "base_model": base_model,
        "license": license,
    }
    return {k: v for k, v in defaults.items() if v}


PLACEHOLDER_REPO_ID = re.compile(r"<namespace>/[\w.-]+")
MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def prepared_card_pictures(card: Path) -> list[str]:
    """Relative paths of the local pictures a prepared model card links to; `HubError` if the card is missing,
    has invalid metadata, or links a relative picture that does not exist."""
    from huggingface_hub import ModelCard

    if not card.is_file():
        raise HubError(f"Model card {card} does not exist.")
    text = read_card(card)
    try:
        data = ModelCard(text).data
    except Exception as error:
        raise HubError(f"Model card {card} has invalid metadata: {error}") from error
    if data.library_name != "transformers" or "custom_code" not in (data.tags or []):
        raise HubError(f"Model card {card} is not a ProtoSegformer card (library_name transformers, tag custom_code).")
    pictures = []
    for link in MARKDOWN_IMAGE.findall(text):
        if "://" in link or link.startswith("/"):
            continue
        if not os.path.lexists(card.parent / link) or ".." in Path(link).parts:
            raise HubError(f"Model card {card} links to {link!r}, which is not a file next to it.")
        try:
            with open_for_upload(card.parent / link, card.parent):
                pass
        except RefusedFile as error:
            raise HubError(
                f"Model card {card} links to {link!r}, which is refused: {error}. Publishing stopped (nothing was"
                " written): the card's pictures must be files in its folder."
            ) from error
        pictures.append(link)
    return sorted(set(pictures))


def read_card(card: Path) -> str:
    """The text of the prepared model card the user named (`HubError` if it is not a readable regular file)."""
    try:
        return read_for_upload(card, card.parent, named_by_user=True).decode("utf-8")
    except RefusedFile as error:
        raise HubError(f"Model card refused: {error}.") from error
    except UnicodeDecodeError as error:
        raise HubError(f"Model card {card} is not UTF-8 text: {error}.") from error


def check_pictures(pictures: Sequence[str | Path]) -> None:
    """The pictures the user named must be regular files (they may lie anywhere: the user named them), with
    distinct file names (they are published as images/<name>)."""
    names = [Path(picture).name for picture in pictures]
    if len(set(names)) < len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise HubError(f"Pictures with the same file name {twice}: rename them (each is published as images/<name>).")
    for picture in pictures:
        try:
            with open_for_upload(picture, Path(picture).parent, named_by_user=True):
                pass
        except RefusedFile as error:
            raise HubError(f"Picture refused: {error}.") from error


def assemble_repository(
    source: str | Path,
    local_dir: str | Path,
    *,
    repo_id: str | None = None,
    dataset_name: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    pictures: Sequence[str | Path] = (),
    project_url: str | None = None,
    card_kwargs: dict[str, Any] | None = None,
    card: str | Path | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write the complete Hub repository of the checkpoint `source` into `local_dir`; return its files (relative).

    `source` is a training output folder or one of its `checkpoint-*` folders (the processor config and result
    files are then taken from the parent). The weights are loaded and re-saved, so a checkpoint that does not load,
    or lacks tensors, fails here with a `CheckpointError` rather than on the Hub.

    The card is rendered afresh (dataset_name, base_model and license default to those of the folder's existing
    card), unless `card` names a prepared model card (e.g. model_cards/<name>/README.md): it is then used as it
    is, with the pictures it links to by relative path (and `repo_id` in place of its "<namespace>/..."
    placeholders).
    """
    from .checkpoint import CheckpointError, load_image_processor, load_model, validate_checkpoint

    source, local_dir = Path(source), Path(local_dir)
    check_pictures(pictures)
    card_pictures = prepared_card_pictures(Path(card)) if card is not None else []
    check_model_files(source)
    checkpoint = validate_checkpoint(source)  # read and checked once: the model and processor load from it
    defaults = card_defaults(source)
    dataset_name = dataset_name or defaults.get("dataset_name")
    base_model = base_model or defaults.get("base_model")
    license = license or defaults.get("license")
    processor_folder = checkpoint.processor_folder
    if processor_folder is None:
        raise CheckpointError(
            f"{source} (and its parent) has no preprocessor_config.json: save the image processor with the model"
            " (the training script does) so that users preprocess images as in training."
        )
    if not is_within(processor_folder, model_folder(source)):
        raise HubError(
            f"{source} has no preprocessor_config.json; the one in {processor_folder} lies outside the model folder"
            f" (only a checkpoint-* folder takes it from its training output): copy it into {source}."
        )
    model = load_model(checkpoint)
    processor = load_image_processor(checkpoint)

    def write(staging: Path) -> None:
        write_repository(
            staging,
            source,
            model,
            processor,
            pictures=pictures,
            card=card,
            card_pictures=card_pictures,
            repo_id=repo_id,
            card_inputs={
                "dataset_name": dataset_name,
                "base_model": base_model,
                "license": license,
                "project_url": project_url,
                **(card_kwargs or {}),
            },
        )

    return assemble_folder(local_dir, source, overwrite, write, purpose="assembling", written_by="assemble_repository")


def write_repository(
    folder: Path,
    source: Path,
    model,
    processor,
    *,
    pictures: Sequence[str | Path],
    card: str | Path | None,
    card_pictures: Sequence[str],
    repo_id: str | None,
    card_inputs: dict[str, Any],
) -> None:
    """Write every repository file of `model` (loaded from `source`) into the empty `folder`.

    Files enter only through `copy_into_upload` (code and handler from the package, optional files from the model
    folder, pictures and a prepared card the user named); the weights, config and processor are saved afresh."""
    model.save_pretrained(folder)  # model.safetensors with `prototypes`, config.json with auto_map, code files
    for code_file in custom_code_files(model.config.model_type):
        (folder / code_file.name).unlink(missing_ok=True)  # save_pretrained may have copied it: copy it our way
        copy_into_upload(code_file, folder / code_file.name, code_file.parent)
    processor.save_pretrained(folder)
    copy_into_upload(HANDLER_SOURCE, folder / HANDLER_NAME, PACKAGE_DIR)
    copy_image_decoder(folder)  # the handler's decoder
    (folder / "requirements.txt").write_text(ENDPOINT_REQUIREMENTS)
    root = model_folder(source)
    for name in SIDECAR_FILES:
        found = sidecar_source(source, name)
        if found is not None:
            copy_optional(found, folder / name, root)

    picture_entries = []
    for picture in map(Path, pictures):
        copy_into_upload(picture, folder / "images" / picture.name, picture.parent, named_by_user=True)
        picture_entries.append((f"images/{picture.name}", picture.stem.replace("_", " ").replace("-", " ")))

    if card is not None:
        text = read_card(Path(card))
        if repo_id is not None:  # a card rendered without a repo id has placeholders in its snippets
            text = PLACEHOLDER_REPO_ID.sub(repo_id, text)
        (folder / "README.md").write_text(redact_tokens(text, Path(card)))
        for relative in card_pictures:
            copy_into_upload(Path(card).parent / relative, folder / relative, Path(card).parent)
    else:
        write_model_card(folder, repo_id=repo_id, pictures=picture_entries, **card_inputs)
    missing = [
        name
        for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")
        if not (folder / name).is_file()
    ]
    if missing:
        raise HubError(f"Assembling the repository failed: {missing} were not written.")


def push_to_hub(
    source: str | Path,
    repo_id: str | None,
    *,
    local_dir: str | Path | None = None,
    dry_run: bool = False,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    api: HfApi | None = None,
    overwrite: bool = False,
    space_dir: str | Path | None = None,
    space_repo_id: str | None = None,
    **assemble_kwargs: Any,
) -> PushResult:
    """Assemble the repository of `source` and, unless `dry_run` or `local_dir` is given, upload it in one commit.

    Checks first (before any work): the repo id form ("owner/name"; optional for a dry run) and, for an upload, a
    token and that the Hub answers (`whoami`); an unreachable Hub is a one-line `HubError`. The upload creates the
    repository if needed (`create_repo(exist_ok=True)`) and adds every file in a single `create_commit`.
    Files already in the repository and not in the folder are left as they are.

    `space_dir` / `space_repo_id`: also write a Gradio Space that loads the model `repo_id` (`space.write_space`)
    into `space_dir` (default: a temporary folder) and, with `space_repo_id` (unless `dry_run`), upload it in one
    commit to that Space (after the model, so that the Space finds it); the model card then links to the Space.
    """
    upload = not dry_run and local_dir is None
    space_upload = not dry_run and space_repo_id is not None
    if space_dir is not None or space_repo_id is not None:
        if repo_id is None:
            raise HubError("A Space loads the model by its repository id: give --repo_id 'owner/name' as well.")
        if space_repo_id is not None:
            check_repo_id(space_repo_id)
            card_kwargs = assemble_kwargs.get("card_kwargs") or {}
            assemble_kwargs["card_kwargs"] = {**card_kwargs, "space_repo_id": space_repo_id}
    if repo_id is not None or upload:
        if repo_id is None:
            raise HubError("A repository id 'owner/name' is needed to upload (or use --dry_run / --local_dir).")
        check_repo_id(repo_id)
    if upload or space_upload:
        token = require_token(token)
        api = api or HfApi(token=token)
        hub_call(api.whoami, token=token)  # the Hub is reachable and the token valid, before any work
    # Without --local_dir the folders are working copies in the shared temporary folder, owner-only (mkdtemp's 0700)
    # on purpose; the files inside, and any --local_dir / --space_dir, get the usual modes (safe_files).
    folder = Path(local_dir) if local_dir is not None else Path(tempfile.mkdtemp(prefix="protoseg_hub_"))
    files = assemble_repository(source, folder, repo_id=repo_id, overwrite=overwrite, **assemble_kwargs)
    result = PushResult(local_dir=folder, files=files, repo_id=repo_id)
    if space_dir is not None or space_repo_id is not None:
        from .checkpoint import read_config
        from .space import write_space

        space_folder = space_dir if space_dir is not None else tempfile.mkdtemp(prefix="protoseg_space_")
        result.space_dir = Path(space_folder)
        id2label = {int(k): str(v) for k, v in read_config(folder).get("id2label", {}).items()}
        result.space_files = write_space(result.space_dir, repo_id, id2label, source=source, overwrite=overwrite)
    if upload:
        message = commit_message or "Upload ProtoSegformer (weights with prototypes, remote code, card, handler)"
        result.commit_url = upload_folder(api, token, repo_id, "model", folder, files, message, private=private)
    if space_upload:
        result.space_repo_id = space_repo_id
        result.space_commit_url = upload_folder(
            api,
            token,
            space_repo_id,
            "space",
            result.space_dir,
            result.space_files,
            f"Gradio demo of {repo_id}",
            private=private,
            space_sdk="gradio",
        )
    return result


def upload_folder(
    api: HfApi,
    token: str,
    repo_id: str,
    repo_type: str,
    folder: Path,
    files: Sequence[str],
    message: str,
    **create_options: Any,
) -> str:
    """Create the repository `repo_id` of `repo_type` if needed and add `files` of `folder` in one commit; its URL."""
    hub_call(api.create_repo, repo_id=repo_id, repo_type=repo_type, exist_ok=True, token=token, **create_options)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    info = hub_call(
        api.create_commit,
        repo_id=repo_id,
        repo_type=repo_type,
        operations=operations,
        commit_message=message,
        token=token,
    )
    return getattr(info, "commit_url", None) or str(info)


# Transport failures of the HTTP clients huggingface_hub uses (httpx, requests), told apart by class name so that
# none of them needs importing here.
NETWORK_ERROR_NAMES = {"TransportError", "ConnectError", "TimeoutException", "NetworkError", "ConnectionError"}


def is_network_error(error: BaseException) -> bool:
    """True for a failure to reach a server (refused, unresolvable, timed out, offline mode), not an HTTP answer."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return False
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        cls.__name__ in NETWORK_ERROR_NAMES for cls in type(error).__mro__
    )


def hub_call(function, *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)`; a network failure becomes a one-line `HubError` that names the endpoint."""
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        return function(*args, **kwargs)
    except OfflineModeIsEnabled as error:
        raise HubError(
            "Cannot upload: HF_HUB_OFFLINE is set (unset it to upload); --local_dir DIR assembles the repository"
            " without network."
        ) from error
    except Exception as error:
        if not is_network_error(error):
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HubError(
            f"The Hugging Face Hub at {constants.ENDPOINT} is unreachable ({reason}); check the network (and"
            " HF_ENDPOINT). --local_dir DIR assembles the repository without network."
        ) from error
