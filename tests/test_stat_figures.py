from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from collapse_utils.analysis import stat_tables as tables
from collapse_utils.analysis.results import histories_of, per_layer_delta, run_summary
from collapse_utils.analysis.stats import metric_correlations
from collapse_utils.book import stat_figures
from tests.fake_records import (
    FULL_CHANGE,
    LR_RUNS,
    METHOD_RUNS,
    START,
    history,
    study_tables,
)


@pytest.fixture(scope="module")
def runs():
    return study_tables()


def line(ax, label):
    return next(line for line in ax.lines if line.get_label() == label)


def test_fig10_heatmap_shows_the_per_layer_changes(runs):
    delta = runs["delta"]
    fig = stat_figures.fig10_per_layer_heatmap(delta)
    ax, colorbar = fig.axes
    np.testing.assert_allclose(ax.images[0].get_array(), delta.to_numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == list(delta.index.get_level_values(0))
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(1, 7)]
    assert len(ax.texts) == delta.size
    assert ax.images[0].norm.vmin == -ax.images[0].norm.vmax  # centred on no change
    assert "Entropy" in colorbar.get_ylabel()


def test_fig10_labels_seeds_when_a_run_has_several(runs):
    extra = history("E2", "full_vs_lora", FULL_CHANGE, seed=7)
    delta = per_layer_delta([*runs["trained"], extra])
    labels = [
        t.get_text() for t in stat_figures.fig10_per_layer_heatmap(delta).axes[0].get_yticklabels()
    ]
    assert "E2/s7" in labels and "E2/s42" in labels


def test_fig11_plots_cis_lr_regression_and_effect_sizes(runs):
    comparisons, _ = tables.full_vs_lora_comparisons(
        runs["summary"], runs["delta"], METHOD_RUNS, "eurosat", n_boot=200
    )
    points = tables.lr_sweep_points(runs["summary"], LR_RUNS)
    lr_table = tables.lr_correlations(points)
    regs = tables.regularizer_tests(runs["summary"], runs["delta"], "E2")
    fig = stat_figures.fig11_statistical_summary(comparisons, points, lr_table, regs, "E2")
    ci_ax, lr_ax, effect_ax = fig.axes
    means = [c.lines[0].get_ydata()[0] for c in ci_ax.containers]
    layer = comparisons["layer"].result
    assert means[:2] == pytest.approx([layer.mean_a, layer.mean_b])
    assert len(ci_ax.containers) == 2 * len(comparisons)
    np.testing.assert_allclose(
        lr_ax.collections[0].get_offsets(), points[["log10_lr", "d_entropy_pct"]].to_numpy()
    )
    assert "Spearman" in lr_ax.texts[-1].get_text()
    assert [p.get_width() for p in effect_ax.patches] == pytest.approx(regs["d_av"].tolist())
    assert [t.get_text() for t in effect_ax.get_yticklabels()] == list(regs.index)


def test_fig11_says_which_panels_have_no_data():
    empty = pd.DataFrame()
    fig = stat_figures.fig11_statistical_summary({}, empty, empty, empty, "E2")
    assert len(fig.axes) == 3
    assert all(ax.texts and not ax.lines for ax in fig.axes)


def test_fig12_plots_velocity_onset_and_co_evolution(runs):
    chosen = histories_of(runs["trained"], ["E2", "E5"])
    fig = stat_figures.fig12_training_dynamics(chosen)
    velocity_ax, entropy_ax, erf_ax, gini_ax = fig.axes
    e2 = line(entropy_ax, "E2")
    np.testing.assert_allclose(e2.get_xdata(), [0.0, 0.5, 1.0])
    e2_mean = np.mean([s * (1 + c) for s, c in zip(START, FULL_CHANGE, strict=True)])
    assert e2.get_ydata()[-1] == pytest.approx(100 * (e2_mean / np.mean(START) - 1))
    onsets = [ln for ln in entropy_ax.lines if ln.get_marker() == "x"]
    assert len(onsets) == 1 and onsets[0].get_xdata()[0] == 0.5  # only E2 collapses
    rate = line(velocity_ax, "E2").get_ydata()
    assert rate == pytest.approx([e2_mean - np.mean(START)] * 2)  # nats per unit of training
    np.testing.assert_allclose(line(erf_ax, "E5").get_xdata(), line(erf_ax, "E5").get_ydata())
    assert gini_ax.get_ylabel() == "Δ Gini (%)"


def test_fig13_shows_r_with_p_and_holm_in_every_off_diagonal_cell(runs):
    matrix = metric_correlations(run_summary(runs["trained"]))
    fig = stat_figures.fig13_metric_correlations(matrix)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), matrix.r.to_numpy())
    assert len(ax.texts) == 5 * 4
    assert all("r=" in t.get_text() and "Holm" in t.get_text() for t in ax.texts)
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "Δ Entropy (%)"
    assert f"{matrix.n} runs" in ax.get_title()


def test_fig14_has_one_panel_per_family_and_a_line_per_run(runs):
    fig = stat_figures.fig14_convergence(runs["trained"])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["full vs lora", "lr sweep", "regularization"]
    lr_ax = fig.axes[1]
    assert len(lr_ax.lines) == 3
    flat = line(lr_ax, "A1_lr1e-6")  # one seed: the run id, as on every figure
    assert list(flat.get_xdata()) == [1, 2, 3] and list(flat.get_ydata()) == [20, 20, 20]  # %


def test_fig14_labels_each_seed_of_a_run_with_several(runs):
    extra = history("E2", "full_vs_lora", FULL_CHANGE, seed=7, accuracies=(0.1, 0.2, 0.3))
    fig = stat_figures.fig14_convergence([*runs["trained"], extra])
    assert {ln.get_label() for ln in fig.axes[0].lines} >= {"E2/s7", "E2/s42", "E3"}
    assert list(line(fig.axes[0], "E2/s7").get_ydata()) == pytest.approx([10, 20, 30])  # %


def test_fig16_dashboard_has_six_panels_with_the_runs_changes(runs):
    points = tables.lr_sweep_points(runs["summary"], LR_RUNS)
    fig = stat_figures.fig16_dashboard(runs["summary"], runs["delta"], METHOD_RUNS, points)
    assert len(fig.axes) == 6
    bars = fig.axes[0]
    trained = run_summary(runs["trained"]).set_index("run").sort_index()
    assert [p.get_width() for p in bars.patches] == pytest.approx(trained["d_entropy_pct"].tolist())
    assert [t.get_text() for t in bars.get_yticklabels()] == list(trained.index)
    per_layer = fig.axes[4]
    assert {ln.get_label() for ln in per_layer.lines} >= {"Full FT (2 runs)", "LoRA (4 runs)"}
    sweep = fig.axes[5].lines[0]
    assert list(sweep.get_xdata()) == pytest.approx([-6, -5, -4, -3])
