"""Figures of the book (the report's figure index, §7). Each function takes results (histories or
the run summary from ``results``) and returns a matplotlib Figure; ``save_figure`` writes it under
``<output_root>/figures/``. Notebooks only call these and show the result."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from collapse_utils.analysis.results import pct_change, trajectory
from collapse_utils.config import METRICS

METRIC_LABELS = {
    "entropy": "Entropy (nats)",
    "erf": "ERF@0.95",
    "gini": "Gini",
    "head_diversity": "Head diversity",
}


def save_figure(fig: Figure, output_root: Path | str, name: str) -> Path:
    """Write ``fig`` to ``<output_root>/figures/<name>.png`` (150 dpi) and return the path."""
    path = Path(output_root) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 4.2, height: float = 3.2):
    """A figure with an (nrows, ncols) axes grid, constrained layout, consistent sizing."""
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), layout="constrained", squeeze=False
    )
    plt.close(fig)  # notebooks display the returned figure explicitly; no duplicate output
    return fig, axes


def _label(history: dict) -> str:
    return f"{history.id}: {history.description}" if history.description else history.id


def baseline_structure(histories: list[dict]) -> Figure:
    """fig2: the pre-trained model's four metrics per layer (one line per baseline run)."""
    fig, axes = new_figure(ncols=4, width=3.4)
    for history in histories:
        metrics = history.evals[0].metrics
        layers = np.arange(1, len(metrics["entropy"]) + 1)
        for ax, metric in zip(axes[0], METRICS, strict=True):
            ax.plot(layers, metrics[metric], marker="o", label=history.id)
    for ax, metric in zip(axes[0], METRICS, strict=True):
        ax.set(xlabel="layer", ylabel=METRIC_LABELS[metric], title=METRIC_LABELS[metric])
    axes[0, 0].legend(fontsize="small")
    fig.suptitle("Pre-trained [CLS]→patch attention structure per layer")
    return fig


def training_curves(history: dict) -> Figure:
    """fig3: validation accuracy per epoch, training loss and layer-mean entropy over training."""
    fig, axes = new_figure(ncols=2, width=4.6)
    left, right = axes[0]
    epochs = history.epochs
    total = max(history.total_steps, 1)
    steps = [e.step / total for e in epochs]
    left.plot(steps, [e.val_acc for e in epochs], marker="o", color="tab:blue")
    left.set(xlabel="fraction of training", ylabel="validation accuracy", ylim=(0, 1.02))
    twin = left.twinx()
    fraction, entropy = trajectory(history, "entropy")
    twin.plot(fraction, entropy, color="tab:red", marker=".")
    twin.set_ylabel("mean entropy (nats)", color="tab:red")
    left.set_title("accuracy and entropy")
    losses = [(e.fraction, e.train_loss) for e in history.evals if e.train_loss]
    if losses:
        right.plot(*zip(*losses, strict=True), marker=".", color="tab:gray")
    right.set(xlabel="fraction of training", ylabel="training loss", title="loss")
    fig.suptitle(_label(history))
    return fig


