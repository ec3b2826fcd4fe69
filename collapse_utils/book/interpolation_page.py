"""The WiSE-FT interpolation page (issue 15): attention structure and accuracy along
θ_α = (1 − α)·θ₀ + α·θ₁ for the full fine-tuning and LoRA runs of the method comparison.

The runs come from data: the family ``statistics.method_comparison`` of ``params/families.yaml``
(its references, then its experiments), those that train with full fine-tuning or LoRA. Each
complete run (every seed) is measured by :func:`~collapse_utils.training.interpolation.
measure_path` on the checkpoint its zero-shot numbers use (``eval.zeroshot_checkpoint``); the
others are named on the page.

*Transfer* is the mean zero-shot accuracy over the profile's zero-shot datasets other than the
run's own task. Along α from 1 to 0, :func:`recovery` finds where transfer has recovered half of
what fine-tuning cost (α½, linear between the measured α) and how much of each metric's change
α = 0 → 1 has come back there; a metric moving on the straight line between its ends would have
1 − α½ back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from collapse_utils.analysis.results import load_histories
from collapse_utils.book.figures import (
    HEATMAP_COLUMNS,
    empty_panel,
    label_line_ends,
    label_points,
    legend_below,
    method_handles,
    new_figure,
)
from collapse_utils.book.page import Page, show_step
from collapse_utils.book.style import (
    DATASET_NAMES,
    METHOD_NAMES,
    METRIC_NAMES,
    curve_labels,
    labelled_styles,
    metric_label,
)
from collapse_utils.config import METRICS, PARAMS_DIR, RunConfig, load_config, profile_output_root
from collapse_utils.families import comparison_ids, load_families, load_statistics_runs

METHODS = ("full", "lora")  # the methods that move the encoder: the ones with a path
MARKED = (0.0, 0.5, 1.0)  # α written beside each frontier curve


@dataclass(frozen=True)
class RunPath:
    """One (run, seed) on the page: its label, config and path table
    (:meth:`~collapse_utils.training.interpolation.InterpolationRecord.table`) and per-layer
    entropy (index α, columns layers)."""

    label: str
    config: RunConfig
    table: pd.DataFrame
    layer_entropy: pd.DataFrame

    @property
    def transfer_datasets(self) -> list[str]:
        """The zero-shot datasets that measure transfer: all but the run's own task."""
        names = [c.removeprefix("zs_") for c in self.table.columns if c.startswith("zs_")]
        return [n for n in names if n != self.config.data.dataset]

    @property
    def transfer(self) -> pd.Series:
        """Mean zero-shot accuracy over :attr:`transfer_datasets` at each α (NaN without any)."""
        columns = [f"zs_{n}" for n in self.transfer_datasets]
        if not columns:
            return pd.Series(np.nan, index=self.table.index)
        return self.table[columns].mean(axis=1)


# --- the arithmetic of the sentences --------------------------------------------------------


