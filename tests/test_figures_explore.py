from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from collapse_utils.analysis.results import run_summary
from collapse_utils.book import figures
from collapse_utils.book.explore import (
    AttentionExplorer,
    RunMaps,
    available_runs,
    concentration_sentence,
    draw,
    image_grid,
)
from collapse_utils.measurement.metrics import cls_to_patch
from collapse_utils.training.experiment import run_experiment
from tests.test_train import small


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two small real runs (full FT and LoRA) in one output root."""
    root = tmp_path_factory.mktemp("runs")
    histories = [
        run_experiment(small(root, i, output_root=str(root)), progress=False).history
        for i in ("E2", "E5")
    ]
    return root, histories


def test_metric_trajectories_plot_each_runs_layer_mean(runs):
    _, histories = runs
    fig = figures.metric_trajectories(histories)
    axes = fig.axes
    assert len(axes) == 4
    y = axes[0].lines[1].get_ydata()
    expected = [e.layer_mean("entropy") for e in histories[1].evals]
    np.testing.assert_allclose(y, expected)
    assert [line.get_label() for line in axes[3].lines] == ["E2", "E5"]


def test_layer_heatmaps_share_one_colour_scale(runs):
    _, histories = runs
    fig = figures.layer_heatmaps(histories)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    assert images[0].get_clim() == images[1].get_clim()
    assert images[0].get_array().shape == (3, len(histories[0].evals))


def test_summary_figures_draw_one_mark_per_run(runs):
    _, histories = runs
    summary = run_summary(histories)
    bars = figures.zeroshot_bars(summary).axes[0].patches
    assert [b.get_height() for b in bars] == pytest.approx((100 * summary["zs_cifar100"]).tolist())
    scatter = figures.zeroshot_vs_collapse(summary).axes[0]
    assert sum(len(c.get_offsets()) for c in scatter.collections) == 2


def test_attention_overlay_shows_the_renormalised_patch_grid():
    fig, axes = figures.new_figure()
    row = torch.tensor(np.r_[0.5, np.full(49, 0.5 / 49)])
    patches = cls_to_patch(row).numpy()  # the one CLS→patch slicing, as the explorer uses it
    figures.attention_overlay(axes[0, 0], np.zeros((3, 224, 224), np.uint8), patches)
    overlay = axes[0, 0].images[1].get_array()  # RGBA: one red, opacity by relative weight
    assert overlay.shape == (7, 7, 4)
    relative = np.asarray(overlay[..., 3]) / figures.ATTENTION_ALPHA
    assert relative.max() == pytest.approx(1.0)  # the strongest patch
    np.testing.assert_allclose(relative.ravel(), patches / patches.max(), rtol=1e-6)


def test_explorer_loads_maps_switches_configuration_and_draws(runs):
    root, _ = runs
    assert set(available_runs(root)) == {"E2", "E5"}
    explorer = AttentionExplorer(root, initial="E2")
    assert explorer.layer.max == 3 and explorer.head.options[0] == ("mean of heads", -1)
    assert len(explorer.output.outputs) == 1  # the figure lives in the widget's own state
    assert "image/png" in explorer.output.outputs[0]["data"]
    explorer.config.value = "E5"
    assert explorer.run.history.id == "E5"
    assert len(explorer.output.outputs) == 1  # replaced, not appended
    explorer.step.value = explorer.step.options[0]
    run = RunMaps.load(available_runs(root)["E5"])
    assert run.row(0, 0, 2, None).shape == (50,)
    patches = run.patches(0, 0, 2, None)
    assert patches.shape == (49,) and patches.sum() == pytest.approx(1.0, abs=1e-5)
    row = run.row(0, 0, 2, 1)
    np.testing.assert_allclose(run.patches(0, 0, 2, 1), row[1:] / row[1:].sum(), rtol=1e-5)
    assert len(draw(run, 0, 0, 2, 1).axes) == 5 + 1  # the map, its colour bar, four metrics
    assert len(image_grid(run, -1, 0).axes) == run.images.shape[0] + 1  # and one colour bar


def test_explorer_without_runs_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the family notebooks"):
        AttentionExplorer(tmp_path)


def test_close_points_share_one_label_and_labels_never_overlap():
    fig, axes = figures.new_figure(width=5.0, height=4.0)
    ax = axes[0, 0]
    x = [0.0, 0.01, 0.02, 0.6, 0.61, 5.0, 5.0, 5.1]
    y = [6.5, 6.5, 6.5, 6.5, 6.5, -8.0, -8.0, -7.9]
    names = ["E2", "E3", "R1", "A3_f3", "A3_f6", "E4", "E5", "E6"]
    ax.scatter(x, y)
    ax.margins(0.3)
    texts = figures.label_points(ax, x, y, names)
    assert sorted(texts) == ["A3_f3, A3_f6", "E2, E3, R1", "E4, E5, E6"]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.overlaps(b)]
    inside = ax.get_window_extent(renderer)
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 for b in boxes)


def test_zero_shot_bars_have_a_legend_for_every_colour():
    summary = pd.DataFrame(
        {
            "run": ["E2", "E5"],
            "method": ["full", "lora"],
            "zs_cifar100": [0.2, 0.1],
            "zs_cifar100_pretrained": [0.15, 0.15],
        }
    )
    legend = figures.zeroshot_bars(summary).axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["Full FT", "LoRA", "pre-trained model"]


def test_the_explorers_conclusion_reads_the_strongest_patch_share_from_the_maps(runs):
    root, _ = runs
    run = RunMaps.load(available_runs(root)["E2"])
    text = concentration_sentence(run, 2)
    last = len(run.steps) - 1
    top = np.mean([run.patches(last, i, 2, None).max() for i in range(run.images.shape[0])])
    assert f"{100 * top:.1f} % at step {int(run.steps[-1])}" in text
    assert text.startswith(f"In {run.history.label}, layer 3 (mean of the heads")