def metric_trajectories(histories: list[dict], title: str = "") -> Figure:
    """fig5/5b/6/9/17, extra ERF: each metric's layer mean over training, one line per run."""
    fig, axes = new_figure(ncols=4, width=3.4)
    for history in histories:
        for ax, metric in zip(axes[0], METRICS, strict=True):
            ax.plot(*trajectory(history, metric), marker=".", label=history.id)
    for ax, metric in zip(axes[0], METRICS, strict=True):
        ax.set(xlabel="fraction of training", ylabel=METRIC_LABELS[metric])
    axes[0, -1].legend(fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    return fig


def single_metric_trajectories(histories: list[dict], metric: str, title: str = "") -> Figure:
    """fig9 (head diversity), fig17 (Gini), extra (ERF): one metric's layer mean over training,
    one line per run, plus its per-layer change first → final."""
    fig, axes = new_figure(ncols=2, width=4.6)
    left, right = axes[0]
    for history in histories:
        left.plot(*trajectory(history, metric), marker=".", label=history.id)
        first = np.array(history.evals[0].metrics[metric])
        final = np.array(history.evals[-1].metrics[metric])
        change = [pct_change(a, b) for a, b in zip(first, final, strict=True)]
        right.plot(np.arange(1, len(first) + 1), change, marker="o")
    left.set(xlabel="fraction of training", ylabel=METRIC_LABELS[metric], title="layer mean")
    right.axhline(0, color="black", linewidth=0.8)
    right.set(xlabel="layer", ylabel="Δ first → final (%)", title="per layer")
    left.legend(fontsize="small")
    fig.suptitle(title or f"{METRIC_LABELS[metric]} over training")
    return fig


def layer_heatmaps(histories: list[dict], metric: str = "entropy") -> Figure:
    """fig4: per-layer metric (rows) at each eval (columns), one panel per run; a shared
    colour scale so panels compare."""
    grids = [np.array([e.metrics[metric] for e in h.evals]).T for h in histories]
    low = min(g.min() for g in grids)
    high = max(g.max() for g in grids)
    fig, axes = new_figure(ncols=len(histories), width=3.6, height=3.4)
    for ax, history, grid in zip(axes[0], histories, grids, strict=True):
        image = ax.imshow(
            grid,
            aspect="auto",
            origin="lower",
            vmin=low,
            vmax=high,
            cmap="viridis",
            extent=(0, 1, 0.5, grid.shape[0] + 0.5),
        )
        ax.set(title=history.id, xlabel="fraction of training", ylabel="layer")
    fig.colorbar(image, ax=axes[0].tolist(), label=METRIC_LABELS[metric])
    return fig


def lr_sweep(summary: pd.DataFrame, histories: list[dict]) -> Figure:
    """fig6: Δ% of entropy/ERF/Gini vs learning rate (log axis), best accuracy vs learning rate,
    and the entropy trajectories per learning rate."""
    ordered = summary.sort_values("lr")
    fig, axes = new_figure(ncols=3, width=4.0)
    left, middle, right = axes[0]
    for column, label in (
        ("d_entropy_pct", "entropy"),
        ("d_erf_pct", "ERF@0.95"),
        ("d_gini_pct", "Gini"),
    ):
        left.plot(ordered["lr"], ordered[column], marker="o", label=label)
    left.axhline(0, color="black", linewidth=0.8)
    left.set(xscale="log", xlabel="learning rate", ylabel="Δ first → final (%)")
    left.legend(fontsize="small")
    middle.plot(ordered["lr"], ordered["best_acc"], marker="o", color="tab:green")
    middle.set(xscale="log", xlabel="learning rate", ylabel="best validation accuracy")
    by_id = {h.id: h for h in histories}
    for _, row in ordered.iterrows():
        right.plot(*trajectory(by_id[row["run"]], "entropy"), label=f"lr={row['lr']:g}")
    right.set(xlabel="fraction of training", ylabel="mean entropy (nats)")
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
    right.set(xlabel=xlabel, ylabel="best validation accuracy")
    fig.suptitle(title)
    return fig


def regularization(summary: pd.DataFrame, histories: list[dict]) -> Figure:
    """fig8: Δentropy % per regularizer setting against no regularization, and the mean KL from
    the pre-trained attention over training."""
    fig, axes = new_figure(ncols=2, width=5.0)
    left, right = axes[0]
    left.bar(summary["run"], summary["d_entropy_pct"], color="tab:purple")
    left.axhline(0, color="black", linewidth=0.8)
    left.set(ylabel="Δ entropy first → final (%)", title="entropy change")
    left.tick_params(axis="x", rotation=45)
    for history in histories:
        fraction = [e.fraction for e in history.evals]
        kl = [np.mean(e.kl_to_initial) for e in history.evals]
        right.plot(fraction, kl, marker=".", label=history.id)
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
    change = 100 * (runs[f"zs_{dataset}"] - runs[f"zs_{dataset}_pretrained"])
    fig, axes = new_figure(width=5.0, height=4.0)
    ax = axes[0, 0]
    for method, colour in (("full", "tab:red"), ("lora", "tab:blue")):
        chosen = runs["method"] == method
        ax.scatter(runs.loc[chosen, "d_entropy_pct"], change[chosen], color=colour, label=method)
    for _, row in runs.iterrows():
        ax.annotate(row["run"], (row["d_entropy_pct"], change[row.name]), fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(
        xlabel="Δ entropy first → final (%)",
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
    colours = runs["method"].map({"full": "tab:red", "lora": "tab:blue"})
    ax.bar(runs["run"], 100 * runs[f"zs_{dataset}"], color=colours)
    pretrained = 100 * runs[f"zs_{dataset}_pretrained"].iloc[0]
    ax.axhline(pretrained, color="black", linestyle="--", label="pre-trained")
    ax.set(ylabel=f"zero-shot {dataset} accuracy (%)", title="Zero-shot transfer after fine-tuning")
    ax.tick_params(axis="x", rotation=45)
    ax.legend()
    return fig


def attention_overlay(ax, image: np.ndarray, row: np.ndarray, title: str = "") -> None:
    """Draw the [CLS]→patch weights ``row`` (tokens,) as a heat map over ``image`` (3, S, S)
    uint8; the CLS→CLS entry is dropped and the rest renormalised, as in the metrics."""
    patches = row[1:] / row[1:].sum()
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