def recovered(alpha: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Fraction of the change α = 0 → 1 that has come back at each α:
    ``(v(α) − v(1)) / (v(0) − v(1))``, 0 at α = 1 and 1 at α = 0. NaN where the path lacks
    either end or the ends are equal."""
    alpha, values = np.asarray(alpha, dtype=float), np.asarray(values, dtype=float)
    if not (np.isin(0.0, alpha) and np.isin(1.0, alpha)):
        return np.full(len(values), np.nan)
    start, end = values[alpha == 0.0][0], values[alpha == 1.0][0]
    if start == end or not np.isfinite(start - end):
        return np.full(len(values), np.nan)
    return (values - end) / (start - end)


def half_back(alpha: np.ndarray, fraction: np.ndarray) -> float:
    """The largest α at which ``fraction`` (from :func:`recovered`) reaches ½, walking from
    α = 1 towards 0, linear between the measured α; NaN if it never does."""
    order = np.argsort(np.asarray(alpha, dtype=float))[::-1]
    a = np.asarray(alpha, dtype=float)[order]
    f = np.asarray(fraction, dtype=float)[order]
    for i in range(len(a)):
        if f[i] >= 0.5:
            if i == 0:
                return float(a[0])
            t = (0.5 - f[i - 1]) / (f[i] - f[i - 1])
            return float(a[i - 1] + t * (a[i] - a[i - 1]))
    return math.nan


def recovery(path: RunPath) -> dict[str, float | str]:
    """One row of the recovery table: ``zs_loss`` (transfer at α = 0 minus at α = 1, a
    fraction), ``alpha_half`` (α½; NaN when transfer lost nothing), ``<metric>_back`` (% of the
    metric's change back at α½) and ``linear_back`` (100·(1 − α½), the straight line's)."""
    table = path.table.sort_values("alpha")
    alpha = table["alpha"].to_numpy()
    transfer = path.transfer.loc[table.index].to_numpy()
    ends = np.isin(0.0, alpha) and np.isin(1.0, alpha)
    loss = transfer[alpha == 0.0][0] - transfer[alpha == 1.0][0] if ends else math.nan
    at = half_back(alpha, recovered(alpha, transfer)) if loss > 0 else math.nan
    row: dict[str, float | str] = {
        "method": path.config.train.method,
        "dataset": path.config.data.dataset,
        "zs_loss": loss,
        "alpha_half": at,
    }
    for metric in METRICS:
        back = recovered(alpha, table[metric].to_numpy())
        row[f"{metric}_back"] = 100 * float(np.interp(at, alpha, back))  # NaN at a NaN α½
    row["linear_back"] = 100 * (1 - at)
    return row


def _percent(value: float) -> str:
    return "n/a (no change)" if math.isnan(value) else f"{value:.0f} %"


def recovery_sentence(path: RunPath, row: dict) -> str:
    """What :func:`recovery` found for one run, in one sentence."""
    named = [DATASET_NAMES.get(n, n) for n in path.transfer_datasets]
    where = ("the mean over " if len(named) > 1 else "") + ", ".join(named)
    head = f"**{path.label}** ({path.config.description or path.config.id})"
    if not named:
        return f"{head}: the profile has no zero-shot dataset besides the task's own."
    if math.isnan(row["zs_loss"]):
        return f"{head}: the path lacks α = 0 or α = 1, so no loss is defined."
    if row["zs_loss"] <= 0:
        change = -100 * row["zs_loss"]
        moved = f"rises by {change:.2f} points" if change > 0 else "stays the same"
        return (
            f"{head}: zero-shot accuracy ({where}) {moved} from α = 0 to α = 1, so fine-tuning "
            "cost no transfer here and there is nothing to recover."
        )
    others = ", ".join(
        f"{METRIC_NAMES[m]} {_percent(row[f'{m}_back'])}" for m in METRICS if m != "entropy"
    )
    return (
        f"{head}: zero-shot accuracy ({where}) falls by {100 * row['zs_loss']:.2f} points from "
        f"α = 0 to α = 1, and half of that is back at α = {row['alpha_half']:.2f}; there "
        f"{_percent(row['entropy_back'])} of the entropy change has come back ({others}), "
        f"against {row['linear_back']:.0f} % on a straight line."
    )


# --- figures --------------------------------------------------------------------------------


def frontier(paths: list[RunPath]) -> Figure:
    """Task accuracy against transfer along α, one curve per run: with the run's trained head
    (left) and with a zero-shot text head (right); α = 0, ½ and 1 written beside each curve."""
    fig, axes = new_figure(ncols=2, width=4.4, height=3.6)
    styles = _styles(paths)
    for ax, column, title in (
        (axes[0, 0], "task_acc", "trained head"),
        (axes[0, 1], "task_acc_zeroshot_head", "zero-shot text head"),
    ):
        marks: dict[tuple[float, float], str] = {}
        for path, style in zip(paths, styles, strict=True):
            table = path.table.sort_values("alpha")
            x, y = 100 * path.transfer.loc[table.index], 100 * table[column]
            ax.plot(x, y, **style, markersize=4)
            ax.plot(x.iloc[-1:], y.iloc[-1:], marker="*", markersize=10, color=style["color"])
            # the fine-tuned end (α = 1, star) is named by its run
            marks.update({(round(xi, 6), round(yi, 6)): path.label if alpha == 1 else
                          f"α {alpha:g}" for alpha, xi, yi in zip(table["alpha"], x, y,
                          strict=True) if any(math.isclose(alpha, m) for m in MARKED)})  # fmt: skip
        ax.set(xlabel="zero-shot accuracy (%)", ylabel="task accuracy (%)", title=title)
        # α once per point (every run starts at the same pre-trained point), placed clear of
        # each other by label_points
        label_points(ax, [p[0] for p in marks], [p[1] for p in marks], list(marks.values()))
    star = Line2D([], [], marker="*", markersize=10, color="black", linestyle="", label="α = 1")
    methods = method_handles([p.config.train.method for p in paths], lines=True)
    legend_below(fig, [*methods, star])

    fig.suptitle("WiSE-FT frontier: α from the pre-trained (0) to the fine-tuned (1) weights")
    return fig


def metrics_along_alpha(paths: list[RunPath]) -> Figure:
    """Each metric's layer mean against α (2×2 panels), one line per run, with the straight
    line between its ends (dotted) for reference."""
    fig, axes = new_figure(ncols=2, nrows=2, width=4.2, height=3.0)
    for ax, metric in zip(axes.ravel(), METRICS, strict=True):
        for path, style in zip(paths, _styles(paths), strict=True):
            table = path.table.sort_values("alpha")
            ax.plot(table["alpha"], table[metric], **style, markersize=4)
            ends = table.iloc[[0, -1]]
            ax.plot(ends["alpha"], ends[metric], linestyle=":", color=style["color"])
        ax.set(xlabel="α", ylabel=metric_label(metric))
    legend_below(fig, method_handles([p.config.train.method for p in paths], lines=True))
    label_line_ends(axes[0, 0])
    fig.suptitle("Attention metrics along the path (dotted: straight line between the ends)")
    return fig


def _styles(paths: list[RunPath]) -> list[dict]:
    return labelled_styles([p.config.train.method for p in paths], [p.label for p in paths])


def layer_delta_heatmaps(paths: list[RunPath]) -> Figure:
    """Entropy change from α = 0 per layer (rows) and α (columns), one panel per run, on one
    colour scale centred at zero."""
    if not paths:
        fig, axes = new_figure()
        empty_panel(axes[0, 0], "no run measured")
        return fig
    grids = [(p.layer_entropy - p.layer_entropy.iloc[0]).sort_index() for p in paths]
    reach = max(float(np.abs(g.to_numpy()).max()) for g in grids) or 1.0
    ncols = min(HEATMAP_COLUMNS, len(paths))
    nrows = math.ceil(len(paths) / ncols)
    fig, axes = new_figure(ncols=ncols, nrows=nrows, width=3.0, height=2.8)
    flat = axes.ravel()
    for ax, path, grid in zip(flat, paths, grids, strict=False):
        image = ax.pcolormesh(
            _edges(grid.index.to_numpy(dtype=float)),
            _edges(grid.columns.to_numpy(dtype=float)),
            grid.to_numpy().T,
            cmap="RdBu_r",
            vmin=-reach,
            vmax=reach,
        )
        ax.set(title=path.label, xlabel="α", ylabel="layer")
    for ax in flat[len(paths) :]:
        ax.remove()
    label = f"Δ {metric_label('entropy')} from α = 0"
    fig.colorbar(image, ax=flat[: len(paths)].tolist(), label=label)
    return fig


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around sorted ``centres`` (midpoints; half a step beyond the ends)."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    middle = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - middle[0]], middle, [2 * centres[-1] - middle[-1]]])


# --- the page -------------------------------------------------------------------------------


def path_runs(profile: str, params_dir: Path | str = PARAMS_DIR) -> list[str]:
    """Ids of the full fine-tuning and LoRA runs of the method comparison, in its order."""
    family = load_families(params_dir)[load_statistics_runs(params_dir).method_comparison]
    ids = comparison_ids(profile, family, params_dir)
    return [i for i in ids if load_config(profile, i, params_dir).train.method in METHODS]


def load_paths(
    profile: str, params_dir: Path | str = PARAMS_DIR
) -> tuple[list[RunPath], dict[str, str]]:
    """The measured paths of :func:`path_runs` (every complete seed, measured when not stored
    yet) and, for each run left out, why."""
    # torch, transformers and PEFT take seconds to import: only when a page measures
    from collapse_utils.training.interpolation import RunNotReadyError, measure_path

    ids = path_runs(profile, params_dir)
    complete = load_histories(profile_output_root(profile, params_dir), ids=ids)
    missing = {i: "not complete" for i in ids if i not in {h.id for h in complete}}
    histories = sorted(complete, key=lambda h: (ids.index(h.id), h.seed))
    paths = []
    for history, label in zip(histories, curve_labels(histories), strict=True):
        config = load_config(profile, history.id, params_dir, seed=history.seed)
        if history.config_hash != config.config_hash():
            missing[label] = "trained with another configuration"
            continue
        try:
            record = measure_path(config, checkpoint=config.eval.zeroshot_checkpoint)
        except RunNotReadyError as err:  # e.g. a damaged checkpoint: named, not measured
            missing[label] = str(err)
            continue
        paths.append(RunPath(label, config, record.table(), record.layers("entropy")))
    return paths, missing


@dataclass(frozen=True)
class Paths:
    """The measured paths of the page (:func:`load_paths`)."""

    paths: list[RunPath]

    @property
    def empty(self) -> bool:
        return not self.paths


def open_interpolation(
    profile: str, params_dir: Path | str = PARAMS_DIR, show: bool = True
) -> tuple[Paths, Page]:
    """The page's first step: every path measured (or read back), and a note naming the runs
    left out and why."""
    page = Page(profile, profile_output_root(profile, params_dir), show)
    paths, missing = load_paths(profile, params_dir)
    if missing:
        left_out = ", ".join(f"{run} ({why})" for run, why in missing.items())
        page.note(f"**Not measured, left out:** {left_out}")
    if not paths:
        page.sentences.append(
            "No full fine-tuning or LoRA run of the method comparison is complete yet."
        )
    return Paths(paths), page


def frontier_step(page: Page, runs: Paths) -> str:
    page.figure(
        "extra_interpolation_frontier",
        frontier(runs.paths),
        "Task accuracy against zero-shot accuracy as the weights move from the pre-trained "
        "model (α = 0) to the fine-tuned one (α = 1, star, named by its run), one curve per run: "
        "with the run's trained head (left) and a zero-shot text head (right); a curve that "
        "bulges up and to the right beats both ends.",
    )
    return ""


def metrics_step(page: Page, runs: Paths) -> str:
    page.figure(
        "extra_interpolation_metrics",
        metrics_along_alpha(runs.paths),
        "Layer-mean entropy, ERF@0.95, Gini and head diversity against α, one line per run: "
        "where a line leaves its dotted straight line, the structure does not move linearly "
        "with the weights.",
    )
    page.figure(
        "extra_interpolation_layer_entropy",
        layer_delta_heatmaps(runs.paths),
        "Entropy change from the pre-trained model per layer (rows) along α (columns), one "
        "panel per run: blue is attention concentrating; see at which α each layer changes.",
    )
    return ""


def recovery_step(page: Page, runs: Paths) -> str:
    """Per run, where zero-shot accuracy has half recovered and how much structure is back
    there: the table, a sentence per run (shown), and the page's summary sentence."""
    rows = {p.label: recovery(p) for p in runs.paths}
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("run")
    page.table(
        "recovery",
        table,
        "Per run: where zero-shot accuracy has recovered half of what fine-tuning cost (α½) "
        "and how much of each metric's change has come back there.",
    )
    page.note("\n".join(f"- {recovery_sentence(p, rows[p.label])}" for p in runs.paths))
    alphas = sorted({a for p in runs.paths for a in p.table["alpha"]})
    checkpoints = sorted({p.config.eval.zeroshot_checkpoint for p in runs.paths})
    return _findings(table, alphas, checkpoints)


INTERPOLATION_STEPS = (frontier_step, metrics_step, recovery_step)
"""The steps of ``11_interpolation`` in its order (a test holds the notebook to it)."""


def interpolation_page(
    profile: str, params_dir: Path | str = PARAMS_DIR, show: bool = True
) -> Page:
    """The WiSE-FT page in one call (tests, scripts): what ``11_interpolation`` shows step by
    step."""
    runs, page = open_interpolation(profile, params_dir, show)
    for step in INTERPOLATION_STEPS:
        show_step(step, page, runs)
    page.conclusion()
    return page


def _findings(table: pd.DataFrame, alphas: list[float], checkpoints: list[str]) -> str:
    lost = table[table["zs_loss"] > 0]
    text = (
        f"{len(table)} runs measured at {len(alphas)} values of α from {alphas[0]:g} to "
        f"{alphas[-1]:g} on their {' / '.join(checkpoints)} checkpoint; zero-shot accuracy "
        f"falls from α = 0 to α = 1 for {len(lost)} of them."
    )
    if len(lost):
        by_method = lost.groupby("method")[["alpha_half", "entropy_back", "linear_back"]].mean()
        text += " " + " ".join(
            f"{METHOD_NAMES.get(m, m)}: half the zero-shot loss is back at α = "
            f"{r.alpha_half:.2f} on average, with {r.entropy_back:.0f} % of the entropy change "
            f"(a straight line: {r.linear_back:.0f} %)."
            for m, r in by_method.iterrows()
        )
    return text
