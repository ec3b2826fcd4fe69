from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
import scipy.stats
from statsmodels.stats.multitest import multipletests

from collapse_utils.analysis import stats
from collapse_utils.analysis.stats import (
    anova_by_layer_group,
    bootstrap_mean_ci,
    collapse_onset,
    compare_groups,
    correlation,
    entropy_velocity,
    exact_permutation_p,
    holm,
    layer_groups,
    layer_pooled_test,
    metric_correlations,
    paired,
    paired_layer_test,
    run_level_test,
    seed_level_test,
)

RNG = np.random.default_rng(20240601)
A = RNG.normal(-0.15, 0.85, size=12)
B = RNG.normal(0.67, 1.2, size=36)
LOG_LR = np.log10([1e-6, 5e-6, 1e-5, 5e-5, 1e-4])
D_ENTROPY_LR = np.array([1.45, 0.33, -0.14, -4.19, -10.40])  # report §3.4


def brute_force_p(x, y, method):
    """Share of all orderings of y (itertools) with |r| >= observed |r|."""
    if method == "spearman":
        x, y = scipy.stats.rankdata(x), scipy.stats.rankdata(y)
    orderings = np.array(list(itertools.permutations(y)))
    xs = np.broadcast_to(x, orderings.shape)
    null = np.abs(scipy.stats.pearsonr(xs, orderings, axis=1).statistic)
    observed = abs(scipy.stats.pearsonr(x, y).statistic)
    return np.mean(null >= observed - 1e-12)


# --- two groups --------------------------------------------------------------------------------


def test_compare_groups_matches_scipy_welch_and_mann_whitney():
    result = compare_groups(A, B, n_boot=2000)
    welch = scipy.stats.ttest_ind(A, B, equal_var=False)
    mwu = scipy.stats.mannwhitneyu(A, B)
    assert result.welch_t == pytest.approx(welch.statistic)
    assert result.welch_p == pytest.approx(welch.pvalue)
    assert result.welch_dof == pytest.approx(welch.df)
    assert result.mwu_u == pytest.approx(mwu.statistic)
    assert result.mwu_p == pytest.approx(mwu.pvalue)
    assert (result.n_a, result.n_b) == (12, 36)
    assert result.mean_a == pytest.approx(A.mean())
    assert result.sd_b == pytest.approx(B.std(ddof=1))


def test_cohen_d_is_signed_a_minus_b_over_pooled_sd():
    result = compare_groups(A, B, n_boot=2000)
    pooled = math.sqrt((11 * A.var(ddof=1) + 35 * B.var(ddof=1)) / 46)
    assert result.cohen_d == pytest.approx((A.mean() - B.mean()) / pooled)
    assert result.cohen_d < 0
    # pingouin's ttest reports only the magnitude
    assert pg.ttest(A, B, correction=True)["cohen_d"].iloc[0] == pytest.approx(-result.cohen_d)
    assert compare_groups(B, A, n_boot=2000).cohen_d == pytest.approx(-result.cohen_d)


def test_bootstrap_ci_is_reproducible_with_a_seed_and_changes_with_another():
    first = compare_groups(A, B, n_boot=2000, seed=1)
    again = compare_groups(A, B, n_boot=2000, seed=1)
    other = compare_groups(A, B, n_boot=2000, seed=2)
    assert (first.ci_a, first.ci_b) == (again.ci_a, again.ci_b)
    assert first.ci_a != other.ci_a
    assert first.ci_b != other.ci_b


def test_bootstrap_ci_brackets_the_mean_and_matches_scipy():
    low, high = bootstrap_mean_ci(B, n_boot=2000, rng=5)
    assert low < B.mean() < high
    expected = scipy.stats.bootstrap(
        (B,), np.mean, n_resamples=2000, rng=np.random.default_rng(5)
    ).confidence_interval
    assert (low, high) == pytest.approx((expected.low, expected.high))


