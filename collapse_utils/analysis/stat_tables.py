"""Tables of the statistics chapter (report §3.8–3.10, §6.4): which runs each test compares, and
the test results as DataFrames. No plotting here (figures: ``book/stat_figures.py``).

Functions take the ``results`` frames (``run_summary``, ``per_layer_delta``) or histories, and
the run ids a test is about (from ``params/families.yaml``: a family's runs, its reference).
Every table of p-values is one family of tests and carries Holm-adjusted p-values (``*_holm``
columns, ``analysis.stats.holm`` within that table only). A test that cannot run (its runs are
missing, one run per group) is left out of the table and a note says why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from collapse_utils.analysis.results import pct_change, run_means, trajectory
from collapse_utils.analysis.stats import (
    CorrelationMatrix,
    UnitComparison,
    anova_by_layer_group,
    collapse_onset,
    correlation,
    entropy_velocity,
    holm,
    layer_pooled_test,
    paired_layer_test,
    run_level_test,
    seed_level_test,
)
from collapse_utils.run_record import RunRecord

ONSET_THRESHOLD = 0.01
"""Relative entropy drop (1%) that marks collapse onset (§3.9)."""
CONVERGENCE_STD = 0.005
CONVERGENCE_EPOCHS = 3
"""The report's convergence check: SD of val. accuracy over the last 3 epochs below 0.005."""
UNIT_TITLES = {"layer": "layers pooled", "run": "one value per run", "seed": "one per seed"}


# --- selection -------------------------------------------------------------------------------


def trained(histories: Iterable[RunRecord]) -> list[RunRecord]:
    """Histories of runs that trained (method is not ``none``): baselines have no change."""
    return [h for h in histories if h.method != "none"]


def cell(frame: pd.DataFrame, row: Any, column: str) -> float:
    """``frame.loc[row, column]`` as a Python float, NaN when the row is absent (for glue)."""
    if frame.empty or row not in frame.index or column not in frame.columns:
        return float("nan")
    value = frame.loc[row, column]
    return float("nan") if pd.isna(value) else float(value)


def delta_rows(delta: pd.DataFrame, runs: Iterable[str]) -> pd.DataFrame:
    """The rows (every seed) of a ``per_layer_delta`` frame that belong to ``runs``."""
    return delta[delta.index.get_level_values("run").isin(set(runs))]


def change_from_start(values: np.ndarray) -> np.ndarray:
    """Each value's change in % from the first (``results.pct_change``; NaN if it is 0)."""
    return np.array([pct_change(values[0], v) for v in values], dtype=float)


# --- §6.4 A: Full FT vs LoRA -----------------------------------------------------------------


def method_groups(summary: pd.DataFrame, runs: Sequence[str], dataset: str) -> dict[str, Any]:
    """The run ids of each side of §6.4 A, from the summary's ``method`` and ``dataset``:
    ``layer_full``/``layer_lora`` on ``dataset`` (the layer-pooled and seed-level tests),
    ``run_full``/``run_lora`` on every dataset (the run-level test). Complete runs only."""
    rows = summary[summary["run"].isin(runs)]
    on_dataset = rows[rows["dataset"] == dataset]

    def ids(frame: pd.DataFrame, method: str) -> list[str]:
        return list(dict.fromkeys(frame.loc[frame["method"] == method, "run"]))

    return {
        "layer_full": ids(on_dataset, "full"),
        "layer_lora": ids(on_dataset, "lora"),
        "run_full": ids(rows, "full"),
        "run_lora": ids(rows, "lora"),
    }


def full_vs_lora_comparisons(
    summary: pd.DataFrame,
    delta: pd.DataFrame,
    runs: Sequence[str],
    dataset: str,
    n_boot: int = 10_000,
    seed: int = 0,
) -> tuple[dict[str, UnitComparison], list[str]]:
    """Full FT (a) vs LoRA (b) Δentropy among ``runs`` at each unit of analysis.

    ``layer``: the report's test, every layer of the runs on ``dataset`` pooled. ``run``: one
    value per run, every dataset. ``seed``: the seeds of the runs on ``dataset``, only when a run
    has several. Returns the comparisons that could run and notes on those that could not."""
    groups = method_groups(summary, runs, dataset)
    rows = summary[summary["run"].isin(runs)]
    on_dataset = rows[rows["dataset"] == dataset]
    comparisons: dict[str, UnitComparison] = {}
    notes: list[str] = []
    layers_a = delta_rows(delta, groups["layer_full"])
    layers_b = delta_rows(delta, groups["layer_lora"])
    if layers_a.empty or layers_b.empty:
        notes.append(f"Layer-pooled test not run: no {dataset} Full FT or LoRA run is complete.")
    else:
        comparisons["layer"] = layer_pooled_test(layers_a, layers_b, n_boot, seed)
    n_full, n_lora = len(groups["run_full"]), len(groups["run_lora"])
    if min(n_full, n_lora) < 2:
        notes.append(
            "Run-level test not run: it needs at least two complete runs per method "
            f"(Full FT: {n_full}, LoRA: {n_lora})."
        )
    else:
        full_r, lora_r = rows[rows["method"] == "full"], rows[rows["method"] == "lora"]
        comparisons["run"] = run_level_test(full_r, lora_r, n_boot=n_boot, seed=seed)
    seeds = on_dataset.groupby("run").size()
    if seeds.empty or seeds.max() < 2:
        notes.append(
            "Seed-level test not run: every run of this profile has a single seed, so "
            "training randomness cannot be separated from the method here."
        )
    elif not groups["layer_full"] or not groups["layer_lora"]:
        notes.append(f"Seed-level test not run: no {dataset} Full FT or LoRA run is complete.")
    else:
        full_e = on_dataset[on_dataset["method"] == "full"]
        lora_e = on_dataset[on_dataset["method"] == "lora"]
        comparisons["seed"] = seed_level_test(full_e, lora_e, n_boot=n_boot, seed=seed)
    return comparisons, notes


