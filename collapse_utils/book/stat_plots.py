"""Tables and figures of the statistics page (report §3.8–3.10, §6.4; figures 10–14 and 16).

Table functions take the ``results`` frames (``run_summary``, ``per_layer_delta``) or histories
and return DataFrames; every table of p-values is one family of tests and carries Holm-adjusted
p-values (``*_holm`` columns, ``analysis.stats.holm`` within that table only). A test that
cannot run (its runs are missing, one run per group) is left out of the table and a note says
why. Figure functions return matplotlib Figures; the notebook only calls them.

Groups follow the report: the "no regularization" reference is E2 (Full FT EuroSAT at the
profile's default learning rate); §6.4 A compares the EuroSAT runs of the ``full_vs_lora``
family (E2 vs LoRA E4–E6); the learning-rate sweep is the ``lr_sweep`` family plus E2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from collapse_utils.analysis.results import run_means, trajectory
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
from collapse_utils.book.figures import METRIC_LABELS, new_figure

REFERENCE_RUN = "E2"
"""Full FT EuroSAT without regularization: the reference of §6.4 C and the LR sweep's default."""
ANOVA_RUNS = ("E2", "E5")
"""Runs of the layer-position ANOVA (§3.8, §6.4 D): Full FT and LoRA r=8 on EuroSAT."""
DYNAMICS_RUNS = ("E2", "E3", "A1_lr5e-5", "A1_lr1e-4", "E5")
"""Runs of the training-dynamics figure, as in the report's §3.9 table."""
ONSET_THRESHOLD = 0.01
"""Relative entropy drop (1%) that marks collapse onset (§3.9)."""
CONVERGENCE_STD = 0.005
CONVERGENCE_EPOCHS = 3
"""The report's convergence check: SD of val. accuracy over the last 3 epochs below 0.005."""
METHOD_COLORS = {"full": "tab:red", "lora": "tab:blue", "none": "tab:gray"}
UNIT_TITLES = {"layer": "layers pooled", "run": "one value per run", "seed": "one per seed"}


def delta_label(column: str) -> str:
    """Axis label of a ``run_summary`` column: ``d_gini_pct`` → ``Δ Gini (%)``."""
    if column == "best_acc":
        return "Best val. accuracy"
    metric = column.removeprefix("d_").removesuffix("_pct")
    name = METRIC_LABELS.get(metric, metric).split(" (")[0]
    return f"Δ {name} (%)"


# --- selection -------------------------------------------------------------------------------