def test_paired_matches_scipy_and_reports_both_effect_sizes():
    a, b = A, B[:12]
    result = paired(a, b)
    expected = scipy.stats.ttest_rel(a, b)
    diff = a - b
    assert result.t == pytest.approx(expected.statistic)
    assert result.p == pytest.approx(expected.pvalue)
    assert (result.n, result.dof) == (12, 11)
    assert result.mean_diff == pytest.approx(diff.mean())
    assert result.d_z == pytest.approx(diff.mean() / diff.std(ddof=1))
    assert result.d_z == pytest.approx(result.t / math.sqrt(12))
    d_av = diff.mean() / math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    assert result.cohen_d == pytest.approx(d_av)
    assert abs(result.cohen_d) == pytest.approx(pg.ttest(a, b, paired=True)["cohen_d"].iloc[0])


def test_paired_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="equal lengths"):
        paired(A, B)


def test_missing_values_are_refused_not_dropped():
    with pytest.raises(ValueError, match="NaN"):
        compare_groups([1.0, np.nan, 2.0], B)


# --- correlation -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_correlation_r_and_p_match_scipy(method):
    x, y = B[:20], A.repeat(2)[:20] + B[:20]
    result = correlation(x, y, method)
    expected = (scipy.stats.pearsonr if method == "pearson" else scipy.stats.spearmanr)(x, y)
    assert result.r == pytest.approx(expected.statistic)
    assert result.p == pytest.approx(expected.pvalue)
    assert result.n == 20
    assert result.p_exact is None


@pytest.mark.parametrize("n", [3, 5, 6, 7, 8])
@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_exact_p_equals_brute_force_enumeration(n, method):
    rng = np.random.default_rng(n)
    x = rng.normal(size=n)
    y = 0.8 * x + rng.exponential(size=n)
    result = correlation(x, y, method)
    assert result.p_exact == pytest.approx(brute_force_p(x, y, method))


def test_exact_p_counts_tied_spearman_orderings():
    x = np.array([1.0, 2.0, 2.0, 3.0, 4.0, 4.0])
    y = np.array([1.0, 1.0, 2.0, 3.0, 3.0, 5.0])
    assert exact_permutation_p(x, y, "spearman") == pytest.approx(brute_force_p(x, y, "spearman"))


def test_perfect_rank_correlation_of_five_runs_has_exact_p_two_over_120():
    result = correlation(LOG_LR, D_ENTROPY_LR, "spearman")
    assert result.r == pytest.approx(-1.0)
    assert result.p < 1e-10  # the asymptotic p the report quoted as "< 0.001"
    assert result.p_exact == pytest.approx(2 / 120)


def test_report_lr_pearson_is_reproduced_with_its_exact_p():
    result = correlation(LOG_LR, D_ENTROPY_LR)
    assert result.r == pytest.approx(-0.893, abs=5e-4)
    assert result.p == pytest.approx(0.041, abs=5e-4)
    assert result.p_exact == pytest.approx(brute_force_p(LOG_LR, D_ENTROPY_LR, "pearson"))


def test_exact_p_is_computed_up_to_ten_and_not_above():
    rng = np.random.default_rng(0)
    x = rng.normal(size=11)
    assert correlation(x, x + rng.normal(size=11)).p_exact is None
    assert correlation(x[:8], x[:8] ** 3).p_exact is not None


def test_correlation_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        correlation(A, A, "kendall")


def test_metric_correlations_matches_pairwise_scipy_and_holm():
    rng = np.random.default_rng(3)
    d_entropy = rng.normal(size=15)
    summary = pd.DataFrame(
        {
            "d_entropy_pct": d_entropy,
            "d_erf_pct": d_entropy + 0.3 * rng.normal(size=15),
            "d_gini_pct": -d_entropy + 0.5 * rng.normal(size=15),
            "d_head_diversity_pct": rng.normal(size=15),
            "best_acc": [np.nan] + list(rng.uniform(0.9, 1.0, size=14)),
        }
    )
    result = metric_correlations(summary)
    kept = summary.dropna()
    assert result.n == 14
    expected = scipy.stats.pearsonr(kept["d_entropy_pct"], kept["d_gini_pct"])
    assert result.r.loc["d_entropy_pct", "d_gini_pct"] == pytest.approx(expected.statistic)
    assert result.r.loc["d_gini_pct", "d_entropy_pct"] == pytest.approx(expected.statistic)
    assert result.p.loc["d_entropy_pct", "d_gini_pct"] == pytest.approx(expected.pvalue)
    assert np.allclose(np.diag(result.r), 1.0)
    upper = np.triu_indices(5, k=1)
    raw = result.p.to_numpy()[upper]
    assert np.allclose(result.p_holm.to_numpy()[upper], multipletests(raw, method="holm")[1])


