"""Family comparison pages: the steps each family notebook shows (:data:`FAMILY_STEPS`).

The runs of a comparison come from data: the family's reference runs (``params/families.yaml``)
then its experiments (``params/experiments/*.yaml`` with that ``family``), so a new experiment
file shows up in its family's tables, figures and findings without a code change. A page shows
whichever of those runs are complete and names the others. Tables hold one row per run, the mean
over its seeds (``results.run_means``, column ``seeds``); curves draw every seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from collapse_utils.analysis.results import (
    histories_of,
    load_histories,
    run_means,
    run_summary,
    zeroshot_datasets,
)
from collapse_utils.book import figures
from collapse_utils.book.page import STATISTICS_LINK, Page, show_step
from collapse_utils.book.run_pages import code_warning
from collapse_utils.book.study_b_page import study_b_page
from collapse_utils.book.style import (
    DATASET_NAMES,
    METHOD_NAMES,
    METRIC_NAMES,
    SETTING_NAMES,
)
from collapse_utils.book.tables import format_change
from collapse_utils.config import PARAMS_DIR, RunConfig, load_config, profile_output_root
from collapse_utils.families import Family, comparison_ids, load_families
from collapse_utils.run_record import RunRecord


@dataclass(frozen=True)
class FamilyRuns:
    """The runs of one family comparison. ``ids``: references, then the family's experiments;
    ``histories``: the complete ones, every seed, in ``ids`` order; ``summary``: one row per
    complete run (index ``run``, in ``ids`` order), seeds averaged."""

    family: Family
    ids: list[str]
    configs: dict[str, RunConfig]
    histories: list[RunRecord]
    summary: pd.DataFrame

    @property
    def empty(self) -> bool:
        return self.summary.empty

    @property
    def missing(self) -> list[str]:
        return [i for i in self.ids if i not in self.summary.index]

    @property
    def datasets(self) -> list[str]:
        """Datasets of the comparison, the references' first (from the configs, so the order
        does not depend on which runs are complete)."""
        return list(dict.fromkeys(self.configs[i].data.dataset for i in self.ids))


def family_runs(profile: str, family: Family, params_dir: Path | str = PARAMS_DIR) -> FamilyRuns:
    ids = comparison_ids(profile, family, params_dir)
    configs = {i: load_config(profile, i, params_dir) for i in ids}
    histories = histories_of(load_histories(profile_output_root(profile, params_dir)), ids)
    summary = pd.DataFrame(index=pd.Index([], name="run"))
    if histories:
        means = run_means(run_summary(histories))
        summary = means.reindex([i for i in ids if i in means.index])
    return FamilyRuns(family, ids, configs, histories, summary)


def metric_comparison_table(rows: pd.DataFrame, setting: str) -> pd.DataFrame:
    """``setting``, seeds, best accuracy and each metric's final value (``<m>_f``) and Δ% first →
    final (``d_<m>_pct``, report §3.2.1), one row per run of ``rows`` (seed means)."""
    columns = [setting, "seeds", "best_acc"]
    for metric in METRIC_NAMES:
        columns += [f"{metric}_f", f"d_{metric}_pct"]
    return rows[list(dict.fromkeys(columns))].copy()


# --- the steps of each family page -------------------------------------------------------------
# Each step shows one table or figure on ``page`` and returns its sentence of the conclusion
# (empty when it has none). A family notebook calls its family's steps (FAMILY_STEPS) one by
# one under its own headings; a test holds every notebook to that order.


def baseline_structure(page: Page, runs: FamilyRuns) -> str:
    """Report §3.1 / §6.2: the pre-trained model's four metrics per layer, one line per
    dataset."""
    page.figure(
        "fig2_baseline_structure",
        figures.baseline_structure(runs.histories),
        "The pre-trained model's four attention metrics per layer, one line per dataset: where "
        "the lines part, the model attends differently to the two datasets' images.",
    )
    return ""


def baseline_table(page: Page, runs: FamilyRuns) -> str:
    """Per baseline and metric: the layer profile's mean, SD, min and max (seed means)."""
    rows, sentences = [], []
    for run in runs.summary.index:
        seeds = [h for h in runs.histories if h.id == run]
        profiles = {
            m: np.mean([h.evals[0].metrics[m] for h in seeds], axis=0) for m in METRIC_NAMES
        }
        for metric, name in METRIC_NAMES.items():
            values = profiles[metric]
            rows.append({"baseline": run, "metric": name, "seeds": len(seeds),
                         "mean": values.mean(), "std": values.std(ddof=1),
                         "min": values.min(), "max": values.max()})  # fmt: skip
        entropy = profiles["entropy"]
        sentences.append(
            f"On {run}, layer-mean entropy is {entropy.mean():.3f} nats and the most "
            f"concentrated layer is layer {int(np.argmin(entropy)) + 1}."
        )
    page.table(
        "structure",
        pd.DataFrame(rows).set_index(["baseline", "metric"]),
        "Each metric's profile over the layers of the pre-trained model: its mean, SD, minimum "
        "and maximum across layers, per baseline run.",
    )
    return " ".join(sentences)


