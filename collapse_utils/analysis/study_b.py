"""Study B's analyses of a matched grid (methods × learning rates × seeds per dataset), one set
of functions for our runs and for the authors' published ones.

Every function takes a run-level frame, one row per (run, seed), in the run summary's column
names: :func:`grid_frame` of ``results.run_summary`` (ours) or
``published.load_study2`` (theirs), with ``dataset``, ``method``, ``lr``, ``seed``, the outcomes
and the signals. Seeds are the replicates; a matched cell is (dataset, lr, seed); a cell of the
grid is (dataset, method, lr).

Signals and outcomes are read at one checkpoint, the *selected* one (suffix ``_sel``): the
checkpoint whose zero-shot retention was scored (study2: the best-validation epoch). ``_e1``
columns are the same signals after the first epoch. The ranking and the verdicts use the core
methods (full FT and LoRA); linear probes, last-block and frozen-projection runs keep ~all of
their zero-shot accuracy by construction and are shown as reference points only. A frame holds
one backbone: split by ``model`` first (``published.primary``); a second backbone is analysed
apart, never pooled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.stats

from collapse_utils.analysis import verdicts as rules
from collapse_utils.analysis.stats import (
    dose_response,
    holm,
    paired_matched,
    predictor_ranking,
)
from collapse_utils.analysis.verdicts import Verdict

CELL = ["dataset", "method", "lr"]
PAIRED_COLUMNS = ["n", "mean_a", "mean_b", "diff", "d_z", "p_t", "p_wilcoxon"]
MATCHED = ["lr", "seed"]  # within a dataset: the cell a full-FT run and a LoRA run share
CORE_METHODS = ("full", "lora")
FROZEN_PROJECTION = "lora_frozen_proj"
TARGET = "retention_cifar100"  # the report's transfer set
DAMAGED = 0.5
"""A cell is *damaged* when its mean retention is below half the pre-trained zero-shot
accuracy (study2's threshold, 50 %)."""
SELECTION_MARGIN = 2.0
"""Points of validation accuracy below the best run that still count as a candidate."""
# Label-free signals ranked against forgetting, in study2's order; |Δ| of attention metrics.
SIGNALS = (
    "cka_mean_sel",
    "embedding_drift_sel",
    "weight_drift_sel",
    "abs_d_gini_pct_sel",
    "abs_d_entropy_pct_sel",
    "abs_d_entropy_last_pct_sel",
)
# Reference rows: what a signal must beat (the learning-rate dial, the training loss), the signed
# statistic the report used, and what needs labels (test accuracy, study2's labelled probe).
REFERENCES = ("d_entropy_pct_sel", "log10_lr", "train_loss_f", "test_acc", "probe_retention_e1")
EARLY = (
    "cka_mean_e1",
    "embedding_drift_e1",
    "weight_drift_e1",
    "abs_d_entropy_pct_e1",
    "d_entropy_pct_e1",
)
# Signals for choosing among candidates, and which end means "changed least".
LOW_IS_LESS_CHANGE = {
    "abs_d_entropy_pct_sel": True,
    "abs_d_entropy_last_pct_sel": True,
    "abs_d_erf_pct_sel": True,
    "abs_d_gini_pct_sel": True,
    "embedding_drift_sel": True,
    "weight_drift_sel": True,
    "cka_mean_sel": False,
}


# --- the frame ---------------------------------------------------------------------------------


def add_derived(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``log10_lr`` and, for every signed change ``d_<m>_pct_<when>``, its size
    ``abs_d_<m>_pct_<when>`` (a copy)."""
    frame = frame.copy()
    frame["log10_lr"] = np.log10(frame["lr"].astype(float))
    for column in [c for c in frame.columns if c.startswith("d_") and "_pct_" in c]:
        frame[f"abs_{column}"] = frame[column].abs()
    return frame


def grid_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """Our ``summary`` (one row per run and seed) as a Study B frame (:func:`add_derived`);
    runs without a learning rate (a pre-trained baseline) are left out. LoRA with a frozen
    projection is its own arm, ``lora_frozen_proj`` (study2's name), never pooled with LoRA."""
    frame = add_derived(summary[summary["lr"].notna()]).reset_index(drop=True)
    if "train_projection" in frame:
        frozen = (frame["method"] == "lora") & (frame["train_projection"] == False)  # noqa: E712
        frame.loc[frozen, "method"] = FROZEN_PROJECTION
    return frame


def core(frame: pd.DataFrame) -> pd.DataFrame:
    """The full-FT and LoRA runs of ``frame``."""
    return frame[frame["method"].isin(CORE_METHODS)].reset_index(drop=True)


def reference_points(frame: pd.DataFrame) -> pd.DataFrame:
    """The other runs (linear probe, last block, frozen projection)."""
    return frame[~frame["method"].isin(CORE_METHODS)].reset_index(drop=True)


def present(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The ``columns`` of ``frame`` that hold at least one value, in order."""
    return [c for c in columns if c in frame.columns and frame[c].notna().any()]


def retention_columns(frame: pd.DataFrame) -> list[str]:
    """``retention_<d>`` columns of ``frame`` with values, sorted."""
    return present(frame, sorted(c for c in frame.columns if c.startswith("retention_")))


# --- tables over cells -------------------------------------------------------------------------


def cell_table(
    frame: pd.DataFrame, values: Sequence[str], sd: Sequence[str] | None = None
) -> pd.DataFrame:
    """Mean over seeds of each of ``values`` per dataset × method × lr, and the SD of those in
    ``sd`` (default: all): columns ``seeds``, ``<v>_mean``, ``<v>_sd`` (SD blank with one
    seed)."""
    groups = frame.groupby(CELL, sort=True)
    table = pd.DataFrame({"seeds": groups.size()})
    for value in values:
        table[f"{value}_mean"] = groups[value].mean()
        if sd is None or value in sd:
            table[f"{value}_sd"] = groups[value].std(ddof=1)
    return table


def paired_table(
    frame: pd.DataFrame, outcomes: Sequence[str], a: str = "full", b: str = "lora"
) -> pd.DataFrame:
    """``a`` against ``b`` at matched (lr, seed) per dataset and outcome
    (``stats.paired_matched``), with Holm's correction of the paired-t p over the table's
    tests (the family, as in study2). Index (dataset, outcome)."""
    rows = {}
    for dataset, runs in frame.groupby("dataset", sort=True):
        for outcome in outcomes:
            rows[(dataset, outcome)] = paired_matched(runs, MATCHED, "method", a, b, outcome)
    if not rows:  # no full-FT or LoRA run
        return pd.DataFrame(columns=[*PAIRED_COLUMNS, "p_t_holm"])
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


def within_groups(
    frame: pd.DataFrame,
    signal: str,
    target: str = TARGET,
    by: Sequence[str] = ("dataset", "method"),
) -> pd.DataFrame:
    """Spearman ρ of ``signal`` with ``target`` inside each group of ``by`` (n = runs): the
    sign and strength per configuration that a pooled correlation hides. Index: the groups;
    columns rho, p, n, lrs (learning rates in the group)."""
    rows = {}
    for key, runs in frame.groupby(list(by), sort=True):
        rows[key] = dose_response(runs, signal, target).to_dict() | {"lrs": runs["lr"].nunique()}
    if not rows:
        return pd.DataFrame(columns=["rho", "p", "n", "lrs"])
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=list(by))
    return table.astype({"n": int, "lrs": int})


def polarity(frame: pd.DataFrame, signals: Sequence[str], target: str = TARGET) -> pd.DataFrame:
    """Signed Spearman ρ of each of ``signals`` with ``target`` within each dataset × method of
    the core runs: whether a signal keeps its sign across configurations (and backbones).
    Index (dataset, method); one column ``rho_<signal>`` per signal, and ``n`` (runs)."""
    runs = core(frame)
    columns = {f"rho_{s}": within_groups(runs, s, target)["rho"] for s in present(runs, signals)}
    table = pd.DataFrame(columns)
    table["n"] = runs.groupby(["dataset", "method"]).size()
    return table


# --- which signal predicts forgetting ----------------------------------------------------------


def signal_ranking(
    frame: pd.DataFrame,
    target: str = TARGET,
    columns: Sequence[str] | None = None,
    resample: Sequence[str] | None = tuple(CELL),
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """``stats.predictor_ranking`` of the signals and reference rows (``columns``; default
    every one of :data:`SIGNALS` and :data:`REFERENCES` present) for ``target`` over the core
    runs: ρ over runs, mean |ρ| and signed ρ within dataset (``abs_rho_within``,
    ``rho_within``) and within dataset × method (``abs_rho_within_method``,
    ``rho_within_method``), and the bootstrap over ``resample`` cells (None: over runs), with
    each row's gap to the best label-free signal. Column ``kind``: signal or reference."""
    runs = core(frame)
    columns = list(columns or present(runs, [*SIGNALS, *REFERENCES]))
    if runs.empty or not columns or target not in runs:
        return pd.DataFrame(columns=["rho", "p", "n", "unit_rho", "kind"])
    runs = runs.dropna(subset=[*columns, target])  # the best signal is picked on the same runs
    signals = [c for c in columns if c in SIGNALS] or columns
    # Gaps are measured against the best label-free signal (study2: CKA), not a reference row.
    best = predictor_ranking(runs, target, signals, None, 0, seed, resample).index[0]
    ranking = predictor_ranking(
        runs, target, columns, ["dataset"], n_boot, seed, resample, reference=best
    )
    by_method = predictor_ranking(runs, target, columns, ["dataset", "method"], 0, seed)
    ranking["abs_rho_within_method"] = by_method["abs_rho_within"]
    ranking["rho_within_method"] = by_method["rho_within"]
    ranking["kind"] = ["signal" if c in SIGNALS else "reference" for c in ranking.index]
    return ranking


def separated(ranking: pd.DataFrame) -> list[str]:
    """The rows of a ranking whose gap to the best has a 95 % CI above 0."""
    return [name for name, row in ranking.iterrows() if row["gap_low"] > 0]


def early_warning(frame: pd.DataFrame, target: str = TARGET) -> pd.DataFrame:
    """Does the first epoch tell? Per epoch-1 signal: Spearman ρ with the final ``target`` over
    the core runs (rho, p, n), and the cell-level AUC with which it separates damaged cells
    (mean ``target`` < :data:`DAMAGED`) from the others (``auc``: oriented, 1 = perfect, 0.5 =
    chance; ``damaged_low``: whether damaged cells score lower), over cell means
    (``n_damaged``, ``n_healthy``)."""
    runs = core(frame)
    signals = present(runs, EARLY)
    cells = runs.groupby(CELL)[[*signals, target]].mean().dropna(subset=[target])
    damaged = cells[target] < DAMAGED
    rows = {}
    for signal in signals:
        row = dose_response(runs, signal, target).to_dict()
        row |= {"n_damaged": int(damaged.sum()), "n_healthy": int((~damaged).sum())}
        row |= _auc(cells.loc[damaged, signal], cells.loc[~damaged, signal])
        rows[signal] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "predictor"
    return table.astype({"n": int}) if rows else table


def _auc(damaged: pd.Series, healthy: pd.Series) -> dict[str, float]:
    """How well a signal separates damaged from healthy cells: P(a damaged cell scores higher
    than a healthy one), ties half, oriented to ≥ 0.5; ``damaged_low`` says which side."""
    if damaged.empty or healthy.empty:
        return {"auc": float("nan"), "damaged_low": float("nan")}
    higher = scipy.stats.mannwhitneyu(damaged, healthy).statistic / (len(damaged) * len(healthy))
    return {"auc": float(max(higher, 1 - higher)), "damaged_low": float(higher < 0.5)}


def selection(
    frame: pd.DataFrame, target: str = TARGET, margin: float = SELECTION_MARGIN
) -> pd.DataFrame:
    """Choosing a configuration by a signal, as a practitioner could: per dataset, the core runs
    within ``margin`` points of the best validation accuracy are the candidates; each signal of
    :data:`LOW_IS_LESS_CHANGE` picks the one it says changed least. Columns: ``picked`` (run
    and seed), ``retention`` of the pick, ``regret`` (oracle − pick), ``range_fraction`` (where
    the pick falls between the worst and the oracle, 0..1), and per dataset the band:
    ``candidates``, ``cutoff`` (%), ``oracle``, ``random`` (mean: a random pick's expectation),
    ``worst``. Index (dataset, predictor); datasets with fewer than 3 candidates are left out."""
    rows = {}
    for dataset, runs in core(frame).groupby("dataset", sort=True):
        cutoff = 100 * runs["best_acc"].max() - margin
        band = runs[100 * runs["best_acc"] >= cutoff - 1e-9]
        if len(band) < 3:
            continue
        oracle, worst = band[target].max(), band[target].min()
        common = {"candidates": len(band), "cutoff": cutoff, "oracle": oracle,
                  "random": band[target].mean(), "worst": worst}  # fmt: skip
        for signal in present(band, list(LOW_IS_LESS_CHANGE)):
            low = LOW_IS_LESS_CHANGE[signal]
            pick = band.loc[band[signal].idxmin() if low else band[signal].idxmax()]
            rows[(dataset, signal)] = {
                "picked": f"{pick['run']}/s{int(pick['seed'])}",
                "retention": pick[target],
                "regret": oracle - pick[target],
                "range_fraction": (pick[target] - worst) / (oracle - worst)
                if oracle > worst
                else np.nan,
                **common,
            }
    table = pd.DataFrame.from_dict(rows, orient="index")
    if not table.empty:
        table.index = pd.MultiIndex.from_tuples(table.index, names=["dataset", "predictor"])
    return table


def frontier(frame: pd.DataFrame, target: str = TARGET, accuracy: str = "test_acc") -> pd.DataFrame:
    """The accuracy / retention trade-off of every cell (all methods, reference points
    included): seed means of ``accuracy`` and ``target`` per dataset × method × lr and
    ``on_frontier``, true when no other cell of the dataset is at least as good on both and
    better on one (Pareto)."""
    cells = frame.groupby(CELL, sort=True)[[accuracy, target]].mean()
    cells.insert(0, "seeds", frame.groupby(CELL, sort=True).size())
    flags = []
    for (dataset, *_), row in cells.iterrows():
        if row[[accuracy, target]].isna().any():  # not measured: on no frontier
            flags.append(False)
            continue
        others = cells.xs(dataset, level="dataset", drop_level=False)
        dominated = (
            (others[accuracy] >= row[accuracy])
            & (others[target] >= row[target])
            & ((others[accuracy] > row[accuracy]) | (others[target] > row[target]))
        )
        flags.append(not dominated.any())
    cells["on_frontier"] = flags
    return cells


def operating_points(frame: pd.DataFrame, values: Sequence[str]) -> pd.DataFrame:
    """Per dataset × method, the learning rate with the best mean validation accuracy over
    seeds (``best_acc``; what a practitioner would pick) and the seed means of ``values`` there.
    Index (dataset, method)."""
    means = frame.groupby(CELL, sort=True)[["best_acc", *values]].mean().reset_index()
    picked = means.loc[means.groupby(["dataset", "method"])["best_acc"].idxmax()]
    return picked.set_index(["dataset", "method"])


# --- verdicts ----------------------------------------------------------------------------------


def verdicts(frame: pd.DataFrame, target: str = TARGET) -> dict[str, Verdict]:
    """RQ2 and RQ3 on a matched grid, judged where the design lets them be judged:

    - ``RQ2``: per dataset, LoRA's Δ entropy minus full FT's at matched (lr, seed), paired t,
      Holm across datasets (:func:`~collapse_utils.analysis.verdicts.rq2_per_dataset`);
    - ``RQ3``: Spearman ρ of Δ entropy with ``target`` within each dataset × method
      (:func:`~collapse_utils.analysis.verdicts.rq3_within_groups`).

    Core runs only, signals at the selected checkpoint."""
    runs = core(frame)
    entropy = "d_entropy_pct_sel"
    per_dataset = {}
    for dataset, block in runs.groupby("dataset", sort=True):
        signed, size = (
            paired_matched(block, MATCHED, "method", "lora", "full", column)
            for column in (entropy, f"abs_{entropy}")
        )
        per_dataset[dataset] = {"pairs": signed["n"], "diff": signed["diff"], "p": signed["p_t"],
                                "d_z": signed["d_z"], "abs_diff": size["diff"],
                                "abs_p": size["p_t"]}  # fmt: skip
    groups = within_groups(runs, entropy, target) if target in runs else pd.DataFrame()
    pooled = dose_response(runs, entropy, target) if target in runs else None
    return {
        "RQ2": rules.rq2_per_dataset(pd.DataFrame.from_dict(per_dataset, orient="index")),
        "RQ3": rules.rq3_within_groups(groups, pooled),
    }
