from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from collapse_utils.analysis import stat_tables as tables
from collapse_utils.analysis.results import (
    histories_of,
    per_layer_delta,
    per_layer_final,
    run_summary,
)
from collapse_utils.analysis.stats import holm, metric_correlations
from tests.fake_records import (
    FULL_CHANGE,
    LAYERS,
    LORA_CHANGES,
    LR_RUNS,
    METHOD_RUNS,
    START,
    history,
    study_tables,
)


@pytest.fixture(scope="module")
def runs():
    return study_tables()


def compare_methods(summary, delta):
    return tables.full_vs_lora_comparisons(summary, delta, METHOD_RUNS, "eurosat", n_boot=200)


def test_trained_drops_baselines_and_histories_of_keeps_the_requested_order(runs):
    assert "E1_eurosat" not in {h.id for h in runs["trained"]}
    assert [h.id for h in histories_of(runs["trained"], ["E5", "missing", "E2"])] == ["E5", "E2"]


def test_change_from_start_is_the_percent_change_and_nan_from_zero():
    np.testing.assert_allclose(tables.change_from_start(np.array([2.0, 3.0, 1.0])), [0, 50, -50])
    assert np.isnan(tables.change_from_start(np.array([0.0, 1.0]))).all()


def test_cell_is_nan_for_a_missing_row_or_an_empty_table():
    table = pd.DataFrame({"p": [0.5]}, index=["a"])
    assert tables.cell(table, "a", "p") == 0.5
    assert math.isnan(tables.cell(table, "b", "p"))
    assert math.isnan(tables.cell(pd.DataFrame(), "a", "p"))


def test_full_vs_lora_pools_eurosat_layers_and_tests_runs_of_both_datasets(runs):
    comparisons, notes = compare_methods(runs["summary"], runs["delta"])
    assert set(comparisons) == {"layer", "run"}
    assert "Seed-level" in notes[0]
    layer = comparisons["layer"].result
    assert (layer.n_a, layer.n_b) == (LAYERS, 3 * LAYERS)  # E2 vs E4–E6
    assert layer.mean_a == pytest.approx(100 * np.mean(FULL_CHANGE))
    run = comparisons["run"].result
    assert (run.n_a, run.n_b) == (2, 4)  # E2, E3 vs E4–E7
    table = tables.unit_comparison_table(comparisons)
    assert list(table.index) == ["layer", "run"]
    assert table.loc["layer", "welch_t"] < 0
    expected = holm([*table["welch_p"], *table["mwu_p"]])
    assert table["welch_p_holm"].tolist() == pytest.approx(expected[:2])
    assert table["mwu_p_holm"].tolist() == pytest.approx(expected[2:])
    markdown = tables.supports_markdown(comparisons)
    assert markdown.count("\n- ") == 1 and "layers pooled" in markdown


def test_full_vs_lora_says_why_tests_are_missing(runs):
    only_e2 = runs["summary"][runs["summary"]["run"].isin(["E2", "E5"])]
    comparisons, notes = compare_methods(only_e2, runs["delta"])
    assert set(comparisons) == {"layer"}
    assert any("Run-level test not run" in n for n in notes)
    assert tables.unit_comparison_table({}).empty


def test_seed_level_test_runs_when_a_run_has_several_seeds(runs):
    extra = [
        history("E2", "full_vs_lora", [c * 2 for c in FULL_CHANGE], seed=7),
        history("E5", "full_vs_lora", LORA_CHANGES["E4"], method="lora", seed=7),
    ]
    all_runs = runs["all"] + extra
    comparisons, notes = compare_methods(
        run_summary(all_runs), per_layer_delta(tables.trained(all_runs))
    )
    assert comparisons["seed"].result.n_a == 2 and comparisons["seed"].result.n_b == 4
    assert not notes


