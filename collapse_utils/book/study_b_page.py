"""The Study B comparison page: the summary phase of ``13_study_b`` (family ``study_b``).

It answers RQ2/RQ3 on a matched grid: the cell table over seeds, full FT against LoRA at
matched (dataset, lr, seed), each method's dose-response in learning rate, which label-free
signal predicts zero-shot retention best, and the operating point each method picks by
validation accuracy. The analyses are :mod:`collapse_utils.analysis.study_b`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from collapse_utils.analysis import study_b
from collapse_utils.analysis.results import run_summary
from collapse_utils.book import study_b_figures
from collapse_utils.book.page import Page
from collapse_utils.book.style import DATASET_NAMES, METHOD_NAMES
from collapse_utils.book.tables import column_spec, format_p, format_value

if TYPE_CHECKING:
    from collapse_utils.book.family_pages import FamilyRuns

N_BOOT = 2000


def study_b_page(page: Page, runs: FamilyRuns) -> None:
    """The Study B comparison of the complete runs of ``runs`` (any subset renders)."""
    frame = study_b.grid_frame(run_summary(runs.histories))
    retention = study_b.retention_columns(frame)
    # CIFAR-100 is the report's transfer set; another retention only when it is missing.
    target = (
        "retention_cifar100" if "retention_cifar100" in retention else next(iter(retention), "")
    )
    effects = study_b.present(frame, ["d_entropy_pct", *retention])  # what training changes
    outcomes = study_b.present(frame, ["best_acc", *effects])
    page.table(
        "cells", study_b.cell_table(frame, study_b.present(frame, [*outcomes, "embedding_drift_f"]))
    )
    paired = study_b.paired_table(_accuracy_in_points(frame), outcomes)
    page.table("paired", paired)
    page.table("dose_response", study_b.dose_table(frame, effects))
    page.figure(
        "study_b_dose_response",
        study_b_figures.dose_response(frame, effects),
        "Each outcome against the learning rate, one dot per seed and the seed mean as a line "
        "per method: compare the lines at the same learning rate, not the methods' defaults.",
    )
    sentences = [_paired_sentence(paired, dataset) for dataset in sorted(frame["dataset"].unique())]
    if target:
        sentences.append(_signal_ranking(page, frame, target))
    points = study_b.operating_points(frame, study_b.present(frame, ["test_acc", *effects]))
    page.table("operating_points", points)
    sentences.append(_operating_sentence(points, target))
    page.conclude(" ".join(s for s in sentences if s))


def _signal_ranking(page: Page, frame: pd.DataFrame, target: str) -> str:
    """Retention against Δ entropy, and every measured signal ranked by how well it predicts
    ``target``; returns the finding's sentence."""
    page.figure(
        "study_b_retention_vs_entropy",
        study_b_figures.retention_vs_entropy(frame, target),
        f"{column_spec(target).label} against Δ entropy for every run, coloured by method: "
        "if collapse drove forgetting, the points of each colour would fall along a line.",
    )
    signals = [*study_b.ATTENTION_SIGNALS, *study_b.REPRESENTATION_SIGNALS, *study_b.EARLY_SIGNALS]
    ranking = study_b.signal_ranking(frame, target, study_b.present(frame, signals), N_BOOT)
    page.table("signal_ranking", ranking)
    page.figure(
        "study_b_signal_ranking",
        study_b_figures.signal_ranking(ranking),
        "How well each label-free signal ranks the runs' zero-shot retention: the bar over "
        "all runs (with its 95 % bootstrap CI), the markers within a dataset and within a "
        "dataset and method, where the method cannot carry the correlation.",
    )
    return _ranking_sentence(ranking, target)


def _accuracy_in_points(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with accuracies (stored as fractions) in %: a table whose rows are outcomes
    of different units shows each in the unit of its label."""
    scaled = frame.copy()
    for column in ("best_acc", "final_acc", "test_acc"):
        if column in scaled:
            scaled[column] = 100 * scaled[column].astype(float)
    return scaled


def _paired_sentence(paired: pd.DataFrame, dataset: str) -> str:
    """Full FT − LoRA at matched (lr, seed) on one dataset, per outcome with Holm's p."""
    rows = paired.loc[dataset] if dataset in paired.index.get_level_values(0) else pd.DataFrame()
    rows = rows[rows["n"] > 0] if not rows.empty else rows
    if rows.empty:
        return f"On {DATASET_NAMES.get(dataset, dataset)} no full-FT run has a LoRA twin yet."
    parts = [
        f"{column_spec(outcome).label} {row['diff']:+.3f} "
        f"(d_z {_num(row['d_z'])}, Holm p {_p(row['p_t_holm'])})"
        for outcome, row in rows.iterrows()
    ]
    n = int(rows["n"].max())
    return (
        f"On {DATASET_NAMES.get(dataset, dataset)}, full FT minus LoRA at matched learning rate "
        f"and seed ({n} pairs): {'; '.join(parts)}."
    )


def _ranking_sentence(ranking: pd.DataFrame, target: str) -> str:
    best, label = ranking.index[0], column_spec(target).label
    row = ranking.loc[best]
    text = (
        f"The signal that ranks {label} best over all {int(row['n'])} runs is "
        f"{column_spec(best).label} (ρ = {row['rho']:.2f}, |ρ| 95 % CI {row['ci_low']:.2f} to "
        f"{row['ci_high']:.2f}; mean |ρ| {_num(row['abs_rho_within_method'])} within dataset "
        "and method)."
    )
    if "d_entropy_pct" in ranking.index and best != "d_entropy_pct":
        entropy = ranking.loc["d_entropy_pct"]
        text += (
            f" Δ entropy reaches |ρ| = {abs(entropy['rho']):.2f}; its gap to the best is "
            f"{entropy['gap']:.2f} (95 % CI {entropy['gap_low']:.2f} to {entropy['gap_high']:.2f})."
        )
    return text


def _operating_sentence(points: pd.DataFrame, target: str) -> str:
    parts = []
    for (dataset, method), row in points.iterrows():
        text = f"{METHOD_NAMES.get(method, method)} on {DATASET_NAMES.get(dataset, dataset)} "
        text += f"lr {format_value(row['lr'], column_spec('lr'))}"
        if target and pd.notna(row.get(target)):
            text += f" (retention {row[target]:.3f})"
        parts.append(text)
    return "Picked by validation accuracy, the operating points are: " + "; ".join(parts) + "."


def _num(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:.2f}"


def _p(value: float) -> str:
    return "n/a" if pd.isna(value) else format_p(value)
