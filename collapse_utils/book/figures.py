"""Figures of the run and family pages (the report's figure index, §7), and the one way a page
shows a figure (:func:`show_figure`: saved under ``<output_root>/figures/``, then displayed).

Each figure function takes results (histories, or seed-mean rows of ``run_summary``) and returns
a matplotlib Figure. A run with several seeds draws one curve per seed (labels from
:mod:`~collapse_utils.book.style`)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Image, display
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from collapse_utils.analysis.results import per_layer_delta, trajectory, zeroshot_change
from collapse_utils.book.style import (
    METHOD_COLORS,
    METHOD_NAMES,
    METRIC_NAMES,
    curve_labels,
    delta_label,
    metric_label,
)
from collapse_utils.config import METRICS
from collapse_utils.run_record import RunRecord

HEATMAP_COLUMNS = 4  # panels per row of layer_heatmaps


def save_figure(fig: Figure, output_root: Path | str, name: str) -> Path:
    """Write ``fig`` to ``<output_root>/figures/<name>.png`` (150 dpi) and return the path."""
    path = Path(output_root) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def show_figure(fig: Figure, output_root: Path | str, name: str) -> None:
    """How every page shows a figure: save it (:func:`save_figure`) and display the saved PNG,
    so the page shows exactly the file under ``figures/``."""
    display(Image(filename=save_figure(fig, output_root, name)))


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 4.2, height: float = 3.2):
    """A figure with an (nrows, ncols) axes grid, constrained layout, consistent sizing."""
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), layout="constrained", squeeze=False
    )
    plt.close(fig)  # pages display the saved figure (show_figure); no duplicate output
    return fig, axes


def empty_panel(ax: Axes, message: str) -> None:
    """A panel that says why it has nothing to show."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def baseline_structure(histories: list[RunRecord]) -> Figure:
    """fig2: the pre-trained model's four metrics per layer (one line per baseline run)."""
    fig, axes = new_figure(ncols=4, width=3.4)
    for history, label in zip(histories, curve_labels(histories), strict=True):
        metrics = history.evals[0].metrics
        layers = np.arange(1, len(metrics["entropy"]) + 1)
        for ax, metric in zip(axes[0], METRICS, strict=True):
            ax.plot(layers, metrics[metric], marker="o", label=label)
    for ax, metric in zip(axes[0], METRICS, strict=True):
        ax.set(xlabel="layer", ylabel=metric_label(metric), title=metric_label(metric))
    axes[0, 0].legend(fontsize="small")
    fig.suptitle("Pre-trained [CLS]→patch attention structure per layer")
    return fig


def training_curves(history: RunRecord) -> Figure:
    """fig3: accuracy per epoch (on validation, or on test under the report's protocol),
    training loss and layer-mean entropy over training."""
    fig, axes = new_figure(ncols=2, width=4.6)
    left, right = axes[0]
    epochs = history.epochs
    total = max(history.total_steps, 1)
    steps = [e.step / total for e in epochs]
    left.plot(steps, [e.val_acc for e in epochs], marker="o", color="tab:blue")
    left.set(xlabel="fraction of training", ylabel=f"{history.eval_split} accuracy", ylim=(0, 1.02))
    twin = left.twinx()
    fraction, entropy = trajectory(history, "entropy")
    twin.plot(fraction, entropy, color="tab:red", marker=".")
    twin.set_ylabel(f"mean {metric_label('entropy')}", color="tab:red")
    left.set_title("accuracy and entropy")
    losses = [(e.fraction, e.train_loss) for e in history.evals if e.train_loss]
    if losses:
        right.plot(*zip(*losses, strict=True), marker=".", color="tab:gray")
    right.set(xlabel="fraction of training", ylabel="training loss", title="loss")
    fig.suptitle(history.label)
    return fig


