"""Figures of the run and family pages (the report's figure index, §7), and the one way a page
shows a figure (:func:`show_figure`: saved under ``<output_root>/figures/``, then displayed as a
numbered MyST figure with its caption and its report figure name).

Each figure function takes results (histories, or seed-mean rows of ``run_summary``) and returns
a matplotlib Figure. A run with several seeds draws one curve per seed (labels from
:mod:`~collapse_utils.book.style`). Figures are drawn at most two panels (about
:data:`MAX_WIDTH_IN` inches) wide, so that their text stays legible at the width of the book's
text column; the book shows each at that width and links it to the full-size image."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize, to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from PIL import Image

from collapse_utils.analysis.results import per_layer_delta, trajectory, zeroshot_change
from collapse_utils.book.style import (
    DATASET_NAMES,
    METHOD_GID,
    METHOD_NAMES,
    METRIC_NAMES,
    curve_labels,
    delta_label,
    entropy_ceiling,
    method_style,
    metric_label,
    run_styles,
)
from collapse_utils.config import METRICS
from collapse_utils.run_record import RunRecord

HEATMAP_COLUMNS = 3  # panels per row of layer_heatmaps
MAX_WIDTH_IN = 9.0  # widest figure (inches): its 10 pt text reads at the book's column width
COLUMN_WIDTH_IN = 8.0  # a figure this wide fills the text column; narrower ones are scaled alike
DPI = 150


# PNG text chunk holding {method: colour} of a saved figure (the browser check compares them
# across pages), and the watermark of a figure drawn from smoke runs.
METHODS_KEY = "Collapse-Method-Colors"
SMOKE_WATERMARK = "SMOKE RUN: NOT FINDINGS"


def method_colors(fig: Figure) -> dict[str, str]:
    """{method: hex colour} of every artist of ``fig`` drawn in a method's style (gid
    ``method:<name>``, :func:`~collapse_utils.book.style.method_style`)."""
    found: dict[str, set[str]] = {}
    for artist in fig.findobj(lambda a: (a.get_gid() or "").startswith(METHOD_GID)):
        if isinstance(artist, Line2D):
            colors = [artist.get_color()]
        elif isinstance(artist, Patch):
            colors = [artist.get_facecolor()]
        else:  # a collection: scatter points
            colors = list(artist.get_facecolor())
        method = artist.get_gid().removeprefix(METHOD_GID)
        found.setdefault(method, set()).update(to_hex(c) for c in colors)
    return {m: ",".join(sorted(c)) for m, c in found.items()}


def save_figure(fig: Figure, output_root: Path | str, name: str, watermark: str = "") -> Path:
    """Write ``fig`` to ``<output_root>/figures/<name>.png`` (150 dpi) with its method colours
    in the PNG's text (:data:`METHODS_KEY`) and ``watermark`` across it; return the path."""
    path = Path(output_root) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    mark = None
    if watermark:
        mark = fig.text(0.5, 0.5, watermark, transform=fig.transFigure, ha="center",
                        va="center", rotation=25, fontsize=28, color="tab:gray", alpha=0.3,
                        zorder=10)  # fmt: skip
    metadata = {METHODS_KEY: json.dumps(method_colors(fig), sort_keys=True)}
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata=metadata)
    if mark is not None:
        mark.remove()  # the figure object stays as drawn (tests, a second save)
    return path


def report_figure(name: str) -> str | None:
    """The report's figure a file name stands for (``fig5b_fullft_vs_lora_pets`` → ``Fig. 5b``);
    ``None`` for figures the report does not have (``extra_…``, ``explore_…``)."""
    match = re.match(r"fig(\d+b?)_", name)
    return f"Fig. {match[1]}" if match else None


def figure_caption(name: str, caption: str) -> str:
    """``caption`` followed by the report's figure name and the file under ``figures/``."""
    report = report_figure(name)
    where = f"report {report}" if report else "not in the report"
    return f"{caption.strip()} ({where}, `{name}`)"


def display_width(path: Path) -> int:
    """How much of the text column (%) the saved PNG at ``path`` takes: its width in inches
    over :data:`COLUMN_WIDTH_IN`, at most 100, so that text is the same size in every figure."""
    with Image.open(path) as image:
        inches = image.width / DPI
    return max(10, min(100, round(100 * inches / COLUMN_WIDTH_IN)))


