"""Figures of the statistics chapter (report figures 10–14 and 16). Each function takes the
tables of ``analysis.stat_tables`` (or histories, or ``results`` frames) and returns a matplotlib
Figure; the chapter shows it with ``figures.show_figure``. A run with several seeds draws one
row or curve per seed, labelled ``run/s<seed>``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from collapse_utils.analysis.results import (
    run_means,
    trajectory,
    zeroshot_change,
    zeroshot_datasets,
)
from collapse_utils.analysis.stat_tables import (
    ONSET_THRESHOLD,
    UNIT_TITLES,
    change_from_start,
    delta_rows,
)
from collapse_utils.analysis.stats import (
    CorrelationMatrix,
    UnitComparison,
    collapse_onset,
    entropy_velocity,
)
from collapse_utils.book.figures import (
    bars_by_method,
    empty_panel,
    label_points,
    legend_below,
    method_handles,
    new_figure,
    runs_legend,
    scatter_by_method,
)
from collapse_utils.book.style import (
    DATASET_NAMES,
    METHOD_COLORS,
    METHOD_NAMES,
    delta_label,
    method_style,
    run_styles,
    seed_labels,
)
from collapse_utils.book.tables import format_p
from collapse_utils.run_record import RunRecord


def _diverging_limit(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def fig10_per_layer_heatmap(delta: pd.DataFrame, metric: str = "entropy") -> Figure:
    """Per-layer change in % (runs × layers, a ``per_layer_delta`` frame) as a diverging
    heatmap centred on 0, each cell annotated with its value."""
    height = max(2.5, 0.3 * len(delta) + 1.4)
    fig, axes = new_figure(width=min(9.0, max(6.0, 0.55 * delta.shape[1] + 2.0)), height=height)
    ax = axes[0, 0]
    if delta.empty:
        empty_panel(ax, "no per-layer changes")
        return fig
    values = delta.to_numpy(dtype=float)
    limit = _diverging_limit(values)
    image = ax.imshow(
        np.ma.masked_invalid(values), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto"
    )
    ax.set_xticks(range(delta.shape[1]), [str(c) for c in delta.columns])
    ax.set_yticks(range(len(delta)), seed_labels(list(delta.index)))
    ax.set_xlabel("Layer")
    ax.set_ylabel("Run")
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            shade = "white" if abs(value) > 0.6 * limit else "black"
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8, color=shade)
    label = delta_label(f"d_{metric}_pct")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(f"Per-layer {label}, first to final eval")
    return fig


def _ci_panel(ax: Axes, comparisons: Mapping[str, UnitComparison]) -> None:
    if not comparisons:
        empty_panel(ax, "Full FT vs LoRA: no comparison")
        return
    for k, comparison in enumerate(comparisons.values()):
        r = comparison.result
        for offset, method, mean, ci in (
            (-0.12, "full", r.mean_a, r.ci_a),
            (0.12, "lora", r.mean_b, r.ci_b),
        ):
            ax.errorbar(
                [k + offset],
                [mean],
                yerr=[[mean - ci[0]], [ci[1] - mean]],
                fmt="o",
                color=METHOD_COLORS[method],
                capsize=4,
                label=METHOD_NAMES[method] if k == 0 else None,
            )
        top = max(r.ci_a[1], r.ci_b[1])
        ax.annotate(f"p={format_p(r.welch_p)}", (k, top), ha="center", va="bottom", fontsize=9)
    ax.axhline(0, color="black", linewidth=0.7)
    units = list(comparisons)
    ax.set_xticks(range(len(units)), [f"{UNIT_TITLES.get(u, u)}" for u in units])
    ax.set_xlim(-0.6, len(units) - 0.4)
    ax.set_ylabel("Mean Δ entropy (%), 95% bootstrap CI")
    ax.set_title("Full FT vs LoRA (Welch p)")
    ax.legend(fontsize="small")


def _lr_panel(ax: Axes, points: pd.DataFrame, correlations: pd.DataFrame) -> None:
    if len(points) < 2:
        empty_panel(ax, "learning-rate sweep: fewer than two runs")
        return
    x, y = points["log10_lr"].to_numpy(), points["d_entropy_pct"].to_numpy()
    ax.scatter(x, y, color=METHOD_COLORS["full"], zorder=3)
    slope, intercept = np.polyfit(x, y, 1)
    grid = np.linspace(x.min(), x.max(), 2)
    ax.plot(grid, slope * grid + intercept, color="black", linewidth=1)
    ax.margins(x=0.15, y=0.2)
    label_points(ax, x, y, [str(run) for run in points.index])
    if not correlations.empty:
        pearson, spearman = correlations.loc["pearson"], correlations.loc["spearman"]
        ax.text(
            0.03,
            0.04,
            f"Pearson r = {pearson['r']:.3f} (p {pearson['p_used']} "
            f"{format_p(pearson['p_claim'])})\n"
            f"Spearman ρ = {spearman['r']:.3f} (p {spearman['p_used']} "
            f"{format_p(spearman['p_claim'])})",
            transform=ax.transAxes,
            fontsize=9,
        )
    ax.set_xlabel("log10 learning rate")
    ax.set_ylabel("Δ entropy (%)")
    ax.set_title("Learning rate vs Δ entropy (OLS fit)")


def _effect_panel(ax: Axes, regs: pd.DataFrame, reference: str) -> None:
    if regs.empty:
        empty_panel(ax, "regularizers: no run to compare")
        return
    y = np.arange(len(regs))
    ax.barh(y, regs["d_av"], color="tab:green", label="d (average SD)")
    ax.scatter(regs["d_z"], y, color="black", marker="x", zorder=3, label="dz (paired)")
    for yi, (d, p) in enumerate(zip(regs["d_av"], regs["p_holm"], strict=True)):
        ax.annotate(
            f"Holm p {format_p(p)}",
            (d, yi),
            fontsize=8,
            xytext=(3, -3),
            va="top",
            textcoords="offset points",
        )
    ax.axvline(0, color="black", linewidth=0.7)
    ax.set_yticks(y, list(regs.index))
    ax.set_xlabel(f"Cohen's d vs {reference} (paired over layers)")
    ax.set_title("Regularizers: effect size")
    ax.legend(fontsize="small", loc="best")


def fig11_statistical_summary(
    comparisons: Mapping[str, UnitComparison],
    lr_points: pd.DataFrame,
    lr_table: pd.DataFrame,
    reg_table: pd.DataFrame,
    reference: str,
) -> Figure:
    """Three panels, one above the other: Full FT vs LoRA mean Δentropy with bootstrap CIs at
    each unit of analysis; LR sweep scatter with its OLS line, Pearson r and Spearman ρ;
    regularizers' paired effect sizes (bars d_av, crosses d_z) vs the ``reference`` run."""
    fig, axes = new_figure(nrows=3, width=7.0, height=3.4)
    _ci_panel(axes[0, 0], comparisons)
    _lr_panel(axes[1, 0], lr_points, lr_table)
    _effect_panel(axes[2, 0], reg_table, reference)
    return fig


