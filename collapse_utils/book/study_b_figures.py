"""Study B's figures: dose-response panels, retention against Δentropy, and the signal ranking.

Each function takes a table of :mod:`collapse_utils.analysis.study_b` and returns a Figure;
labels of columns come from the book's one table vocabulary (``tables.column_spec``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from collapse_utils.analysis.study_b import CORE_METHODS
from collapse_utils.book.figures import MAX_WIDTH_IN, empty_panel, legend_below, new_figure
from collapse_utils.book.style import DATASET_NAMES, METHOD_NAMES, method_style
from collapse_utils.book.tables import ACC, column_spec


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
                style = method_style(method)
                values = shown(points, outcome)
                ax.scatter(points["lr"], values, color=style["color"], gid=style["gid"], s=12,
                           alpha=0.5)  # fmt: skip
                means = values.groupby(points["lr"]).mean()
                ax.plot(means.index, means.values, **style, marker="o", markersize=4,
                        label=METHOD_NAMES.get(method, method))  # fmt: skip
            ax.set_xscale("log")
            ax.set_title(DATASET_NAMES.get(dataset, dataset), fontsize=10)
            ax.set_ylabel(column_spec(outcome).label if col == 0 else "")
            ax.set_xlabel("learning rate" if row == len(outcomes) - 1 else "")
    legend_below(fig, *_unique_handles(axes))
    return fig


def retention_vs_entropy(frame: pd.DataFrame, retention: str, signal: str) -> Figure:
    """Zero-shot retention against ``signal`` (Δ entropy) for every full-FT and LoRA run,
    coloured by method, one panel per dataset: whether collapse and forgetting go together
    within a method, and whether the slope keeps its sign across methods."""
    runs = frame[frame["method"].isin(CORE_METHODS)]
    datasets = sorted(runs["dataset"].unique()) or ["none"]
    width = min(MAX_WIDTH_IN / len(datasets), 4.4)
    fig, axes = new_figure(len(datasets), width=width, height=3.2)
    for col, dataset in enumerate(datasets):
        ax = axes[0, col]
        for method, points in runs[runs["dataset"] == dataset].groupby("method", sort=False):
            style = method_style(method)
            ax.scatter(points[signal], shown(points, retention), s=16, color=style["color"],
                       gid=style["gid"], label=METHOD_NAMES.get(method, method))  # fmt: skip
        ax.axhline(100.0, color="black", linewidth=0.8, linestyle="--", label="_pre-trained")
        ax.axvline(0.0, color="gray", linewidth=0.6, linestyle=":", label="_no change")
        ax.set(title=DATASET_NAMES.get(dataset, dataset), xlabel=column_spec(signal).label)
        ax.set_ylabel(column_spec(retention).label if col == 0 else "")
    legend_below(fig, *_unique_handles(axes))
    return fig


def signal_ranking(ranking: pd.DataFrame) -> Figure:
    """|ρ| of each signal with retention over the bootstrap units (bar, 95 % CI) beside its
    mean |ρ| within dataset and within dataset × method (markers), best on top; reference rows
    (what needs labels, the learning-rate dial, the signed statistic) hatched and in italics."""
    fig, axes = new_figure(width=6.8, height=0.45 * len(ranking) + 1.4)
    ax = axes[0, 0]
    if ranking.empty:
        empty_panel(ax, "no signal measured on enough runs")
        return fig
    y = np.arange(len(ranking))[::-1]
    overall = ranking["unit_rho"].abs()
    err = np.vstack([overall - ranking["ci_low"], ranking["ci_high"] - overall]).clip(min=0)
    reference = (ranking.get("kind", pd.Series("signal", ranking.index)) == "reference").to_numpy()
    units = "cell means" if (ranking["n_units"] < ranking["n"]).any() else "runs"
    ax.barh(y[~reference], overall[~reference], xerr=err[:, ~reference], color="tab:gray",
            alpha=0.6, label=f"|ρ| over the {units} (95 % CI)")  # fmt: skip
    if reference.any():
        ax.barh(y[reference], overall[reference], xerr=err[:, reference], color="white",
                edgecolor="tab:gray", hatch="//", label="reference row")  # fmt: skip
    ax.scatter(ranking["abs_rho_within"], y, marker="D", color="tab:purple", zorder=3,
               label="mean |ρ| within dataset")  # fmt: skip
    ax.scatter(ranking["abs_rho_within_method"], y, marker="o", color="black", zorder=3,
               label="mean |ρ| within dataset × method")  # fmt: skip
    ax.set_yticks(y, [column_spec(name).label for name in ranking.index])
    for label, is_reference in zip(ax.get_yticklabels(), reference, strict=True):
        label.set_fontstyle("italic" if is_reference else "normal")
    ax.set(xlim=(0, 1.05), xlabel="|Spearman ρ| with zero-shot retention")
    legend_below(fig, *ax.get_legend_handles_labels())
    return fig


def frontier(cells: pd.DataFrame, retention: str, accuracy: str = "test_acc") -> Figure:
    """Per dataset, each cell's seed-mean ``accuracy`` (%) against its ``retention`` (%),
    coloured by method, with the Pareto frontier (``cells["on_frontier"]``) as a line."""
    datasets = sorted(cells.index.get_level_values("dataset").unique())
    width = min(MAX_WIDTH_IN / len(datasets), 4.4)
    fig, axes = new_figure(len(datasets), width=width, height=3.4)
    for col, dataset in enumerate(datasets):
        ax, block = axes[0, col], cells.xs(dataset, level="dataset")
        for method, points in block.groupby(level="method", sort=False):
            style = method_style(method)
            ax.scatter(100 * points[retention], 100 * points[accuracy], s=24,
                       color=style["color"], gid=style["gid"],
                       label=METHOD_NAMES.get(method, method))  # fmt: skip
        edge = block[block["on_frontier"]].sort_values(retention)
        ax.plot(100 * edge[retention], 100 * edge[accuracy], color="black", linewidth=0.8,
                linestyle="--", label="frontier", zorder=0)  # fmt: skip
        ax.set(title=DATASET_NAMES.get(dataset, dataset), xlabel=column_spec(retention).label)
        ax.set_ylabel(column_spec(accuracy).label if col == 0 else "")
    legend_below(fig, *_unique_handles(axes))
    return fig


def shown(frame: pd.DataFrame, column: str) -> pd.Series:
    """``column`` in the unit of its label: accuracies and retention (stored as fractions) in
    %, everything else as stored."""
    values = frame[column].astype(float)
    return 100 * values if column_spec(column).kind == ACC else values


def _unique_handles(axes) -> tuple[list, list[str]]:
    """Legend handles and labels over all panels, each label once."""
    seen: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)