# --- layers and dynamics -----------------------------------------------------------------------


def test_layer_groups_split_into_contiguous_near_equal_thirds():
    assert layer_groups(12) == ((1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12))
    assert layer_groups(10) == ((1, 2, 3, 4), (5, 6, 7), (8, 9, 10))
    assert layer_groups(3) == ((1,), (2,), (3,))
    with pytest.raises(ValueError):
        layer_groups(2)


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # inside pingouin 0.7 on pandas 3
def test_anova_by_layer_group_matches_pingouin():
    values = RNG.normal(size=12)
    result = anova_by_layer_group(values)
    frame = pd.DataFrame({"value": values, "group": np.repeat(["early", "mid", "late"], 4)})
    expected = pg.anova(data=frame, dv="value", between="group").iloc[0]
    assert result.f == pytest.approx(expected["F"])
    assert result.p == pytest.approx(expected["p_unc"])
    assert (result.dof_between, result.dof_within) == (2, 9)
    assert result.means[2] == pytest.approx(values[8:].mean())
    assert result.stds[0] == pytest.approx(values[:4].std(ddof=1))


def test_collapse_onset_is_first_fraction_one_percent_below_start():
    fraction = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert collapse_onset(fraction, [3.7, 3.69, 3.66, 3.5, 3.4]) == 0.5
    assert collapse_onset(fraction, [1.0, 0.98, 1.0, 0.95, 0.9]) == 0.25
    assert collapse_onset(fraction, [1.0, 0.98, 1.0, 0.95, 0.9], threshold=0.04) == 0.75


def test_collapse_onset_is_none_when_never_reached():
    fraction = [0.0, 0.5, 1.0]
    assert collapse_onset(fraction, [3.7, 3.68, 3.67]) is None
    assert collapse_onset(fraction, [3.7, 3.8, 3.9]) is None  # entropy increases
    assert collapse_onset([0.0], [3.7]) is None


def test_entropy_velocity_is_rate_per_unit_of_training():
    result = entropy_velocity([0.0, 0.25, 0.5, 1.0], [4.0, 3.9, 3.4, 3.3])
    assert result.rate == pytest.approx((-0.4, -2.0, -0.2))
    assert result.midpoints == pytest.approx((0.125, 0.375, 0.75))
    assert result.max_abs_rate == pytest.approx(2.0)
    assert result.at_fraction == pytest.approx(0.375)
    with pytest.raises(ValueError):
        entropy_velocity([0.0, 0.0], [1.0, 1.0])


def test_holm_matches_statsmodels():
    pvalues = [0.01, 0.04, 0.03, 0.005, 0.5, 0.2, 0.04]
    assert np.allclose(holm(pvalues), multipletests(pvalues, method="holm")[1])


def test_holm_keeps_nan_out_of_the_count():
    adjusted = holm([0.01, np.nan, 0.03])
    assert np.isnan(adjusted[1])
    assert adjusted[[0, 2]] == pytest.approx(multipletests([0.01, 0.03], method="holm")[1])


# --- units of analysis -------------------------------------------------------------------------


def layer_frame(values: dict[tuple[str, int], list[float]]) -> pd.DataFrame:
    frame = pd.DataFrame.from_dict(values, orient="index")
    frame.index = pd.MultiIndex.from_tuples(list(values), names=["run", "seed"])
    frame.columns = pd.RangeIndex(1, frame.shape[1] + 1, name="layer")
    return frame


FULL = layer_frame({("E2", 42): list(A)})
LORA = layer_frame({("E4", 42): list(B[:12]), ("E5", 42): list(B[12:24]), ("E6", 42): list(B[24:])})


