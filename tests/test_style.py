from __future__ import annotations

import json

from matplotlib.colors import to_hex
from PIL import Image

from collapse_utils.analysis.published import METHODS as PUBLISHED_METHODS
from collapse_utils.book import figures
from collapse_utils.book.style import (
    METHOD_COLORS,
    METRIC_NAMES,
    delta_label,
    metric_label,
    run_styles,
    seed_labels,
)
from collapse_utils.config import METHODS, METRICS
from tests.fake_records import FULL_CHANGE, history


def test_every_metric_and_method_has_one_label_and_colour():
    assert set(METRIC_NAMES) == set(METRICS)
    # the authors' published runs add an arm we do not run (LoRA with a frozen projection)
    assert set(METHOD_COLORS) == set(METHODS) | set(PUBLISHED_METHODS.values())


def test_labels_carry_units_and_changes():
    assert metric_label("entropy") == "Entropy (nats)" and metric_label("gini") == "Gini"
    assert delta_label("d_head_diversity_pct") == "Δ Head diversity (%)"
    assert delta_label("best_acc") == "Best epoch accuracy (%)"


def test_seeds_are_named_only_for_runs_with_several():
    keys = [("E2", 42), ("E2", 7), ("E5", 42)]
    assert seed_labels(keys) == ["E2/s42", "E2/s7", "E5"]


def test_every_run_of_a_method_has_its_colour_and_line_style_and_its_own_marker():
    runs = [
        history("E2", "full_vs_lora", FULL_CHANGE),
        history("E4", "full_vs_lora", FULL_CHANGE, method="lora"),
        history("E3", "full_vs_lora", FULL_CHANGE),
    ]
    full, lora, other_full = run_styles(runs)
    assert full["color"] == other_full["color"] == METHOD_COLORS["full"] != lora["color"]
    assert full["linestyle"] == other_full["linestyle"] != lora["linestyle"]
    assert full["marker"] != other_full["marker"]
    assert [s["label"] for s in (full, lora, other_full)] == ["E2", "E4", "E3"]


def test_a_saved_figure_records_each_methods_colour_and_smoke_figures_carry_a_watermark(tmp_path):
    runs = [history("E2", "full_vs_lora", FULL_CHANGE),
            history("E4", "full_vs_lora", FULL_CHANGE, method="lora")]  # fmt: skip
    fig = figures.metric_trajectories(runs)
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert {"E2", "E4"} <= {part for t in labels for part in t.split(", ")}  # runs, inside
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["Full FT", "LoRA"]  # methods
    assert any(t.get_text().startswith("ln 49") for t in fig.axes[0].texts)  # entropy ceiling
    plain = figures.save_figure(fig, tmp_path, "plain")
    marked = figures.save_figure(fig, tmp_path, "marked", figures.watermark_of("smoke"))
    with Image.open(plain) as image:
        colours = json.loads(image.text[figures.METHODS_KEY])
    assert colours == {"full": to_hex(METHOD_COLORS["full"]), "lora": to_hex(METHOD_COLORS["lora"])}
    assert figures.SMOKE_WATERMARK not in {t.get_text() for t in fig.texts}  # removed after
    assert plain.read_bytes() != marked.read_bytes()
    assert figures.watermark_of("full") == ""
