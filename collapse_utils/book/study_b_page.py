"""How a Study B page shows its analyses, one section per question, for our runs (the summary
phase of ``13_study_b``) and for the authors' published ones (``14_study_b_published``).

Each section takes a :class:`~collapse_utils.book.page.Page` and a Study B frame
(:mod:`collapse_utils.analysis.study_b`: one row per run, signals at the selected checkpoint),
records and shows its table and figure, and returns the sentence it adds to the page's findings
(empty when it has nothing to say). :func:`study_b_page` runs them all on our runs; the
published chapter calls them one by one between its own text (its own sections:
:mod:`~collapse_utils.book.study_b_published`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

import pandas as pd

from collapse_utils.analysis import published, study_b
from collapse_utils.analysis.results import run_summary
from collapse_utils.book import study_b_figures
from collapse_utils.book.page import Page
from collapse_utils.book.style import DATASET_NAMES, METHOD_NAMES
from collapse_utils.book.tables import column_spec, format_change, format_lr, format_p

if TYPE_CHECKING:
    from collapse_utils.book.family_pages import FamilyRuns

N_BOOT = 2000
ENTROPY = "d_entropy_pct_sel"
DAMAGED = f"{100 * study_b.DAMAGED:g} %"


def frames(runs: FamilyRuns) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(every complete run, the primary backbone's runs, the transfer target): one row per run,
    signals at the selected checkpoint (:func:`study_b.grid_frame`); other backbones are
    analysed apart (:func:`backbones`)."""
    every = study_b.grid_frame(run_summary(runs.histories))
    return every, published.primary(every), transfer_target(every)


def study_b_page(page: Page, runs: FamilyRuns) -> None:
    """The analysis ``13_study_b`` shows step by step, in one call (tests, scripts): every
    section of :data:`SECTIONS` on the primary backbone, then the other backbones."""
    every, frame, target = frames(runs)
    if frame.empty:
        lead = f"None of the {len(every)} complete runs is on the primary backbone (patch 32) yet."
        page.conclusion(" ".join(s for s in (lead, backbones(page, every, target)) if s))
        return
    for section in SECTIONS:
        page.finding(section(page, frame, target))
    page.finding(backbones(page, every, target))
    page.conclusion()


def transfer_target(frame: pd.DataFrame) -> str:
    """CIFAR-100 retention (the report's transfer set), else the first retention measured;
    empty when none is."""
    retention = study_b.retention_columns(frame)
    return study_b.TARGET if study_b.TARGET in retention else next(iter(retention), "")