def test_lr_sweep_adds_the_reference_run_and_claims_rest_on_exact_p(runs):
    points = tables.lr_sweep_points(runs["summary"], LR_RUNS)
    assert list(points.index) == ["A1_lr1e-6", "A1_lr1e-5", "A1_lr1e-4", "E2"]
    assert points["log10_lr"].tolist() == pytest.approx([-6, -5, -4, -3])
    table = tables.lr_correlations(points)
    assert table.loc["spearman", "r"] == pytest.approx(-1.0)
    assert table.loc["spearman", "p_exact"] == pytest.approx(2 / math.factorial(4))
    assert (table["p_used"] == "exact").all()
    assert table["p_claim"].tolist() == table["p_exact"].tolist()
    assert table["p_claim_holm"].tolist() == pytest.approx(holm(table["p_claim"]))
    assert tables.lr_correlations(points.iloc[:2]).empty


def test_regularizer_tests_pair_layers_with_the_reference(runs):
    table = tables.regularizer_tests(runs["summary"], runs["delta"], "E2")
    assert list(table.index) == ["R1_apr0.1", "R2_entfloor0.1"]  # weight decay has no regularizer
    apr = table.loc["R1_apr0.1"]
    assert apr["n_layers"] == LAYERS and apr["mean_diff"] == pytest.approx(1.0)
    assert apr["d_av"] > 0
    assert table["p_holm"].tolist() == pytest.approx(holm(table["p"]))
    assert "pairs layer l" in tables.paired_supports(runs["summary"], runs["delta"], "E2").lower()
    no_reference = runs["delta"].drop("E2", level="run")
    assert tables.regularizer_tests(runs["summary"], no_reference, "E2").empty


def test_regularizer_tests_on_final_entropy_pair_nats_as_the_report_did(runs):
    final = per_layer_final(runs["trained"])
    assert final.loc[("E2", 42)].tolist() == pytest.approx(
        [s * (1 + c) for s, c in zip(START, FULL_CHANGE, strict=True)]
    )
    table = tables.regularizer_tests(runs["summary"], final, "E2")
    apr = table.loc["R1_apr0.1"]  # every layer's change is 0.01 above E2's
    assert apr["mean_diff"] == pytest.approx(0.01 * np.mean(START))
    assert (
        apr["p"]
        != tables.regularizer_tests(runs["summary"], runs["delta"], "E2").loc["R1_apr0.1", "p"]
    )  # a different statistic, as the reproduction check must know


def test_layer_anova_table_has_group_means_and_skips_missing_runs(runs):
    table = tables.layer_anova_table(runs["delta"], runs=("E2", "missing"))
    assert list(table.index) == ["E2"]
    e2 = table.loc["E2"]
    assert (e2["early_layers"], e2["late_layers"]) == ("L1–2", "L5–6")
    assert e2["late_mean"] == pytest.approx(100 * np.mean(FULL_CHANGE[4:]))
    assert e2["dof"] == "2, 3"
    assert e2["p_holm"] == pytest.approx(e2["p"])


def test_dynamics_table_finds_onset_only_where_entropy_falls_far_enough(runs):
    table = tables.dynamics_table(runs["trained"]).xs(42, level="seed")
    e2_mean = np.mean([s * (1 + c) for s, c in zip(START, FULL_CHANGE, strict=True)])
    assert table.loc["E2", "onset_fraction"] == 0.5  # halfway, entropy is already 1.4% lower
    assert table.loc["E2", "d_entropy_pct"] == pytest.approx(100 * (e2_mean / np.mean(START) - 1))
    assert math.isnan(table.loc["E5", "onset_fraction"])
    assert table.loc["A1_lr1e-6", "max_abs_velocity"] == pytest.approx(0.001 * np.mean(START))
    assert tables.dynamics_table(runs["all"][:1]).empty  # a baseline has a single eval


def test_convergence_table_flags_runs_whose_late_accuracy_is_flat(runs):
    table = tables.convergence_table(runs["trained"]).xs(42, level="seed")
    assert table.loc["A1_lr1e-6", "converged"]
    assert not table.loc["E2", "converged"]
    assert table.loc["E2", "late_std"] == pytest.approx(np.std([0.5, 0.8, 0.9]))


def test_correlation_pairs_lists_each_distinct_pair_once(runs):
    matrix = metric_correlations(run_summary(runs["trained"]))
    pairs = tables.correlation_pairs(matrix)
    assert len(pairs) == 10
    assert pairs.loc[("d_entropy_pct", "d_erf_pct"), "r"] == pytest.approx(1.0)
    assert pairs.loc[("d_entropy_pct", "d_gini_pct"), "r"] < -0.9
