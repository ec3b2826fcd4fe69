"""The statistics chapter, section by section: each method computes one family of tests with
``stat_plots``, glues the numbers the chapter's prose uses, displays the table or figure and
returns the table. ``notebooks/08_statistics.ipynb`` calls one method per section."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from IPython.display import Image, Markdown, display
from myst_nb import glue

from collapse_utils.analysis.results import load_histories, per_layer_delta, run_summary
from collapse_utils.analysis.stats import EXACT_MAX_N, metric_correlations
from collapse_utils.book import stat_plots as sp
from collapse_utils.book.figures import save_figure
from collapse_utils.config import profile_output_root

A_COLUMNS = (
    "mean_full", "mean_lora", "welch_t", "welch_p", "welch_p_holm", "mwu_p", "mwu_p_holm",
    "cohen_d", "ci_full_low", "ci_full_high", "ci_lora_low", "ci_lora_high", "n_full", "n_lora",
)  # fmt: skip
CORRELATION_PAIRS = {
    "entropy_erf": ("d_entropy_pct", "d_erf_pct"),
    "entropy_gini": ("d_entropy_pct", "d_gini_pct"),
    "entropy_head": ("d_entropy_pct", "d_head_diversity_pct"),
    "entropy_acc": ("d_entropy_pct", "best_acc"),
    "erf_gini": ("d_erf_pct", "d_gini_pct"),
}


def note(lines: list[str]) -> None:
    """Display why some tests of a family could not run."""
    for line in lines:
        display(Markdown(f"**Note.** {line}"))


def mwu_floor(n_a: float, n_b: float) -> float:
    """Smallest two-sided exact Mann-Whitney p possible with groups of n_a and n_b values."""
    if math.isnan(n_a) or math.isnan(n_b):
        return float("nan")
    return 2 / math.comb(int(n_a + n_b), int(n_a))


class StatisticsPage:
    """All complete histories of ``profile`` and the tables computed from them so far."""

    def __init__(self, profile: str):
        self.output_root: Path = profile_output_root(profile)
        self.histories = load_histories(self.output_root)
        self.trained = sp.trained(self.histories)
        if not self.trained:
            raise RuntimeError(
                f"no complete trained run under {self.output_root}: run the experiments first"
            )
        self.summary = run_summary(self.histories)
        self.trained_summary = run_summary(self.trained)
        self.delta = per_layer_delta(self.trained)
        self.comparisons: dict = {}
        self.lr_points = self.table_b = self.table_c = pd.DataFrame()

    def show(self, fig, name: str) -> None:
        """Save the figure under the profile's figures folder and display the saved PNG."""
        display(Image(filename=save_figure(fig, self.output_root, name)))

    def overview(self) -> pd.DataFrame:
        glue("n_histories", len(self.histories), display=False)
        glue("n_trained", len(self.trained), display=False)
        glue("max_seeds", int(self.summary.groupby("run").size().max()), display=False)
        columns = ["run", "seed", "family", "method", "dataset", "lr", "best_acc", "d_entropy_pct"]
        return self.summary[columns].round({"best_acc": 3, "d_entropy_pct": 3})

    def full_vs_lora(self) -> pd.DataFrame:
        """§6.4 A: layer-pooled (as the report) and run-level (and seed-level) comparisons."""
        self.comparisons, notes = sp.full_vs_lora_comparisons(self.summary, self.delta)
        table = sp.comparison_table(self.comparisons)
        note(notes)
        display(Markdown(sp.supports_markdown(self.comparisons)))
        for unit in ("layer", "run"):
            for column in A_COLUMNS:
                glue(f"a_{unit}_{column}", sp.cell(table, unit, column), display=False)
        n_full, n_lora = sp.cell(table, "run", "n_full"), sp.cell(table, "run", "n_lora")
        glue("a_run_mwu_floor", mwu_floor(n_full, n_lora), display=False)
        return table.round(3)

    def lr_sweep(self) -> pd.DataFrame:
        """§6.4 B: Pearson and Spearman of Δentropy with log10(lr), asymptotic and exact p."""
        self.lr_points = sp.lr_sweep_points(self.summary)
        self.table_b = sp.lr_correlations(self.lr_points)
        if self.table_b.empty:
            note([f"Correlation not run: it needs three runs, found {len(self.lr_points)}."])
        display(self.lr_points.round({"log10_lr": 3, "d_entropy_pct": 3}))
        for method in ("pearson", "spearman"):
            for column in ("r", "p_asymptotic", "p_exact", "p_claim", "p_claim_holm"):
                value = sp.cell(self.table_b, method, column)
                glue(f"b_{method}_{column}", value, display=False)
        n = len(self.lr_points)
        glue("b_n", n, display=False)
        glue("b_exact_max_n", EXACT_MAX_N, display=False)
        glue("b_min_exact_p", 1 / math.factorial(n), display=False)
        used = str(self.table_b["p_used"].iloc[0]) if not self.table_b.empty else "none"
        glue("b_p_used", used, display=False)
        return self.table_b.round(4)

    def regularizers(self) -> pd.DataFrame:
        """§6.4 C: each regularizer against E2, paired over layers."""
        self.table_c = table = sp.regularizer_tests(self.summary, self.delta)
        if table.empty:
            note(["Regularizer tests not run: no regularized run or no complete E2."])
        else:
            display(Markdown(sp.paired_supports(self.summary, self.delta)))
        glue("c_n", len(table), display=False)
        top = table["d_z"].abs().idxmax() if not table.empty else None
        glue("c_top_run", str(top), display=False)
        for column in ("d_av", "d_z", "t", "p", "p_holm", "mean_diff"):
            glue(f"c_top_{column}", sp.cell(table, top, column), display=False)
        low = float(table["p_holm"].min()) if not table.empty else float("nan")
        glue("c_min_p_holm", low, display=False)
        return table.round(4)

    def layer_position(self) -> pd.DataFrame:
        """§6.4 D: one-way ANOVA of per-layer Δentropy over early/middle/late layers."""
        table = sp.layer_anova_table(self.delta)
        note([f"ANOVA of {r} not run: the run is not complete." for r in sp.ANOVA_RUNS
              if r not in table.index])  # fmt: skip
        for run in sp.ANOVA_RUNS:
            for column in ("f", "p", "p_holm"):
                glue(f"d_{run.lower()}_{column}", sp.cell(table, run, column), display=False)
        return table.round(3)

    def per_layer_figure(self) -> None:
        self.show(sp.fig10_per_layer_heatmap(self.delta), "fig10_per_layer_delta_heatmap")

    def correlations(self) -> pd.DataFrame:
        """§3.10: cross-metric correlation matrix over trained runs, Holm within the matrix."""
        enough = len(self.trained_summary) >= 3
        matrix = metric_correlations(self.trained_summary) if enough else None
        table = pd.DataFrame()
        if matrix is None:
            note(
                [f"Correlations not run: they need three runs, found {len(self.trained_summary)}."]
            )
        else:
            table = sp.correlation_pairs(matrix)
            self.show(sp.fig13_metric_correlations(matrix), "fig13_metric_correlations")
        glue("corr_n", matrix.n if matrix is not None else 0, display=False)
        for key, pair in CORRELATION_PAIRS.items():
            for column in ("r", "p_holm"):
                glue(f"corr_{key}_{column}", sp.cell(table, pair, column), display=False)
        return table.round(4)

    def dynamics(self) -> pd.DataFrame:
        """§3.9: collapse onset and entropy velocity."""
        table = sp.dynamics_table(self.trained)
        glue("onset_threshold_pct", 100 * sp.ONSET_THRESHOLD, display=False)
        glue("onset_n_reached", int(table["onset_fraction"].notna().sum()), display=False)
        glue("onset_n_runs", len(table), display=False)
        shown = sp.select(self.trained, sp.DYNAMICS_RUNS)
        present = {h.id for h in shown}
        note([f"{r} is not complete and is missing from the figure." for r in sp.DYNAMICS_RUNS
              if r not in present])  # fmt: skip
        self.show(sp.fig12_training_dynamics(shown), "fig12_training_dynamics")
        return table.round(3)

    def convergence(self) -> pd.DataFrame:
        """The report's convergence check (SD of late-epoch val accuracy)."""
        table = sp.convergence_table(self.trained)
        glue("conv_criterion", sp.CONVERGENCE_STD, display=False)
        glue("conv_epochs", sp.CONVERGENCE_EPOCHS, display=False)
        glue("conv_n_converged", int(table["converged"].sum()), display=False)
        glue("conv_n_runs", len(table), display=False)
        self.show(sp.fig14_convergence(self.trained), "fig14_convergence")
        return table.round(4)

    def dashboard(self) -> None:
        self.show(sp.fig16_dashboard(self.summary, self.delta), "fig16_dashboard")

    def summary_figure(self) -> None:
        """fig11 from the tables of sections A–C (run them first)."""
        fig = sp.fig11_statistical_summary(
            self.comparisons, self.lr_points, self.table_b, self.table_c
        )
        self.show(fig, "fig11_statistical_summary")