def figure_markdown(path: Path, name: str, caption: str) -> str:
    """A MyST ``{figure}`` of the PNG at ``path``: numbered, labelled ``name``, captioned, sized
    by :func:`display_width` (the book links it to the full-size image). The path is written
    from the book's root (the runner executes notebooks there), as Sphinx reads ``/…``."""
    source = "/" + Path(os.path.relpath(Path(path).resolve(), Path.cwd().resolve())).as_posix()
    text = figure_caption(name, caption)
    alt = caption.strip().replace("\n", " ")
    width = display_width(path)
    return f"```{{figure}} {source}\n:name: {name}\n:width: {width}%\n:alt: {alt}\n\n{text}\n```"


def figure_html(path: Path, name: str, caption: str) -> str:
    """The same figure for Jupyter: the PNG inline, with its caption."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    # the caption's `name` as code, as the book renders it (no literal backticks in Jupyter)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(figure_caption(name, caption)))
    return (
        f'<figure><img src="data:image/png;base64,{data}" style="max-width:100%" '
        f'alt="{html.escape(caption)}"><figcaption>{text}</figcaption></figure>'
    )


def watermark_of(profile: str) -> str:
    """The watermark of a figure drawn from ``profile``'s runs: smoke figures carry one."""
    return SMOKE_WATERMARK if profile == "smoke" else ""


def show_figure(
    fig: Figure, output_root: Path | str, name: str, caption: str = "", watermark: str = ""
) -> None:
    """How every page shows a figure: save it (:func:`save_figure`), then display the saved PNG
    as a figure with ``caption`` (one sentence: what to look at; default: the figure's title).
    The output carries a MyST ``{figure}`` (``text/markdown``, what the book renders, see
    ``nb_mime_priority_overrides`` in ``_config.yml``) and the same figure as HTML (what
    Jupyter shows)."""
    path = save_figure(fig, output_root, name, watermark)
    if not caption:
        title = fig.get_suptitle() or next((ax.get_title() for ax in fig.axes), "")
        caption = (title or name.replace("_", " ")) + "."
    bundle = {
        "text/html": figure_html(path, name, caption),
        "text/markdown": figure_markdown(path, name, caption),
    }
    display(bundle, raw=True)


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 4.2, height: float = 3.2):
    """A figure with an (nrows, ncols) axes grid, constrained layout, consistent sizing."""
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), layout="constrained", squeeze=False
    )
    plt.close(fig)  # pages display the saved figure (show_figure); no duplicate output
    return fig, axes


def legend_below(fig: Figure, handles: Sequence, labels: Sequence[str] | None = None) -> None:
    """One legend for every panel, under the figure, in as many columns as fit (handles whose
    label starts with ``_``, such as reference lines, are left out)."""
    if labels is None:
        labels = [h.get_label() for h in handles]
    pairs = [
        (h, label) for h, label in zip(handles, labels, strict=True) if not label.startswith("_")
    ]
    handles, labels = [h for h, _ in pairs], [label for _, label in pairs]
    if handles:
        ncol = min(len(handles), 5)
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol)


def method_handles(methods: Sequence[str], lines: bool = False) -> list:
    """Legend entries naming each method (in the order given, each once) in its style: a patch
    of its colour (bars, points) or, with ``lines``, a line in its colour and line style."""
    handles = []
    for m in dict.fromkeys(methods):
        style = {k: v for k, v in method_style(m).items() if k != "gid"}
        label = METHOD_NAMES.get(m, m)
        handles.append(Line2D([], [], label=label, **style) if lines else
                       Patch(color=style["color"], label=label))  # fmt: skip
    return handles


def runs_legend(fig: Figure, histories: Sequence[RunRecord], *label_axes: Axes) -> None:
    """The legend of a figure with one line per run: the methods under the figure, and each
    run's label at its line's end on ``label_axes``."""
    legend_below(fig, method_handles([h.method for h in histories], lines=True))
    for ax in label_axes:
        label_line_ends(ax)


def label_line_ends(ax: Axes) -> list[str]:
    """Write each run line's label at its last point (:func:`label_points`: nearby ends share
    one label)."""
    lines = [line for line in ax.lines if (line.get_gid() or "").startswith(METHOD_GID)]
    data = [(np.asarray(line.get_xdata()), np.asarray(line.get_ydata()), line.get_label())
            for line in lines]  # fmt: skip
    ends = [(x[-1], y[-1], label) for x, y, label in data if len(x)]
    if not ends:
        return []
    xs, ys, labels = zip(*ends, strict=True)
    return label_points(ax, xs, ys, labels)


