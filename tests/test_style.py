from __future__ import annotations

from collapse_utils.analysis.published import METHODS as PUBLISHED_METHODS
from collapse_utils.book.style import (
    METHOD_COLORS,
    METRIC_NAMES,
    delta_label,
    metric_label,
    seed_labels,
)
from collapse_utils.config import METHODS, METRICS


def test_every_metric_and_method_has_one_label_and_colour():
    assert set(METRIC_NAMES) == set(METRICS)
    # the authors' published runs add an arm we do not run (LoRA with a frozen projection)
    assert set(METHOD_COLORS) == set(METHODS) | set(PUBLISHED_METHODS.values())


def test_labels_carry_units_and_changes():
    assert metric_label("entropy") == "Entropy (nats)" and metric_label("gini") == "Gini"
    assert delta_label("d_head_diversity_pct") == "Δ Head diversity (%)"
    assert delta_label("best_acc") == "Best epoch accuracy"


def test_seeds_are_named_only_for_runs_with_several():
    keys = [("E2", 42), ("E2", 7), ("E5", 42)]
    assert seed_labels(keys) == ["E2/s42", "E2/s7", "E5"]