def test_layer_pooled_test_pools_every_layer_of_every_run():
    result = layer_pooled_test(FULL, LORA, n_boot=1000)
    assert result.unit == "layer"
    assert (result.n_a, result.n_b) == (12, 36)
    expected = scipy.stats.ttest_ind(A, B, equal_var=False)
    assert result.result.welch_t == pytest.approx(expected.statistic)
    assert "independent" in result.supports and "inflated" in result.supports


def summary_frame(rows):
    return pd.DataFrame(rows, columns=["run", "seed", "d_entropy_pct"])


def test_run_level_test_uses_one_seed_averaged_value_per_run():
    full = summary_frame([("E2", 1, -0.2), ("E2", 2, -0.4), ("E3", 1, -1.8), ("A1", 1, -4.0)])
    lora = summary_frame([("E4", 1, 1.0), ("E5", 1, 0.6), ("E6", 1, 0.4), ("E7", 1, -0.7)])
    result = run_level_test(full, lora, n_boot=1000)
    assert result.unit == "run"
    assert (result.n_a, result.n_b) == (3, 4)
    expected = scipy.stats.ttest_ind([-4.0, -0.3, -1.8], [1.0, 0.6, 0.4, -0.7], equal_var=False)
    assert result.result.welch_p == pytest.approx(expected.pvalue)
    assert "per run" in result.supports


def test_seed_level_test_needs_several_seeds_and_says_what_it_replicates():
    one_seed = summary_frame([("E2", 1, -0.2), ("E3", 1, -1.8)])
    with pytest.raises(ValueError, match="several seeds"):
        seed_level_test(one_seed, one_seed)
    full = summary_frame([("E2", s, v) for s, v in enumerate([-0.2, -0.4, -0.1, -0.3])])
    lora = summary_frame([("E5", s, v) for s, v in enumerate([0.5, 0.7, 0.6, 0.4])])
    result = seed_level_test(full, lora, n_boot=1000)
    assert (result.unit, result.n_a, result.n_b) == ("seed", 4, 4)
    assert "replicated comparison of these two configurations" in result.supports
    pooled = seed_level_test(pd.concat([full, one_seed]), lora, n_boot=1000)
    assert pooled.n_a == 6 and "clustered" in pooled.supports


def test_paired_layer_test_pairs_layers_and_averages_seeds():
    seed1, seed2 = A + 1.0 + B[:12] / 10, A + 0.6 + B[12:24] / 10
    reg = layer_frame({("R1", 1): list(seed1), ("R1", 2): list(seed2)})
    result = paired_layer_test(reg, FULL)
    assert (result.unit, result.n_a) == ("layer_paired", 12)
    expected = scipy.stats.ttest_rel((seed1 + seed2) / 2, A)
    assert result.result.t == pytest.approx(expected.statistic)
    assert result.result.mean_diff == pytest.approx(0.8 + B[:24].mean() / 10)
    assert "not independent replicates" in result.supports


def test_groups_too_small_for_a_bootstrap_get_no_confidence_interval():
    result = compare_groups([0.1, 0.5], [1.0, 1.2, 0.9, 1.4, 1.1], n_boot=200, seed=0)
    assert all(np.isnan(result.ci_a))
    assert not any(np.isnan(result.ci_b))


def test_unit_tests_refuse_missing_values_instead_of_dropping_them():
    layers = pd.DataFrame([[0.1, np.nan, 0.3]], index=["E2"])
    with pytest.raises(ValueError, match="NaN"):
        layer_pooled_test(layers, pd.DataFrame([[0.2, 0.4, 0.5]], index=["E5"]))


# --- matched grids (study B) -----------------------------------------------------------------


