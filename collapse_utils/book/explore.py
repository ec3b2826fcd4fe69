"""Interactive exploration of the saved [CLS] attention maps (ipywidgets).

Each run stores, at every tracking point, the full [CLS] attention rows of the first
``eval.map_images`` metric images (``attention_maps.safetensors``). The explorer picks a
run (every seed of it), layer, head (or the head mean), image and training step and draws the
attention over the image, CLS→CLS dropped and renormalised by ``measurement.metrics.cls_to_patch``
as in the metrics, next to the layer's metric curves.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display
from safetensors.torch import load_file

from collapse_utils.book.figures import attention_overlay, attention_scale, new_figure
from collapse_utils.book.style import metric_label, seed_labels
from collapse_utils.config import METRICS
from collapse_utils.measurement.metrics import cls_to_patch
from collapse_utils.run_record import RunFiles, RunRecord, find_runs, read_record


@dataclass(frozen=True)
class RunMaps:
    """One run's saved maps: maps (evals, images, layers, heads, tokens), steps (evals,),
    images (images, 3, S, S) uint8, and its history."""

    history: RunRecord
    maps: np.ndarray
    steps: np.ndarray
    images: np.ndarray

    @classmethod
    def load(cls, files: RunFiles) -> RunMaps:
        tensors = load_file(files.maps)
        return cls(
            history=read_record(files.history),
            maps=tensors["maps"].float().numpy(),
            steps=tensors["steps"].numpy(),
            images=tensors["images"].numpy(),
        )

    def row(self, step_index: int, image: int, layer: int, head: int | None) -> np.ndarray:
        """(tokens,) attention row; ``head=None`` averages the heads."""
        rows = self.maps[step_index, image, layer]
        return rows.mean(axis=0) if head is None else rows[head]

    def patches(self, step_index: int, image: int, layer: int, head: int | None) -> np.ndarray:
        """(patches,) [CLS]→patch weights of :meth:`row`, CLS→CLS dropped and renormalised."""
        return cls_to_patch(torch.from_numpy(self.row(step_index, image, layer, head))).numpy()


def available_runs(output_root: Path | str) -> dict[str, RunFiles]:
    """Run label (the id, or ``id/s<seed>`` for every seed of a run with several) → run files,
    for runs whose attention maps were saved."""
    found = [f for f in find_runs(output_root) if f.maps.exists()]
    keys = [(f.run_dir.parent.name, int(f.run_dir.name.removeprefix("seed"))) for f in found]
    order = sorted(range(len(found)), key=lambda i: keys[i])
    labels = seed_labels([keys[i] for i in order])
    return {label: found[i] for label, i in zip(labels, order, strict=True)}


def image_grid(run: RunMaps, step_index: int, layer: int):
    """Static view: the head-mean attention of every saved image at one step and layer."""
    count = run.images.shape[0]
    fig, axes = new_figure(ncols=count, width=2.0, height=2.2)
    for image, ax in enumerate(axes[0]):
        patches = run.patches(step_index, image, layer, None)
        attention_overlay(ax, run.images[image], patches, f"image {image + 1}")
    attention_scale(fig, list(axes[0]))
    step = int(run.steps[step_index])
    fig.suptitle(f"{run.history.label}: layer {layer + 1}, mean of heads, step {step}")
    return fig


def concentration_sentence(run: RunMaps, layer: int) -> str:
    """What the saved maps of ``run`` say at ``layer`` (0-based), mean of the heads, over its
    saved images, from its first to its last tracking point: the strongest patch's share of the
    [CLS] attention and how many patches hold half of it (both means over images)."""

    def at(step_index: int) -> tuple[float, float]:
        rows = [np.sort(run.patches(step_index, i, layer, None))[::-1]
                for i in range(run.images.shape[0])]  # fmt: skip
        top = float(np.mean([r[0] for r in rows]))
        half = float(np.mean([np.searchsorted(np.cumsum(r), 0.5) + 1 for r in rows]))
        return top, half

    (top0, half0), (top1, half1) = at(0), at(len(run.steps) - 1)
    first, last = int(run.steps[0]), int(run.steps[-1])
    return (
        f"In {run.history.label}, layer {layer + 1} (mean of the heads, {run.images.shape[0]} "
        f"saved images): the strongest patch holds {100 * top0:.1f} % of the [CLS] attention at "
        f"step {first} and {100 * top1:.1f} % at step {last}; half of the attention sits on "
        f"{half0:.1f} patches on average at step {first} and on {half1:.1f} at step {last}."
    )


def draw(run: RunMaps, step_index: int, image: int, layer: int, head: int | None):
    """The explorer's figure: attention over the image (large, left), and the layer's four
    metrics over training with the chosen step marked (2 × 2, right)."""
    fig = plt.figure(figsize=(11, 4.6), layout="constrained")
    plt.close(fig)
    left, right = fig.subfigures(1, 2, width_ratios=(1, 1.35))
    head_name = "mean of heads" if head is None else f"head {head + 1}"
    picture = left.add_subplot()
    attention_overlay(
        picture,
        run.images[image],
        run.patches(step_index, image, layer, head),
        f"image {image + 1}, layer {layer + 1}, {head_name}, step {int(run.steps[step_index])}",
    )
    attention_scale(left, picture)
    evals = run.history.evals
    steps = [e.step for e in evals]
    for ax, metric in zip(right.subplots(2, 2).flat, METRICS, strict=True):
        ax.plot(steps, [e.metrics[metric][layer] for e in evals], marker=".")
        ax.axvline(run.steps[step_index], color="tab:red", linestyle="--")
        ax.set(xlabel="step", title=metric_label(metric))
    fig.suptitle(run.history.label)
    return fig


def png_output(fig) -> dict:
    """A display_data output (as stored in notebooks and Output widgets) holding ``fig`` as PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    data = {"image/png": base64.b64encode(buffer.getvalue()).decode(), "text/plain": repr(fig)}
    return {"output_type": "display_data", "data": data, "metadata": {}}


