"""Assemble a complete Hugging Face Hub repository from a trained ProtoSegformer and upload it in one commit.

    python scripts/push_to_hub.py --model runs/scenes --repo_id alice/protosegformer-scenes --dataset_name scenes
    python scripts/push_to_hub.py --model runs/scenes --local_dir runs/hub_repo     # assemble only, no network
    python scripts/push_to_hub.py --model runs/scenes --dry_run                     # same, into a temporary folder
    python scripts/push_to_hub.py --model runs/scenes --repo_id alice/protosegformer-scenes \
        --space_repo_id alice/protosegformer-scenes-demo                            # + a Gradio Space (demo)
    python scripts/push_to_hub.py --model runs/scenes --repo_id alice/protosegformer-scenes \
        --local_dir runs/hub_repo --space_dir runs/space                            # both folders, no network

The repository: model.safetensors (with the `prototypes` buffer), config.json with auto_map, the custom-code files,
preprocessor_config.json, README.md (model card), handler.py + requirements.txt (Inference Endpoints), the training
result files and optional pictures. Uploading needs a token (`hf auth login` or HF_TOKEN). Only files of the
model folder (links leading outside it are refused) and the files named here (--pictures, --card) are published.
The Space (app.py, requirements.txt, README.md with the Space metadata, examples/) loads the model `--repo_id` with
`trust_remote_code=True` and shows the segmentation overlay, a class legend and the prototype assignment map.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from proto_segformer.cli import exit_if_write_failure, parse, run_main
from proto_segformer.preflight import check_failed


@dataclass
class PushArguments:
    model: str = field(metadata={"help": "Training output folder or one of its checkpoint-* folders."})
    repo_id: str | None = field(default=None, metadata={"help": "Hub repository 'owner/name'."})
    local_dir: str | None = field(default=None, metadata={"help": "Write the repository here and do not upload."})
    dry_run: bool = field(default=False, metadata={"help": "Assemble into a temporary folder, list files, no upload."})
    overwrite: bool = field(default=False, metadata={"help": "Replace only an earlier assembly in --local_dir."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or the saved login)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Training data (Hub id or built-in name)."})
    base_model: str | None = field(default=None, metadata={"help": "Hub id of the starting checkpoint, if any."})
    license: str | None = field(
        default=None, metadata={"help": "Licence id (default apache-2.0; NVIDIA's for nvidia/)."}
    )
    pictures: list[str] = field(default_factory=list, metadata={"help": "Pictures to add under images/ and show."})
    data_note: str | None = field(default=None, metadata={"help": "A sentence on the data for the card."})
    card: str | None = field(
        default=None, metadata={"help": "Use this prepared card (e.g. model_cards/<name>/README.md) and its pictures."}
    )
    commit_message: str | None = field(default=None, metadata={"help": "Commit message of the upload."})
    space_dir: str | None = field(
        default=None, metadata={"help": "Also write a Gradio Space (demo) of the model --repo_id into this folder."}
    )
    space_repo_id: str | None = field(
        default=None, metadata={"help": "Upload the Space to this Hub Space 'owner/name' (the card links to it)."}
    )


def check_paths(args: PushArguments) -> None:
    """The model folder, the card and pictures, and the folders to write (--local_dir with room for the model,
    --space_dir), before torch loads."""
    from proto_segformer.output_folders import check_output_folder, folder_weights_bytes
    from proto_segformer.preflight import check_existing, check_model_folder

    check_model_folder(args.model)
    if args.card is not None:
        check_existing(args.card, "--card", kind="file")
    for picture in args.pictures:
        check_existing(picture, "--pictures", kind="file")
    if args.local_dir is not None:
        check_output_folder(args.local_dir, "--local_dir", need_bytes=folder_weights_bytes(args.model))
    if args.space_dir is not None:
        check_output_folder(args.space_dir, "--space_dir")


def main(argv: list[str] | None = None) -> int:
    (args,) = parse(PushArguments, argv, description=__doc__)
    if check_failed(check_paths, args):
        return 2

    from proto_segformer.hub import HubError, push_to_hub

    try:
        result = push_to_hub(
            args.model,
            args.repo_id,
            local_dir=args.local_dir,
            dry_run=args.dry_run,
            token=args.token,
            private=args.private,
            commit_message=args.commit_message,
            overwrite=args.overwrite,
            dataset_name=args.dataset_name,
            base_model=args.base_model,
            license=args.license,
            pictures=args.pictures,
            card=args.card,
            card_kwargs={"data_note": args.data_note} if args.data_note else None,
            space_dir=args.space_dir,
            space_repo_id=args.space_repo_id,
        )
    except Exception as error:
        from proto_segformer.checkpoint import CheckpointError  # torch: imported only when needed

        folder = args.local_dir or args.space_dir or "a temporary folder"
        intact = "Nothing was uploaded" if args.local_dir is None else "An earlier assembly there is unchanged"
        exit_if_write_failure(error, folder, "the repository", f"{intact}; free some space and run it again.")
        if not isinstance(error, (HubError, CheckpointError, FileNotFoundError)):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    action = (
        f"Uploaded to {result.repo_id} in one commit: {result.commit_url}" if result.commit_url else "Not uploaded."
    )
    print(f"Repository folder: {result.local_dir} ({len(result.files)} files)")
    for name in result.files:
        size = (result.local_dir / name).stat().st_size
        print(f"  {name}  ({size:,} bytes)")
    print(action)
    if result.space_dir is not None:
        print(f"Space folder: {result.space_dir} ({len(result.space_files)} files: {', '.join(result.space_files)})")
        uploaded = f"Uploaded to the Space {result.space_repo_id}: {result.space_commit_url}"
        print(uploaded if result.space_commit_url else "Space not uploaded.")
    return 0


if __name__ == "__main__":
    run_main(main)