def _curves(history: RunRecord) -> dict[str, np.ndarray]:
    fraction, entropy = trajectory(history, "entropy")
    return {
        "fraction": fraction,
        "entropy": change_from_start(entropy),
        "erf": change_from_start(trajectory(history, "erf")[1]),
        "gini": change_from_start(trajectory(history, "gini")[1]),
        "raw_entropy": entropy,
    }


def fig12_training_dynamics(
    histories: Sequence[RunRecord], threshold: float = ONSET_THRESHOLD
) -> Figure:
    """2×2 panels over training, one line per history (layer-mean metrics): entropy velocity
    at interval midpoints; Δentropy (%) with the −threshold line and onset markers (×);
    ΔERF and ΔGini (%) against Δentropy (%), i.e. how the three metrics co-evolve."""
    fig, axes = new_figure(ncols=2, nrows=2, width=4.3, height=3.3)
    (velocity_ax, entropy_ax), (erf_ax, gini_ax) = axes
    usable = [h for h in histories if len(h.evals) >= 2]
    if not usable:
        for ax in axes.ravel():
            empty_panel(ax, "no run with two or more evals")
        return fig
    for h, style in zip(usable, run_styles(usable), strict=True):
        c = _curves(h)
        velocity = entropy_velocity(c["fraction"], c["raw_entropy"])
        velocity_ax.plot(velocity.midpoints, velocity.rate, **style, markersize=4)
        color = style["color"]
        entropy_ax.plot(c["fraction"], c["entropy"], **style, markersize=4)
        onset = collapse_onset(c["fraction"], c["raw_entropy"], threshold)
        if onset is not None:
            at = int(np.flatnonzero(c["fraction"] == onset)[0])
            entropy_ax.plot(
                [onset],
                [c["entropy"][at]],
                marker="x",
                markersize=10,
                color=color,
                linestyle="none",
            )
        erf_ax.plot(c["entropy"], c["erf"], **style, markersize=4)
        gini_ax.plot(c["entropy"], c["gini"], **style, markersize=4)
    velocity_ax.axhline(0, color="black", linewidth=0.7)
    velocity_ax.set_xlabel("Training fraction")
    velocity_ax.set_ylabel("Entropy velocity (nats / training)")
    velocity_ax.set_title("Entropy velocity")
    runs_legend(fig, usable, entropy_ax)
    entropy_ax.axhline(-100 * threshold, color="gray", linestyle="--", linewidth=0.8)
    entropy_ax.set_xlabel("Training fraction")
    entropy_ax.set_ylabel(delta_label("d_entropy_pct"))
    entropy_ax.set_title(f"Entropy; × = onset ({100 * threshold:g}% drop)")
    for ax, column in ((erf_ax, "d_erf_pct"), (gini_ax, "d_gini_pct")):
        ax.axhline(0, color="black", linewidth=0.5)
        ax.axvline(0, color="black", linewidth=0.5)
        ax.set_xlabel(delta_label("d_entropy_pct"))
        ax.set_ylabel(delta_label(column))
        ax.set_title(f"Co-evolution: {delta_label(column).split(' (')[0]} vs Δ Entropy")
    return fig