class AttentionExplorer:
    """Widgets: configuration, layer, head, image and training step → :func:`draw`. It opens as
    the static viewer does (``static_explorer``): run ``initial``, last layer, mean of the heads,
    image 1, last step; layers, heads and images are numbered from 1 in both."""

    def __init__(self, output_root: Path | str, initial: str | None = None):
        self.paths = available_runs(output_root)
        if not self.paths:
            raise FileNotFoundError(
                f"no runs with attention maps under {output_root}; run the family notebooks first"
            )
        first = initial if initial in self.paths else next(iter(self.paths))
        self.run = RunMaps.load(self.paths[first])
        self.config = widgets.Dropdown(
            options=list(self.paths), value=first, description="configuration"
        )
        self.layer = widgets.IntSlider(min=1, max=1, description="layer")
        self.head = widgets.Dropdown(description="head")
        self.image = widgets.IntSlider(min=1, max=1, description="image")
        self.step = widgets.SelectionSlider(options=[0], description="step")
        self.output = widgets.Output()
        self._quiet = False
        self._configure()
        self.config.observe(self._on_config, names="value")
        for control in (self.layer, self.head, self.image, self.step):
            control.observe(self._redraw, names="value")
        self._redraw()

    def _configure(self) -> None:
        """Fit the controls to the current run; redraws are held until it is consistent."""
        self._quiet = True
        _, images, layers, heads, _ = self.run.maps.shape
        self.layer.max = layers
        self.layer.value = layers
        self.head.options = [("mean of heads", -1)] + [(f"head {h + 1}", h) for h in range(heads)]
        self.head.value = -1
        self.image.max = images
        self.image.value = 1
        self.step.options = [int(s) for s in self.run.steps]
        self.step.value = int(self.run.steps[-1])
        self._quiet = False

    def _on_config(self, change) -> None:
        self.run = RunMaps.load(self.paths[change["new"]])
        self._configure()
        self._redraw()

    def _redraw(self, *_) -> None:
        if self._quiet:
            return
        step_index = int(np.searchsorted(self.run.steps, self.step.value))
        head = None if self.head.value == -1 else self.head.value
        fig = draw(self.run, step_index, self.image.value - 1, self.layer.value - 1, head)
        # Set the Output's state directly instead of capturing display() inside `with output:`:
        # headless clients (papermill/nbclient) intermittently hang on that capture protocol.
        self.output.outputs = (png_output(fig),)

    @property
    def widget(self) -> widgets.Widget:
        controls = widgets.HBox(
            [
                widgets.VBox([self.config, self.layer, self.head]),
                widgets.VBox([self.image, self.step]),
            ]
        )
        return widgets.VBox([controls, self.output])

    def show(self) -> None:
        display(self.widget)
