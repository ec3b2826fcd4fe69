"""How the book names and draws things: the one table of metric labels, the method palette and
line styles (one colour and one line style per method in every figure), the names of settings
and datasets, and how a run with several seeds is labelled."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from collapse_utils.run_record import RunRecord

METRIC_NAMES = {
    "entropy": "Entropy",
    "erf": "ERF@0.95",
    "gini": "Gini",
    "head_diversity": "Head diversity",
}
METRIC_UNITS = {"entropy": "nats"}
METHOD_NAMES = {
    "full": "Full FT",
    "lora": "LoRA",
    "none": "pre-trained",
    "linear_probe": "linear probe",
    "last_block": "last block",
    "lora_frozen_proj": "LoRA, frozen projection",
}
METHOD_COLORS = {
    "full": "tab:red",
    "lora": "tab:blue",
    "none": "tab:gray",
    "linear_probe": "tab:green",
    "last_block": "tab:orange",
    "lora_frozen_proj": "tab:cyan",
}
METHOD_LINES = {
    "full": "-",
    "lora": "--",
    "none": ":",
    "linear_probe": "-.",
    "last_block": (0, (5, 1, 1, 1)),
    "lora_frozen_proj": (0, (1, 1)),
}
# Within one method, runs differ by marker (and by the label written at each line's end).
RUN_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")
METHOD_GID = "method:"  # artist gid prefix: the saved figure records each method's colour
REGULARIZER_NAMES = {"none": "none", "apr": "APR", "entropy_floor": "entropy floor"}
# Settings a family varies (families.yaml ``axis``), as axis labels.
SETTING_NAMES = {
    "dataset": "dataset",
    "method": "method",
    "lr": "learning rate",
    "weight_decay": "weight decay",
    "rank": "LoRA rank",
    "targets": "LoRA targets",
    "freeze_layers": "frozen layers",
    "reg_kind": "regularizer",
    "lam": "regularizer weight λ",
}
DATASET_NAMES = {
    "eurosat": "EuroSAT",
    "pets": "Pets",
    "cifar100": "CIFAR-100",
    "cifar10": "CIFAR-10",
    "flowers102": "Flowers-102",
    "synthetic": "synthetic",
}


def metric_label(metric: str) -> str:
    """Axis label of a metric's value: ``Entropy (nats)``, ``Gini``."""
    name = METRIC_NAMES.get(metric, metric)
    return f"{name} ({METRIC_UNITS[metric]})" if metric in METRIC_UNITS else name


def delta_label(column: str) -> str:
    """Axis label of a ``run_summary`` column: ``d_gini_pct`` → ``Δ Gini (%)``."""
    if column == "best_acc":
        return "Best epoch accuracy (%)"
    metric = column.removeprefix("d_").removesuffix("_pct")
    return f"Δ {METRIC_NAMES.get(metric, metric)} (%)"


def seed_labels(keys: Sequence[tuple[str, int]]) -> list[str]:
    """Labels of (run, seed) pairs: the run id, or ``run/s<seed>`` for a run that appears with
    several seeds."""
    counts = Counter(run for run, _ in keys)
    return [f"{run}/s{seed}" if counts[run] > 1 else str(run) for run, seed in keys]


def curve_labels(histories: Iterable[RunRecord]) -> list[str]:
    """:func:`seed_labels` of histories, for legends and panel titles."""
    return seed_labels([(h.id, h.seed) for h in histories])


def method_style(method: str) -> dict[str, Any]:
    """Colour, line style and gid of ``method``'s lines, bars and points in every figure."""
    return {
        "color": METHOD_COLORS.get(method, "tab:gray"),
        "linestyle": METHOD_LINES.get(method, "-"),
        "gid": METHOD_GID + method,
    }


def run_styles(histories: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Matplotlib line keywords per history (:func:`labelled_styles` of its method and its
    :func:`curve_labels` label)."""
    return labelled_styles([h.method for h in histories], curve_labels(histories))


def labelled_styles(methods: Sequence[str], labels: Sequence[str]) -> list[dict[str, Any]]:
    """Line keywords per run: its method's :func:`method_style`, a marker that tells the
    method's runs apart, and its label (written at the line's end; the legend names methods)."""
    seen: defaultdict[str, int] = defaultdict(int)
    styles = []
    for method, label in zip(methods, labels, strict=True):
        marker = RUN_MARKERS[seen[method] % len(RUN_MARKERS)]
        seen[method] += 1
        styles.append({**method_style(method), "marker": marker, "label": label})
    return styles


def entropy_ceiling(history: RunRecord) -> float:
    """The largest [CLS]→patch entropy the run's model can have (nats): ln of its patch count,
    ln 49 for ViT-B/32 at 224 px (uniform attention over every patch)."""
    model, data = history.config["model"], history.config["data"]
    return math.log((data["image_size"] // model["patch_size"]) ** 2)