def ceiling_line(ax: Axes, histories: Sequence[RunRecord]) -> None:
    """The entropy ceiling (uniform attention over every patch, ln N nats) as a dashed line on
    an entropy axis, labelled once."""
    ceilings = sorted({round(entropy_ceiling(h), 6) for h in histories})
    for value in ceilings:
        ax.axhline(value, color="0.35", linestyle=(0, (2, 2)), linewidth=0.8, label="_ceiling")
        patches = round(math.exp(value))
        ax.annotate(f"ln {patches} (uniform)", (0.0, value), xycoords=("axes fraction", "data"),
                    xytext=(3, -3), textcoords="offset points", va="top", fontsize=7,
                    color="0.35")  # fmt: skip


# Where a point's label may go, tried in order: (x, y) offset in points, alignment.
LABEL_SPOTS = [
    (4, 4, "left", "bottom"),
    (4, -4, "left", "top"),
    (-4, 4, "right", "bottom"),
    (-4, -4, "right", "top"),
    (0, 12, "center", "bottom"),
    (0, -12, "center", "top"),
    (14, 0, "left", "center"),
    (-14, 0, "right", "center"),
]


def label_points(
    ax: Axes, x: Sequence[float], y: Sequence[float], labels: Sequence[str], near: float = 0.06
) -> list[str]:
    """Name each point by its label without piling labels up: points closer than ``near`` (a
    fraction of the axis ranges) share one label, ``E2, E3`` (three names a line), and each
    label takes the first of :data:`LABEL_SPOTS` around its point where it overlaps no other
    label and stays inside the axes. Call it once the axes are otherwise drawn (limits, legend).
    Returns the texts written."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    finite = np.isfinite(xs) & np.isfinite(ys)
    if not finite.any():
        return []

    def scale(v: np.ndarray) -> np.ndarray:
        span = np.ptp(v[finite]) or 1.0
        return (v - v[finite].min()) / span

    points = np.c_[scale(xs), scale(ys)]
    groups: list[list[int]] = []
    for i in np.flatnonzero(finite):
        for group in groups:
            if np.min(np.hypot(*(points[group] - points[i]).T)) < near:
                group.append(int(i))
                break
        else:
            groups.append([int(i)])
    canvas = ax.figure.canvas
    if not isinstance(canvas, FigureCanvasAgg):  # a closed pyplot figure: draw it with Agg
        canvas = FigureCanvasAgg(ax.figure)
    canvas.draw()  # settle the layout, so that label boxes can be measured
    renderer = canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    placed: list = []
    texts = []
    for group in sorted(groups, key=len, reverse=True):  # the longest labels choose first
        names = [str(labels[i]) for i in group]
        text = "\n".join(", ".join(names[k : k + 3]) for k in range(0, len(names), 3))
        point = (xs[group[0]], ys[group[0]])
        for dx, dy, ha, va in LABEL_SPOTS:
            note = ax.annotate(
                text, point, xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=8
            )
            box = note.get_window_extent(renderer)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0
            if fits and box.y1 <= inside.y1 and not any(box.overlaps(p) for p in placed):
                break
            note.remove()
        else:  # nowhere free: the first spot
            dx, dy, ha, va = LABEL_SPOTS[0]
            note = ax.annotate(
                text, point, xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=8
            )
            box = note.get_window_extent(renderer)
        placed.append(box)
        texts.append(text)
    return texts


def empty_panel(ax: Axes, message: str) -> None:
    """A panel that says why it has nothing to show."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def baseline_structure(histories: list[RunRecord]) -> Figure:
    """fig2: the pre-trained model's four metrics per layer (2×2 panels, one line per baseline
    run, one legend under them)."""
    fig, axes = new_figure(ncols=2, nrows=2, width=4.2, height=3.0)
    for history, style in zip(histories, run_styles(histories), strict=True):
        metrics = history.evals[0].metrics
        layers = np.arange(1, len(metrics["entropy"]) + 1)
        for ax, metric in zip(axes.ravel(), METRICS, strict=True):
            ax.plot(layers, metrics[metric], **style)
    for ax, metric in zip(axes.ravel(), METRICS, strict=True):
        ax.set(xlabel="layer", ylabel=metric_label(metric), title=metric_label(metric))
    ceiling_line(axes[0, 0], histories)
    runs_legend(fig, histories, axes[0, 0])
    fig.suptitle("Pre-trained [CLS]→patch attention structure per layer")
    return fig