def comparison_table(page: Page, runs: FamilyRuns) -> str:
    """Every run's setting, seeds, best accuracy and each metric's final value and change."""
    page.table(
        "comparison",
        metric_comparison_table(runs.summary, runs.family.axis),
        "One row per run (seed means): best accuracy, then each metric's final layer mean and "
        "its change from the first tracking point.",
    )
    return ""


def entropy_heatmaps(page: Page, runs: FamilyRuns) -> str:
    page.figure(
        "fig4_layer_entropy_heatmap",
        figures.layer_heatmaps(runs.histories),
        "Entropy of every layer (rows) over training (columns), one panel per run on one colour "
        "scale: compare how far the Full FT panels darken against the LoRA panels.",
    )
    return ""


def method_trajectories(page: Page, runs: FamilyRuns) -> str:
    """Report fig. 5: the four metrics over training, one figure per dataset."""
    for k, dataset in enumerate(runs.datasets):
        shown = [h for h in runs.histories if h.dataset == dataset]
        if shown:
            named = DATASET_NAMES.get(dataset, dataset)
            name = "fig5_fullft_vs_lora" if k == 0 else f"fig5b_fullft_vs_lora_{dataset}"
            page.figure(
                name,
                figures.metric_trajectories(shown, f"Full FT vs LoRA ({named})"),
                f"Layer-mean entropy, ERF@0.95, Gini and head diversity over training for every "
                f"run on {named}: compare the Full FT lines with the LoRA lines.",
            )
    return ""


def single_metrics(page: Page, runs: FamilyRuns) -> str:
    """Report figs. 9 and 17: head diversity, Gini and ERF@0.95 on their own."""
    for metric, name, reading in (
        ("head_diversity", "fig9_head_diversity", "a falling line means the heads attend alike"),
        ("gini", "fig17_gini_evolution", "a rising line means attention on fewer patches"),
        ("erf", "extra_erf95_evolution", "a falling line means fewer patches hold 95 % of it"),
    ):
        page.figure(
            name,
            figures.single_metric_trajectories(runs.histories, metric),
            f"{METRIC_NAMES[metric]} over training (left) and its change per layer (right), "
            f"one line per run: {reading}.",
        )
    return ""


def axis_effect(page: Page, runs: FamilyRuns) -> str:
    """The family's own axis (LoRA rank) per dataset, and the entropy change per method."""
    summary, axis = runs.summary, runs.family.axis
    order = {d: k for k, d in enumerate(runs.datasets)}
    varied = summary[summary[axis].notna()]
    varied = varied.sort_values(
        ["dataset", axis], key=lambda c: c.map(order) if c.name == "dataset" else c
    )
    if not varied.empty:
        columns = ["dataset", axis, "seeds", "best_acc", "d_entropy_pct", "d_gini_pct"]
        page.table(
            "axis",
            varied[columns],
            f"The runs that vary the {SETTING_NAMES.get(axis, axis)}, per dataset: accuracy and "
            "the change of entropy and Gini.",
        )
    changes = [
        f"by {format_change(group['d_entropy_pct'].mean())} % under {METHOD_NAMES[method]} "
        f"({', '.join(group.index)})"
        for method, group in summary.groupby("method", sort=False)
    ]
    return (
        f"Averaged over runs, layer-mean entropy changed {' and '.join(changes)}. Whether that "
        f"difference is more than noise is tested in {STATISTICS_LINK}."
    )


def lr_sweep(page: Page, runs: FamilyRuns) -> str:
    """Report §3.4: the sweep's table and fig. 6, and where entropy drops most."""
    axis = runs.family.axis
    rows = runs.summary.sort_values(axis)
    zeroshot = [f"zs_{d}" for d in zeroshot_datasets(rows)]
    columns = [axis, "seeds", "best_acc", "d_entropy_pct", "d_erf_pct", "d_gini_pct", *zeroshot]
    page.table(
        "sweep",
        rows[columns],
        "One row per learning rate (seed means): best accuracy, the change of entropy, ERF@0.95 "
        "and Gini, and zero-shot accuracy where measured.",
    )
    page.figure(
        "fig6_lr_sweep",
        figures.lr_sweep(rows.reset_index(), runs.histories),
        "Change of entropy, ERF@0.95 and Gini (top left) and best accuracy (top right) against "
        "the learning rate, and entropy over training per rate (bottom): look for a steeper "
        "drop at the higher rates.",
    )
    steepest = rows.loc[rows["d_entropy_pct"].idxmin()]
    return (
        f"Across {len(rows)} learning rates from {rows[axis].min():g} to {rows[axis].max():g}, "
        f"the largest entropy drop is {format_change(steepest['d_entropy_pct'])} % at lr "
        f"{steepest[axis]:g}. The correlation with log learning rate, with exact p-values, is in "
        f"{STATISTICS_LINK}."
    )


