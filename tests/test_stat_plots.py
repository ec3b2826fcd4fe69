from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from collapse_utils.analysis.results import per_layer_delta, run_summary
from collapse_utils.analysis.stats import holm, metric_correlations
from collapse_utils.book import stat_plots as sp
from collapse_utils.config import DataSpec, LoraSpec, RegSpec, RunConfig, TrainSpec
from collapse_utils.run_record import EpochRecord, EvalRecord, RunRecord, ZeroShotRecord

LAYERS = 6
START = [2.0 + 0.1 * layer for layer in range(LAYERS)]


def history(
    run: str,
    family: str,
    change: list[float],
    method: str = "full",
    dataset: str = "eurosat",
    lr: float = 1e-3,
    reg: RegSpec | None = None,
    seed: int = 42,
    accuracies: tuple[float, ...] = (0.5, 0.8, 0.9),
) -> RunRecord:
    """A history whose entropy moves linearly from START to START·(1 + change) over 3 evals;
    ERF tracks entropy, Gini is its inverse, head diversity drifts with a run-specific slope."""
    config = RunConfig(
        id=run,
        family=family,
        seed=seed,
        data=DataSpec(dataset=dataset),
        train=TrainSpec(method=method, lr=None if method == "none" else lr),
        lora=LoraSpec(rank=8),
        reg=reg or RegSpec(),
    )
    fractions = [0.0] if method == "none" else [0.0, 0.5, 1.0]
    slope = 0.3 + 0.1 * (len(run) % 5)
    evals = []
    for fraction in fractions:
        entropy = [s * (1 + c * fraction) for s, c in zip(START, change, strict=True)]
        evals.append(
            {
                "step": int(40 * fraction),
                "epoch": 3 * fraction,
                "fraction": fraction,
                "train_loss": 1.0,
                "metrics": {
                    "entropy": entropy,
                    "erf": [e / 4 for e in entropy],
                    "gini": [1 / e for e in entropy],
                    "head_diversity": [0.1 * (1 + slope * c * fraction) for c in change],
                },
                "kl_to_initial": [0.0] * LAYERS,
            }
        )
    trained = method != "none"
    return RunRecord(
        id=run,
        family=family,
        description="",
        profile="smoke",
        seed=seed,
        config=config.to_dict(),
        config_hash=config.config_hash(),
        versions={},
        device="cpu",
        steps_per_epoch=10,
        total_steps=40,
        status="complete",
        evals=[EvalRecord(**e) for e in evals],
        epochs=[
            EpochRecord(epoch=i + 1, step=10 * (i + 1), train_loss=1.0, val_acc=acc,
                        samples_per_s=1.0)  # fmt: skip
            for i, acc in enumerate(accuracies if trained else ())
        ],
        best_val_acc=max(accuracies) if trained else None,
        final_val_acc=accuracies[-1] if trained else None,
        zeroshot={"cifar100": ZeroShotRecord(0.4, 0.5, "single", 100)},
    )


FULL_CHANGE = [-0.02, -0.01, 0.0, -0.03, -0.04, -0.05]
LORA_CHANGES = {
    "E4": [0.01, 0.02, 0.0, 0.01, 0.03, 0.02],
    "E5": [0.02, 0.01, 0.01, 0.02, 0.02, 0.04],
    "E6": [0.0, 0.01, 0.02, 0.03, 0.01, 0.01],
}


def histories() -> list[RunRecord]:
    lora = [
        history(run, "full_vs_lora", change, method="lora", lr=1e-2)
        for run, change in LORA_CHANGES.items()
    ]
    return [
        history("E1_eurosat", "baseline", [0.0] * LAYERS, method="none"),
        history("E2", "full_vs_lora", FULL_CHANGE),
        history("E3", "full_vs_lora", [-0.05, -0.02, -0.01, -0.03, -0.02, -0.06], dataset="pets"),
        *lora,
        history("E7", "full_vs_lora", [0.01, -0.01, 0.0, 0.02, 0.0, 0.01], "lora", "pets"),
        history("A1_lr1e-6", "lr_sweep", [0.001] * LAYERS, lr=1e-6, accuracies=(0.2, 0.2, 0.2)),
        history("A1_lr1e-5", "lr_sweep", [-0.001] * LAYERS, lr=1e-5),
        history("A1_lr1e-4", "lr_sweep", [-0.01] * LAYERS, lr=1e-4),
        history(
            "R1_apr0.1", "regularization", [c + 0.01 for c in FULL_CHANGE], reg=RegSpec("apr", 0.1)
        ),
        history(
            "R2_entfloor0.1",
            "regularization",
            [c + 0.005 * (i % 2) for i, c in enumerate(FULL_CHANGE)],
            reg=RegSpec("entropy_floor", 0.1),
        ),
        history("R3_wd0.1", "regularization", FULL_CHANGE),
    ]