def training_curves(history: RunRecord) -> Figure:
    """fig3: accuracy per epoch (on validation, or on test under the report's protocol),
    training loss and layer-mean entropy over training."""
    fig, axes = new_figure(ncols=2, width=4.4)
    left, right = axes[0]
    epochs = history.epochs
    total = max(history.total_steps, 1)
    steps = [e.step / total for e in epochs]
    left.plot(steps, [100 * e.val_acc for e in epochs], marker="o", color="tab:blue")
    left.set(xlabel="fraction of training", ylabel=f"{history.eval_split} accuracy (%)",
             ylim=(0, 102))  # fmt: skip
    twin = left.twinx()
    fraction, entropy = trajectory(history, "entropy")
    twin.plot(fraction, entropy, color="tab:red", marker=".")
    twin.set_ylabel(f"mean {metric_label('entropy')}", color="tab:red")
    ceiling_line(twin, [history])
    left.set_title("accuracy and entropy")
    losses = [(e.fraction, e.train_loss) for e in history.evals if e.train_loss]
    if losses:
        right.plot(*zip(*losses, strict=True), marker=".", color="tab:gray")
    right.set(xlabel="fraction of training", ylabel="training loss", title="loss")
    fig.suptitle(history.label)
    return fig


def metric_trajectories(histories: list[RunRecord], title: str = "") -> Figure:
    """fig5/5b, extra LoRA QKVO: each metric's layer mean over training (2×2 panels), one line
    per run, one legend under the panels."""
    fig, axes = new_figure(ncols=2, nrows=2, width=4.2, height=3.0)
    for history, style in zip(histories, run_styles(histories), strict=True):
        for ax, metric in zip(axes.ravel(), METRICS, strict=True):
            ax.plot(*trajectory(history, metric), **style, markersize=4)
    for ax, metric in zip(axes.ravel(), METRICS, strict=True):
        ax.set(xlabel="fraction of training", ylabel=metric_label(metric))
    ceiling_line(axes[0, 0], histories)
    runs_legend(fig, histories, axes[0, 0])
    if title:
        fig.suptitle(title)
    return fig


def single_metric_trajectories(histories: list[RunRecord], metric: str, title: str = "") -> Figure:
    """fig9 (head diversity), fig17 (Gini), extra (ERF): one metric's layer mean over training,
    one line per run, plus its per-layer change first → final."""
    fig, axes = new_figure(ncols=2, width=4.4)
    left, right = axes[0]
    change = per_layer_delta(histories, metric)
    for history, style in zip(histories, run_styles(histories), strict=True):
        left.plot(*trajectory(history, metric), **style, markersize=4)
        right.plot(change.columns, change.loc[(history.id, history.seed)], **style, markersize=4)
    left.set(xlabel="fraction of training", ylabel=metric_label(metric), title="layer mean")
    if metric == "entropy":
        ceiling_line(left, histories)
    right.axhline(0, color="black", linewidth=0.8)
    right.set(xlabel="layer", ylabel="Δ first → final (%)", title="per layer")
    runs_legend(fig, histories, left)
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
    fig, axes = new_figure(ncols=ncols, nrows=nrows, width=3.0, height=2.8)
    flat = axes.ravel()
    labels = [f"{label} ({METHOD_NAMES.get(h.method, h.method)})"
              for h, label in zip(histories, curve_labels(histories), strict=True)]  # fmt: skip
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
    fig = plt.figure(figsize=(8.4, 6.4), layout="constrained")
    plt.close(fig)
    panels = fig.subplot_mosaic([["left", "middle"], ["right", "right"]])
    left, middle, right = panels["left"], panels["middle"], panels["right"]
    for metric in ("entropy", "erf", "gini"):
        left.plot(ordered["lr"], ordered[f"d_{metric}_pct"], marker="o", label=METRIC_NAMES[metric])
    left.axhline(0, color="black", linewidth=0.8)
    left.set(xscale="log", xlabel="learning rate", ylabel="Δ first → final (%)")
    left.legend(fontsize="small")
    middle.plot(ordered["lr"], 100 * ordered["best_acc"], marker="o", color="tab:green")
    middle.set(xscale="log", xlabel="learning rate", ylabel="best epoch accuracy (%)")
    lr_of = dict(zip(ordered["run"], ordered["lr"], strict=True))
    shown = sorted((h for h in histories if h.id in lr_of), key=lambda h: (lr_of[h.id], h.seed))
    for history, style in zip(shown, run_styles(shown), strict=True):
        seed = style["label"].removeprefix(history.id)
        right.plot(
            *trajectory(history, "entropy"), **{**style, "label": f"lr={lr_of[history.id]:g}{seed}"}
        )
    right.set(xlabel="fraction of training", ylabel=f"mean {metric_label('entropy')}")
    ceiling_line(right, shown)
    runs_legend(fig, shown, right)
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
    right.plot(ordered[x], 100 * ordered["best_acc"], marker="o", color="tab:green")
    right.set(xlabel=xlabel, ylabel="best epoch accuracy (%)")
    fig.suptitle(title)
    return fig