def trained(histories: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Histories of runs that trained (method is not ``none``): baselines have no change."""
    return [h for h in histories if h.method != "none"]


def select(histories: Iterable[dict[str, Any]], runs: Sequence[str]) -> list[dict[str, Any]]:
    """The histories of ``runs`` that exist, in the order of ``runs`` (then seed)."""
    by_run = sorted(histories, key=lambda h: h.seed)
    return [h for run in runs for h in by_run if h.id == run]


def cell(frame: pd.DataFrame, row: Any, column: str) -> float:
    """``frame.loc[row, column]`` as a Python float, NaN when the row is absent (for glue)."""
    if frame.empty or row not in frame.index or column not in frame.columns:
        return float("nan")
    value = frame.loc[row, column]
    return float("nan") if pd.isna(value) else float(value)


def _rows(delta: pd.DataFrame, runs: Iterable[str]) -> pd.DataFrame:
    runs = set(runs)
    return delta[delta.index.get_level_values("run").isin(runs)]


# --- §6.4 A: Full FT vs LoRA -----------------------------------------------------------------


def full_vs_lora_comparisons(
    summary: pd.DataFrame, delta: pd.DataFrame, n_boot: int = 10_000, seed: int = 0
) -> tuple[dict[str, UnitComparison], list[str]]:
    """Full FT (a) vs LoRA (b) Δentropy at each unit of analysis.

    ``layer``: the report's test, every layer of the EuroSAT runs of the ``full_vs_lora``
    family pooled (E2 vs E4–E6). ``run``: one value per run of that family, both datasets
    (E2, E3 vs E4–E7). ``seed``: the EuroSAT runs' seeds, only when a run has several.
    Returns the comparisons that could run and notes on those that could not."""
    family = summary[summary["family"] == "full_vs_lora"]
    eurosat = family[family["dataset"] == "eurosat"]
    full_e, lora_e = eurosat[eurosat["method"] == "full"], eurosat[eurosat["method"] == "lora"]
    full_r, lora_r = family[family["method"] == "full"], family[family["method"] == "lora"]
    comparisons: dict[str, UnitComparison] = {}
    notes: list[str] = []
    layers_a, layers_b = _rows(delta, full_e["run"]), _rows(delta, lora_e["run"])
    if layers_a.empty or layers_b.empty:
        notes.append("Layer-pooled test not run: no EuroSAT Full FT or LoRA run is complete.")
    else:
        comparisons["layer"] = layer_pooled_test(layers_a, layers_b, n_boot, seed)
    if min(full_r["run"].nunique(), lora_r["run"].nunique()) < 2:
        notes.append(
            "Run-level test not run: it needs at least two complete runs per method "
            f"(Full FT: {full_r['run'].nunique()}, LoRA: {lora_r['run'].nunique()})."
        )
    else:
        comparisons["run"] = run_level_test(full_r, lora_r, n_boot=n_boot, seed=seed)
    seeds = eurosat.groupby("run").size()
    if seeds.empty or seeds.max() < 2:
        notes.append(
            "Seed-level test not run: every run of this profile has a single seed, so "
            "training randomness cannot be separated from the method here."
        )
    elif full_e.empty or lora_e.empty:
        notes.append("Seed-level test not run: no EuroSAT Full FT or LoRA run is complete.")
    else:
        comparisons["seed"] = seed_level_test(full_e, lora_e, n_boot=n_boot, seed=seed)
    return comparisons, notes


def comparison_table(comparisons: Mapping[str, UnitComparison]) -> pd.DataFrame:
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


def lr_sweep_points(summary: pd.DataFrame, reference: str = REFERENCE_RUN) -> pd.DataFrame:
    """One row per run of the ``lr_sweep`` family plus ``reference``, by learning rate:
    run (index), lr, log10_lr, d_entropy_pct (seeds averaged)."""
    rows = summary[(summary["family"] == "lr_sweep") | (summary["run"] == reference)]
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


def regularizer_tests(
    summary: pd.DataFrame, delta: pd.DataFrame, reference: str = REFERENCE_RUN
) -> pd.DataFrame:
    """Each run with an attention regularizer vs ``reference``: paired t over layers of the
    per-layer Δentropy (seeds averaged per layer), signed d_av and d_z (positive: the
    regularized run's entropy change is higher). Index: run."""
    regs = summary[summary["reg_kind"] != "none"]
    ref = _rows(delta, [reference])
    if regs.empty or ref.empty:
        return pd.DataFrame()
    rows = []
    for run, run_summary_rows in run_means(regs).iterrows():
        result = paired_layer_test(_rows(delta, [run]), ref).result
        rows.append(
            {
                "run": run,
                "reg_kind": run_summary_rows["reg_kind"],
                "lam": run_summary_rows["lam"],
                "best_acc": run_summary_rows["best_acc"],
                "d_entropy_pct": run_summary_rows["d_entropy_pct"],
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


def paired_supports(summary: pd.DataFrame, delta: pd.DataFrame) -> str:
    """The ``supports`` sentence of the paired layer test (same for every regularizer)."""
    regs = sorted(summary.loc[summary["reg_kind"] != "none", "run"].unique())
    ref = _rows(delta, [REFERENCE_RUN])
    if not regs or ref.empty:
        return ""
    return paired_layer_test(_rows(delta, [regs[0]]), ref).supports


# --- §6.4 D: layer position --------------------------------------------------------------------


def layer_anova_table(delta: pd.DataFrame, runs: Sequence[str] = ANOVA_RUNS) -> pd.DataFrame:
    """One-way ANOVA of each run's per-layer Δentropy (seeds averaged) between early, middle
    and late layers: mean and SD per group, F, degrees of freedom, p, Holm over runs."""
    rows = []
    for run in runs:
        layers = _rows(delta, [run])
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


def _relative(values: np.ndarray) -> np.ndarray:
    return 100.0 * (values - values[0]) / values[0]


def dynamics_table(
    histories: Iterable[dict[str, Any]], threshold: float = ONSET_THRESHOLD
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
                "d_entropy_pct": float(_relative(entropy)[-1]),
                "max_abs_velocity": velocity.max_abs_rate,
                "at_fraction": velocity.at_fraction,
            }
        )
    return pd.DataFrame(rows).set_index(["run", "seed"]) if rows else pd.DataFrame()


def convergence_table(
    histories: Iterable[dict[str, Any]], last: int = CONVERGENCE_EPOCHS
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


# --- figures -----------------------------------------------------------------------------------


def format_p(p: float) -> str:
    """A p-value for a figure: three decimals, ``<0.001`` below that."""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _row_labels(index: pd.Index) -> list[str]:
    """Run ids; with several seeds of one run, ``run/s<seed>``."""
    if "seed" not in (index.names or []):
        return [str(i) for i in index]
    runs = index.get_level_values("run")
    repeated = runs.duplicated(keep=False).any()
    return [f"{run}/s{seed}" if repeated else str(run) for run, seed in index]


def _diverging_limit(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def fig10_per_layer_heatmap(delta: pd.DataFrame, metric: str = "entropy") -> Figure:
    """Per-layer change in % (runs × layers, a ``per_layer_delta`` frame) as a diverging
    heatmap centred on 0, each cell annotated with its value."""
    height = max(2.5, 0.32 * len(delta) + 1.2)
    fig, axes = new_figure(width=max(6.0, 0.55 * delta.shape[1] + 2.5), height=height)
    ax = axes[0, 0]
    if delta.empty:
        _empty(ax, "no per-layer changes")
        return fig
    values = delta.to_numpy(dtype=float)
    limit = _diverging_limit(values)
    image = ax.imshow(
        np.ma.masked_invalid(values), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto"
    )
    ax.set_xticks(range(delta.shape[1]), [str(c) for c in delta.columns])
    ax.set_yticks(range(len(delta)), _row_labels(delta.index))
    ax.set_xlabel("Layer")
    ax.set_ylabel("Run")
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            shade = "white" if abs(value) > 0.6 * limit else "black"
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6, color=shade)
    label = delta_label(f"d_{metric}_pct")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(f"Per-layer {label}, first to final eval")
    return fig


def _ci_panel(ax: Axes, comparisons: Mapping[str, UnitComparison]) -> None:
    if not comparisons:
        _empty(ax, "Full FT vs LoRA: no comparison")
        return
    for k, comparison in enumerate(comparisons.values()):
        r = comparison.result
        for offset, name, mean, ci in (
            (-0.12, "Full FT", r.mean_a, r.ci_a),
            (0.12, "LoRA", r.mean_b, r.ci_b),
        ):
            method = "full" if name == "Full FT" else "lora"
            ax.errorbar(
                [k + offset],
                [mean],
                yerr=[[mean - ci[0]], [ci[1] - mean]],
                fmt="o",
                color=METHOD_COLORS[method],
                capsize=4,
                label=name if k == 0 else None,
            )
        top = max(r.ci_a[1], r.ci_b[1])
        ax.annotate(f"p={format_p(r.welch_p)}", (k, top), ha="center", va="bottom", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.7)
    units = list(comparisons)
    ax.set_xticks(range(len(units)), [f"{UNIT_TITLES.get(u, u)}" for u in units])
    ax.set_xlim(-0.6, len(units) - 0.4)
    ax.set_ylabel("Mean Δ entropy (%), 95% bootstrap CI")
    ax.set_title("Full FT vs LoRA (Welch p)")
    ax.legend(fontsize=7)


def _lr_panel(ax: Axes, points: pd.DataFrame, correlations: pd.DataFrame) -> None:
    if len(points) < 2:
        _empty(ax, "learning-rate sweep: fewer than two runs")
        return
    x, y = points["log10_lr"].to_numpy(), points["d_entropy_pct"].to_numpy()
    ax.scatter(x, y, color=METHOD_COLORS["full"], zorder=3)
    for run, xi, yi in zip(points.index, x, y, strict=True):
        ax.annotate(str(run), (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    slope, intercept = np.polyfit(x, y, 1)
    grid = np.linspace(x.min(), x.max(), 2)
    ax.plot(grid, slope * grid + intercept, color="black", linewidth=1)
    if not correlations.empty:
        pearson, spearman = correlations.loc["pearson"], correlations.loc["spearman"]
        ax.text(
            0.03,
            0.04,
            f"Pearson r = {pearson['r']:.3f} (p {pearson['p_used']} "
            f"{format_p(pearson['p_claim'])})\n"
            f"Spearman ρ = {spearman['r']:.3f} (p {spearman['p_used']} "
            f"{format_p(spearman['p_claim'])})",
            transform=ax.transAxes,
            fontsize=7,
        )
    ax.set_xlabel("log10 learning rate")
    ax.set_ylabel("Δ entropy (%)")
    ax.set_title("Learning rate vs Δ entropy (OLS fit)")


def _effect_panel(ax: Axes, regs: pd.DataFrame) -> None:
    if regs.empty:
        _empty(ax, "regularizers: no run to compare")
        return
    y = np.arange(len(regs))
    ax.barh(y, regs["d_av"], color="tab:green", label="d_av")
    ax.scatter(regs["d_z"], y, color="black", marker="x", zorder=3, label="d_z")
    for yi, (d, p) in enumerate(zip(regs["d_av"], regs["p_holm"], strict=True)):
        ax.annotate(
            f"p_Holm {format_p(p)}",
            (d, yi),
            fontsize=6,
            xytext=(3, -3),
            va="top",
            textcoords="offset points",
        )
    ax.axvline(0, color="black", linewidth=0.7)
    ax.set_yticks(y, list(regs.index))
    ax.set_xlabel(f"Cohen's d vs {REFERENCE_RUN} (paired over layers)")
    ax.set_title("Regularizers: effect size")
    ax.legend(fontsize=7, loc="lower right")


def fig11_statistical_summary(
    comparisons: Mapping[str, UnitComparison],
    lr_points: pd.DataFrame,
    lr_table: pd.DataFrame,
    reg_table: pd.DataFrame,
) -> Figure:
    """Three panels: Full FT vs LoRA mean Δentropy with bootstrap CIs at each unit of analysis;
    LR sweep scatter with its OLS line, Pearson r and Spearman ρ; regularizers' paired effect
    sizes (bars d_av, crosses d_z) vs the reference run."""
    fig, axes = new_figure(ncols=3, width=4.6, height=3.8)
    _ci_panel(axes[0, 0], comparisons)
    _lr_panel(axes[0, 1], lr_points, lr_table)
    _effect_panel(axes[0, 2], reg_table)
    return fig


def _curves(history: dict[str, Any]) -> dict[str, np.ndarray]:
    fraction, entropy = trajectory(history, "entropy")
    return {
        "fraction": fraction,
        "entropy": _relative(entropy),
        "erf": _relative(trajectory(history, "erf")[1]),
        "gini": _relative(trajectory(history, "gini")[1]),
        "raw_entropy": entropy,
    }


def fig12_training_dynamics(
    histories: Sequence[dict[str, Any]], threshold: float = ONSET_THRESHOLD
) -> Figure:
    """2×2 panels over training, one line per history (layer-mean metrics): entropy velocity
    at interval midpoints; Δentropy (%) with the −threshold line and onset markers (×);
    ΔERF and ΔGini (%) against Δentropy (%), i.e. how the three metrics co-evolve."""
    fig, axes = new_figure(ncols=2, nrows=2, width=4.8, height=3.5)
    (velocity_ax, entropy_ax), (erf_ax, gini_ax) = axes
    usable = [h for h in histories if len(h.evals) >= 2]
    if not usable:
        for ax in axes.ravel():
            _empty(ax, "no run with two or more evals")
        return fig
    for h in usable:
        c = _curves(h)
        label = (
            h.id
            if len({x.seed for x in usable if x.id == h.id}) == 1
            else (f"{h.id}/s{h.seed}")
        )
        velocity = entropy_velocity(c["fraction"], c["raw_entropy"])
        (line,) = velocity_ax.plot(velocity.midpoints, velocity.rate, marker=".", label=label)
        color = line.get_color()
        entropy_ax.plot(c["fraction"], c["entropy"], marker=".", color=color, label=label)
        onset = collapse_onset(c["fraction"], c["raw_entropy"], threshold)
        if onset is not None:
            at = int(np.flatnonzero(c["fraction"] == onset)[0])
            entropy_ax.plot(
                [onset],
                [c["entropy"][at]],
                marker="x",
                markersize=10,
                color=color,
                linestyle="none",
            )
        erf_ax.plot(c["entropy"], c["erf"], marker=".", color=color, label=label)
        gini_ax.plot(c["entropy"], c["gini"], marker=".", color=color, label=label)
    velocity_ax.axhline(0, color="black", linewidth=0.7)
    velocity_ax.set_xlabel("Training fraction")
    velocity_ax.set_ylabel("Entropy velocity (nats / training)")
    velocity_ax.set_title("Entropy velocity")
    velocity_ax.legend(fontsize=7)
    entropy_ax.axhline(-100 * threshold, color="gray", linestyle="--", linewidth=0.8)
    entropy_ax.set_xlabel("Training fraction")
    entropy_ax.set_ylabel(delta_label("d_entropy_pct"))
    entropy_ax.set_title(f"Entropy; × = onset ({100 * threshold:g}% drop)")
    for ax, column in ((erf_ax, "d_erf_pct"), (gini_ax, "d_gini_pct")):
        ax.axhline(0, color="black", linewidth=0.5)
        ax.axvline(0, color="black", linewidth=0.5)
        ax.set_xlabel(delta_label("d_entropy_pct"))
        ax.set_ylabel(delta_label(column))
        ax.set_title(f"Co-evolution: {delta_label(column).split(' (')[0]} vs Δ Entropy")
    return fig


def fig13_metric_correlations(matrix: CorrelationMatrix) -> Figure:
    """Correlation matrix of the Δ% metrics and best accuracy across runs: colour = r, each
    off-diagonal cell annotated with r, its p and its Holm-adjusted p."""
    names = list(matrix.r.columns)
    fig, axes = new_figure(width=6.8, height=5.6)
    ax = axes[0, 0]
    r = matrix.r.to_numpy(dtype=float)
    image = ax.imshow(np.ma.masked_invalid(r), cmap="RdBu_r", vmin=-1, vmax=1)
    labels = [delta_label(n) for n in names]
    ax.set_xticks(range(len(names)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), labels)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                continue
            text = (
                f"r={matrix.r.loc[a, b]:.2f}\np={format_p(matrix.p.loc[a, b])}\n"
                f"Holm {format_p(matrix.p_holm.loc[a, b])}"
            )
            strong = abs(matrix.r.loc[a, b]) > 0.6
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=6.5,
                color="white" if strong else "black",
            )
    fig.colorbar(image, ax=ax, label=f"{matrix.method.capitalize()} r")
    ax.set_title(f"Cross-metric correlations ({matrix.n} runs)")
    return fig


def fig14_convergence(histories: Sequence[dict[str, Any]]) -> Figure:
    """Validation accuracy per epoch, one panel per family, one line per (run, seed)."""
    runs = [h for h in histories if h.epochs]
    families = list(dict.fromkeys(h.family for h in runs))
    ncols = max(1, min(3, len(families)))
    nrows = max(1, math.ceil(len(families) / ncols))
    fig, axes = new_figure(ncols=ncols, nrows=nrows, width=4.2, height=3.0)
    flat = axes.ravel()
    if not families:
        _empty(flat[0], "no run with epochs")
        return fig
    for ax, family in zip(flat, families, strict=False):
        for h in (h for h in runs if h.family == family):
            epochs = [e.epoch for e in h.epochs]
            acc = [e.val_acc for e in h.epochs]
            ax.plot(epochs, acc, marker="o", markersize=3, label=f"{h.id}/s{h.seed}")
        ax.set_title(family)
        ax.set_xlabel("Epoch")
        ax.set_ylabel("Val. accuracy")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=6)
    for ax in flat[len(families) :]:
        ax.remove()
    return fig


def fig16_dashboard(summary: pd.DataFrame, delta: pd.DataFrame) -> Figure:
    """2×3 summary: Δentropy per run (bars by method); ΔGini vs Δentropy; best accuracy vs
    Δentropy; zero-shot accuracy change (points) vs Δentropy; mean per-layer Δentropy of the
    ``full_vs_lora`` runs per method; Δentropy along the learning-rate sweep."""
    fig, axes = new_figure(ncols=3, nrows=2, width=4.3, height=3.4)
    runs = run_means(summary[summary["method"] != "none"]) if not summary.empty else summary
    if runs.empty:
        for ax in axes.ravel():
            _empty(ax, "no trained run")
        return fig
    colors = [METHOD_COLORS.get(m, "tab:gray") for m in runs["method"]]
    dent = runs["d_entropy_pct"]

    ax = axes[0, 0]
    ax.barh(range(len(runs)), dent, color=colors)
    ax.set_yticks(range(len(runs)), list(runs.index), fontsize=6)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.7)
    ax.set_xlabel(delta_label("d_entropy_pct"))
    ax.set_title("Entropy change per run (red Full FT, blue LoRA)")

    for ax, column, title in (
        (axes[0, 1], "d_gini_pct", "Concentration vs entropy"),
        (axes[0, 2], "best_acc", "Task accuracy vs entropy"),
    ):
        ax.scatter(dent, runs[column], c=colors)
        ax.set_xlabel(delta_label("d_entropy_pct"))
        ax.set_ylabel(delta_label(column))
        ax.set_title(title)

    ax = axes[1, 0]
    zs = sorted(c for c in runs.columns if c.startswith("zs_") and not c.endswith("_pretrained"))
    if zs:
        change = 100 * (runs[zs[0]] - runs[f"{zs[0]}_pretrained"])
        ax.scatter(dent, change, c=colors)
        ax.axhline(0, color="black", linewidth=0.7)
        ax.set_xlabel(delta_label("d_entropy_pct"))
        ax.set_ylabel(f"Δ zero-shot {zs[0].removeprefix('zs_')} (points)")
        ax.set_title("Zero-shot transfer vs entropy")
    else:
        _empty(ax, "no zero-shot results")

    ax = axes[1, 1]
    family = summary[summary["family"] == "full_vs_lora"]
    for method in ("full", "lora"):
        layers = _rows(delta, family.loc[family["method"] == method, "run"])
        if not layers.empty:
            ax.plot(
                layers.columns,
                layers.mean(axis=0),
                marker="o",
                markersize=3,
                color=METHOD_COLORS[method],
                label=f"{method} ({len(layers)} runs)",
            )
    if ax.lines:
        ax.axhline(0, color="black", linewidth=0.7)
        ax.set_xlabel("Layer")
        ax.set_ylabel("Mean " + delta_label("d_entropy_pct"))
        ax.set_title("Per-layer change, Full FT vs LoRA runs")
        ax.legend(fontsize=7)
    else:
        _empty(ax, "no full_vs_lora runs")

    ax = axes[1, 2]
    points = lr_sweep_points(summary)
    if len(points) >= 2:
        ax.plot(
            points["log10_lr"], points["d_entropy_pct"], marker="o", color=METHOD_COLORS["full"]
        )
        ax.axhline(0, color="black", linewidth=0.7)
        ax.set_xlabel("log10 learning rate")
        ax.set_ylabel(delta_label("d_entropy_pct"))
        ax.set_title(f"Learning-rate sweep (A1 + {REFERENCE_RUN})")
    else:
        _empty(ax, "learning-rate sweep: fewer than two runs")
    return fig
