"""How the book names and colours things: the one table of metric labels, the method palette,
the names of settings and datasets, and how a run with several seeds is labelled."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

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
        return "Best epoch accuracy"
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
