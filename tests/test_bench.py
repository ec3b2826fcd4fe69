from __future__ import annotations

import json
import math

import pytest
import torch

import bench
from collapse_utils.config import available_experiments, plan_runs
from collapse_utils.projection import (
    pack_longest_first,
    sample_by_kind,
    split_sizes,
    study_work,
)
from collapse_utils.storage import verify


def _positive_numbers(mapping: dict) -> bool:
    return all(isinstance(v, int | float) and v > 0 and math.isfinite(v) for v in mapping.values())


def test_quick_cpu_benchmark_writes_well_formed_json(tmp_path, capsys):
    argv = ["--quick", "--device", "cpu", "--size", "smoke", "--out", str(tmp_path)]
    # The study projection on the first run of the full profile (packing K at a time is
    # pack_longest_first's to show; spawning K processes is the dispatcher's).
    argv += ["--study", "--study-scale", "0.0005", "--study-runs", "1", "--runs-per-gpu", "1"]
    result = bench.main(argv + ["--threads", str(torch.get_num_threads())])

    written = sorted(p.name for p in tmp_path.glob("*.json"))
    assert len(written) == 2 and "latest.json" in written
    assert all(verify(tmp_path / name) for name in written)  # each with its checksum
    assert json.loads((tmp_path / "latest.json").read_text()) == json.loads(json.dumps(result))
    assert {
        "created",
        "hardware",
        "versions",
        "settings",
        "workload",
        "preprocessing",
        "sizes",
    } <= (result.keys())
    assert result["settings"]["quick"] and result["settings"]["steps"] == 2
    assert result["hardware"]["device"] == "cpu" and result["versions"]["torch"]

    assert set(result["preprocessing"]) == set(bench.PREP_IMAGES)
    for figures in result["preprocessing"].values():
        assert _positive_numbers(figures)
        assert {"report_images_per_s", "ours_images_per_s", "cache_build_images_per_s"} <= (
            figures.keys()
        )

    assert set(result["sizes"]) == {"smoke"}
    smoke = result["sizes"]["smoke"]
    assert set(smoke["step"]) == {"report"} | {name for name, _ in bench.OUR_STEPS}
    for step in smoke["step"].values():
        assert step["images_per_s"] > 0 and step["flops_per_s"] > 0
        assert step["mfu"] is None  # no peak on CPU
    assert smoke["flops_per_image"] > 0 and smoke["snapshot_s"] > 0
    assert set(smoke["tracking_overhead_pct"]) == {"eurosat", "pets", "study"}
    assert _positive_numbers(smoke["tracking_overhead_pct"])
    assert set(smoke["regularizer_overhead_pct"]) == {name for name, _ in bench.OUR_STEPS[1:]}
    assert all(math.isfinite(v) for v in smoke["regularizer_overhead_pct"].values())
    study = smoke["implied_study_s"]
    assert _positive_numbers(study)
    assert study["total"] == sum(v for k, v in study.items() if k != "total")
    assert set(smoke["step_profile"]) == {"report", "ours"}
    assert all(p["ops_per_step"] > 0 and p["kernels_per_step"] is None
               for p in smoke["step_profile"].values())  # fmt: skip

    (projection,) = result["study"].values()
    assert projection["runs_per_gpu"] == 1 and len(projection["runs"]) == 1
    for run in projection["runs"]:
        assert run["scaled_steps"] >= 1 and run["fixed_s"] > 0 and run["scaled_s"] > 0
        assert run["projected_s"] == pytest.approx(run["fixed_s"] + run["scaled_s"] / 0.0005)
    (run,) = projection["runs"]
    assert projection["projected_study_s"] == pytest.approx(run["projected_s"])
    assert result["targets"]["study, 1 per GPU: >= 35% MFU"] is False  # no peak on a CPU
    assert "smoke: tracking <= 3% of the study" in result["targets"]
    out = capsys.readouterr().out
    assert "implied study" in out and "study projection, 1 run(s) per device" in out


def test_study_workload_counts_every_trained_run_at_its_own_split_and_batch_size():
    work = bench.study_workload("full")
    configs = plan_runs("full")  # every configuration once per seed
    assert len(configs) > len(available_experiments())
    trained = [c for c in configs if c.train.method != "none"]
    assert work["runs"] == len(configs) and work["trained_runs"] == len(trained)
    images = sum(c.train.epochs * split_sizes(c)[0] for c in trained)
    steps = sum(c.train.epochs * math.ceil(split_sizes(c)[0] / c.train.batch_size) for c in trained)
    assert work["total_train_images"] == images == sum(work["train_images"].values())
    assert work["total_train_steps"] == steps == sum(work["train_steps"].values())
    # Study B trains on study2's 1 600 EuroSAT images (160 per class), not the 21 600 pool.
    b = next(c for c in trained if c.id.startswith("B_") and c.data.dataset == "eurosat")
    assert split_sizes(b) == (1600, 300)
    assert [w.steps for w in study_work("full")] == [
        c.train.epochs * math.ceil(split_sizes(c)[0] / c.train.batch_size) for c in trained
    ]


def test_longest_first_packing_fills_the_first_free_slot():
    assert pack_longest_first([5, 4, 3, 3], slots=2) == 8  # 5 | 4; 3 → 4 + 3; 3 → 5 + 3
    assert pack_longest_first([5, 4, 3], slots=1) == 12
    assert pack_longest_first([5, 1, 1], slots=4) == 5


def test_a_sample_by_kind_stands_for_every_run_of_the_study_once():
    works = study_work("full")
    sample, stands_for = sample_by_kind(works)
    assert len(sample) < len(works) and sum(map(len, stands_for)) == len(works)
    pairs = zip(sample, stands_for, strict=True)
    steps = sorted(round(rep.steps * q) for rep, qs in pairs for q in qs)
    assert steps == sorted(w.steps for w in works)
    methods = {(w.config.train.method, w.config.reg.kind, w.config.model.patch_size) for w in works}
    assert {(w.config.train.method, w.config.reg.kind, w.config.model.patch_size)
            for w in sample} == methods  # fmt: skip
