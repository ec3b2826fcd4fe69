"""Study B's analyses of a matched grid (methods × learning rates × seeds per dataset).

Every function takes the run-level frame: :func:`grid_frame` of ``results.run_summary`` (one
row per (run, seed)), with ``dataset``, ``method``, ``lr``, ``log10_lr``, ``seed`` and the
outcome and signal columns. Seeds are the replicates; a matched cell is (dataset, lr, seed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from collapse_utils.analysis.stats import dose_response, holm, paired_matched, predictor_ranking

CELL = ["dataset", "method", "lr"]
MATCHED = ["lr", "seed"]  # within a dataset: the cell a full-FT run and a LoRA run share
# Label-free signals that could predict forgetting: attention (the report's) and representation
# (study2's); ``_e1`` versions are the same signals after the first epoch.
ATTENTION_SIGNALS = ("d_entropy_pct", "d_gini_pct", "d_head_diversity_pct")
REPRESENTATION_SIGNALS = ("cka_mean_f", "cka_last_f", "embedding_drift_f", "weight_drift_f")
EARLY_SIGNALS = ("cka_mean_e1", "embedding_drift_e1", "weight_drift_e1")


def grid_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """``summary`` (one row per run and seed) with ``log10_lr``; runs without a learning rate
    (a pre-trained baseline) are left out."""
    frame = summary[summary["lr"].notna()].copy()
    frame["log10_lr"] = np.log10(frame["lr"].astype(float))
    return frame.reset_index(drop=True)


def present(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The ``columns`` of ``frame`` that hold at least one value, in order."""
    return [c for c in columns if c in frame.columns and frame[c].notna().any()]


def retention_columns(frame: pd.DataFrame) -> list[str]:
    """``retention_<d>`` columns of ``frame`` with values, sorted."""
    return present(frame, sorted(c for c in frame.columns if c.startswith("retention_")))


def cell_table(frame: pd.DataFrame, values: Sequence[str]) -> pd.DataFrame:
    """Mean and SD over seeds of each of ``values`` per dataset × method × lr: columns
    ``seeds``, ``<v>_mean``, ``<v>_sd`` (SD blank with one seed)."""
    groups = frame.groupby(CELL, sort=True)
    table = pd.DataFrame({"seeds": groups.size()})
    for value in values:
        table[f"{value}_mean"] = groups[value].mean()
        table[f"{value}_sd"] = groups[value].std(ddof=1)
    return table


def paired_table(
    frame: pd.DataFrame, outcomes: Sequence[str], a: str = "full", b: str = "lora"
) -> pd.DataFrame:
    """``a`` against ``b`` at matched (lr, seed) per dataset and outcome
    (``stats.paired_matched``), with Holm's correction of the paired-t p over the table's
    tests (the family). Index (dataset, outcome)."""
    rows = {}
    for dataset, runs in frame.groupby("dataset", sort=True):
        for outcome in outcomes:
            rows[(dataset, outcome)] = paired_matched(runs, MATCHED, "method", a, b, outcome)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["dataset", "outcome"])
    tested = table["p_t"].notna()
    table["p_t_holm"] = np.nan
    table.loc[tested, "p_t_holm"] = holm(table.loc[tested, "p_t"].to_numpy())
    return table


def dose_table(frame: pd.DataFrame, outcomes: Sequence[str]) -> pd.DataFrame:
    """Spearman ρ of each outcome with log10 lr per dataset × method (n = lrs × seeds), for the
    methods run at two or more learning rates. Index (dataset, method, outcome)."""
    rows = {}
    for (dataset, method), runs in frame.groupby(["dataset", "method"], sort=True):
        if runs["lr"].nunique() < 2:
            continue
        for outcome in outcomes:
            rows[(dataset, method, outcome)] = dose_response(runs, "log10_lr", outcome)
    table = pd.DataFrame.from_dict(rows, orient="index")
    if not table.empty:
        names = ["dataset", "method", "outcome"]
        table.index = pd.MultiIndex.from_tuples(table.index, names=names)
        table["n"] = table["n"].astype(int)
    return table


def signal_ranking(
    frame: pd.DataFrame, target: str, signals: Sequence[str], n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """``stats.predictor_ranking`` of ``signals`` for ``target`` over every run, with mean |ρ|
    within dataset (``abs_rho_within``) and within dataset × method
    (``abs_rho_within_method``): a signal that only tells datasets or methods apart ranks
    high overall and low within."""
    ranking = predictor_ranking(frame, target, signals, ["dataset"], n_boot, seed)
    by_method = predictor_ranking(frame, target, signals, ["dataset", "method"], 0, seed)
    ranking["abs_rho_within_method"] = by_method["abs_rho_within"]
    return ranking


def operating_points(frame: pd.DataFrame, values: Sequence[str]) -> pd.DataFrame:
    """Per dataset × method, the learning rate with the best mean validation accuracy over
    seeds (``best_acc``; what a practitioner would pick) and the seed means of ``values`` there.
    Index (dataset, method)."""
    means = frame.groupby(CELL, sort=True)[["best_acc", *values]].mean().reset_index()
    picked = means.loc[means.groupby(["dataset", "method"])["best_acc"].idxmax()]
    return picked.set_index(["dataset", "method"])