def _in_points(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every column in the unit of its label (``study_b_figures.shown``:
    accuracies and retention, stored as fractions, in %): a table whose rows are outcomes of
    different units shows each in its own."""
    scaled = frame.copy()
    for column in scaled.select_dtypes("number").columns:
        scaled[column] = study_b_figures.shown(scaled, column)
    return scaled


# --- the sections ------------------------------------------------------------------------------


def cells(page: Page, frame: pd.DataFrame, target: str) -> str:
    """Mean over seeds per dataset × method × lr (SD of Δ entropy and retention)."""
    accuracy = next(iter(study_b.present(frame, ["test_acc", "best_acc"])), "")
    # the page's two key outcomes first: readable without scrolling sideways
    values = study_b.present(frame, [ENTROPY, target, accuracy, "cka_mean_sel",
                                     "corruption_mean_acc"])  # fmt: skip
    table = study_b.cell_table(frame, values, sd=[ENTROPY, target])
    page.table(
        "cells",
        table,
        "One row per cell (dataset × method × learning rate): each outcome's mean over the "
        "cell's seeds, with the SD over seeds of Δ entropy and retention.",
    )
    mean = f"{target}_mean"
    if mean not in table or table[mean].isna().all():
        return f"The grid has {len(table)} cells of up to {int(table['seeds'].max())} seeds."
    low, high = table[mean].idxmin(), table[mean].idxmax()
    return (
        f"Over the {len(table)} cells, {column_spec(target).label.removesuffix(' (%)')} runs "
        f"from {100 * table.loc[low, mean]:.1f} % ({_cell(low)}) to "
        f"{100 * table.loc[high, mean]:.1f} % ({_cell(high)})."
    )


def _cell(key: tuple) -> str:
    dataset, method, lr = key
    name, where = METHOD_NAMES.get(method, method), DATASET_NAMES.get(dataset, dataset)
    return f"{name} on {where}, lr {format_lr(lr)}"


def paired(page: Page, frame: pd.DataFrame, target: str) -> str:
    """Full FT against LoRA at matched (dataset, lr, seed); accuracies in points."""
    outcomes = study_b.present(frame, [ENTROPY, f"abs_{ENTROPY}", target, "test_acc"])
    table = study_b.paired_table(_in_points(study_b.core(frame)), outcomes)
    page.table(
        "paired",
        _key_first(table, ["n", "diff", "p_t_holm", "d_z"]),
        "Full FT minus LoRA at the same dataset, learning rate and seed, per outcome: the mean "
        "difference, Holm-corrected paired-t p and the paired effect size d_z first.",
    )
    parts = []
    for (dataset, outcome), row in table.iterrows():
        if outcome in (ENTROPY, target) and row["n"] > 0:
            parts.append(
                f"{column_spec(outcome).label} on {DATASET_NAMES.get(dataset, dataset)} "
                f"{format_change(row['diff'])} ({int(row['n'])} pairs, "
                f"Holm p {_p(row['p_t_holm'])})"
            )
    if not parts:
        return "No full-FT run has a LoRA twin at the same learning rate and seed yet."
    return "Full FT minus LoRA at matched learning rate and seed: " + "; ".join(parts) + "."


def dose(page: Page, frame: pd.DataFrame, target: str) -> str:
    """Each outcome against the learning rate, per dataset and method."""
    effects = study_b.present(frame, [ENTROPY, target, "test_acc"])
    page.table(
        "dose_response",
        study_b.dose_table(frame, effects),
        "Each outcome's Spearman correlation with the learning rate, per dataset and method.",
    )
    page.figure(
        "study_b_dose_response",
        study_b_figures.dose_response(frame, effects),
        "Each outcome against the learning rate, one dot per seed and the seed mean as a line "
        "per method: compare the lines at the same learning rate, not the methods' defaults.",
    )
    return ""


def verdicts(page: Page, frame: pd.DataFrame, target: str) -> str:
    """RQ2 per dataset and RQ3 within dataset × method, with the per-group table of RQ3."""
    if not target:
        return ""
    found = study_b.verdicts(frame, target)
    groups = study_b.within_groups(study_b.core(frame), ENTROPY, target)
    page.table(
        "entropy_within_groups",
        groups,
        "Within each dataset × method: Spearman ρ of Δ entropy with retention over its runs.",
    )
    page.figure(
        "study_b_retention_vs_entropy",
        study_b_figures.retention_vs_entropy(frame, target, ENTROPY),
        f"{column_spec(target).label} against Δ entropy for every full-FT and LoRA run, one "
        "panel per dataset: within a colour the points follow a line whose slope can change "
        "sign between methods and datasets.",
    )
    rq3, rq2 = found["RQ3"], found["RQ2"]
    text = f"RQ3, judged within dataset × method: **{rq3.verdict}**"
    text += f" ({rq3.detail or rq3.reason})." if (rq3.detail or rq3.reason) else "."
    text += _dose_meter(rq3)
    text += f" RQ2, judged per dataset: **{rq2.verdict}** ({rq2.detail or rq2.reason})."
    return text


def _dose_meter(rq3) -> str:
    """What the within-group and pooled correlations of RQ3 say together, in words."""
    x = rq3.numbers
    if "pooled_rho" not in x:
        return ""
    text = (
        f" Pooled over every run the same correlation is ρ = {x['pooled_rho']:+.2f}, against a "
        f"mean |ρ| of {x['mean_abs_rho']:.2f} within the groups"
    )
    if rq3.verdict == "not stable across configurations" and x["mean_abs_rho"] > abs(
        x["pooled_rho"]
    ):
        text += (
            ": within one configuration Δ entropy measures the dose of fine-tuning, but neither "
            "its strength nor its sign carries across configurations, so it is not a meter of "
            "the damage to transfer"
        )
    return text + "."


def ranking(page: Page, frame: pd.DataFrame, target: str) -> str:
    """Every signal and reference row ranked against ``target`` over full FT and LoRA, the
    bootstrap over cells; the other methods appear only as reference points."""
    if not target:
        return ""
    table = study_b.signal_ranking(frame, target, n_boot=N_BOOT)
    if table.empty:
        return ""
    page.table(
        "signal_ranking",
        _key_first(
            table, ["kind", "unit_rho", "ci_low", "ci_high", "gap", "gap_low", "gap_high"]
        ),  # fmt: skip
        "Each signal's Spearman ρ with retention over the cell means, its 95 % CI from "
        "resampled cells and its gap to the best signal; reference rows need labels.",
    )
    page.figure(
        "study_b_signal_ranking",
        study_b_figures.signal_ranking(table),
        "How well each label-free signal (and, in grey italics, each reference row) ranks "
        "zero-shot retention over the full-FT and LoRA runs: the bar over the cell means with its "
        "95 % CI from resampled cells, the markers within a dataset and within a dataset and "
        "method.",
    )
    signals = table[table["kind"] == "signal"]
    if signals.empty:
        return ""
    best, row = signals.index[0], signals.iloc[0]
    by_runs = signals.reindex(signals["rho"].abs().sort_values(ascending=False).index)
    leaders = ", ".join(f"{column_spec(n).label} (ρ = {r:+.2f})" for n, r in
                        by_runs["rho"].head(2).items())  # fmt: skip
    split = study_b.separated(table)
    text = (
        f"Over the {int(row['n'])} runs the leading label-free signals are {leaders}. Over the "
        f"cell means the best is {column_spec(best).label} (|ρ| = {abs(row['unit_rho']):.2f}, "
        f"95 % CI {row['ci_low']:.2f} to {row['ci_high']:.2f}, {int(row['n_units'])} cells)."
    )
    text += (
        " Resampling cells, the gap to it excludes 0 only for "
        + ", ".join(column_spec(name).label for name in split)
        + f"; the other {len(table) - 1 - len(split)} rows are within resampling noise of it."
        if split
        else " Resampling cells, no other row's gap to it excludes 0."
    )
    return text


def early_warning(page: Page, frame: pd.DataFrame, target: str) -> str:
    """Epoch-1 signals against the final retention, and their cell-level AUC for damage."""
    table = study_b.early_warning(frame, target) if target else pd.DataFrame()
    if table.empty:
        return ""
    page.table(
        "early_warning",
        _key_first(table, ["auc", "damaged_low", "rho", "p"]),
        "Each signal read after the first epoch: its cell-level AUC for separating damaged "
        "cells, and its Spearman ρ with the final retention.",
    )
    row = table.iloc[0]
    if row["n_damaged"] == 0 or row["n_healthy"] == 0:
        return f"No cell is damaged (retention below {DAMAGED}), so no early warning can be scored."
    best = table["auc"].idxmax()
    text = (
        f"After one epoch, {column_spec(best).label} separates the {int(row['n_damaged'])} "
        f"damaged cells (retention below {DAMAGED}) from the {int(row['n_healthy'])} others with a "
        f"cell-level AUC of {table.loc[best, 'auc']:.2f}"
    )
    if "d_entropy_pct_e1" in table.index and best != "d_entropy_pct_e1":
        text += f"; signed Δ entropy reaches {table.loc['d_entropy_pct_e1', 'auc']:.2f}"
    return text + "."


def selection(page: Page, frame: pd.DataFrame, target: str) -> str:
    """Choosing among runs of near-best validation accuracy by one signal."""
    table = study_b.selection(frame, target) if target else pd.DataFrame()
    if table.empty:
        return ""
    page.table(
        "selection",
        _key_first(table, ["picked", "retention", "regret"]),
        "Per dataset and signal: the run the signal picks among those near the best validation "
        "accuracy, its retention and the regret against the best pick.",
    )
    parts = []
    for dataset, block in table.groupby(level="dataset"):
        picks = block.droplevel("dataset")
        first, best = picks.iloc[0], picks["regret"].idxmin()
        text = (
            f"on {DATASET_NAMES.get(dataset, dataset)} ({int(first['candidates'])} candidates, "
            f"retention {100 * first['worst']:.1f}–{100 * first['oracle']:.1f} %, a random pick "
            f"{100 * first['random']:.1f} %) {column_spec(best).label} picks "
            f"{100 * picks.loc[best, 'retention']:.1f} %"
        )
        entropy = f"abs_{ENTROPY}"
        if entropy in picks.index and entropy != best:
            text += (
                f" and {column_spec(entropy).label} {100 * picks.loc[entropy, 'retention']:.1f} %"
            )
        parts.append(text)
    return (
        f"Choosing among the runs within {study_b.SELECTION_MARGIN:g} points of the best "
        "validation accuracy by the signal that says least changed: " + "; ".join(parts) + "."
    )


def frontier(page: Page, frame: pd.DataFrame, target: str) -> str:
    """The accuracy / retention trade-off of every cell, reference points included."""
    if not target or "test_acc" not in study_b.present(frame, ["test_acc"]):
        return ""
    cells = study_b.frontier(frame, target)
    page.table(
        "frontier",
        cells,
        "Every cell's test accuracy and retention (seed means), and whether it is on the "
        "accuracy / retention frontier.",
    )
    page.figure(
        "study_b_frontier",
        study_b_figures.frontier(cells, target),
        "Test accuracy against zero-shot retention per cell (seed means), every method: the "
        "cells on the line are those no other cell beats on both.",
    )
    parts = []
    for dataset, on in cells[cells["on_frontier"]].reset_index().groupby("dataset"):
        names = [f"{METHOD_NAMES.get(m, m)} at {format_lr(lr)}"
                 for m, lr in zip(on["method"], on["lr"], strict=True)]  # fmt: skip
        parts.append(f"on {DATASET_NAMES.get(dataset, dataset)} {', '.join(names)}")
    return f"On the accuracy / retention frontier: {'; '.join(parts)}."


def operating_points(page: Page, frame: pd.DataFrame, target: str) -> str:
    """The learning rate each method picks by mean validation accuracy, and what it costs."""
    values = study_b.present(frame, ["test_acc", ENTROPY, target])
    points = study_b.operating_points(frame, values)
    page.table(
        "operating_points",
        points,
        "Per dataset and method: the learning rate picked by mean validation accuracy and "
        "what it gives on each outcome.",
    )
    parts = []
    for (dataset, method), row in points.iterrows():
        text = (f"{METHOD_NAMES.get(method, method)} on {DATASET_NAMES.get(dataset, dataset)} "
                f"lr {format_lr(row['lr'])}")  # fmt: skip
        if target and pd.notna(row.get(target)):
            text += f" (retention {100 * row[target]:.1f} %)"
        parts.append(text)
    return "Picked by validation accuracy, the operating points are: " + "; ".join(parts) + "."


# The questions of a Study B page, in the order ``13_study_b`` asks them (a test holds the
# notebook to this order); each returns its sentence of the page's conclusion.
SECTIONS = (
    cells, paired, dose, verdicts, ranking, early_warning, selection, operating_points, frontier,
)  # fmt: skip


def _key_first(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``table`` with ``columns`` first: what a reader needs must not hide behind a scroll."""
    return table[[*columns, *(c for c in table.columns if c not in columns)]]


def _p(value: float) -> str:
    return "n/a" if pd.isna(value) else format_p(value)


def backbones(page: Page, frame: pd.DataFrame, target: str) -> str:
    """Each backbone beside the primary one (ViT-B/16 beside ViT-B/32), analysed apart and
    never pooled: its cell table, then the sign of each signal per backbone on EuroSAT (the
    dataset they share). Empty when ``frame`` holds one backbone."""
    arms = published.others(frame)
    for model, arm in arms.items():
        page.note(f"**The {published.short_name(model)} arm** ({len(arm)} runs), apart:")
        cells(
            dataclasses.replace(page, prefix=f"{page.prefix}{backbone_slug(model)}_"), arm, target
        )
    eurosat = frame[frame["dataset"] == "eurosat"]
    if not target or eurosat["patch_size"].nunique() < 2:  # nothing to set side by side
        return ""
    return polarity(page, {model: rows for model, rows in eurosat.groupby("model")}, target)


def backbone_slug(model: str) -> str:
    """``openai/clip-vit-base-patch16`` → ``ViTB16``: a table or figure name's part."""
    return re.sub(r"[^A-Za-z0-9]+", "", published.short_name(model))


def polarity(page: Page, frames: dict[str, pd.DataFrame], target: str) -> str:
    """The sign of each signal's relation to ``target`` within dataset × method, per backbone
    (``frames``: model → its runs, EuroSAT only so the backbones share their datasets)."""
    signals = [ENTROPY, "cka_mean_sel", "weight_drift_sel", "embedding_drift_sel"]
    table = pd.concat(
        {model: study_b.polarity(runs, signals, target) for model, runs in frames.items()},
        names=["model"],
    )
    page.table(
        "polarity",
        table,
        "Per backbone: each signal's Spearman ρ with retention, to compare the signs.",
    )
    rho = table[f"rho_{ENTROPY}"].dropna()
    groups = {"positive": [], "negative": [], "null": []}
    for (model, _, method), value in rho.items():
        kind = "null" if abs(value) < 0.005 else ("positive" if value > 0 else "negative")
        where = f"{METHOD_NAMES.get(method, method)} on {published.short_name(model)}"
        groups[kind].append(f"{where} ({format_change(value)})")
    parts = [f"{kind} for {', '.join(found)}" for kind, found in groups.items() if found]
    if not parts:
        return (
            "Within the EuroSAT runs, Δ entropy's correlation with retention has no value in any "
            "dataset × method group of any backbone: too few runs that differ."
        )
    steady = [column_spec(s).label for s in signals[1:] if f"rho_{s}" in table
              and ((table[f"rho_{s}"] > 0).all() or (table[f"rho_{s}"] < 0).all())]  # fmt: skip
    keep = f"; {', '.join(steady)} keep one sign in every group" if steady else ""
    return (
        "Within the EuroSAT runs, Δ entropy's correlation with retention is "
        + "; ".join(parts)
        + keep
        + "."
    )
