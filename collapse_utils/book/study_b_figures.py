"""Study B's figures: dose-response panels, retention against Δentropy, and the signal ranking.

Each function takes a table of :mod:`collapse_utils.analysis.study_b` and returns a Figure;
labels of columns come from the book's one table vocabulary (``tables.column_spec``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from collapse_utils.book.figures import MAX_WIDTH_IN, empty_panel, legend_below, new_figure
from collapse_utils.book.style import DATASET_NAMES, METHOD_COLORS, METHOD_NAMES
from collapse_utils.book.tables import column_spec


def dose_response(frame: pd.DataFrame, outcomes: Sequence[str]) -> Figure:
    """One panel per outcome (rows) and dataset (columns): each seed's run as a dot and the
    seed mean as a line against the learning rate (log scale), one colour per method; methods
    run at one learning rate are a single marker."""
    datasets = sorted(frame["dataset"].unique())
    width = min(MAX_WIDTH_IN / len(datasets), 4.4)
    fig, axes = new_figure(len(datasets), len(outcomes), width=width, height=2.7)
    for row, outcome in enumerate(outcomes):
        for col, dataset in enumerate(datasets):
            ax = axes[row, col]
            runs = frame[frame["dataset"] == dataset]
            for method, points in runs.groupby("method", sort=False):
                color = METHOD_COLORS.get(method, "tab:gray")
                ax.scatter(points["lr"], points[outcome], color=color, s=12, alpha=0.5)
                means = points.groupby("lr")[outcome].mean()
                ax.plot(means.index, means.values, color=color, marker="o", markersize=4,
                        label=METHOD_NAMES.get(method, method))  # fmt: skip
            ax.set_xscale("log")
            ax.set_title(DATASET_NAMES.get(dataset, dataset), fontsize=10)
            ax.set_ylabel(column_spec(outcome).label if col == 0 else "")
            ax.set_xlabel("learning rate" if row == len(outcomes) - 1 else "")
    legend_below(fig, *_unique_handles(axes))
    return fig


def retention_vs_entropy(frame: pd.DataFrame, retention: str) -> Figure:
    """Every run's zero-shot retention against its Δentropy, coloured by method, one panel per
    dataset: whether collapse and forgetting go together within a method."""
    datasets = sorted(frame["dataset"].unique())
    width = min(MAX_WIDTH_IN / len(datasets), 4.4)
    fig, axes = new_figure(len(datasets), width=width, height=3.2)
    for col, dataset in enumerate(datasets):
        ax = axes[0, col]
        runs = frame[frame["dataset"] == dataset]
        for method, points in runs.groupby("method", sort=False):
            ax.scatter(points["d_entropy_pct"], points[retention], s=16,
                       color=METHOD_COLORS.get(method, "tab:gray"),
                       label=METHOD_NAMES.get(method, method))  # fmt: skip
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set(title=DATASET_NAMES.get(dataset, dataset), xlabel=column_spec("d_entropy_pct").label)
        ax.set_ylabel(column_spec(retention).label if col == 0 else "")
    legend_below(fig, *_unique_handles(axes))
    return fig


def signal_ranking(ranking: pd.DataFrame) -> Figure:
    """|ρ| of each signal with retention over every run (bar, 95 % bootstrap CI) beside its
    mean |ρ| within dataset and within dataset × method (markers), best signal on top."""
    fig, axes = new_figure(width=6.8, height=0.45 * len(ranking) + 1.4)
    ax = axes[0, 0]
    if ranking.empty:
        empty_panel(ax, "no signal measured on enough runs")
        return fig
    y = np.arange(len(ranking))[::-1]
    overall = ranking["rho"].abs()
    err = np.vstack([overall - ranking["ci_low"], ranking["ci_high"] - overall]).clip(min=0)
    ax.barh(y, overall, xerr=err, color="tab:gray", alpha=0.6, label="|ρ| over all runs")
    ax.scatter(ranking["abs_rho_within"], y, marker="D", color="tab:blue", zorder=3,
               label="mean |ρ| within dataset")  # fmt: skip
    ax.scatter(ranking["abs_rho_within_method"], y, marker="o", color="tab:red", zorder=3,
               label="mean |ρ| within dataset × method")  # fmt: skip
    ax.set_yticks(y, [column_spec(name).label for name in ranking.index])
    ax.set(xlim=(0, 1.05), xlabel="|Spearman ρ| with zero-shot retention")
    legend_below(fig, *ax.get_legend_handles_labels())
    return fig


def _unique_handles(axes) -> tuple[list, list[str]]:
    """Legend handles and labels over all panels, each label once."""
    seen: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)