def fig13_metric_correlations(matrix: CorrelationMatrix) -> Figure:
    """Correlation matrix of the Δ% metrics and best accuracy across runs: colour = r, each
    off-diagonal cell annotated with r, its p and its Holm-adjusted p."""
    names = list(matrix.r.columns)
    fig, axes = new_figure(width=8.0, height=6.6)
    ax = axes[0, 0]
    r = matrix.r.to_numpy(dtype=float)
    image = ax.imshow(np.ma.masked_invalid(r), cmap="RdBu_r", vmin=-1, vmax=1)
    labels = [delta_label(n) for n in names]
    ax.set_xticks(range(len(names)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), labels)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                continue
            text = (
                f"r={matrix.r.loc[a, b]:.2f}\np={format_p(matrix.p.loc[a, b])}\n"
                f"Holm {format_p(matrix.p_holm.loc[a, b])}"
            )
            strong = abs(matrix.r.loc[a, b]) > 0.6
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if strong else "black",
            )
    fig.colorbar(image, ax=ax, label=f"{matrix.method.capitalize()} r")
    ax.set_title(f"Cross-metric correlations ({matrix.n} runs)")
    return fig


def fig14_convergence(histories: Sequence[RunRecord]) -> Figure:
    """Validation accuracy per epoch, one panel per family, one line per (run, seed)."""
    runs = [h for h in histories if h.epochs]
    families = list(dict.fromkeys(h.family for h in runs))
    ncols = max(1, min(2, len(families)))
    nrows = max(1, math.ceil(len(families) / ncols))
    fig, axes = new_figure(ncols=ncols, nrows=nrows, width=4.3, height=3.0)
    flat = axes.ravel()
    if not families:
        empty_panel(flat[0], "no run with epochs")
        return fig
    styles = dict(zip(((h.id, h.seed) for h in runs), run_styles(runs), strict=True))
    for ax, family in zip(flat, families, strict=False):
        for h in (h for h in runs if h.family == family):
            epochs = [e.epoch for e in h.epochs]
            acc = [100 * e.val_acc for e in h.epochs]
            ax.plot(epochs, acc, **styles[(h.id, h.seed)], markersize=3)
        ax.set_title(family.replace("_", " "))
        ax.set_xlabel("Epoch")
        ax.set_ylabel("Accuracy per epoch (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    runs_legend(fig, runs, *flat[: len(families)])
    for ax in flat[len(families) :]:
        ax.remove()
    return fig


def fig16_dashboard(
    summary: pd.DataFrame,
    delta: pd.DataFrame,
    method_runs: Sequence[str],
    lr_points: pd.DataFrame,
) -> Figure:
    """3×2 summary: Δentropy per run (bars by method); ΔGini vs Δentropy; best accuracy vs
    Δentropy; zero-shot accuracy change (points) vs Δentropy; mean per-layer Δentropy per
    method of ``method_runs`` (the Full FT vs LoRA comparison); Δentropy along the
    learning-rate sweep (``lr_points``, from ``stat_tables.lr_sweep_points``). One legend of the
    method colours under the panels."""
    fig, grid = new_figure(ncols=2, nrows=3, width=4.3, height=3.2)
    axes = grid.reshape(2, 3)  # the panels in reading order, as before: [0, :] then [1, :]
    runs = run_means(summary[summary["method"] != "none"]) if not summary.empty else summary
    if runs.empty:
        for ax in axes.ravel():
            empty_panel(ax, "no trained run")
        return fig
    dent = runs["d_entropy_pct"]

    ax = axes[0, 0]
    bars_by_method(ax, list(runs.index), dent, runs["method"], horizontal=True)
    ax.set_yticks(range(len(runs)), list(runs.index), fontsize=7 if len(runs) > 12 else 9)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.7)
    ax.set_xlabel(delta_label("d_entropy_pct"))
    ax.set_title("Entropy change per run")
    legend_below(fig, method_handles(runs["method"]))

    for ax, column, title in (
        (axes[0, 1], "d_gini_pct", "Concentration vs entropy"),
        (axes[0, 2], "best_acc", "Task accuracy vs entropy"),
    ):
        scatter_by_method(ax, dent, 100 * runs[column] if column == "best_acc" else
                           runs[column], runs["method"])  # fmt: skip
        ax.set_xlabel(delta_label("d_entropy_pct"))
        ax.set_ylabel(delta_label(column))
        ax.set_title(title)

    ax = axes[1, 0]
    zeroshot = zeroshot_datasets(runs)
    if zeroshot:
        scatter_by_method(ax, dent, zeroshot_change(runs, zeroshot[0]), runs["method"])
        ax.axhline(0, color="black", linewidth=0.7)
        ax.set_xlabel(delta_label("d_entropy_pct"))
        ax.set_ylabel(f"Δ zero-shot {DATASET_NAMES.get(zeroshot[0], zeroshot[0])} (points)")
        ax.set_title("Zero-shot transfer vs entropy")
    else:
        empty_panel(ax, "no zero-shot results")
    _method_layers_panel(axes[1, 1], summary[summary["run"].isin(method_runs)], delta)
    _lr_line_panel(axes[1, 2], lr_points)
    return fig


