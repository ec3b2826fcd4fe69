"""The statistics chapter, section by section: each method computes one family of tests
(``analysis.stat_tables``), glues the numbers the chapter's prose uses, displays the table
(``book.tables``, the book's one formatter) or figure (``book.stat_figures``, with its caption)
and returns the raw table. ``notebooks/08_statistics.ipynb`` calls one
method per section. Which runs a test is about comes from ``params/families.yaml``.

Glue keys are written out in full (a key used in the notebook can be found here with grep): the
``*_GLUE`` tables map each key to the (row, column) of the section's table it holds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

from collapse_utils.analysis import stat_tables as tables
from collapse_utils.analysis.results import (
    histories_of,
    load_histories,
    per_layer_delta,
    per_layer_final,
    run_summary,
)
from collapse_utils.analysis.stats import EXACT_MAX_N, metric_correlations
from collapse_utils.book import stat_figures
from collapse_utils.book.page import Page
from collapse_utils.book.style import DATASET_NAMES
from collapse_utils.book.tables import NUMBER, Column, format_p
from collapse_utils.config import PARAMS_DIR, load_config, profile_output_root
from collapse_utils.families import (
    comparison_ids,
    load_families,
    load_statistics_runs,
    report_ids,
)

A_GLUE = {
    "a_layer_n_full": ("layer", "n_full"),
    "a_layer_n_lora": ("layer", "n_lora"),
    "a_layer_mean_full": ("layer", "mean_full"),
    "a_layer_mean_lora": ("layer", "mean_lora"),
    "a_layer_ci_full_low": ("layer", "ci_full_low"),
    "a_layer_ci_full_high": ("layer", "ci_full_high"),
    "a_layer_ci_lora_low": ("layer", "ci_lora_low"),
    "a_layer_ci_lora_high": ("layer", "ci_lora_high"),
    "a_layer_welch_t": ("layer", "welch_t"),
    "a_layer_welch_p": ("layer", "welch_p"),
    "a_layer_welch_p_holm": ("layer", "welch_p_holm"),
    "a_layer_mwu_p": ("layer", "mwu_p"),
    "a_layer_cohen_d": ("layer", "cohen_d"),
    "a_run_n_full": ("run", "n_full"),
    "a_run_n_lora": ("run", "n_lora"),
    "a_run_welch_t": ("run", "welch_t"),
    "a_run_welch_p": ("run", "welch_p"),
    "a_run_welch_p_holm": ("run", "welch_p_holm"),
    "a_run_mwu_p": ("run", "mwu_p"),
}
B_GLUE = {
    "b_pearson_r": ("pearson", "r"),
    "b_pearson_p_asymptotic": ("pearson", "p_asymptotic"),
    "b_pearson_p_exact": ("pearson", "p_exact"),
    "b_pearson_p_claim_holm": ("pearson", "p_claim_holm"),
    "b_spearman_r": ("spearman", "r"),
    "b_spearman_p_asymptotic": ("spearman", "p_asymptotic"),
    "b_spearman_p_exact": ("spearman", "p_exact"),
    "b_spearman_p_claim_holm": ("spearman", "p_claim_holm"),
}
C_TOP_GLUE = {
    "c_top_d_av": "d_av",
    "c_top_d_z": "d_z",
    "c_top_t": "t",
    "c_top_p": "p",
    "c_top_p_holm": "p_holm",
    "c_top_mean_diff": "mean_diff",
}
CORRELATION_GLUE = {
    "corr_entropy_erf_r": (("d_entropy_pct", "d_erf_pct"), "r"),
    "corr_entropy_erf_p_holm": (("d_entropy_pct", "d_erf_pct"), "p_holm"),
    "corr_entropy_gini_r": (("d_entropy_pct", "d_gini_pct"), "r"),
    "corr_entropy_gini_p_holm": (("d_entropy_pct", "d_gini_pct"), "p_holm"),
    "corr_entropy_head_r": (("d_entropy_pct", "d_head_diversity_pct"), "r"),
    "corr_entropy_head_p_holm": (("d_entropy_pct", "d_head_diversity_pct"), "p_holm"),
    "corr_entropy_acc_r": (("d_entropy_pct", "best_acc"), "r"),
    "corr_entropy_acc_p_holm": (("d_entropy_pct", "best_acc"), "p_holm"),
    "corr_erf_gini_r": (("d_erf_pct", "d_gini_pct"), "r"),
    "corr_erf_gini_p_holm": (("d_erf_pct", "d_gini_pct"), "p_holm"),
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


def glue_cells(table: pd.DataFrame, keys: dict[str, tuple]) -> None:
    """Glue each key of ``keys`` (key → (row, column)) with that cell of ``table`` (NaN if
    absent)."""
    for key, (row, column) in keys.items():
        glue(key, tables.cell(table, row, column), display=False)


def run_list(ids: list[str]) -> str:
    return ", ".join(ids) if ids else "none"


class StatisticsChapter:
    """All complete histories of ``profile``, the runs each test is about (from the families
    table of ``params_dir``) and the tables computed so far."""

    def __init__(self, profile: str, params_dir: Path | str = PARAMS_DIR):
        self.profile = profile
        self.output_root: Path = profile_output_root(profile, params_dir)
        # Study B has its own page: the report's chapters read the report's runs.
        self.histories = load_histories(self.output_root, ids=set(report_ids(profile, params_dir)))
        self.trained = tables.trained(self.histories)
        if not self.trained:
            raise RuntimeError(
                f"no complete trained run under {self.output_root}: run the experiments first"
            )
        families = load_families(params_dir)
        self.statistics_runs = load_statistics_runs(params_dir)
        chosen = self.statistics_runs
        methods = families[chosen.method_comparison]
        self.method_runs = comparison_ids(profile, methods, params_dir)
        self.method_dataset = load_config(profile, methods.reference, params_dir).data.dataset
        self.lr_runs = comparison_ids(profile, families[chosen.lr_sweep], params_dir)
        self.reg_reference = families[chosen.regularizers].reference
        self.summary = run_summary(self.histories)
        self.trained_summary = run_summary(self.trained)
        self.delta = per_layer_delta(self.trained)
        # §6.4 C's unit (eval.c_statistic): layers of Δ entropy in %, or final entropy in nats.
        reference = load_config(profile, self.reg_reference, params_dir)
        self.c_nats = reference.eval.c_statistic == "final_nats"
        self.c_layers = per_layer_final(self.trained) if self.c_nats else self.delta
        self.lr_points = tables.lr_sweep_points(self.summary, self.lr_runs)
        self.page = Page(profile, self.output_root)
        self.comparisons: dict = {}
        self.table_b = self.table_c = pd.DataFrame()

    def show(self, fig, name: str, caption: str) -> None:
        self.page.figure(name, fig, caption)

    def overview(self) -> pd.DataFrame:
        glue("n_histories", len(self.histories), display=False)
        glue("n_trained", len(self.trained), display=False)
        glue("max_seeds", int(self.summary.groupby("run").size().max()), display=False)
        columns = ["run", "seed", "family", "method", "dataset", "lr", "best_acc", "d_entropy_pct"]
        table = self.summary[columns]
        self.page.table(
            "overview",
            table,
            "Every run and seed the tests below draw on: its family, method, dataset, "
            "learning rate, best accuracy and layer-mean entropy change.",
        )
        return table

    def full_vs_lora(self) -> pd.DataFrame:
        """§6.4 A: layer-pooled (as the report) and run-level (and seed-level) comparisons."""
        runs, dataset = self.method_runs, self.method_dataset
        self.comparisons, notes = tables.full_vs_lora_comparisons(
            self.summary, self.delta, runs, dataset
        )
        table = tables.unit_comparison_table(self.comparisons)
        note(notes)
        self.page.table(
            "full_vs_lora",
            table,
            "Full FT against LoRA at each unit of analysis (layers pooled as the "
            "report, runs, seeds): group sizes, means, Welch t and Mann-Whitney p, effect sizes.",
        )
        display(Markdown(tables.supports_markdown(self.comparisons)))
        groups = tables.method_groups(self.summary, runs, dataset)
        glue("a_dataset", DATASET_NAMES.get(dataset, dataset), display=False)
        glue("a_layer_full_runs", run_list(groups["layer_full"]), display=False)
        glue("a_layer_lora_runs", run_list(groups["layer_lora"]), display=False)
        glue("a_run_full_runs", run_list(groups["run_full"]), display=False)
        glue("a_run_lora_runs", run_list(groups["run_lora"]), display=False)
        glue_cells(table, A_GLUE)
        n_full, n_lora = tables.cell(table, "run", "n_full"), tables.cell(table, "run", "n_lora")
        glue("a_run_mwu_floor", mwu_floor(n_full, n_lora), display=False)
        return table

    def lr_sweep(self) -> pd.DataFrame:
        """§6.4 B: Pearson and Spearman of Δentropy with log10(lr), asymptotic and exact p."""
        self.table_b = tables.lr_correlations(self.lr_points)
        if self.table_b.empty:
            note([f"Correlation not run: it needs three runs, found {len(self.lr_points)}."])
        self.page.table(
            "lr_points",
            self.lr_points,
            "The learning-rate sweep's runs: log10 learning rate and entropy change.",
        )
        self.page.table(
            "lr_correlations",
            self.table_b,
            "Correlation of entropy change with log10 learning rate: Pearson and "
            "Spearman, asymptotic and exact p, and which p the text uses.",
        )
        glue_cells(self.table_b, B_GLUE)
        n = len(self.lr_points)
        glue("b_n", n, display=False)
        glue("b_runs", run_list(list(self.lr_points.index)), display=False)
        glue("b_exact_max_n", EXACT_MAX_N, display=False)
        glue("b_min_exact_p", 1 / math.factorial(n), display=False)
        used = str(self.table_b["p_used"].iloc[0]) if not self.table_b.empty else "none"
        glue("b_p_used", used, display=False)
        return self.table_b

    def regularizers(self) -> pd.DataFrame:
        """§6.4 C: each regularizer against the regularization family's reference, paired over
        layers."""
        reference = self.reg_reference
        self.table_c = table = tables.regularizer_tests(self.summary, self.c_layers, reference)
        glue("c_reference", reference, display=False)
        glue("c_unit", "nats" if self.c_nats else "percentage points", display=False)
        quantity = "the final entropy in nats" if self.c_nats else "the change of entropy in %"
        glue("c_quantity", quantity, display=False)
        if table.empty:
            note([f"Regularizer tests not run: no regularized run or no complete {reference}."])
        else:
            unit = "nats" if self.c_nats else "points"
            self.page.table(
                "regularizers",
                table,
                f"Each regularized run against {reference}, paired over layers: the mean "
                "layer difference, paired t, Holm-corrected p and d_z.",
                {"mean_diff": Column(f"Mean layer difference ({unit})", NUMBER, 4)},
            )
            display(Markdown(tables.paired_supports(self.summary, self.c_layers, reference)))
        glue("c_n", len(table), display=False)
        top = table["d_z"].abs().idxmax() if not table.empty else None
        glue("c_top_run", str(top), display=False)
        glue_cells(table, {key: (top, column) for key, column in C_TOP_GLUE.items()})
        low = float(table["p_holm"].min()) if not table.empty else float("nan")
        glue("c_min_p_holm", low, display=False)
        return table

    def layer_position(self) -> pd.DataFrame:
        """§6.4 D: one-way ANOVA of per-layer Δentropy over early/middle/late layers."""
        runs = self.statistics_runs.layer_anova
        table = tables.layer_anova_table(self.delta, runs)
        note([f"ANOVA of {r} not run: the run is not complete." for r in runs
              if r not in table.index])  # fmt: skip
        glue("d_runs", run_list(list(runs)), display=False)
        sentences = [
            f"for {run}, F = {row['f']:.2f}, p = {row['p']:.2g} (Holm {row['p_holm']:.2g})"
            for run, row in table.iterrows()
        ]
        text = "; ".join(sentences) if sentences else "no run of the ANOVA is complete"
        glue("d_results", text[0].upper() + text[1:] + ".", display=False)
        self.page.table(
            "layer_anova",
            table,
            "One-way ANOVA of per-layer entropy change over early, middle and late "
            "layers, per run: F, p and Holm-corrected p.",
        )
        return table

    def per_layer_figure(self) -> None:
        self.show(
            stat_figures.fig10_per_layer_heatmap(self.delta),
            "fig10_per_layer_delta_heatmap",
            "Change in entropy (%) of every layer (columns) of every trained run (rows), first "
            "to final evaluation: red cells lost entropy, blue cells gained; look for bands of "
            "layers that change together.",
        )

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
            table = tables.correlation_pairs(matrix)
            self.page.table(
                "correlations",
                table,
                "Every pair of metric changes (and best accuracy) across runs: "
                "correlation, p and Holm-corrected p.",
            )
            self.show(
                stat_figures.fig13_metric_correlations(matrix),
                "fig13_metric_correlations",
                "Correlation across runs of the changes in the four metrics and of best "
                "accuracy, with p and Holm-adjusted p in each cell: strongly coloured cells are "
                "pairs that move together from run to run.",
            )
        glue("corr_n", matrix.n if matrix is not None else 0, display=False)
        glue_cells(table, CORRELATION_GLUE)
        return table

    def dynamics(self) -> pd.DataFrame:
        """§3.9: collapse onset and entropy velocity."""
        table = tables.dynamics_table(self.trained)
        glue("onset_threshold_pct", 100 * tables.ONSET_THRESHOLD, display=False)
        glue("onset_n_reached", int(table["onset_fraction"].notna().sum()), display=False)
        glue("onset_n_runs", len(table), display=False)
        runs = self.statistics_runs.dynamics
        shown = histories_of(self.trained, runs)
        present = {h.id for h in shown}
        note([f"{r} is not complete and is missing from the figure." for r in runs
              if r not in present])  # fmt: skip
        self.page.table(
            "dynamics",
            table,
            "Per run: when entropy first fell past the onset threshold and how fast it moved.",
        )
        self.show(
            stat_figures.fig12_training_dynamics(shown),
            "fig12_training_dynamics",
            "Entropy velocity (top left), entropy change with the collapse onset marked × (top "
            "right), and the ERF@0.95 and Gini changes against the entropy change along "
            "training (bottom): curves that stay on one line mean the metrics move together.",
        )
        return table

    def convergence(self) -> pd.DataFrame:
        """The report's convergence check (SD of late-epoch val accuracy)."""
        table = tables.convergence_table(self.trained)
        glue("conv_criterion", tables.CONVERGENCE_STD, display=False)
        glue("conv_epochs", tables.CONVERGENCE_EPOCHS, display=False)
        glue("conv_n_converged", int(table["converged"].sum()), display=False)
        glue("conv_n_runs", len(table), display=False)
        self.page.table(
            "convergence",
            table,
            "Per run: the SD of validation accuracy over the last epochs, and whether "
            "it is under the convergence criterion.",
        )
        self.show(
            stat_figures.fig14_convergence(self.trained),
            "fig14_convergence",
            "Accuracy after every epoch, one panel per family and one line per run: a line that "
            "is flat over the last epochs has converged.",
        )
        return table

    def dashboard(self) -> None:
        fig = stat_figures.fig16_dashboard(
            self.summary, self.delta, self.method_runs, self.lr_points
        )
        self.show(
            fig,
            "fig16_dashboard",
            "Every trained run at a glance, coloured by method: entropy change per run, against "
            "Gini, accuracy and zero-shot change, the per-layer profile of Full FT and LoRA, and "
            "the learning-rate sweep.",
        )

    def summary_figure(self) -> None:
        """fig11 from the tables of sections A–C (run them first)."""
        fig = stat_figures.fig11_statistical_summary(
            self.comparisons, self.lr_points, self.table_b, self.table_c, self.reg_reference
        )
        self.show(
            fig,
            "fig11_statistical_summary",
            "Full FT against LoRA at each unit of analysis with 95 % bootstrap intervals (top), "
            "entropy change against log learning rate with its fit (middle), and each "
            "regularizer's effect size against the reference (bottom): overlapping intervals "
            "and large p mean no evidence of a difference.",
        )

    def conclusion(self) -> None:
        """The chapter's answer in words, from the tables of sections A–C (run them first)."""
        self.page.conclusion(" ".join(self.conclusion_sentences()))

    def conclusion_sentences(self) -> list[str]:
        a = tables.unit_comparison_table(self.comparisons) if self.comparisons else pd.DataFrame()
        layer_p, run_p = tables.cell(a, "layer", "welch_p"), tables.cell(a, "run", "welch_p")
        text = []
        if not math.isnan(layer_p):
            text.append(
                f"Full FT against LoRA: pooling layers as the report did gives Welch p = "
                f"{format_p(layer_p)}; with one value per run (the independent unit) p = "
                f"{format_p(run_p)}."
            )
        spearman = tables.cell(self.table_b, "spearman", "p_exact")
        if not math.isnan(spearman):
            r = tables.cell(self.table_b, "spearman", "r")
            text.append(
                f"Entropy change against log learning rate: Spearman ρ = {r:.2f}, exact p = "
                f"{format_p(spearman)} over {len(self.lr_points)} runs."
            )
        if not self.table_c.empty:
            low = float(self.table_c["p_holm"].min())
            text.append(
                f"Of {len(self.table_c)} regularized runs against {self.reg_reference}, the "
                f"smallest Holm-corrected p is {format_p(low)}."
            )
        return text or ["No test of this chapter could run on the complete runs."]