def _grid() -> pd.DataFrame:
    """Two datasets × three lrs × two seeds × {full, lora}; full is lower by a known amount."""
    rng = np.random.default_rng(3)
    rows = []
    for dataset in ("eurosat", "pets"):
        for log_lr in (-6, -5, -4):
            for seed in (7, 11):
                base = -2.0 * (log_lr + 6) + rng.normal(0, 0.3)
                for method, shift in (("full", -1.0), ("lora", 0.0)):
                    rows.append({"dataset": dataset, "log10_lr": log_lr, "seed": seed,
                                 "method": method, "d_entropy": base + shift + rng.normal(0, .1),
                                 "retention": 1 + 0.1 * base + rng.normal(0, .05)})  # fmt: skip
    return pd.DataFrame(rows)


def test_paired_matched_pairs_cells_and_agrees_with_scipy():
    grid = _grid()
    result = stats.paired_matched(grid, ["dataset", "log10_lr", "seed"], "method", "full",
                                  "lora", "d_entropy")  # fmt: skip
    wide = grid.pivot(index=["dataset", "log10_lr", "seed"], columns="method", values="d_entropy")
    diff = wide["full"] - wide["lora"]
    assert result["n"] == 12 and result["diff"] == pytest.approx(diff.mean())
    assert result["p_t"] == pytest.approx(scipy.stats.ttest_rel(wide["full"], wide["lora"]).pvalue)
    assert result["p_wilcoxon"] == pytest.approx(scipy.stats.wilcoxon(diff).pvalue)
    assert result["d_z"] == pytest.approx(diff.mean() / diff.std(ddof=1))


def test_paired_matched_refuses_ambiguous_cells_and_handles_one_pair():
    grid = _grid()
    with pytest.raises(ValueError, match="several method rows"):
        stats.paired_matched(grid, ["dataset", "log10_lr"], "method", "full", "lora", "d_entropy")
    one = grid[(grid["dataset"] == "pets") & (grid["log10_lr"] == -6) & (grid["seed"] == 7)]
    result = stats.paired_matched(one, ["dataset", "log10_lr", "seed"], "method", "full", "lora",
                                  "d_entropy")  # fmt: skip
    assert result["n"] == 1 and math.isnan(result["p_t"]) and math.isnan(result["p_wilcoxon"])


def test_dose_response_is_spearman_over_lrs_and_seeds():
    full = _grid().query("method == 'full' and dataset == 'eurosat'")
    result = stats.dose_response(full, "log10_lr", "d_entropy")
    expected = scipy.stats.spearmanr(full["log10_lr"], full["d_entropy"])
    assert result["n"] == 6 and result["rho"] == pytest.approx(expected.statistic)
    assert result["rho"] < 0
    assert result["p"] == pytest.approx(expected.pvalue)


def test_predictor_ranking_puts_the_informative_signal_first_with_cis():
    grid = _grid()
    grid["noise"] = np.random.default_rng(0).normal(size=len(grid))
    table = stats.predictor_ranking(grid, "retention", ["noise", "d_entropy"],
                                    within=["dataset", "method"], n_boot=300)  # fmt: skip
    assert list(table.index) == ["d_entropy", "noise"]
    best = table.loc["d_entropy"]
    assert best["rho"] == pytest.approx(
        scipy.stats.spearmanr(grid["d_entropy"], grid["retention"]).statistic
    )
    assert best["ci_low"] <= abs(best["rho"]) <= best["ci_high"] and best["n"] == 24
    assert 0 < best["abs_rho_within"] <= 1
    assert best["gap"] == 0 and best["gap_low"] <= 0 <= best["gap_high"]
    noise = table.loc["noise"]
    assert noise["gap"] == pytest.approx(abs(best["rho"]) - abs(noise["rho"]))
    assert 0 < noise["gap_low"] <= noise["gap"] <= noise["gap_high"]  # the gap is real


def test_predictor_ranking_scores_every_predictor_on_the_same_runs():
    grid = _grid()
    grid["cka"] = -grid["d_entropy"]
    grid.loc[:4, "cka"] = np.nan  # a signal not measured on five runs
    table = stats.predictor_ranking(grid, "retention", ["d_entropy", "cka"], n_boot=50)
    assert set(table["n"]) == {len(grid) - 5}
    assert table.loc["cka", "rho"] == pytest.approx(-table.loc["d_entropy", "rho"])
    assert math.isnan(table.loc["cka", "abs_rho_within"])  # no within groups asked