@pytest.fixture(scope="module")
def runs():
    all_runs = histories()
    trained = sp.trained(all_runs)
    return {
        "all": all_runs,
        "trained": trained,
        "summary": run_summary(all_runs),
        "delta": per_layer_delta(trained),
    }


def line(ax, label):
    return next(line for line in ax.lines if line.get_label() == label)


# --- tables ------------------------------------------------------------------------------------


def test_trained_drops_baselines_and_select_keeps_the_requested_order(runs):
    assert "E1_eurosat" not in {h.id for h in runs["trained"]}
    assert [h.id for h in sp.select(runs["trained"], ["E5", "missing", "E2"])] == ["E5", "E2"]


def test_cell_is_nan_for_a_missing_row_or_an_empty_table():
    table = pd.DataFrame({"p": [0.5]}, index=["a"])
    assert sp.cell(table, "a", "p") == 0.5
    assert math.isnan(sp.cell(table, "b", "p"))
    assert math.isnan(sp.cell(pd.DataFrame(), "a", "p"))


def test_full_vs_lora_pools_eurosat_layers_and_tests_runs_of_both_datasets(runs):
    comparisons, notes = sp.full_vs_lora_comparisons(runs["summary"], runs["delta"], n_boot=200)
    assert set(comparisons) == {"layer", "run"}
    assert "Seed-level" in notes[0]
    layer = comparisons["layer"].result
    assert (layer.n_a, layer.n_b) == (LAYERS, 3 * LAYERS)  # E2 vs E4–E6
    assert layer.mean_a == pytest.approx(100 * np.mean(FULL_CHANGE))
    run = comparisons["run"].result
    assert (run.n_a, run.n_b) == (2, 4)  # E2, E3 vs E4–E7
    table = sp.comparison_table(comparisons)
    assert list(table.index) == ["layer", "run"]
    assert table.loc["layer", "welch_t"] < 0
    expected = holm([*table["welch_p"], *table["mwu_p"]])
    assert table["welch_p_holm"].tolist() == pytest.approx(expected[:2])
    assert table["mwu_p_holm"].tolist() == pytest.approx(expected[2:])
    markdown = sp.supports_markdown(comparisons)
    assert markdown.count("\n- ") == 1 and "layers pooled" in markdown


def test_full_vs_lora_says_why_tests_are_missing(runs):
    only_e2 = runs["summary"][runs["summary"]["run"].isin(["E2", "E5"])]
    comparisons, notes = sp.full_vs_lora_comparisons(only_e2, runs["delta"], n_boot=200)
    assert set(comparisons) == {"layer"}
    assert any("Run-level test not run" in n for n in notes)
    assert sp.comparison_table({}).empty


def test_seed_level_test_runs_when_a_run_has_several_seeds(runs):
    extra = [
        history("E2", "full_vs_lora", [c * 2 for c in FULL_CHANGE], seed=7),
        history("E5", "full_vs_lora", LORA_CHANGES["E4"], method="lora", seed=7),
    ]
    all_runs = runs["all"] + extra
    comparisons, notes = sp.full_vs_lora_comparisons(
        run_summary(all_runs), per_layer_delta(sp.trained(all_runs)), n_boot=200
    )
    assert comparisons["seed"].result.n_a == 2 and comparisons["seed"].result.n_b == 4
    assert not notes


def test_lr_sweep_adds_the_reference_run_and_claims_rest_on_exact_p(runs):
    points = sp.lr_sweep_points(runs["summary"])
    assert list(points.index) == ["A1_lr1e-6", "A1_lr1e-5", "A1_lr1e-4", "E2"]
    assert points["log10_lr"].tolist() == pytest.approx([-6, -5, -4, -3])
    table = sp.lr_correlations(points)
    assert table.loc["spearman", "r"] == pytest.approx(-1.0)
    assert table.loc["spearman", "p_exact"] == pytest.approx(2 / math.factorial(4))
    assert (table["p_used"] == "exact").all()
    assert table["p_claim"].tolist() == table["p_exact"].tolist()
    assert table["p_claim_holm"].tolist() == pytest.approx(holm(table["p_claim"]))
    assert sp.lr_correlations(points.iloc[:2]).empty


def test_regularizer_tests_pair_layers_with_the_reference(runs):
    table = sp.regularizer_tests(runs["summary"], runs["delta"])
    assert list(table.index) == ["R1_apr0.1", "R2_entfloor0.1"]  # weight decay has no regularizer
    apr = table.loc["R1_apr0.1"]
    assert apr["n_layers"] == LAYERS and apr["mean_diff"] == pytest.approx(1.0)
    assert apr["d_av"] > 0
    assert table["p_holm"].tolist() == pytest.approx(holm(table["p"]))
    assert "pairs layer l" in sp.paired_supports(runs["summary"], runs["delta"]).lower()
    no_reference = runs["delta"].drop("E2", level="run")
    assert sp.regularizer_tests(runs["summary"], no_reference).empty