def metric_trajectories(histories: list[RunRecord], title: str = "") -> Figure:
    """fig5/5b, extra LoRA QKVO: each metric's layer mean over training, one line per run."""
    fig, axes = new_figure(ncols=4, width=3.4)
    for history, label in zip(histories, curve_labels(histories), strict=True):
        for ax, metric in zip(axes[0], METRICS, strict=True):
            ax.plot(*trajectory(history, metric), marker=".", label=label)
    for ax, metric in zip(axes[0], METRICS, strict=True):
        ax.set(xlabel="fraction of training", ylabel=metric_label(metric))
    axes[0, -1].legend(fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    return fig


def single_metric_trajectories(histories: list[RunRecord], metric: str, title: str = "") -> Figure:
    """fig9 (head diversity), fig17 (Gini), extra (ERF): one metric's layer mean over training,
    one line per run, plus its per-layer change first → final."""
    fig, axes = new_figure(ncols=2, width=4.6)
    left, right = axes[0]
    change = per_layer_delta(histories, metric)
    for history, label in zip(histories, curve_labels(histories), strict=True):
        left.plot(*trajectory(history, metric), marker=".", label=label)
        right.plot(change.columns, change.loc[(history.id, history.seed)], marker="o")
    left.set(xlabel="fraction of training", ylabel=metric_label(metric), title="layer mean")
    right.axhline(0, color="black", linewidth=0.8)
    right.set(xlabel="layer", ylabel="Δ first → final (%)", title="per layer")
    left.legend(fontsize="small")
    fig.suptitle(title or f"{metric_label(metric)} over training")
    return fig


def layer_heatmaps(histories: list[RunRecord], metric: str = "entropy") -> Figure:
    """fig4: per-layer metric (rows) at each eval (columns), one panel per run (up to
    :data:`HEATMAP_COLUMNS` per row); a shared colour scale so panels compare."""
    if not histories:
        fig, axes = new_figure()
        empty_panel(axes[0, 0], "no complete run")
        return fig
    grids = [np.array([e.metrics[metric] for e in h.evals]).T for h in histories]
    low = min(g.min() for g in grids)
    high = max(g.max() for g in grids)
    ncols = min(HEATMAP_COLUMNS, len(histories))
    nrows = math.ceil(len(histories) / ncols)
    fig, axes = new_figure(ncols=ncols, nrows=nrows, width=3.6, height=3.4)
    flat = axes.ravel()
    labels = curve_labels(histories)
    for ax, label, grid in zip(flat, labels, grids, strict=False):
        image = ax.imshow(
            grid,
            aspect="auto",
            origin="lower",
            vmin=low,
            vmax=high,
            cmap="viridis",
            extent=(0, 1, 0.5, grid.shape[0] + 0.5),
        )
        ax.set(title=label, xlabel="fraction of training", ylabel="layer")
    for ax in flat[len(histories) :]:
        ax.remove()
    fig.colorbar(image, ax=flat[: len(histories)].tolist(), label=metric_label(metric))
    return fig


def lr_sweep(summary: pd.DataFrame, histories: list[RunRecord]) -> Figure:
    """fig6: Δ% of entropy/ERF/Gini vs learning rate (log axis), best accuracy vs learning rate
    (``summary``: one row per run with a ``run`` column), and the entropy trajectories per
    learning rate (``histories``)."""
    ordered = summary.sort_values("lr")
    fig, axes = new_figure(ncols=3, width=4.0)
    left, middle, right = axes[0]
    for metric in ("entropy", "erf", "gini"):
        left.plot(ordered["lr"], ordered[f"d_{metric}_pct"], marker="o", label=METRIC_NAMES[metric])
    left.axhline(0, color="black", linewidth=0.8)
    left.set(xscale="log", xlabel="learning rate", ylabel="Δ first → final (%)")
    left.legend(fontsize="small")
    middle.plot(ordered["lr"], ordered["best_acc"], marker="o", color="tab:green")
    middle.set(xscale="log", xlabel="learning rate", ylabel="best epoch accuracy")
    lr_of = dict(zip(ordered["run"], ordered["lr"], strict=True))
    shown = sorted((h for h in histories if h.id in lr_of), key=lambda h: (lr_of[h.id], h.seed))
    for history, label in zip(shown, curve_labels(shown), strict=True):
        seed = label.removeprefix(history.id)
        right.plot(*trajectory(history, "entropy"), label=f"lr={lr_of[history.id]:g}{seed}")
    right.set(xlabel="fraction of training", ylabel=f"mean {metric_label('entropy')}")
    right.legend(fontsize="small")
    fig.suptitle("Learning-rate sweep (full fine-tuning)")
    return fig


def ablation_effect(summary: pd.DataFrame, x: str, xlabel: str, title: str) -> Figure:
    """Extra (frozen layers) and the like: Δentropy % and best accuracy against one setting."""
    ordered = summary.sort_values(x)
    fig, axes = new_figure(ncols=2, width=4.2)
    left, right = axes[0]
    left.plot(ordered[x], ordered["d_entropy_pct"], marker="o", color="tab:red")
    left.axhline(0, color="black", linewidth=0.8)
    left.set(xlabel=xlabel, ylabel="Δ entropy first → final (%)")
    right.plot(ordered[x], ordered["best_acc"], marker="o", color="tab:green")
    right.set(xlabel=xlabel, ylabel="best epoch accuracy")
    fig.suptitle(title)
    return fig


def regularization(summary: pd.DataFrame, histories: list[RunRecord]) -> Figure:
    """fig8: Δentropy % per regularizer setting against no regularization, and the mean KL from
    the pre-trained attention over training."""
    fig, axes = new_figure(ncols=2, width=5.0)
    left, right = axes[0]
    left.bar(summary["run"], summary["d_entropy_pct"], color="tab:purple")
    left.axhline(0, color="black", linewidth=0.8)
    left.set(ylabel="Δ entropy first → final (%)", title="entropy change")
    left.tick_params(axis="x", rotation=45)
    for history, label in zip(histories, curve_labels(histories), strict=True):
        fraction = [e.fraction for e in history.evals]
        kl = [np.mean(e.kl_to_initial) for e in history.evals]
        right.plot(fraction, kl, marker=".", label=label)
    right.set(
        xlabel="fraction of training",
        ylabel="KL(pre-trained ‖ current) (nats)",
        title="distance from pre-trained attention",
    )
    right.legend(fontsize="small")
    return fig


def zeroshot_vs_collapse(summary: pd.DataFrame, dataset: str = "cifar100") -> Figure:
    """fig7: zero-shot accuracy change against Δentropy per fine-tuned run."""
    runs = summary[summary["method"] != "none"]
    change = zeroshot_change(runs, dataset)
    fig, axes = new_figure(width=5.0, height=4.0)
    ax = axes[0, 0]
    for method in dict.fromkeys(runs["method"]):
        chosen = runs["method"] == method
        ax.scatter(
            runs.loc[chosen, "d_entropy_pct"],
            change[chosen],
            color=METHOD_COLORS[method],
            label=METHOD_NAMES[method],
        )
    for _, row in runs.iterrows():
        ax.annotate(row["run"], (row["d_entropy_pct"], change[row.name]), fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(
        xlabel=delta_label("d_entropy_pct"),
        ylabel=f"zero-shot {dataset} change (points)",
        title="Attention change vs zero-shot transfer",
    )
    ax.legend()
    return fig


def zeroshot_bars(summary: pd.DataFrame, dataset: str = "cifar100") -> Figure:
    """fig15: zero-shot accuracy of every run with the pre-trained model as a reference line."""
    runs = summary[summary["method"] != "none"]
    fig, axes = new_figure(width=max(5.0, 0.5 * len(runs)), height=3.4)
    ax = axes[0, 0]
    ax.bar(runs["run"], 100 * runs[f"zs_{dataset}"], color=runs["method"].map(METHOD_COLORS))
    pretrained = 100 * runs[f"zs_{dataset}_pretrained"].iloc[0]
    ax.axhline(pretrained, color="black", linestyle="--", label="pre-trained")
    ax.set(ylabel=f"zero-shot {dataset} accuracy (%)", title="Zero-shot transfer after fine-tuning")
    ax.tick_params(axis="x", rotation=45)
    ax.legend()
    return fig


def attention_overlay(ax: Axes, image: np.ndarray, patches: np.ndarray, title: str = "") -> None:
    """Draw [CLS]→patch weights ``patches`` (patches,), CLS→CLS already dropped and renormalised
    (``measurement.metrics.cls_to_patch``), as a heat map over ``image`` (3, S, S) uint8."""
    grid = int(round(np.sqrt(len(patches))))
    size = image.shape[-1]
    ax.imshow(np.transpose(image, (1, 2, 0)))
    ax.imshow(
        patches.reshape(grid, grid),
        cmap="inferno",
        alpha=0.55,
        extent=(0, size, size, 0),
        interpolation="nearest",
    )
    ax.set(title=title, xticks=[], yticks=[])
