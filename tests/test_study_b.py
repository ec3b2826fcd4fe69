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
                        + rng.normal(0, 0.001), "d_entropy_pct_sel": -2.0 * k + rng.normal(0, 0.5),
                        "embedding_drift_sel": drift, "retention_cifar100": 1 - drift
                        + rng.normal(0, 0.002), "weight_drift_sel": rng.normal(0.1, 0.01),
                    })  # fmt: skip
        for seed in seeds:
            rows.append({"run": f"B_probe_{dataset}", "seed": seed, "dataset": dataset,
                         "method": "linear_probe", "lr": 1e-3, "best_acc": 0.7,
                         "d_entropy_pct_sel": 0.0, "embedding_drift_sel": 0.0,
                         "retention_cifar100": 1.0, "weight_drift_sel": 0.0})  # fmt: skip
    return study_b.grid_frame(pd.DataFrame(rows))


def test_cell_table_is_mean_and_sd_over_seeds_per_dataset_method_lr():
    frame = grid()
    table = study_b.cell_table(frame, ["d_entropy_pct_sel"])
    cell = frame.query("dataset == 'pets' and method == 'lora' and lr == 3e-5")["d_entropy_pct_sel"]
    row = table.loc[("pets", "lora", 3e-5)]
    assert row["seeds"] == 3
    assert row["d_entropy_pct_sel_mean"] == pytest.approx(cell.mean())
    assert row["d_entropy_pct_sel_sd"] == pytest.approx(cell.std(ddof=1))
    assert len(table) == 2 * (2 * 4 + 1)