def test_layer_anova_table_has_group_means_and_skips_missing_runs(runs):
    table = sp.layer_anova_table(runs["delta"], runs=("E2", "missing"))
    assert list(table.index) == ["E2"]
    e2 = table.loc["E2"]
    assert (e2["early_layers"], e2["late_layers"]) == ("L1–2", "L5–6")
    assert e2["late_mean"] == pytest.approx(100 * np.mean(FULL_CHANGE[4:]))
    assert e2["dof"] == "2, 3"
    assert e2["p_holm"] == pytest.approx(e2["p"])


def test_dynamics_table_finds_onset_only_where_entropy_falls_far_enough(runs):
    table = sp.dynamics_table(runs["trained"]).xs(42, level="seed")
    e2_mean = np.mean([s * (1 + c) for s, c in zip(START, FULL_CHANGE, strict=True)])
    assert table.loc["E2", "onset_fraction"] == 0.5  # halfway, entropy is already 1.4% lower
    assert table.loc["E2", "d_entropy_pct"] == pytest.approx(100 * (e2_mean / np.mean(START) - 1))
    assert math.isnan(table.loc["E5", "onset_fraction"])
    assert table.loc["A1_lr1e-6", "max_abs_velocity"] == pytest.approx(0.001 * np.mean(START))
    assert sp.dynamics_table(runs["all"][:1]).empty  # a baseline has a single eval


def test_convergence_table_flags_runs_whose_late_accuracy_is_flat(runs):
    table = sp.convergence_table(runs["trained"]).xs(42, level="seed")
    assert table.loc["A1_lr1e-6", "converged"]
    assert not table.loc["E2", "converged"]
    assert table.loc["E2", "late_std"] == pytest.approx(np.std([0.5, 0.8, 0.9]))


def test_correlation_pairs_lists_each_distinct_pair_once(runs):
    matrix = metric_correlations(run_summary(runs["trained"]))
    pairs = sp.correlation_pairs(matrix)
    assert len(pairs) == 10
    assert pairs.loc[("d_entropy_pct", "d_erf_pct"), "r"] == pytest.approx(1.0)
    assert pairs.loc[("d_entropy_pct", "d_gini_pct"), "r"] < -0.9


# --- figures -----------------------------------------------------------------------------------


def test_fig10_heatmap_shows_the_per_layer_changes(runs):
    delta = runs["delta"]
    fig = sp.fig10_per_layer_heatmap(delta)
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
    labels = [t.get_text() for t in sp.fig10_per_layer_heatmap(delta).axes[0].get_yticklabels()]
    assert "E2/s7" in labels and "E2/s42" in labels


def test_fig11_plots_cis_lr_regression_and_effect_sizes(runs):
    comparisons, _ = sp.full_vs_lora_comparisons(runs["summary"], runs["delta"], n_boot=200)
    points = sp.lr_sweep_points(runs["summary"])
    lr_table = sp.lr_correlations(points)
    regs = sp.regularizer_tests(runs["summary"], runs["delta"])
    fig = sp.fig11_statistical_summary(comparisons, points, lr_table, regs)
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
    fig = sp.fig11_statistical_summary({}, empty, empty, empty)
    assert len(fig.axes) == 3
    assert all(ax.texts and not ax.lines for ax in fig.axes)


def test_fig12_plots_velocity_onset_and_co_evolution(runs):
    chosen = sp.select(runs["trained"], ["E2", "E5"])
    fig = sp.fig12_training_dynamics(chosen)
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
    fig = sp.fig13_metric_correlations(matrix)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), matrix.r.to_numpy())
    assert len(ax.texts) == 5 * 4
    assert all("r=" in t.get_text() and "Holm" in t.get_text() for t in ax.texts)
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "Δ Entropy (%)"
    assert f"{matrix.n} runs" in ax.get_title()


def test_fig14_has_one_panel_per_family_and_a_line_per_run(runs):
    fig = sp.fig14_convergence(runs["trained"])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["full_vs_lora", "lr_sweep", "regularization"]
    lr_ax = fig.axes[1]
    assert len(lr_ax.lines) == 3
    flat = line(lr_ax, "A1_lr1e-6/s42")
    assert list(flat.get_xdata()) == [1, 2, 3] and list(flat.get_ydata()) == [0.2, 0.2, 0.2]


def test_fig16_dashboard_has_six_panels_with_the_runs_changes(runs):
    fig = sp.fig16_dashboard(runs["summary"], runs["delta"])
    assert len(fig.axes) == 6
    bars = fig.axes[0]
    trained = run_summary(runs["trained"]).set_index("run").sort_index()
    assert [p.get_width() for p in bars.patches] == pytest.approx(trained["d_entropy_pct"].tolist())
    assert [t.get_text() for t in bars.get_yticklabels()] == list(trained.index)
    per_layer = fig.axes[4]
    assert {ln.get_label() for ln in per_layer.lines} >= {"full (2 runs)", "lora (4 runs)"}
    sweep = fig.axes[5].lines[0]
    assert list(sweep.get_xdata()) == pytest.approx([-6, -5, -4, -3])
