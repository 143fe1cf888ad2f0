"""The distributed setup of a training run: what the launcher asked for, checked against what runs, and recorded.

`accelerate launch`, `torchrun` and the Trainer fall back silently when a mode cannot run: `accelerate launch
--num_machines 2` without `--multi_gpu` starts one process per machine, each training alone as rank 0; FSDP and
DeepSpeed under `--use_cpu` become plain DDP; on a machine without GPU and without `--use_cpu`, the processes of
`torchrun` each form a world of one and write one folder together. Each check below names such a misfire in one line
(`DistributedSetupError`) before training starts, with the fix:

- `accelerate_single_launch_problem`: accelerate's one-process launcher with --num_processes / --num_machines > 1;
- `world_problem`: a launcher's WORLD_SIZE / RANK / LOCAL_RANK / node count that the process's world disagrees with;
- `precision_problem`: --bf16 / --fp16 without a GPU and without --use_cpu (transformers answers with a traceback);
- `sharding_cpu_problem`: FSDP or DeepSpeed asked for on CPU (accelerate runs FSDP on GPUs only, DeepSpeed in one
  process on CPU; with --use_cpu neither);
- `inactive_sharding_problem`: FSDP or DeepSpeed asked for but not active in the Trainer's accelerator, or FSDP
  with a sharded state dict or ZeRO-3 without gathering the weights (no model.safetensors would be saved).

`setup_record(trainer)` is the setup that runs (processes, machines, DDP / FSDP / DeepSpeed with version and
sharding, precision, backend, device, library versions), written into the run's results and its model card;
`describe_setup` is its one-line form.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

TRUE_VALUES = ("1", "true", "yes", "y", "on")
SETUP_KEY = "distributed_setup"  # its key in train_results.json / all_results.json
# Environment variables some launchers and cluster scripts set for the number of machines.
MACHINE_COUNT_VARIABLES = ("NNODES", "ACCELERATE_NUM_MACHINES", "GROUP_WORLD_SIZE", "SLURM_NNODES")


class DistributedSetupError(ValueError):
    """The distributed mode asked for is not the one that would run (one line: the problem and the fix)."""


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in TRUE_VALUES


def _int(env: Mapping[str, str], name: str) -> int | None:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        return None


def requested_machines(env: Mapping[str, str]) -> int | None:
    """The number of machines the launcher or the cluster asked for, if an environment variable says so."""
    counts = [count for count in (_int(env, name) for name in MACHINE_COUNT_VARIABLES) if count is not None]
    return max(counts) if counts else None


def accelerate_single_launch_problem(env: Mapping[str, str], world_size: int = 1) -> str | None:
    """accelerate's one-process launcher (no --multi_gpu / --use_fsdp / --use_deepspeed) with --num_processes or
    --num_machines above 1: it sets MASTER_ADDR but starts a single process (a world of one), so every machine
    trains alone. (Its mpirun launch sets MPI's variables and forms a larger world: not this.)"""
    if world_size > 1 or "ACCELERATE_USE_CPU" not in env or "MASTER_ADDR" not in env or "WORLD_SIZE" in env:
        return None
    if any(name in env for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")):
        return None
    return (
        "accelerate launch started this script as a single process, although --num_processes or --num_machines asks"
        " for more: without --multi_gpu every machine would train alone as rank 0 on its own. Add --multi_gpu to the"
        " accelerate command (on CPU too, with --use_cpu after the script: gloo), or drop --num_processes /"
        " --num_machines (and MASTER_ADDR from the environment) for a one-process run."
    )


def world_problem(env: Mapping[str, str], world_size: int, rank: int, local_rank: int, use_cpu: bool) -> str | None:
    """The process's world (`world_size`, global `rank`, `local_rank`, as the Trainer set it up) against what the
    launcher asked for (WORLD_SIZE, RANK, LOCAL_RANK, the machine count)."""
    requested, env_rank, env_local_rank = _int(env, "WORLD_SIZE"), _int(env, "RANK"), _int(env, "LOCAL_RANK")
    machines = requested_machines(env)
    if world_size == 1 and ((requested or 1) > 1 or (machines or 1) > 1):
        asked = f"WORLD_SIZE={requested}" if (requested or 1) > 1 else f"{machines} machines"
        hint = (
            " On a machine without GPU pass --use_cpu to the script (the processes then join over gloo)."
            if not use_cpu
            else " Start every process with the same launcher command (accelerate launch --multi_gpu or torchrun)."
        )
        return (
            f"The launcher asked for several processes ({asked}), but this process runs alone (a world of one"
            f"{f', while RANK={env_rank}' if env_rank else ''}): each process would train on its own and write the"
            f" same output folder.{hint}"
        )
    if requested is not None and requested != world_size:
        return (
            f"The launcher set WORLD_SIZE={requested} but this process's world has {world_size} processes: start"
            " every process with the same launcher command and the same --num_processes / --nproc_per_node."
        )
    if env_rank is not None and env_rank != rank:
        return (
            f"This process was started as RANK={env_rank} but runs as process {rank}: two processes would believe"
            " they are the same rank (and write the same files). Start every process with the same launcher command."
        )
    if env_local_rank is not None and env_local_rank >= 0 and env_local_rank != local_rank:  # -1: none
        return (
            f"This process was started as LOCAL_RANK={env_local_rank} but runs as local process {local_rank}: start"
            " every process with the same launcher command."
        )
    return None


def _bool_value(argv: Sequence[str], name: str) -> bool | None:
    """The value of the boolean flag `--name` on a raw command line (`--name`, `--name true`, `--name=false`),
    None when absent; a json file of arguments: its key."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        import json

        try:
            data = json.loads(open(argv[0]).read())
        except (OSError, ValueError):
            return None
        return bool(data.get(name)) if isinstance(data, dict) and name in data else None
    found = None
    spellings = (f"--{name}", f"--{name.replace('_', '-')}")
    for index, arg in enumerate(argv):
        flag, equals, value = arg.partition("=")
        if flag not in spellings:
            continue
        if not equals:
            following = argv[index + 1] if index + 1 < len(argv) else ""
            value = following if following.lower() in (*TRUE_VALUES, "false", "no", "0", "n", "off") else "true"
        found = value.strip().lower() in TRUE_VALUES
    return found


def accelerator_available() -> bool:
    """Whether torch sees a GPU or another accelerator (CUDA, ROCm, MPS, XPU...)."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def precision_problem(argv: Sequence[str], accelerator_available: bool) -> str | None:
    """--bf16 / --fp16 on a machine without GPU (or other accelerator) and without --use_cpu."""
    if accelerator_available or _bool_value(argv, "use_cpu"):
        return None
    asked = [f"--{name}" for name in ("bf16", "fp16") if _bool_value(argv, name)]
    if not asked:
        return None
    return (
        f"{asked[0]} asks for mixed precision on a GPU, but this machine has none: pass --use_cpu too (bf16 on CPU,"
        " where the CPU supports it), or drop it for float32."
    )


def requested_sharding(env: Mapping[str, str], training_args) -> str | None:
    """The sharding asked for, "FSDP" or "DeepSpeed", when the launcher (accelerate's --use_fsdp /
    --use_deepspeed) or the arguments (--fsdp, --deepspeed) ask for it, else None."""
    if _flag(env, "ACCELERATE_USE_DEEPSPEED") or getattr(training_args, "deepspeed", None):
        return "DeepSpeed"
    if _flag(env, "ACCELERATE_USE_FSDP") or getattr(training_args, "fsdp", None):
        return "FSDP"
    return None


def sharding_cpu_problem(requested: str | None, use_cpu: bool, on_cpu: bool, processes: int) -> str | None:
    """FSDP or DeepSpeed where accelerate cannot run it: with --use_cpu it runs plain DDP instead, silently; on a
    machine without GPU it gives each of `processes` processes a world of its own."""
    if requested is None or not (use_cpu or on_cpu):
        return None
    if requested == "FSDP":
        instead = "plain DDP, unsharded" if use_cpu else "every process alone as rank 0, writing the same folder"
        return (
            f"FSDP was asked for (accelerate --use_fsdp or --fsdp) on CPU, but accelerate runs FSDP on GPUs only: here"
            f" it would run {instead}. On CPU use DDP (accelerate launch --multi_gpu --num_processes N"
            " scripts/train.py --use_cpu ...); on GPUs drop --use_cpu."
        )
    if use_cpu:
        return (
            "DeepSpeed was asked for (accelerate --use_deepspeed or --deepspeed) with --use_cpu, but accelerate turns"
            " DeepSpeed off under --use_cpu: it would run plain DDP. Drop --use_cpu, or drop DeepSpeed and use DDP"
            " (accelerate launch --multi_gpu ... --use_cpu)."
        )
    if processes > 1:
        return (
            f"DeepSpeed was asked for with {processes} processes on a machine without GPU, but accelerate sets up"
            " DeepSpeed's processes on GPUs only: on CPU each would train alone on all the data as rank 0 and write"
            " the same folder. On CPU run DeepSpeed as one process, or use DDP (accelerate launch --multi_gpu"
            " --num_processes N scripts/train.py --use_cpu ...); on GPUs it runs as asked."
        )
    return None


def inactive_sharding_problem(requested: str | None, trainer) -> str | None:
    """FSDP or DeepSpeed asked for but not active in the Trainer's accelerator."""
    if requested == "FSDP" and not trainer.is_fsdp_enabled:
        active = "DeepSpeed" if trainer.is_deepspeed_enabled else _plain_mode(trainer.args.world_size)
        return (
            f"FSDP was asked for but the Trainer's accelerator runs {active}: accelerate activates FSDP only with"
            " several GPU processes (accelerate launch --use_fsdp --num_processes N on GPUs). Drop --use_fsdp /"
            " --fsdp to run DDP."
        )
    if trainer.is_fsdp_enabled:
        state_dict_type = str(getattr(trainer.accelerator.state.fsdp_plugin, "state_dict_type", ""))
        if "FULL_STATE_DICT" not in state_dict_type:
            return (
                f"FSDP with state_dict_type {state_dict_type.rsplit('.', 1)[-1] or '?'} (accelerate's default for"
                " FSDP2): the Trainer would save no model.safetensors, so neither the checkpoints nor the final model"
                " would load with from_pretrained. Pass --fsdp_state_dict_type FULL_STATE_DICT to accelerate launch."
            )
    if trainer.is_deepspeed_enabled:
        zero = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization") or {}
        if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
            return (
                "DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save: the Trainer would save DeepSpeed's"
                " partitioned checkpoint instead of model.safetensors, which from_pretrained cannot load. Set"
                ' "stage3_gather_16bit_weights_on_model_save": true under "zero_optimization" in the DeepSpeed config'
                " (accelerate launch --zero3_save_16bit_model true)."
            )
    if requested == "DeepSpeed" and not trainer.is_deepspeed_enabled:
        return (
            f"DeepSpeed was asked for but the Trainer's accelerator runs {_plain_mode(trainer.args.world_size)}:"
            " check that deepspeed is installed and that --use_cpu is not given. Drop --use_deepspeed / --deepspeed"
            " to run DDP."
        )
    return None


def check_launch(env: Mapping[str, str], training_args) -> None:
    """The checks that need no Trainer, run before the output folder is touched: `DistributedSetupError`."""
    on_cpu = getattr(getattr(training_args, "device", None), "type", "cpu") == "cpu"
    processes = max(_int(env, "WORLD_SIZE") or 1, training_args.world_size)
    requested = requested_sharding(env, training_args)
    problem = accelerate_single_launch_problem(env, training_args.world_size)
    problem = problem or sharding_cpu_problem(requested, bool(training_args.use_cpu), on_cpu, processes)
    problem = problem or world_problem(
        env,
        world_size=training_args.world_size,
        rank=training_args.process_index,
        local_rank=training_args.local_process_index,
        use_cpu=bool(training_args.use_cpu),
    )
    if problem is not None:
        raise DistributedSetupError(problem)


def check_trainer(env: Mapping[str, str], trainer) -> None:
    """The mode asked for is the one the Trainer's accelerator runs: `DistributedSetupError` otherwise."""
    problem = inactive_sharding_problem(requested_sharding(env, trainer.args), trainer)
    if problem is not None:
        raise DistributedSetupError(problem)


def shared_disk_problem(blind: int, sharing: int, save_on_each_node: bool, folder) -> str | None:
    """At the first save of a run on several machines: `blind` machines (their first process) do not see the folder
    the main process created in `folder`, `sharing` machines do. Without a shared disk the other machines' saves
    need --save_on_each_node (else their checkpoints stay incomplete); with one, --save_on_each_node makes every
    machine write the same files."""
    if blind and not save_on_each_node:
        return (
            f"The main process's output folder ({folder}) is not visible from {blind} of the other machines: they"
            " share no disk with it, so their checkpoints would stay incomplete and the final model would be on the"
            " first machine only. Pass --save_on_each_node (every machine keeps complete checkpoints and the final"
            " model, and --resume_from_checkpoint last resumes on each), or put --output_dir on a disk all machines"
            " share."
        )
    if sharing and save_on_each_node:
        return (
            f"--save_on_each_node, but the machines share the disk of {folder}: every machine would write the same"
            " checkpoint files. Drop --save_on_each_node (the main process writes for all)."
        )
    return None


# ------------------------------------------------------------------------------------------------------ the record


def _plain_mode(world_size: int) -> str:
    return "DDP" if world_size > 1 else "single process"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_count(env: Mapping[str, str], world_size: int) -> int:
    """Machines (nodes) of the run: the world size over the processes per machine (LOCAL_WORLD_SIZE, which torchrun
    and accelerate set), else the launcher's node count, else 1."""
    local = _int(env, "LOCAL_WORLD_SIZE")
    if local and world_size % local == 0:
        return world_size // local
    return requested_machines(env) or 1


def setup_record(trainer, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The setup the Trainer runs: processes, machines, mode (single process / DDP / FSDP / DeepSpeed) with its
    sharding, precision, backend, device and the library versions."""
    import torch
    import torch.distributed as dist

    env = os.environ if env is None else env
    args = trainer.args
    world_size = int(args.world_size)
    record: dict[str, Any] = {
        "processes": world_size,
        "machines": machine_count(env, world_size),
        "mode": _plain_mode(world_size),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "device": args.device.type,
        "torch": torch.__version__,
        "accelerate": _version("accelerate"),
        "transformers": _version("transformers"),
    }
    if trainer.is_fsdp_enabled:
        plugin = trainer.accelerator.state.fsdp_plugin
        version = int(getattr(plugin, "fsdp_version", 1))
        strategy = getattr(plugin, "reshard_after_forward", None) if version == 2 else plugin.sharding_strategy
        record.update(mode="FSDP", fsdp_version=version, sharding=str(getattr(strategy, "name", strategy)))
    elif trainer.is_deepspeed_enabled:
        config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
        stage = (config.get("zero_optimization") or {}).get("stage", 0)
        record.update(mode="DeepSpeed", zero_stage=stage, sharding=f"ZeRO-{stage}", deepspeed=_version("deepspeed"))
    return record


def describe_setup(record: Mapping[str, Any]) -> str:
    """'2 processes on 2 machines, DDP (gloo), fp32, cpu' and the like."""
    processes, machines = int(record.get("processes", 1)), int(record.get("machines", 1))
    where = f"{processes} process{'es' if processes != 1 else ''}"
    where += f" on {machines} machines" if machines > 1 else " on 1 machine"
    mode = str(record.get("mode", "?"))
    if mode == "FSDP":
        mode += f"{record.get('fsdp_version', '')} ({record.get('sharding')})"
    elif mode == "DeepSpeed":
        mode += f" {record.get('sharding')}"
    backend = f" ({record['backend']})" if record.get("backend") else ""
    mode = "" if mode == "single process" and not backend else f"{mode}{backend}, "
    return f"{where}, {mode}{record.get('precision', '?')}, {record.get('device', '?')}"