def _method_layers_panel(ax: Axes, compared: pd.DataFrame, delta: pd.DataFrame) -> None:
    """Mean per-layer Δentropy of the Full FT and of the LoRA rows of ``compared``."""
    for method in ("full", "lora"):
        layers = delta_rows(delta, compared.loc[compared["method"] == method, "run"])
        if not layers.empty:
            ax.plot(
                layers.columns,
                layers.mean(axis=0),
                marker="o",
                markersize=3,
                **method_style(method),
                label=f"{METHOD_NAMES[method]} ({len(layers)} runs)",
            )
    if not ax.lines:
        empty_panel(ax, "no Full FT or LoRA run to compare")
        return
    ax.axhline(0, color="black", linewidth=0.7)
    ax.set_xlabel("Layer")
    ax.set_ylabel("Mean " + delta_label("d_entropy_pct"))
    ax.set_title("Per-layer change, Full FT vs LoRA runs")
    ax.legend(fontsize="small")


def _lr_line_panel(ax: Axes, points: pd.DataFrame) -> None:
    if len(points) < 2:
        empty_panel(ax, "learning-rate sweep: fewer than two runs")
        return
    ax.plot(points["log10_lr"], points["d_entropy_pct"], marker="o", color=METHOD_COLORS["full"])
    ax.axhline(0, color="black", linewidth=0.7)
    ax.set_xlabel("log10 learning rate")
    ax.set_ylabel(delta_label("d_entropy_pct"))
    ax.set_title(f"Learning-rate sweep ({len(points)} runs)")