def test_paired_table_matches_lr_and_seed_within_each_dataset_and_applies_holm():
    frame = grid()
    table = study_b.paired_table(frame, ["d_entropy_pct_sel", "retention_cifar100"])
    assert list(table.index) == [
        ("eurosat", "d_entropy_pct_sel"), ("eurosat", "retention_cifar100"),
        ("pets", "d_entropy_pct_sel"), ("pets", "retention_cifar100"),
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
    signals = ["d_entropy_pct_sel", "embedding_drift_sel", "weight_drift_sel"]
    table = study_b.signal_ranking(frame, "retention_cifar100", signals, resample=None, n_boot=200)
    core = study_b.core(frame)  # probes are reference points, never ranked
    assert table.index[0] == "embedding_drift_sel"
    assert table.loc["embedding_drift_sel", "abs_rho_within_method"] > 0.5
    assert table.loc["weight_drift_sel", "gap_low"] > 0  # pure noise: clearly worse than the best
    expected = scipy.stats.spearmanr(core["d_entropy_pct_sel"], core["retention_cifar100"])
    assert table.loc["d_entropy_pct_sel", "rho"] == pytest.approx(expected.statistic)


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
    frame["cka_mean_sel"] = math.nan
    assert study_b.present(frame, ["cka_mean_sel", "weight_drift_sel", "nope"]) == [
        "weight_drift_sel"
    ]
    assert study_b.retention_columns(frame) == ["retention_cifar100"]


def test_signal_ranking_resamples_cell_means_when_asked():
    frame = grid()
    signals = ["embedding_drift_sel", "weight_drift_sel"]
    by_cell = study_b.signal_ranking(frame, "retention_cifar100", signals, n_boot=200)
    cells = study_b.core(frame).groupby(study_b.CELL)[[*signals, "retention_cifar100"]].mean()
    expected = scipy.stats.spearmanr(cells["embedding_drift_sel"], cells["retention_cifar100"])
    row = by_cell.loc["embedding_drift_sel"]
    assert row["n_units"] == 16 and row["n"] == 48  # 2 datasets × 2 methods × 4 lrs; 3 seeds
    assert row["unit_rho"] == pytest.approx(expected.statistic)
    assert by_cell.loc["embedding_drift_sel", "kind"] == "signal"


def test_signal_ranking_measures_gaps_against_the_best_label_free_signal():
    frame = grid()
    frame["test_acc"] = 1 - frame["retention_cifar100"]  # a perfect reference row
    columns = ["weight_drift_sel", "test_acc"]  # the only signal is noise
    table = study_b.signal_ranking(frame, "retention_cifar100", columns, n_boot=100)
    assert table.index[0] == "test_acc" and table.loc["test_acc", "kind"] == "reference"
    assert table.loc["weight_drift_sel", "gap"] == 0  # the reference of every gap
    assert table.loc["test_acc", "gap"] < 0


def early_frame() -> pd.DataFrame:
    """Four cells of one dataset: two damaged (retention < 0.5), whose epoch-1 drift is high;
    a signed signal that cannot tell them apart."""
    rows = []
    for method, lr, retention, drift, signed in [
        ("full", 1e-5, 0.3, 0.8, 1.0), ("full", 1e-4, 0.1, 0.9, -1.0),
        ("lora", 1e-5, 0.95, 0.1, 1.0), ("lora", 1e-4, 0.9, 0.2, -1.0),
    ]:  # fmt: skip
        for seed in (1, 2):
            rows.append({"run": f"{method}{lr:g}", "seed": seed, "dataset": "eurosat",
                         "method": method, "lr": lr, "retention_cifar100": retention,
                         "embedding_drift_e1": drift + seed / 100,
                         "d_entropy_pct_e1": signed})  # fmt: skip
    return study_b.add_derived(pd.DataFrame(rows))


def test_early_warning_scores_epoch_one_signals_by_cell_level_auc():
    table = study_b.early_warning(early_frame())
    drift, signed = table.loc["embedding_drift_e1"], table.loc["d_entropy_pct_e1"]
    assert drift["n_damaged"] == 2 and drift["n_healthy"] == 2
    assert drift["auc"] == 1.0 and drift["damaged_low"] == 0  # damaged cells drift more
    assert signed["auc"] == 0.5  # each group holds one +1 and one −1
    assert drift["rho"] < -0.8 and drift["n"] == 8


def selection_frame() -> pd.DataFrame:
    """Candidates within 2 points of the best validation accuracy: the one with the least drift
    keeps the most retention; a run 5 points below the best is no candidate."""
    rows = [
        ("full", 1e-4, 0.900, 0.20, 0.9),
        ("full", 1e-5, 0.890, 0.50, 0.5),
        ("lora", 1e-4, 0.885, 0.80, 0.1),
        ("lora", 1e-5, 0.850, 1.00, 0.0),
    ]
    frame = pd.DataFrame(rows, columns=["method", "lr", "best_acc", "retention_cifar100",
                                        "embedding_drift_sel"])  # fmt: skip
    frame["run"], frame["seed"], frame["dataset"] = frame["method"], 7, "pets"
    frame["cka_mean_sel"] = 1 - frame["embedding_drift_sel"]
    return frame


def test_selection_picks_within_the_validation_band_and_scores_regret():
    table = study_b.selection(selection_frame())
    drift = table.loc[("pets", "embedding_drift_sel")]
    assert drift["candidates"] == 3 and drift["cutoff"] == pytest.approx(88.0)
    assert drift["picked"] == "lora/s7" and drift["retention"] == 0.8
    assert drift["oracle"] == 0.8 and drift["regret"] == 0 and drift["range_fraction"] == 1
    assert drift["random"] == pytest.approx((0.2 + 0.5 + 0.8) / 3)
    assert table.loc[("pets", "cka_mean_sel"), "picked"] == "lora/s7"  # high CKA: least change


def test_frontier_flags_the_cells_no_other_cell_beats_on_both_axes():
    frame = selection_frame().rename(columns={"best_acc": "test_acc"})
    cells = study_b.frontier(frame)
    flags = cells["on_frontier"].droplevel("dataset")
    assert flags[("full", 1e-4)] and flags[("lora", 1e-4)] and flags[("lora", 1e-5)]
    assert flags[("full", 1e-5)]  # 0.890/0.5 is beaten by nobody on both axes
    frame.loc[1, "retention_cifar100"] = 0.1  # now lora 1e-4 beats it on both
    assert not study_b.frontier(frame)["on_frontier"].droplevel("dataset")[("full", 1e-5)]


def verdict_frame(lora_sign: float) -> pd.DataFrame:
    """Two datasets × two methods × three lrs × two seeds. Within full FT, Δ entropy falls with
    lr as retention does (ρ > 0); within LoRA Δ entropy moves with ``lora_sign``."""
    rows = []
    for dataset in ("eurosat", "pets"):
        for method in ("full", "lora"):
            for k, lr in enumerate((1e-5, 3e-5, 1e-4)):
                for seed in (7, 11):
                    jitter = seed / 1000
                    sign = 1.0 if method == "full" else lora_sign
                    scale = 1.0 if method == "full" else 0.1
                    rows.append({"run": f"{dataset}{method}{lr:g}", "seed": seed,
                                 "dataset": dataset, "method": method, "lr": lr,
                                 "retention_cifar100": 1 - 0.3 * k - jitter,
                                 "d_entropy_pct_sel": sign * scale * (-k - jitter)
                                 - (method == "full")})  # fmt: skip
    return study_b.add_derived(pd.DataFrame(rows))


def test_rq3_is_judged_within_dataset_and_method_and_a_flipped_sign_is_not_stable():
    same = study_b.verdicts(verdict_frame(lora_sign=1.0))["RQ3"]
    assert same.verdict == "supported" and same.numbers["groups"] == 4
    flipped = study_b.verdicts(verdict_frame(lora_sign=-1.0))["RQ3"]
    assert flipped.verdict == "not stable across configurations"
    assert flipped.numbers["positive"] == 2 and flipped.numbers["negative"] == 2
    assert "eurosat / lora: ρ = -1.00" in flipped.detail


def test_rq3_without_a_powered_group_is_inconclusive_and_says_why():
    few = verdict_frame(1.0).query("lr != 1e-4")  # 4 runs at 2 lrs per group
    verdict = study_b.verdicts(few)["RQ3"]
    assert verdict.verdict == "inconclusive at this n" and "6 runs at 3" in verdict.reason


def test_rq2_is_judged_per_dataset_with_holm_and_shows_the_size_of_the_change():
    frame = verdict_frame(lora_sign=1.0)  # LoRA changes a tenth as much: less negative Δ
    verdict = study_b.verdicts(frame)["RQ2"]
    assert verdict.verdict == "supported" and verdict.n == 12
    assert "eurosat: LoRA − Full FT +" in verdict.detail and "in size |Δ| -" in verdict.detail
    pets = frame["dataset"] == "pets"
    frame.loc[pets & (frame["method"] == "lora"), "d_entropy_pct_sel"] = frame.loc[
        pets & (frame["method"] == "full"), "d_entropy_pct_sel"
    ].to_numpy() + np.tile([0.01, -0.01], 3)  # Pets: no difference
    mixed = study_b.verdicts(frame)["RQ2"]
    assert mixed.verdict == "not stable across configurations"
    assert mixed.numbers["significant"] == 1


def test_analyses_of_a_grid_without_core_runs_or_with_two_runs_are_empty_not_errors():
    frame = grid()
    probes = frame[frame["method"] == "linear_probe"]
    assert (study_b.paired_table(probes, ["d_entropy_pct_sel"])["n"] == 0).all()  # no pairs
    assert study_b.signal_ranking(probes).empty
    assert study_b.selection(probes).empty
    assert study_b.verdicts(probes)["RQ3"].verdict == "inconclusive at this n"
    two = frame[frame["method"] == "full"].head(2)
    ranking = study_b.signal_ranking(two, columns=["embedding_drift_sel"], n_boot=50)
    assert ranking["n_units"].iloc[0] == 1 and np.isnan(ranking["ci_low"].iloc[0])


def test_lora_with_a_frozen_projection_is_its_own_arm_never_pooled_with_lora():
    rows = [
        {"run": "B_eurosat_lora_lr1e-4", "method": "lora", "train_projection": True, "lr": 1e-4},
        {"run": "B_frozen_eurosat_lr1e-4", "method": "lora", "train_projection": False,
         "lr": 1e-4},
        {"run": "B_eurosat_full_lr1e-4", "method": "full", "train_projection": None, "lr": 1e-4},
    ]  # fmt: skip
    frame = study_b.grid_frame(pd.DataFrame(rows))
    assert frame["method"].tolist() == ["lora", "lora_frozen_proj", "full"]
    assert "lora_frozen_proj" not in set(study_b.core(frame)["method"])
