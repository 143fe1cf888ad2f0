"""The distributed mode asked for is the one that runs, or one line naming the problem and the fix
(`proto_segformer.distributed_setup`): launcher environments as accelerate and torchrun set them, checked without
starting processes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from proto_segformer import distributed_setup as ds
from proto_segformer.model_card import write_model_card

# What `accelerate launch --num_machines 2 --machine_rank 0 ... --num_processes 2` (no --multi_gpu) hands the script.
ACCELERATE_SINGLE = {"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}
# What torchrun (and accelerate --multi_gpu / --use_fsdp) hands process 1 of 2 on one machine.
TORCHRUN_RANK1 = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1"}


def test_accelerate_without_multi_gpu_but_several_processes_is_an_error_naming_multi_gpu() -> None:
    problem = ds.accelerate_single_launch_problem(ACCELERATE_SINGLE)
    assert "single process" in problem and "Add --multi_gpu" in problem and "--use_cpu" in problem
    assert ds.accelerate_single_launch_problem({**ACCELERATE_SINGLE, **TORCHRUN_RANK1}) is None  # torchrun started it
    assert ds.accelerate_single_launch_problem({"ACCELERATE_USE_CPU": "False"}) is None  # one process asked for
    assert ds.accelerate_single_launch_problem({"MASTER_ADDR": "10.0.0.1"}) is None  # not accelerate's launcher
    assert ds.accelerate_single_launch_problem({**ACCELERATE_SINGLE, "OMPI_COMM_WORLD_SIZE": "2"}) is None  # mpirun
    assert ds.accelerate_single_launch_problem(ACCELERATE_SINGLE, world_size=2) is None  # a world formed anyway


def test_a_world_of_one_where_the_launcher_asked_for_two_is_an_error_naming_use_cpu() -> None:
    # torchrun / accelerate --use_fsdp on a machine without GPU and without --use_cpu: each process alone as rank 0.
    problem = ds.world_problem(TORCHRUN_RANK1, world_size=1, rank=0, local_rank=0, use_cpu=False)
    assert "WORLD_SIZE=2" in problem and "RANK=1" in problem and "pass --use_cpu" in problem
    problem = ds.world_problem({"NNODES": "2"}, world_size=1, rank=0, local_rank=0, use_cpu=True)
    assert "2 machines" in problem and "same launcher command" in problem


def test_processes_that_disagree_on_rank_or_world_size_are_an_error() -> None:
    assert ds.world_problem(TORCHRUN_RANK1, world_size=2, rank=1, local_rank=1, use_cpu=True) is None
    assert "RANK=1 but runs as process 0" in ds.world_problem(TORCHRUN_RANK1, 2, 0, 1, True)
    assert "LOCAL_RANK=1" in ds.world_problem(TORCHRUN_RANK1, 2, 1, 0, True)
    assert "WORLD_SIZE=2 but this process's world has 4" in ds.world_problem(TORCHRUN_RANK1, 4, 1, 1, True)
    assert ds.world_problem({}, world_size=1, rank=0, local_rank=0, use_cpu=False) is None  # plain python
    assert ds.world_problem({"LOCAL_RANK": "-1"}, world_size=1, rank=0, local_rank=0, use_cpu=False) is None


@pytest.mark.parametrize(
    ("argv", "gpu", "expected"),
    [
        (["--bf16"], False, "--bf16"),
        (["--fp16", "true", "--output_dir", "x"], False, "--fp16"),
        (["--bf16=True"], False, "--bf16"),
        (["--bf16", "--use_cpu"], False, None),
        (["--bf16", "--use-cpu", "true"], False, None),
        (["--bf16", "false"], False, None),
        (["--bf16"], True, None),
        (["--output_dir", "x"], False, None),
    ],
)
def test_mixed_precision_without_gpu_and_without_use_cpu_is_one_line(argv, gpu, expected) -> None:
    problem = ds.precision_problem(argv, accelerator_available=gpu)
    if expected is None:
        assert problem is None
    else:
        assert problem.startswith(expected) and "pass --use_cpu" in problem and "\n" not in problem


def test_precision_flags_are_read_from_a_json_file_of_arguments(tmp_path) -> None:
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"bf16": True, "output_dir": "x"}))
    assert "--bf16" in ds.precision_problem([str(args)], accelerator_available=False)
    args.write_text(json.dumps({"bf16": True, "use_cpu": True}))
    assert ds.precision_problem([str(args)], accelerator_available=False) is None


def test_fsdp_or_deepspeed_with_use_cpu_is_an_error_saying_what_would_run() -> None:
    plain = SimpleNamespace(fsdp=[], deepspeed=None)
    assert ds.requested_sharding({"ACCELERATE_USE_FSDP": "true"}, plain) == "FSDP"
    assert ds.requested_sharding({}, SimpleNamespace(fsdp=["full_shard"], deepspeed=None)) == "FSDP"
    assert ds.requested_sharding({"ACCELERATE_USE_DEEPSPEED": "true"}, plain) == "DeepSpeed"
    assert ds.requested_sharding({}, SimpleNamespace(fsdp=[], deepspeed="ds.json")) == "DeepSpeed"
    assert ds.requested_sharding({"ACCELERATE_USE_FSDP": "false"}, plain) is None
    fsdp = ds.sharding_cpu_problem("FSDP", use_cpu=True, on_cpu=True, processes=2)
    assert "GPUs only" in fsdp and "plain DDP" in fsdp and "--multi_gpu" in fsdp
    fsdp = ds.sharding_cpu_problem("FSDP", use_cpu=False, on_cpu=True, processes=2)
    assert "GPUs only" in fsdp and "alone as rank 0" in fsdp
    assert "Drop --use_cpu" in ds.sharding_cpu_problem("DeepSpeed", use_cpu=True, on_cpu=True, processes=1)
    deepspeed = ds.sharding_cpu_problem("DeepSpeed", use_cpu=False, on_cpu=True, processes=2)
    assert "2 processes on a machine without GPU" in deepspeed and "as one process" in deepspeed
    assert ds.sharding_cpu_problem("DeepSpeed", use_cpu=False, on_cpu=True, processes=1) is None  # runs (tested)
    assert ds.sharding_cpu_problem("FSDP", use_cpu=False, on_cpu=False, processes=2) is None  # on GPUs
    assert ds.sharding_cpu_problem(None, use_cpu=True, on_cpu=True, processes=2) is None


def test_deepspeed_zero_optimizers_get_a_schedule_through_the_torch_optimizer_they_wrap() -> None:
    import torch

    from proto_segformer.trainer import schedulable_optimizer

    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    zero = SimpleNamespace(optimizer=adamw)  # DeepSpeedZeroOptimizer: no `defaults`, the torch optimizer inside
    wrapped = SimpleNamespace(optimizer=zero)  # accelerate's DeepSpeedOptimizerWrapper around it
    assert schedulable_optimizer(wrapped) is adamw
    assert schedulable_optimizer(adamw) is adamw
    assert schedulable_optimizer(SimpleNamespace()) is not None  # nothing to unwrap: left as given


def _trainer(world_size=2, fsdp=False, deepspeed=False, **args):
    arguments = SimpleNamespace(
        world_size=world_size, bf16=False, fp16=False, device=SimpleNamespace(type="cpu"), fsdp=[], deepspeed=None
    )
    for key, value in args.items():
        setattr(arguments, key, value)
    state = SimpleNamespace(
        fsdp_plugin=SimpleNamespace(fsdp_version=2, reshard_after_forward=True, state_dict_type="FULL_STATE_DICT"),
        deepspeed_plugin=SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 2}}),
    )
    return SimpleNamespace(
        args=arguments, is_fsdp_enabled=fsdp, is_deepspeed_enabled=deepspeed, accelerator=SimpleNamespace(state=state)
    )


def test_fsdp_asked_for_but_not_active_in_the_trainer_is_an_error() -> None:
    problem = ds.inactive_sharding_problem("FSDP", _trainer())
    assert "runs DDP" in problem and "--use_fsdp" in problem
    assert "DeepSpeed was asked for" in ds.inactive_sharding_problem("DeepSpeed", _trainer(world_size=1))
    assert ds.inactive_sharding_problem("FSDP", _trainer(fsdp=True)) is None
    sharded = _trainer(fsdp=True)
    sharded.accelerator.state.fsdp_plugin.state_dict_type = "StateDictType.SHARDED_STATE_DICT"
    assert "--fsdp_state_dict_type FULL_STATE_DICT" in ds.inactive_sharding_problem("FSDP", sharded)
    zero3 = _trainer(deepspeed=True)
    zero3.accelerator.state.deepspeed_plugin.deepspeed_config = {"zero_optimization": {"stage": 3}}
    assert "stage3_gather_16bit_weights_on_model_save" in ds.inactive_sharding_problem("DeepSpeed", zero3)
    zero3.accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].update(
        stage3_gather_16bit_weights_on_model_save=True
    )
    assert ds.inactive_sharding_problem("DeepSpeed", zero3) is None
    assert ds.inactive_sharding_problem(None, _trainer()) is None
    with pytest.raises(ds.DistributedSetupError, match="FSDP was asked for"):
        ds.check_trainer({"ACCELERATE_USE_FSDP": "true"}, _trainer())


def test_check_launch_reads_the_world_from_the_training_arguments() -> None:
    cpu = SimpleNamespace(type="cpu")
    args = SimpleNamespace(
        world_size=1, process_index=0, local_process_index=0, use_cpu=False, fsdp=[], deepspeed=None, device=cpu
    )
    ds.check_launch({}, args)
    with pytest.raises(ds.DistributedSetupError, match="runs alone"):
        ds.check_launch(TORCHRUN_RANK1, args)
    with pytest.raises(ds.DistributedSetupError, match="GPUs only"):
        ds.check_launch({"ACCELERATE_USE_FSDP": "true"}, SimpleNamespace(**{**vars(args), "use_cpu": True}))
    with pytest.raises(ds.DistributedSetupError, match="DeepSpeed was asked for with 2 processes"):
        ds.check_launch({**TORCHRUN_RANK1, "ACCELERATE_USE_DEEPSPEED": "true"}, args)


def test_nodes_without_a_shared_disk_need_save_on_each_node_and_a_shared_disk_must_not_have_it() -> None:
    problem = ds.shared_disk_problem(blind=1, sharing=0, save_on_each_node=False, folder="out")
    assert "Pass --save_on_each_node" in problem and "out" in problem
    assert ds.shared_disk_problem(blind=1, sharing=0, save_on_each_node=True, folder="out") is None
    assert ds.shared_disk_problem(blind=0, sharing=1, save_on_each_node=False, folder="out") is None
    assert "Drop --save_on_each_node" in ds.shared_disk_problem(0, 1, True, "out")


def test_the_record_names_processes_machines_mode_and_sharding() -> None:
    env = {"LOCAL_WORLD_SIZE": "2"}
    ddp = ds.setup_record(_trainer(world_size=4), env)
    assert (ddp["processes"], ddp["machines"], ddp["mode"], ddp["precision"]) == (4, 2, "DDP", "fp32")
    assert ds.describe_setup(ddp) == "4 processes on 2 machines, DDP, fp32, cpu"
    fsdp = ds.setup_record(_trainer(world_size=2, fsdp=True, bf16=True), env)
    assert (fsdp["mode"], fsdp["fsdp_version"], fsdp["sharding"], fsdp["precision"]) == ("FSDP", 2, "True", "bf16")
    zero = ds.setup_record(_trainer(deepspeed=True), {})
    assert (zero["mode"], zero["zero_stage"], zero["sharding"]) == ("DeepSpeed", 2, "ZeRO-2")
    assert "DeepSpeed ZeRO-2" in ds.describe_setup(zero)
    single = ds.setup_record(_trainer(world_size=1), {})
    assert ds.describe_setup(single) == "1 process on 1 machine, fp32, cpu"
    assert ds.machine_count({"NNODES": "3"}, 3) == 3


def test_the_model_card_shows_the_recorded_setup(tmp_path, tiny_model) -> None:
    tiny_model.save_pretrained(tmp_path)
    record = {"processes": 4, "machines": 2, "mode": "DDP", "backend": "nccl", "precision": "bf16", "device": "cuda"}
    (tmp_path / "all_results.json").write_text(json.dumps({"eval_mean_iou": 0.5, ds.SETUP_KEY: record}))
    card = write_model_card(tmp_path).read_text()
    assert "Setup: 4 processes on 2 machines, DDP (nccl), bf16, cuda." in card


def test_another_machine_sees_a_new_folder_or_says_no_after_its_wait(tmp_path) -> None:
    from proto_segformer.training import visible

    (tmp_path / "tmp-checkpoint-2").mkdir()
    assert visible(tmp_path / "tmp-checkpoint-2", wait_s=0)
    assert not visible(tmp_path / "tmp-checkpoint-4", wait_s=0)
    assert not visible(tmp_path / "no" / "such" / "tmp-checkpoint-2", wait_s=0)  # no output folder on this machine
