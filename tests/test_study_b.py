"""Study B's grid analyses (analysis.study_b) on hand-made run-level tables, against scipy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from collapse_utils.analysis import study_b
from collapse_utils.analysis.stats import holm

LRS = (3e-6, 1e-5, 3e-5, 1e-4)


def grid(seeds=(7, 11, 19)) -> pd.DataFrame:
    """Two datasets × {full, lora} × four lrs × seeds, plus a linear probe: full loses more
    retention the higher its lr; entropy falls with lr for both methods alike."""
    rng = np.random.default_rng(0)
    rows = []
    for dataset in ("eurosat", "pets"):
        for method in ("full", "lora"):
            for k, lr in enumerate(LRS):
                for seed in seeds:
                    drift = (0.1 if method == "full" else 0.02) * (k + 1) + rng.normal(0, 0.005)
                    rows.append({
                        "run": f"B_{dataset}_{method}_lr{lr:g}", "seed": seed, "dataset": dataset,
                        "method": method, "lr": lr, "best_acc": 0.8 + 0.02 * k - 0.05 * (k == 3)
                        + rng.normal(0, 0.001), "d_entropy_pct": -2.0 * k + rng.normal(0, 0.5),
                        "embedding_drift_f": drift, "retention_cifar100": 1 - drift
                        + rng.normal(0, 0.002), "weight_drift_f": rng.normal(0.1, 0.01),
                    })  # fmt: skip
        for seed in seeds:
            rows.append({"run": f"B_probe_{dataset}", "seed": seed, "dataset": dataset,
                         "method": "linear_probe", "lr": 1e-3, "best_acc": 0.7,
                         "d_entropy_pct": 0.0, "embedding_drift_f": 0.0,
                         "retention_cifar100": 1.0, "weight_drift_f": 0.0})  # fmt: skip
    return study_b.grid_frame(pd.DataFrame(rows))


def test_cell_table_is_mean_and_sd_over_seeds_per_dataset_method_lr():
    frame = grid()
    table = study_b.cell_table(frame, ["d_entropy_pct"])
    cell = frame.query("dataset == 'pets' and method == 'lora' and lr == 3e-5")["d_entropy_pct"]
    row = table.loc[("pets", "lora", 3e-5)]
    assert row["seeds"] == 3
    assert row["d_entropy_pct_mean"] == pytest.approx(cell.mean())
    assert row["d_entropy_pct_sd"] == pytest.approx(cell.std(ddof=1))
    assert len(table) == 2 * (2 * 4 + 1)


def test_paired_table_matches_lr_and_seed_within_each_dataset_and_applies_holm():
    frame = grid()
    table = study_b.paired_table(frame, ["d_entropy_pct", "retention_cifar100"])
    assert list(table.index) == [
        ("eurosat", "d_entropy_pct"), ("eurosat", "retention_cifar100"),
        ("pets", "d_entropy_pct"), ("pets", "retention_cifar100"),
    ]  # fmt: skip
    euro = frame[frame["dataset"] == "eurosat"]
    wide = euro.pivot_table(index=["lr", "seed"], columns="method", values="retention_cifar100")
    wide = wide.dropna(subset=["full", "lora"])
    row = table.loc[("eurosat", "retention_cifar100")]
    assert row["n"] == 12
    assert row["p_t"] == pytest.approx(scipy.stats.ttest_rel(wide["full"], wide["lora"]).pvalue)
    assert row["diff"] < 0  # full FT retains less at matched lr and seed
    assert list(table["p_t_holm"]) == pytest.approx(list(holm(table["p_t"].to_numpy())))


def test_dose_table_is_spearman_against_log_lr_for_methods_with_several_lrs():
    frame = grid()
    table = study_b.dose_table(frame, ["retention_cifar100"])
    assert "linear_probe" not in table.index.get_level_values("method")  # one lr only
    runs = frame.query("dataset == 'pets' and method == 'full'")
    expected = scipy.stats.spearmanr(np.log10(runs["lr"]), runs["retention_cifar100"])
    row = table.loc[("pets", "full", "retention_cifar100")]
    assert row["n"] == 12 and row["rho"] == pytest.approx(expected.statistic) and row["rho"] < 0


def test_signal_ranking_puts_embedding_drift_first_and_reports_within_groups():
    frame = grid()
    signals = ["d_entropy_pct", "embedding_drift_f", "weight_drift_f"]
    table = study_b.signal_ranking(frame, "retention_cifar100", signals, n_boot=200)
    assert table.index[0] == "embedding_drift_f"
    assert table.loc["embedding_drift_f", "abs_rho_within_method"] > 0.5
    assert table.loc["weight_drift_f", "gap_low"] > 0  # pure noise: clearly worse than the best
    expected = scipy.stats.spearmanr(frame["d_entropy_pct"], frame["retention_cifar100"])
    assert table.loc["d_entropy_pct", "rho"] == pytest.approx(expected.statistic)


def test_operating_point_is_the_lr_with_the_best_mean_validation_accuracy():
    frame = grid()
    points = study_b.operating_points(frame, ["retention_cifar100"])
    assert points.loc[("eurosat", "full"), "lr"] == 3e-5  # the best mean accuracy, not the last
    cell = frame.query("dataset == 'eurosat' and method == 'full' and lr == 3e-5")
    assert points.loc[("eurosat", "full"), "retention_cifar100"] == pytest.approx(
        cell["retention_cifar100"].mean()
    )
    assert points.loc[("pets", "linear_probe"), "lr"] == 1e-3


def test_present_columns_skip_signals_no_run_measured():
    frame = grid()
    frame["cka_mean_f"] = math.nan
    assert study_b.present(frame, ["cka_mean_f", "weight_drift_f", "nope"]) == ["weight_drift_f"]
    assert study_b.retention_columns(frame) == ["retention_cifar100"]