def regularization(summary: pd.DataFrame, histories: list[RunRecord]) -> Figure:
    """fig8: Δentropy % per regularizer setting against no regularization, and the mean KL from
    the pre-trained attention over training."""
    fig, axes = new_figure(ncols=2, width=4.4, height=3.4)
    left, right = axes[0]
    bars_by_method(left, summary["run"], summary["d_entropy_pct"], summary["method"])
    left.axhline(0, color="black", linewidth=0.8)
    left.set(ylabel="Δ entropy first → final (%)", title="entropy change")
    plt.setp(left.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    for history, style in zip(histories, run_styles(histories), strict=True):
        fraction = [e.fraction for e in history.evals]
        kl = [np.mean(e.kl_to_initial) for e in history.evals]
        right.plot(fraction, kl, **style, markersize=4)
    right.set(
        xlabel="fraction of training",
        ylabel="KL(pre-trained ‖ current) (nats)",
        title="distance from pre-trained attention",
    )
    runs_legend(fig, histories, right)
    return fig


def zeroshot_vs_collapse(summary: pd.DataFrame, dataset: str = "cifar100") -> Figure:
    """fig7: zero-shot accuracy change against Δentropy per fine-tuned run."""
    runs = summary[summary["method"] != "none"]
    change = zeroshot_change(runs, dataset)
    fig, axes = new_figure(width=6.4, height=4.4)
    ax = axes[0, 0]
    scatter_by_method(ax, runs["d_entropy_pct"], change, runs["method"])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(
        xlabel=delta_label("d_entropy_pct"),
        ylabel=f"zero-shot {DATASET_NAMES.get(dataset, dataset)} change (points)",
        title="Attention change vs zero-shot transfer",
    )
    ax.margins(x=0.3, y=0.2)  # room for the labels
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    label_points(ax, runs["d_entropy_pct"], change, list(runs["run"]))
    return fig


def zeroshot_bars(summary: pd.DataFrame, dataset: str = "cifar100") -> Figure:
    """fig15: zero-shot accuracy of every run with the pre-trained model as a reference line."""
    runs = summary[summary["method"] != "none"]
    fig, axes = new_figure(width=min(MAX_WIDTH_IN, max(6.0, 0.4 * len(runs))), height=3.6)
    ax = axes[0, 0]
    bars_by_method(ax, runs["run"], 100 * runs[f"zs_{dataset}"], runs["method"])
    pretrained = 100 * runs[f"zs_{dataset}_pretrained"].iloc[0]
    ax.axhline(pretrained, color="black", linestyle="--")
    named = DATASET_NAMES.get(dataset, dataset)
    ax.set(ylabel=f"zero-shot {named} accuracy (%)", title="Zero-shot transfer after fine-tuning")
    plt.setp(ax.get_xticklabels(), rotation=60, ha="right", rotation_mode="anchor")
    handles = [
        *method_handles(runs["method"]),
        Line2D([], [], color="black", linestyle="--", label="pre-trained model"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def scatter_by_method(ax: Axes, x: pd.Series, y: pd.Series, methods: pd.Series) -> None:
    """One scatter per method, in its colour and labelled by its name (the gid records the
    method)."""
    for method in dict.fromkeys(methods):
        chosen = (methods == method).to_numpy()
        style = method_style(method)
        ax.scatter(x[chosen], y[chosen], color=style["color"], gid=style["gid"],
                   label=METHOD_NAMES.get(method, method))  # fmt: skip


def bars_by_method(
    ax: Axes,
    names: Sequence,
    values: Sequence[float],
    methods: Sequence[str],
    horizontal: bool = False,
) -> None:
    """One bar per run in its method's colour (its gid records the method)."""
    draw = ax.barh if horizontal else ax.bar
    positions = range(len(names)) if horizontal else list(names)
    bars = draw(positions, list(values))
    for bar, method in zip(bars, methods, strict=True):
        style = method_style(method)
        bar.set_color(style["color"])
        bar.set_gid(style["gid"])


# How both explorers shade attention over an image: this red, opaque in proportion to a patch's
# weight relative to the strongest patch (the static viewer's script uses the same numbers).
ATTENTION_RGB = (220, 20, 20)
ATTENTION_ALPHA = 0.75
ATTENTION_SCALE = "[CLS]→patch weight relative to the strongest patch"


def attention_overlay(ax: Axes, image: np.ndarray, patches: np.ndarray, title: str = "") -> None:
    """Draw [CLS]→patch weights ``patches`` (patches,), CLS→CLS already dropped and renormalised
    (``measurement.metrics.cls_to_patch``), over ``image`` (3, S, S) uint8: each patch in
    :data:`ATTENTION_RGB`, its opacity its weight over the strongest patch's."""
    grid = int(round(np.sqrt(len(patches))))
    size = image.shape[-1]
    ax.imshow(np.transpose(image, (1, 2, 0)))
    relative = patches / max(float(patches.max()), 1e-12)
    shade = np.zeros((grid, grid, 4))
    shade[..., :3] = np.array(ATTENTION_RGB) / 255
    shade[..., 3] = ATTENTION_ALPHA * relative.reshape(grid, grid)
    ax.imshow(shade, extent=(0, size, size, 0), interpolation="nearest")
    ax.set(title=title, xticks=[], yticks=[])


def attention_scale(fig: Figure, axes: Axes | list[Axes]) -> None:
    """The colour bar of :func:`attention_overlay`: from none to the strongest patch."""
    colours = LinearSegmentedColormap.from_list(
        "attention",
        [
            (*np.array(ATTENTION_RGB) / 255, 0.0),
            (*np.array(ATTENTION_RGB) / 255, ATTENTION_ALPHA),
        ],  # fmt: skip
    )
    mappable = ScalarMappable(norm=Normalize(0, 1), cmap=colours)
    fig.colorbar(mappable, ax=axes, label=ATTENTION_SCALE, shrink=0.8)


FLAG_COLORS = {"within tolerance": "tab:green", "differs": "tab:red"}


def report_vs_build(comparison: pd.DataFrame, units: dict[str, str]) -> Figure:
    """The reproduction check at a glance: every published number (x) against this build's (y),
    one panel per kind of quantity (``units``: kind → unit), points coloured by their flag, the
    diagonal where the two agree. ``comparison``: rows with ``kind``, ``report``, ``ours`` and
    ``flag`` (numbers missing on either side are left out)."""
    shown = comparison.dropna(subset=["report", "ours"])
    kinds = [k for k in units if k in set(shown["kind"])]
    ncols = min(len(kinds), 3) or 1
    fig, axes = new_figure(ncols=ncols, nrows=math.ceil(len(kinds) / ncols) or 1, width=3.0,
                           height=2.9)  # fmt: skip
    for ax, kind in zip(axes.ravel(), kinds, strict=False):
        rows = shown[shown["kind"] == kind]
        for flag, group in rows.groupby("flag"):
            ax.scatter(group["report"], group["ours"], s=12, label=flag,
                       color=FLAG_COLORS.get(flag, "tab:gray"))  # fmt: skip
        values = pd.concat([rows["report"], rows["ours"]])
        low, high = float(values.min()), float(values.max())
        ax.plot([low, high], [low, high], color="black", linewidth=0.8, label="_same")
        unit = f" ({units[kind]})" if units[kind] else ""
        ax.set(xlabel=f"report{unit}", ylabel=f"this build{unit}",
               title=f"{kind.replace('_', ' ')} ({len(rows)})")  # fmt: skip
    for ax in axes.ravel()[len(kinds) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=f)
               for f, c in FLAG_COLORS.items()]  # fmt: skip
    legend_below(fig, handles)
    fig.suptitle("Every published number against this build's")
    return fig
