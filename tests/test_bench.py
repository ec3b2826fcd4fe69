from __future__ import annotations

import json
import math

import torch

import bench
from collapse_utils.config import available_experiments, plan_runs
from collapse_utils.storage import verify


def _positive_numbers(mapping: dict) -> bool:
    return all(isinstance(v, int | float) and v > 0 and math.isfinite(v) for v in mapping.values())


def test_quick_cpu_benchmark_writes_well_formed_json(tmp_path, capsys):
    argv = ["--quick", "--device", "cpu", "--size", "smoke", "--out", str(tmp_path)]
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
    assert "implied study" in capsys.readouterr().out


def test_study_workload_is_epochs_times_train_split_of_every_trained_run():
    work = bench.study_workload("full")
    configs = plan_runs("full")  # every configuration once per seed
    assert len(configs) > len(available_experiments())
    trained = [c for c in configs if c.train.method != "none"]
    expected = sum(
        c.train.epochs * round(bench.POOL_SIZES[c.data.dataset] * (1 - c.data.val_fraction))
        for c in trained
    )
    assert work["runs"] == len(configs) and work["trained_runs"] == len(trained)
    assert work["total_train_images"] == expected == sum(work["train_images"].values())
    apr_cached = [c for c in trained if c.reg.kind == "apr" and c.reg.reference == "cache"]
    assert work["train_images"]["ours_apr_cache"] == sum(
        c.train.epochs * round(bench.POOL_SIZES[c.data.dataset] * (1 - c.data.val_fraction))
        for c in apr_cached
    )