def unit_comparison_table(comparisons: Mapping[str, UnitComparison]) -> pd.DataFrame:
    """One row per unit (index): n, means and bootstrap CIs of Full FT and LoRA, Welch t,
    Mann-Whitney U, signed Cohen's d; Holm over every p of the table (Welch and MWU)."""
    rows = []
    for unit, comparison in comparisons.items():
        r = comparison.result
        rows.append(
            {
                "unit": unit,
                "n_full": r.n_a,
                "n_lora": r.n_b,
                "mean_full": r.mean_a,
                "ci_full_low": r.ci_a[0],
                "ci_full_high": r.ci_a[1],
                "mean_lora": r.mean_b,
                "ci_lora_low": r.ci_b[0],
                "ci_lora_high": r.ci_b[1],
                "welch_t": r.welch_t,
                "welch_dof": r.welch_dof,
                "welch_p": r.welch_p,
                "mwu_u": r.mwu_u,
                "mwu_p": r.mwu_p,
                "cohen_d": r.cohen_d,
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    adjusted = holm([*table["welch_p"], *table["mwu_p"]])
    table["welch_p_holm"] = adjusted[: len(table)]
    table["mwu_p_holm"] = adjusted[len(table) :]
    return table.set_index("unit")


def supports_markdown(comparisons: Mapping[str, UnitComparison]) -> str:
    """A Markdown list of what each unit's test can support (its ``supports`` sentence)."""
    return "\n".join(
        f"- **{UNIT_TITLES.get(unit, unit)}**: {c.supports}" for unit, c in comparisons.items()
    )


# --- §6.4 B: learning rate ---------------------------------------------------------------------


def lr_sweep_points(summary: pd.DataFrame, runs: Sequence[str]) -> pd.DataFrame:
    """One row per complete run of ``runs`` (the sweep and its reference), by learning rate:
    run (index), lr, log10_lr, d_entropy_pct (seeds averaged)."""
    rows = summary[summary["run"].isin(runs)] if not summary.empty else summary
    if rows.empty:
        return pd.DataFrame(columns=["lr", "log10_lr", "d_entropy_pct"])
    means = run_means(rows)[["lr", "d_entropy_pct"]].astype(float)
    means.insert(1, "log10_lr", np.log10(means["lr"]))
    return means.sort_values("lr")


def lr_correlations(points: pd.DataFrame) -> pd.DataFrame:
    """Pearson r and Spearman ρ of log10(lr) with Δentropy (index: method).

    ``p_claim`` is the p a claim rests on: the exact permutation p when n ≤ 10 (the asymptotic
    p is unreliable for five runs), else the asymptotic one; ``p_claim_holm`` adjusts the two.
    Empty with fewer than three runs."""
    if len(points) < 3:
        return pd.DataFrame()
    rows = []
    for method in ("pearson", "spearman"):
        c = correlation(points["log10_lr"], points["d_entropy_pct"], method)
        exact = c.p_exact is not None
        rows.append(
            {
                "method": method,
                "n": c.n,
                "r": c.r,
                "p_asymptotic": c.p,
                "p_exact": c.p_exact if exact else float("nan"),
                "p_used": "exact" if exact else "asymptotic",
                "p_claim": c.p_exact if exact else c.p,
            }
        )
    table = pd.DataFrame(rows).set_index("method")
    table["p_claim_holm"] = holm(table["p_claim"])
    return table


# --- §6.4 C: regularizers ----------------------------------------------------------------------


def regularizer_tests(summary: pd.DataFrame, layers: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Each run with an attention regularizer vs ``reference``: paired t over layers of
    ``layers`` (seeds averaged per layer), signed d_av and d_z (positive: the regularized run's
    value is higher). ``layers``: per-layer Δ entropy in % (``results.per_layer_delta``, this
    project's statistic) or final entropy in nats (``results.per_layer_final``, the report's);
    ``mean_diff`` is in that unit. Index: run."""
    regs = summary[summary["reg_kind"] != "none"]
    ref = delta_rows(layers, [reference])
    if regs.empty or ref.empty:
        return pd.DataFrame()
    rows = []
    for run, setting in run_means(regs).iterrows():
        result = paired_layer_test(delta_rows(layers, [run]), ref).result
        rows.append(
            {
                "run": run,
                "reg_kind": setting["reg_kind"],
                "lam": setting["lam"],
                "best_acc": setting["best_acc"],
                "d_entropy_pct": setting["d_entropy_pct"],
                "n_layers": result.n,
                "mean_diff": result.mean_diff,
                "t": result.t,
                "dof": result.dof,
                "p": result.p,
                "d_av": result.cohen_d,
                "d_z": result.d_z,
            }
        )
    table = pd.DataFrame(rows).set_index("run")
    table["p_holm"] = holm(table["p"])
    return table


def paired_supports(summary: pd.DataFrame, delta: pd.DataFrame, reference: str) -> str:
    """The ``supports`` sentence of the paired layer test (same for every regularizer)."""
    regs = sorted(summary.loc[summary["reg_kind"] != "none", "run"].unique())
    ref = delta_rows(delta, [reference])
    if not regs or ref.empty:
        return ""
    return paired_layer_test(delta_rows(delta, [regs[0]]), ref).supports


# --- §6.4 D: layer position --------------------------------------------------------------------


def layer_anova_table(delta: pd.DataFrame, runs: Sequence[str]) -> pd.DataFrame:
    """One-way ANOVA of each run's per-layer Δentropy (seeds averaged) between early, middle
    and late layers: mean and SD per group, F, degrees of freedom, p, Holm over runs."""
    rows = []
    for run in runs:
        layers = delta_rows(delta, [run])
        if layers.empty:
            continue
        anova = anova_by_layer_group(layers.mean(axis=0).dropna())
        row: dict[str, Any] = {"run": run}
        for name, group, mean, sd in zip(
            ("early", "middle", "late"), anova.groups, anova.means, anova.stds, strict=True
        ):
            row[f"{name}_layers"] = f"L{group[0]}–{group[-1]}"
            row[f"{name}_mean"] = mean
            row[f"{name}_sd"] = sd
        row.update(f=anova.f, dof=f"{anova.dof_between}, {anova.dof_within}", p=anova.p)
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows).set_index("run")
    table["p_holm"] = holm(table["p"])
    return table


# --- §3.10 correlations, §3.9 dynamics, convergence ----------------------------------------------


def correlation_pairs(matrix: CorrelationMatrix) -> pd.DataFrame:
    """The distinct pairs of a correlation matrix, one row each: a, b, r, p, p_holm."""
    names = list(matrix.r.columns)
    rows = [
        {
            "a": a,
            "b": b,
            "r": matrix.r.loc[a, b],
            "p": matrix.p.loc[a, b],
            "p_holm": matrix.p_holm.loc[a, b],
        }
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]
    return pd.DataFrame(rows).set_index(["a", "b"])


def dynamics_table(
    histories: Iterable[RunRecord], threshold: float = ONSET_THRESHOLD
) -> pd.DataFrame:
    """Per (run, seed), from the layer-mean entropy trajectory: collapse onset (first training
    fraction with entropy ``threshold`` below its start; NaN: never), total Δentropy in %, and
    the largest |entropy velocity| (nats per unit training fraction) with where it occurs."""
    rows = []
    for h in histories:
        fraction, entropy = trajectory(h)
        if len(fraction) < 2:
            continue
        velocity = entropy_velocity(fraction, entropy)
        onset = collapse_onset(fraction, entropy, threshold)
        rows.append(
            {
                "run": h.id,
                "seed": h.seed,
                "onset_fraction": float("nan") if onset is None else onset,
                "d_entropy_pct": float(change_from_start(entropy)[-1]),
                "max_abs_velocity": velocity.max_abs_rate,
                "at_fraction": velocity.at_fraction,
            }
        )
    return pd.DataFrame(rows).set_index(["run", "seed"]) if rows else pd.DataFrame()


def convergence_table(
    histories: Iterable[RunRecord], last: int = CONVERGENCE_EPOCHS
) -> pd.DataFrame:
    """Per (run, seed): epochs, best and final val. accuracy, ``late_std`` (SD, ddof 0, of val.
    accuracy over the ``last`` epochs) and ``converged`` (late_std < :data:`CONVERGENCE_STD`)."""
    rows = []
    for h in histories:
        acc = np.array([e.val_acc for e in h.epochs], dtype=float)
        if acc.size == 0:
            continue
        rows.append(
            {
                "run": h.id,
                "seed": h.seed,
                "epochs": int(acc.size),
                "best_acc": h.best_val_acc,
                "final_acc": h.final_val_acc,
                "late_std": float(acc[-last:].std()),
                "converged": bool(acc[-last:].std() < CONVERGENCE_STD),
            }
        )
    return pd.DataFrame(rows).set_index(["run", "seed"]) if rows else pd.DataFrame()
