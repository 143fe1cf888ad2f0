"""The quality comparison's machinery (benchmarks/quality.py, benchmarks/run_quality.py, scripts/benchmark_quality.py)
on a tiny preset.

Nothing here is timed: the comparison's numbers live in benchmarks/quality*.json.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import quality, run_quality
from benchmarks.arguments import QualityArguments
from benchmarks.quality import (
    BatchFingerprint,
    ComparisonSettings,
    QualityInputError,
    build_model_pair,
    check_settings,
    compare,
    format_comparison,
    format_table,
    parse_train_arguments,
    plan_jobs,
    prototype_geometry,
    prototype_usage,
    rare_class_mean_iou,
    run_comparison,
    shared_parameter_names,
    summarize,
)

ROOT = Path(__file__).resolve().parent.parent
TINY_OPTIONS = {
    "config_overrides": "hidden_sizes=[8,16,24,32],depths=[1,1,1,1],num_attention_heads=[1,1,1,1]",
    "decoder_hidden_size": 16,
    "prototype_dim": 8,
    "num_prototypes_per_class": 3,
    "builtin_num_train": 12,
    "builtin_num_validation": 3,
    "builtin_image_size": 32,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 3,
    "max_steps": 3,
    "check_samples": 3,
    "use_cpu": True,
}
ID2LABEL = {i: f"class {i}" for i in range(5)}


def tiny_model_args(**options):
    model_args, _, _ = parse_train_arguments("scenes", {"output_dir": "unused", **TINY_OPTIONS, **options})
    return model_args


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_quality", ROOT / "scripts" / "benchmark_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------- shared weights


def test_model_pair_shares_every_encoder_and_decoder_tensor():
    parametric, protoseg = build_model_pair(tiny_model_args(), ID2LABEL, seed=3)
    p_state, q_state = parametric.state_dict(), protoseg.state_dict()
    shared = shared_parameter_names(p_state, "parametric")
    assert shared == shared_parameter_names(q_state, "protoseg")
    assert any(name.startswith("segformer.stages.") for name in shared)
    assert any(name.startswith("decode_head.linear_projections.") for name in shared)
    assert "decode_head.batch_norm.running_mean" in shared
    for name in shared:
        assert torch.equal(p_state[name], q_state[name]), name
    assert "decode_head.classifier.weight" in p_state and "decode_head.classifier.weight" not in q_state
    assert quality.shared_weights_fingerprint(parametric, "parametric") == quality.shared_weights_fingerprint(
        protoseg, "protoseg"
    )
    # Same SegFormer config, classes and prototype shape as train.py builds (M = 3, D = 8 from the options).
    assert parametric.config.hidden_sizes == protoseg.config.hidden_sizes == [8, 16, 24, 32]
    assert parametric.config.id2label == protoseg.config.id2label
    assert protoseg.prototypes.shape == (5, 3, 8)
    torch.testing.assert_close(protoseg.prototypes.norm(dim=-1), torch.ones(5, 3))


def test_model_pair_depends_on_the_seed_only():
    first_p, first_q = build_model_pair(tiny_model_args(), ID2LABEL, seed=1)
    torch.manual_seed(12345)  # the global state must not matter
    again_p, again_q = build_model_pair(tiny_model_args(), ID2LABEL, seed=1)
    other_p, other_q = build_model_pair(tiny_model_args(), ID2LABEL, seed=2)
    fingerprint = quality.shared_weights_fingerprint
    assert fingerprint(first_p, "parametric") == fingerprint(again_p, "parametric")
    assert torch.equal(first_q.prototypes, again_q.prototypes)
    assert fingerprint(first_p, "parametric") != fingerprint(other_p, "parametric")
    assert not torch.equal(first_q.prototypes, other_q.prototypes)


def test_copy_shared_weights_refuses_models_that_do_not_match():
    parametric, _ = build_model_pair(tiny_model_args(), ID2LABEL, seed=0)
    _, wider = build_model_pair(tiny_model_args(decoder_hidden_size=24), ID2LABEL, seed=0)
    with pytest.raises(RuntimeError, match="size mismatch|do not share"):
        quality.copy_shared_weights(parametric, wider)


def test_batch_fingerprint_tells_batches_and_their_order_apart():
    x = {"pixel_values": torch.zeros(1, 3, 2, 2), "labels": torch.zeros(1, 2, 2, dtype=torch.long)}
    y = {"pixel_values": torch.zeros(1, 3, 2, 2), "labels": torch.ones(1, 2, 2, dtype=torch.long)}
    a, b, c = BatchFingerprint(), BatchFingerprint(), BatchFingerprint()
    for fingerprint, order in ((a, (x, y)), (b, (x, y)), (c, (y, x))):
        for batch in order:
            fingerprint.update(batch)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()  # same batches, other order


# --------------------------------------------------------------------------------------------- the whole comparison


def test_run_comparison_end_to_end_on_a_tiny_preset(tmp_path):
    variants = {"default": {}, "init-from-data": {"prototype_init_batches": 1}}
    settings = ComparisonSettings(("scenes",), (0,), TINY_OPTIONS, variants, mode="test")
    result = run_comparison(settings, work_dir=tmp_path, log=lambda line: None)
    runs = {(run["head"], run["variant"]): run for run in result["runs"]}
    assert set(runs) == {("parametric", "default"), ("protoseg", "default"), ("protoseg", "init-from-data")}
    parametric, protoseg = runs["parametric", "default"], runs["protoseg", "default"]
    initialised = runs["protoseg", "init-from-data"]
    # Every head: same initial encoder+decoder weights, the same 3 training batches in the same order (the batch
    # that initialises the prototypes from data is not a training step).
    for run in (protoseg, initialised):
        assert run["initial_shared_weights"] == parametric["initial_shared_weights"]
        assert run["batches"] == parametric["batches"]
        assert run["num_batches"] == run["train_steps"] == 3
    assert initialised["prototypes"]["cosine_to_init"] < protoseg["prototypes"]["cosine_to_init"]
    for run in runs.values():
        assert 0.0 <= run["mean_iou"] <= 1.0 and 0.0 <= run["pixel_accuracy"] <= 1.0
        assert len(run["per_class_iou"]) == 11
        items = [v for v in run["per_class_iou"][1:] if not math.isnan(v)]
        assert run["item_mean_iou"] == pytest.approx(sum(items) / len(items))
        assert run["train_seconds"] > 0
    # Learnable parameters: the classifier (11 x 16 + 11) against the projection (16 x 16 + 16 + 16 x 8 + 8 + 2 x 8).
    assert protoseg["learnable_parameters"] - parametric["learnable_parameters"] == (272 + 136 + 16) - (176 + 11)
    assert 0 < protoseg["prototypes"]["used_per_class"] <= 3
    assert -1.0 <= protoseg["prototypes"]["cosine_to_init"] <= 1.0
    assert "prototypes" not in parametric

    comparison, with_init = result["comparison"]
    assert comparison["variant"] == "default" and with_init["variant"] == "init-from-data"
    assert comparison["same_batches"] and comparison["same_initial_weights"] and with_init["same_batches"]
    assert comparison["delta_mean_iou"] == pytest.approx(protoseg["mean_iou"] - parametric["mean_iou"])
    rows = {row["head"]: row for row in result["summary"] if row["variant"] == "default"}
    for row in rows.values():
        for name in ("mean_iou_mean", "mean_iou_std", "pixel_accuracy_mean", "train_seconds_mean"):
            assert name in row
        assert row["seeds"] == [0]
    assert rows["protoseg"]["learnable_parameters"] == protoseg["learnable_parameters"]
    parsed = json.loads(json.dumps(result, default=str))
    assert set(parsed) >= {"machine", "summary", "comparison", "runs", "train_options", "seeds", "wall_seconds"}
    table = format_table(result["summary"])
    assert "| scenes | parametric | default | 1 |" in table and "| scenes | protoseg | default | 1 |" in table
    assert "| scenes | default |" in format_comparison(result["comparison"])
    assert not any(tmp_path.iterdir()) or all(p.name == "prepare" for p in tmp_path.iterdir())


def test_plan_pairs_heads_per_seed_and_alternates_their_order():
    settings = ComparisonSettings(
        datasets=("scenes", "scenes-large"), seeds=(0, 1), variants={"default": {}, "M-1": {"x": 1}}
    )
    jobs = plan_jobs(settings)
    assert len(jobs) == 2 * 2 * 3
    first = [(j.head, j.variant) for j in jobs[:3]]
    second = [(j.head, j.variant) for j in jobs[3:6]]
    assert first == [("parametric", "default"), ("protoseg", "default"), ("protoseg", "M-1")]
    assert second == [("protoseg", "default"), ("protoseg", "M-1"), ("parametric", "default")]
    assert {j.seed for j in jobs[:3]} == {0} and {j.seed for j in jobs[3:6]} == {1}
    assert jobs[2].extra_options == {"x": 1} and jobs[0].extra_options == {}
    # Every run of a data set shares the options that define the prepared data.
    assert all(j.shared_options == jobs[0].shared_options for j in jobs)


def test_dataset_options_apply_to_their_data_set_only_and_yield_to_train_options():
    settings = ComparisonSettings(
        datasets=("scenes", "scenes-large"),
        seeds=(0,),
        train_options={"max_steps": 10},
        dataset_options={"scenes-large": {"max_steps": 30, "builtin_num_train": 7}},
    )
    steps = {(j.dataset, j.head): j.shared_options["max_steps"] for j in plan_jobs(settings)}
    assert steps == {("scenes", "parametric"): 10, ("scenes", "protoseg"): 10,
                     ("scenes-large", "parametric"): 30, ("scenes-large", "protoseg"): 30}  # fmt: skip
    quick, _ = run_quality.build_settings(QualityArguments(quick=True, device="cpu"))
    assert quick.dataset_options == {"scenes-large": quality.MODES["quick"]["dataset_train_args"]["scenes-large"]}
    assert quick.dataset_options["scenes-large"]["max_steps"] > quick.train_options["max_steps"]
    mine, _ = run_quality.build_settings(QualityArguments(quick=True, device="cpu", train_options="max_steps=5"))
    assert mine.train_options["max_steps"] == 5 and "max_steps" not in mine.dataset_options["scenes-large"]
    only_small, _ = run_quality.build_settings(QualityArguments(quick=True, device="cpu", datasets="scenes"))
    assert only_small.dataset_options == {}


def test_job_options_merge_config_overrides_and_set_seed():
    job = quality.Job("scenes", "protoseg", "t", 3, {"max_steps": 5, "config_overrides": "depths=[1,1,1,1]"},
                      dict(quality.ABLATIONS["temperature-0.1"]))  # fmt: skip
    options = quality.job_options(job, "out")
    assert options["seed"] == 3 and options["output_dir"] == "out" and options["max_steps"] == 5
    assert options["config_overrides"] == (
        "depths=[1,1,1,1],class_score_normalization=temperature,class_score_temperature=0.1"
    )
    model_args, _, _ = parse_train_arguments("scenes", options)
    assert model_args.config_fields()["class_score_normalization"] == "temperature"
    assert model_args.config_fields()["depths"] == [1, 1, 1, 1]


def test_train_options_reach_train_py_parser():
    model_args, data_args, training_args = parse_train_arguments(
        "scenes-large", {"output_dir": "x", "ppc_weight": 0.0, "max_steps": 7, "prototype_dim": None, "seed": 4}
    )
    assert model_args.ppc_weight == 0.0 and model_args.prototype_dim is None
    assert training_args.max_steps == 7 and training_args.seed == 4
    assert data_args.dataset_name == "builtin:scenes-large"
    # The built-in demo defaults of scripts/train.py apply (learning rate, batch size, crop).
    from proto_segformer.run_training import BUILTIN_DEMO_DEFAULTS

    assert training_args.learning_rate == BUILTIN_DEMO_DEFAULTS["learning_rate"]
    assert training_args.per_device_train_batch_size == BUILTIN_DEMO_DEFAULTS["per_device_train_batch_size"]


# ------------------------------------------------------------------------------------------------- the statistics


def _run(dataset, head, seed, miou, variant="default", batches="b", weights="w", rare=None):
    run = {
        "dataset": dataset,
        "head": head,
        "variant": variant,
        "seed": seed,
        "mean_iou": miou,
        "pixel_accuracy": 0.9,
        "mean_accuracy": 0.5,
        "train_seconds": 10.0,
        "learnable_parameters": 100 if head == "parametric" else 90,
        "batches": f"{batches}{seed}",
        "initial_shared_weights": f"{weights}{seed}",
    }
    if rare is not None:
        run["rare_half_mean_iou"] = rare
    if head == "protoseg":
        run["prototypes"] = {"used_per_class": 2.0, "effective_per_class": 1.5, "cosine_to_init": 0.9,
                             "within_class_cosine": 0.1}  # fmt: skip
    return run


def test_summary_and_paired_comparison_numbers():
    runs = [
        _run("s", "parametric", 0, 0.50, rare=0.1),
        _run("s", "parametric", 1, 0.52, rare=0.2),
        _run("s", "parametric", 2, 0.54, rare=0.3),
        _run("s", "protoseg", 0, 0.55, rare=0.2),
        _run("s", "protoseg", 1, 0.58, rare=0.2),
        _run("s", "protoseg", 2, 0.58, rare=0.2),
    ]
    rows = {row["head"]: row for row in summarize(runs)}
    assert rows["parametric"]["mean_iou_mean"] == pytest.approx(0.52)
    assert rows["parametric"]["mean_iou_std"] == pytest.approx(0.02)
    assert rows["protoseg"]["mean_iou_mean"] == pytest.approx(0.57)
    assert rows["protoseg"]["mean_iou_std"] == pytest.approx(math.sqrt(0.0003))
    assert rows["protoseg"]["prototypes_used_per_class"] == 2.0
    (row,) = compare(runs)
    assert row["delta_mean_iou"] == pytest.approx(0.05)  # paired differences 0.05, 0.06, 0.04
    assert row["delta_mean_iou_std"] == pytest.approx(0.01)
    assert row["seed_spread"] == pytest.approx(0.02)
    assert row["paired_t"] == pytest.approx(0.05 / (0.01 / math.sqrt(3)))
    assert row["verdict"] == "ahead"
    assert row["same_batches"] and row["same_initial_weights"]
    assert row["delta_rare_half_mean_iou"] == pytest.approx(0.0)


def test_comparison_within_noise_and_mismatched_batches_are_reported():
    runs = [
        _run("s", "parametric", 0, 0.50),
        _run("s", "parametric", 1, 0.60),
        _run("s", "protoseg", 0, 0.52, batches="other"),
        _run("s", "protoseg", 1, 0.61),
    ]
    (row,) = compare(runs)
    assert row["verdict"] == "equal within noise"  # +1.5 points against a spread of about 7
    assert row["same_batches"] is False and row["same_initial_weights"] is True
    behind = compare([_run("s", "parametric", 0, 0.5), _run("s", "parametric", 1, 0.5),
                      _run("s", "protoseg", 0, 0.3), _run("s", "protoseg", 1, 0.31)])  # fmt: skip
    assert behind[0]["verdict"] == "behind"
    # |delta| (5.3 points) above the spread (5.0) but the paired differences (10, 0, 6) do not reject 0 (t = 1.8).
    unsure = compare([_run("s", "parametric", s, 0.5) for s in range(3)]
                     + [_run("s", "protoseg", s, v) for s, v in enumerate((0.6, 0.5, 0.56))])  # fmt: skip
    assert unsure[0]["delta_mean_iou"] > unsure[0]["seed_spread"]
    assert unsure[0]["paired_t"] == pytest.approx(1.835, abs=0.01)
    assert unsure[0]["verdict"] == "equal within noise"


def test_rare_class_mean_iou_takes_the_classes_with_fewest_training_pixels():
    counts = torch.tensor([1000, 5, 50, 500, 1]).numpy()
    iou = {0: 0.9, 1: 0.1, 2: 0.4, 3: 0.8, 4: 0.3}
    assert rare_class_mean_iou(iou, counts) == pytest.approx((0.3 + 0.1) / 2)  # classes 4 and 1; background left out
    iou[4] = float("nan")  # absent from validation: left out
    assert rare_class_mean_iou(iou, counts) == pytest.approx((0.1 + 0.4) / 2)


# ------------------------------------------------------------------------------------------ prototype diagnostics


def test_prototype_usage_counts_the_nearest_own_class_prototype(tiny_model):
    tiny_model.eval()
    with torch.no_grad():
        prototypes = torch.zeros(5, 4, 32)
        for m in range(4):
            prototypes[:, m, m] = 1.0
        tiny_model.prototypes.copy_(prototypes)
    # Embeddings 2x2 per image: class 1 pixels near prototype 0 and 2; class 2 pixels all near prototype 3.
    embeddings = torch.zeros(1, 32, 2, 2)
    embeddings[0, 0, 0, 0] = embeddings[0, 2, 0, 1] = embeddings[0, 3, 1, 0] = embeddings[0, 3, 1, 1] = 1.0
    tiny_model.embed_pixels = lambda pixel_values: (embeddings, None)
    batch = {"pixel_values": torch.zeros(1, 3, 8, 8), "labels": torch.tensor([[1, 1], [2, 2]]).repeat_interleave(
        4, 0).repeat_interleave(4, 1)[None]}  # fmt: skip
    usage = prototype_usage(tiny_model, [batch])
    assert usage["classes_seen"] == 2
    assert usage["used_per_class"] == pytest.approx((2 + 1) / 2)
    assert usage["min_used_per_class"] == 1
    assert usage["effective_per_class"] == pytest.approx((2 + 1) / 2)


def test_prototype_geometry_sees_motion_and_collapse():
    initial = torch.nn.functional.normalize(torch.randn(3, 4, 16), dim=-1)
    still = prototype_geometry(initial, initial)
    assert still["cosine_to_init"] == pytest.approx(1.0)
    collapsed = prototype_geometry(initial[:, :1].expand(3, 4, 16), initial)
    assert collapsed["within_class_cosine"] == pytest.approx(1.0)
    assert collapsed["cosine_to_init"] < 0.7


# --------------------------------------------------------------------------------------------------- bad input


def test_bad_settings_get_clear_errors():
    with pytest.raises(QualityInputError, match="Unknown data set.*'nope'"):
        check_settings(ComparisonSettings(datasets=("nope",)))
    with pytest.raises(QualityInputError, match="Seeds repeat"):
        check_settings(ComparisonSettings(seeds=(1, 1)))
    with pytest.raises(QualityInputError, match="at least one"):
        check_settings(ComparisonSettings(seeds=()))
    with pytest.raises(QualityInputError, match="workers must be >= 1"):
        run_comparison(ComparisonSettings(), workers=0)


def test_script_arguments_and_their_errors(monkeypatch):
    script = load_script()
    args = QualityArguments(quick=True, ablations="M-1,init-from-data", device="cpu", seeds="3,4,5")
    settings, device = run_quality.build_settings(args)
    assert device == "cpu" and settings.mode == "quick" and settings.seeds == (3, 4, 5)
    assert set(settings.variants) == {"default", "M-1", "init-from-data"}
    ablated, _ = run_quality.build_settings(QualityArguments(ablate=True))
    assert set(ablated.variants) == {"default", *quality.ABLATIONS}
    assert settings.train_options["use_cpu"] is True
    assert settings.train_options["max_steps"] == quality.MODES["quick"]["train_args"]["max_steps"]
    assert run_quality.default_output(settings).name == "quality_ablations_quick.json"
    for bad, message in (
        ({"quick": True, "large": True}, "exclude each other"),
        ({"ablations": "M-7"}, r"Unknown ablation.*M-7"),
        ({"device": "tpu"}, "--device must be"),
        ({"seeds": "1,x"}, "Bad --seeds"),
    ):
        with pytest.raises(QualityInputError, match=message):
            run_quality.build_settings(QualityArguments(**bad))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QualityInputError, match="no CUDA device"):
        run_quality.build_settings(QualityArguments(device="cuda"))
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--datasets", "nope", "--device", "cpu"])
    assert exit_info.value.code == 2


def test_resummarize_recomputes_statistics_from_the_runs(tmp_path, capsys):
    script = load_script()
    runs = [_run("s", "parametric", i, 0.5 + i / 100) for i in range(3)]
    runs += [_run("s", "protoseg", i, 0.6 + i / 100) for i in range(3)]
    source = tmp_path / "old.json"
    source.write_text(json.dumps({"runs": runs, "summary": [], "comparison": [], "wall_seconds": 1.0}))
    result = script.main(["--resummarize", str(source), "--output", str(tmp_path / "new.json")])
    (row,) = result["comparison"]
    assert row["delta_mean_iou"] == pytest.approx(0.1) and row["verdict"] == "ahead"
    assert json.loads((tmp_path / "new.json").read_text())["comparison"][0]["verdict"] == "ahead"
    assert "| s | default | +10.0 ± 0.0 |" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{}")
    for bad in (tmp_path / "missing.json", tmp_path / "bad.json"):
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--resummarize", str(bad)])
        assert exit_info.value.code == 2
    assert "is not a benchmark_quality result" in capsys.readouterr().err


def test_reused_runs_match_exactly_and_are_not_trained_again(monkeypatch):
    settings = ComparisonSettings(
        ("scenes",), (0, 1), {"max_steps": 9}, {"default": {}, "M-1": {"num_prototypes_per_class": 1}}
    )
    earlier_runs = [
        _run("scenes", "parametric", 0, 0.5),
        _run("scenes", "protoseg", 0, 0.6),
        _run("scenes", "protoseg", 0, 0.7, variant="M-1"),
        _run("scenes", "parametric", 5, 0.5),
    ]
    for run in earlier_runs:
        run["options"] = {}
    earlier_runs[2]["options"] = {"num_prototypes_per_class": 3}  # same name, other options: not reusable
    earlier = {"train_options": {"max_steps": 9}, "dataset_options": {}, "runs": earlier_runs}
    reused = quality.reusable_runs(settings, earlier)
    assert [(r["head"], r["variant"], r["seed"]) for r in reused] == [
        ("parametric", "default", 0),
        ("protoseg", "default", 0),
    ]
    trained = []
    monkeypatch.setattr(
        quality,
        "run_job",
        lambda job, root: trained.append(job) or _run(job.dataset, job.head, job.seed, 0.4, job.variant),
    )
    result = run_comparison(settings, workers=1, reuse=reused, log=lambda line: None)
    assert sorted((j.head, j.variant, j.seed) for j in trained) == [
        ("parametric", "default", 1),
        ("protoseg", "M-1", 0),
        ("protoseg", "M-1", 1),
        ("protoseg", "default", 1),
    ]
    assert len(result["runs"]) == 6 and sum(bool(r.get("reused")) for r in result["runs"]) == 2
    with pytest.raises(QualityInputError, match="other training options"):
        quality.reusable_runs(settings, {**earlier, "train_options": {"max_steps": 10}})
    with pytest.raises(QualityInputError, match="not a benchmark_quality result"):
        quality.reusable_runs(settings, {"runs": []})


def test_script_reuse_reads_several_results_first_wins_and_reports_bad_files(tmp_path, monkeypatch, capsys):
    script = load_script()
    args = [
        "--datasets",
        "scenes",
        "--seeds",
        "0",
        "--device",
        "cpu",
        "--train_options",
        "max_steps=3",
        "--workers",
        "1",
    ]
    settings, _ = run_quality.build_settings(QualityArguments(datasets="scenes", seeds="0", device="cpu",
                                                                train_options="max_steps=3"))  # fmt: skip
    for name, miou in (("a.json", 0.5), ("b.json", 0.9)):
        runs = [{**_run("scenes", "parametric", 0, miou), "options": {}}]
        earlier = {"train_options": settings.train_options, "dataset_options": settings.dataset_options, "runs": runs}
        (tmp_path / name).write_text(json.dumps(earlier))
    trained = []
    monkeypatch.setattr(quality, "run_job", lambda job, root: trained.append(job) or _run("scenes", job.head, 0, 0.6))
    result = script.main([*args, "--reuse", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}",
                          "--output", str(tmp_path / "out.json")])  # fmt: skip
    assert [j.head for j in trained] == ["protoseg"]
    assert [r["mean_iou"] for r in result["runs"] if r["head"] == "parametric"] == [0.5]
    with pytest.raises(SystemExit) as exit_info:
        script.main([*args, "--reuse", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2 and "missing.json is not a file" in capsys.readouterr().err