def layer_freezing(page: Page, runs: FamilyRuns) -> str:
    """Report §3.5: entropy change and accuracy against the number of frozen layers."""
    axis = runs.family.axis
    rows = runs.summary.sort_values(axis)
    page.table(
        "freezing",
        rows[[axis, "seeds", "best_acc", "d_entropy_pct"]],
        "One row per number of frozen layers (seed means): best accuracy and entropy change.",
    )
    fig = figures.ablation_effect(rows.reset_index(), axis, SETTING_NAMES[axis], runs.family.title)
    page.figure(
        "extra_frozen_layers",
        fig,
        "Entropy change (left) and best accuracy (right) against the number of frozen layers: "
        "does freezing more layers keep entropy higher, and at what cost in accuracy?",
    )
    span = rows["d_entropy_pct"].max() - rows["d_entropy_pct"].min()
    return (
        f"Across {int(rows[axis].min())}–{int(rows[axis].max())} frozen layers the entropy "
        f"change spans {span:.2f} percentage points and best accuracy ranges from "
        f"{100 * rows['best_acc'].min():.2f} % to {100 * rows['best_acc'].max():.2f} %."
    )


def regularization(page: Page, runs: FamilyRuns) -> str:
    """Report §3.7: APR, entropy floor and weight decay against the unregularized reference."""
    rows = runs.summary
    columns = ["reg_kind", "lam", "weight_decay", "seeds", "best_acc", "d_entropy_pct"]
    page.table(
        "regularization",
        rows[columns],
        "One row per regularizer setting (seed means): best accuracy and entropy change, the "
        "unregularized reference included.",
    )
    page.figure(
        "fig8_regularization",
        figures.regularization(rows.reset_index(), runs.histories),
        "Entropy change per run (left) and the KL from the pre-trained attention over training "
        "(right): a regularizer that works keeps both nearer zero than the unregularized "
        "reference.",
    )
    references = runs.family.references
    clauses = [
        f"without regularization ({ref}) entropy changed by "
        f"{format_change(rows['d_entropy_pct'].get(ref, float('nan')))} %"
        for ref in references
    ]
    best = rows["d_entropy_pct"].idxmax()
    kept = format_change(rows.loc[best, "d_entropy_pct"])
    clauses.append(f"the setting that kept it highest is {best} ({kept} %)")
    text = "; ".join(clauses) + "."
    if references:
        text += f" Paired tests against {', '.join(references)} are in {STATISTICS_LINK}."
    return text[0].upper() + text[1:]


def trajectories(page: Page, runs: FamilyRuns) -> str:
    """The four metrics over training, one line per run, and a Δ sentence per run."""
    name = (
        "extra_lora_qkvo"
        if runs.family.name == "lora_targets"
        else f"{runs.family.name}_trajectories"
    )
    page.figure(
        name,
        figures.metric_trajectories(runs.histories, runs.family.title),
        f"Layer-mean entropy, ERF@0.95, Gini and head diversity over training, one line per run "
        f"of {runs.family.title}: look for lines that part.",
    )
    return " ".join(
        f"{run}: Δentropy {format_change(row['d_entropy_pct'])} %, Δhead diversity "
        f"{format_change(row['d_head_diversity_pct'])} %, best accuracy "
        f"{100 * row['best_acc']:.2f} %."
        for run, row in runs.summary.iterrows()
    )


Step = Callable[[Page, FamilyRuns], str]


FAMILY_STEPS: dict[str, tuple[Step, ...]] = {
    "baseline": (baseline_structure, baseline_table),
    "full_vs_lora": (comparison_table, entropy_heatmaps, method_trajectories, single_metrics,
                     axis_effect),
    "lr_sweep": (lr_sweep,),
    "layer_freezing": (layer_freezing,),
    "lora_targets": (comparison_table, trajectories),
    "regularization": (regularization,),
}  # fmt: skip
"""The steps of each family's page in its notebook's order; any other family of families.yaml
gets :data:`DEFAULT_STEPS`. Study B's page is :mod:`~collapse_utils.book.study_b_page`."""
DEFAULT_STEPS: tuple[Step, ...] = (comparison_table, trajectories)


def open_family(
    profile: str, family: str, params_dir: Path | str = PARAMS_DIR, show: bool = True
) -> tuple[FamilyRuns, Page]:
    """A family page's first step: its runs, and the page with a note naming the runs not
    complete yet and a warning when other training code made some."""
    runs = family_runs(profile, load_families(params_dir)[family], params_dir)
    page = Page(profile, profile_output_root(profile, params_dir), show)
    if runs.missing:
        page.note(f"**Not complete yet, left out:** {', '.join(runs.missing)}")
    if warning := code_warning(runs.histories, profile):
        page.note(warning)
    if runs.summary.empty:  # the page's whole conclusion
        page.sentences.append(f"No run of this comparison is complete yet ({', '.join(runs.ids)}).")
    return runs, page


def family_summary(
    profile: str, family: str, params_dir: Path | str = PARAMS_DIR, show: bool = True
) -> Page:
    """The comparison page of ``family`` in one call (tests, scripts): what its notebook shows
    step by step."""
    runs, page = open_family(profile, family, params_dir, show)
    if runs.summary.empty:
        page.conclusion()
        return page
    if family == "study_b":
        study_b_page(page, runs)
        return page
    for step in FAMILY_STEPS.get(family, DEFAULT_STEPS):
        show_step(step, page, runs)
    page.conclusion()
    return page
