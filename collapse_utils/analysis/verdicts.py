"""Verdict rules: what a set of numbers says about each of the report's answers to its research
questions (report §1.3, ``book/intro.md``). The findings chapter applies the same rule to this
build's runs and to the report's own published numbers.

A rule takes one value per unit of analysis (a run, a learning rate, a pair of layers), runs the
test of :mod:`~collapse_utils.analysis.stats` and returns a :class:`Verdict`: *supported*,
*contradicted* or *inconclusive at this n*. Missing values (NaN) are dropped and counted out of
n; too few values for the test give *inconclusive* with the reason. :data:`RULES` states each
rule in one sentence; the page prints it beside the verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.stats

from collapse_utils.analysis import stat_tables
from collapse_utils.analysis.stats import (
    EXACT_MAX_N,
    MIN_BOOTSTRAP_N,
    bootstrap_mean_ci,
    compare_groups,
    correlation,
    holm,
)

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive at this n"
UNSTABLE = "not stable across configurations"
"""A matched-grid verdict whose groups (datasets, dataset × method) disagree: significant
effects of both signs, or an effect in some groups and none in others."""
VERDICTS = (SUPPORTED, CONTRADICTED, INCONCLUSIVE, UNSTABLE)

ALPHA = 0.05
"""Two-sided significance level of every rule (after Holm where a rule tests several)."""
ACCURACY_COST = 1.0
"""Largest loss of best task accuracy, in points, that RQ4 still calls "without costing"."""
MIN_GROUP = 2
MIN_CORRELATION = 3
MIN_FRIEDMAN_RUNS = 5
MIN_POWER_RUNS = 6
MIN_POWER_LRS = 3
"""A Study B group (dataset × method) has the power to show a relation with this many runs at
this many learning rates."""

CLAIMS = ("RQ1", "RQ2", "RQ3", "RQ4", "RQ5_lr", "RQ5_layers")
LABELS = {"RQ5_lr": "RQ5a", "RQ5_layers": "RQ5b"}
"""How the page names a claim (RQ5 asks about several knobs; two of them are tested)."""
QUESTIONS = {
    "RQ1": "Does fine-tuning systematically lower the entropy of [CLS]→patch attention?",
    "RQ2": "Does LoRA preserve that structure better than full fine-tuning?",
    "RQ3": "How does structural change relate to the loss of zero-shot transfer?",
    "RQ4": "Can a regularizer on attention limit the change without costing task accuracy?",
    "RQ5_lr": "Which knobs matter most: does a higher learning rate bring more collapse?",
    "RQ5_layers": "Which knobs matter most: does the position of a layer matter?",
}
RULES = {
    "RQ1": (
        "One value per run: the layer-mean Δ entropy (%) of every full fine-tuning run without "
        "an attention regularizer. Supported if the 95% bootstrap CI of their mean lies below 0, "
        "contradicted if it lies above 0, otherwise inconclusive (also with fewer than "
        f"{MIN_BOOTSTRAP_N} runs, too few for a bootstrap CI)."
    ),
    "RQ2": (
        "One value per run of the Full FT vs LoRA comparison: Δ entropy (%). Supported if LoRA's "
        f"mean is above Full FT's with Welch p < {ALPHA}, contradicted if it is below with "
        f"p < {ALPHA}, otherwise inconclusive (also with fewer than {MIN_GROUP} runs per method)."
    ),
    "RQ3": (
        "One value per fine-tuned run: Δ entropy (%) and the change in zero-shot accuracy. "
        "Supported if Spearman ρ > 0 (runs that lose more entropy lose more zero-shot accuracy) "
        f"with p < {ALPHA} (exact permutation p up to n = {EXACT_MAX_N}), contradicted if ρ < 0 "
        f"with p < {ALPHA}, otherwise inconclusive (also with fewer than {MIN_CORRELATION} runs)."
    ),
    "RQ4": (
        "Paired t-test over layers of each regularized run against the unregularized reference "
        "run, Holm over the regularized runs. Supported if a regularized run ends with higher Δ "
        f"entropy than the reference at Holm p < {ALPHA} and loses at most {ACCURACY_COST:g} "
        "point of best accuracy; contradicted if runs differ significantly but none in that way; "
        "otherwise inconclusive. Layers of one run are not replicates: this tests a shift within "
        "these runs."
    ),
    "RQ5_lr": (
        "One value per learning rate (the sweep and its reference run): Spearman ρ of Δ entropy "
        f"with log10(lr), exact permutation p up to n = {EXACT_MAX_N}, Holm with Pearson's r. "
        f"Supported if ρ < 0 at Holm p < {ALPHA}, contradicted if ρ > 0 at Holm p < {ALPHA}, "
        f"otherwise inconclusive (also with fewer than {MIN_CORRELATION} rates). It tests the "
        "direction of the effect, not that it is the strongest knob."
    ),
    "RQ5_layers": (
        "One value per run and layer position: the run's mean Δ entropy (%) in its early, middle "
        "and late thirds of layers; Friedman's test of the three positions with runs as the unit "
        f"(at least {MIN_FRIEDMAN_RUNS} runs). Contradicted if p < {ALPHA} (a positional "
        "preference across runs); otherwise inconclusive: a non-significant test cannot show "
        "that there is none, so this rule never says supported. The layers of one run are not "
        "replicates: an ANOVA over them (the statistics chapter, the report's §3.8) tests a "
        "shape within that run only."
    ),
}
MATCHED_RULES = {
    "RQ2": (
        "Per dataset, one value per matched pair of Study B (learning rate, seed): LoRA's Δ "
        "entropy (%) minus Full FT's, both at the selected checkpoint; paired t, Holm across "
        f"datasets. A dataset supports the claim if the mean difference is above 0 at Holm "
        f"p < {ALPHA}, contradicts it if below 0 at Holm p < {ALPHA}, else is inconclusive "
        f"(also with fewer than {MIN_GROUP} pairs). Supported or contradicted only if every "
        "dataset says so; datasets that disagree make it not stable across configurations. "
        "The difference in size, |Δ entropy|, is shown beside it."
    ),
    "RQ3": (
        "Within each dataset × method of Study B's full-FT and LoRA runs: Spearman ρ of Δ "
        "entropy (%) with zero-shot retention (CIFAR-100), both at the selected checkpoint; Holm "
        f"across the groups that have the power to show a relation (at least {MIN_POWER_RUNS} "
        f"runs at {MIN_POWER_LRS} learning rates). Supported if every such group has ρ > 0 at "
        f"Holm p < {ALPHA} (runs that lose more entropy keep less transfer), contradicted if "
        "every one has ρ < 0; significant groups of both signs, or a relation in some groups "
        "and none in others, make it not stable across configurations; no significant group: "
        "inconclusive. Pooling the groups would let the dataset and the method carry the "
        "correlation."
    ),
}
"""Rules of the matched-grid evidence (Study B) for the claims it can test."""


@dataclass(frozen=True)
class Verdict:
    """A rule's answer. ``unit``: the unit of analysis; ``n``: how many units it used;
    ``numbers``: what the verdict rests on, by name (the page's evidence sentence reads them);
    ``reason``: why no test could run, when none could; ``focus``: the run the numbers
    single out, where a rule tests several; ``detail``: the answer of each group, where a rule
    judges groups apart."""

    claim: str
    verdict: str
    unit: str
    n: int
    numbers: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    focus: str = ""
    detail: str = ""  # a matched-grid verdict's answer per group, in words

    @property
    def rule(self) -> str:
        return RULES[self.claim]


def _values(values: Sequence[float] | pd.Series | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    return array[~np.isnan(array)]


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")


def _signed(
    claim: str, unit: str, n: int, sign: float, p: float, numbers: dict[str, float], want: int
) -> Verdict:
    """Supported when the effect has the sign ``want`` and p < ALPHA, contradicted when it has
    the other sign and p < ALPHA, otherwise inconclusive."""
    if math.isnan(p) or math.isnan(sign) or p >= ALPHA or sign == 0:
        verdict = INCONCLUSIVE
    else:
        verdict = SUPPORTED if np.sign(sign) == np.sign(want) else CONTRADICTED
    return Verdict(claim, verdict, unit, n, numbers)


def rq1_fine_tuning_lowers_entropy(changes: Sequence[float]) -> Verdict:
    """RQ1 from the Δ entropy (%) of each full fine-tuning run without an attention regularizer
    (one value per run)."""
    x = _values(changes)
    unit = "full-FT run"
    if len(x) < MIN_BOOTSTRAP_N:
        reason = f"{len(x)} full-FT runs; a bootstrap CI needs {MIN_BOOTSTRAP_N}"
        return Verdict("RQ1", INCONCLUSIVE, unit, len(x), {"mean": _mean(x)}, reason)
    # All runs equal: the bootstrap distribution is a point, and so is the interval.
    low, high = (x[0], x[0]) if np.ptp(x) == 0 else bootstrap_mean_ci(x)
    numbers = {"mean": float(x.mean()), "ci_low": low, "ci_high": high}
    if high < 0:
        verdict = SUPPORTED
    elif low > 0:
        verdict = CONTRADICTED
    else:
        verdict = INCONCLUSIVE
    return Verdict("RQ1", verdict, unit, len(x), numbers)


def rq2_lora_preserves_better(full: Sequence[float], lora: Sequence[float]) -> Verdict:
    """RQ2 from the Δ entropy (%) of each Full FT run and each LoRA run (one value per run)."""
    a, b = _values(full), _values(lora)
    numbers = {"mean_full": _mean(a), "mean_lora": _mean(b), "n_full": len(a), "n_lora": len(b)}
    unit = "run"
    if min(len(a), len(b)) < MIN_GROUP:
        reason = f"{len(a)} Full FT and {len(b)} LoRA runs; Welch's test needs {MIN_GROUP} each"
        return Verdict("RQ2", INCONCLUSIVE, unit, len(a) + len(b), numbers, reason)
    result = compare_groups(a, b)
    numbers.update(welch_t=result.welch_t, welch_p=result.welch_p, mwu_p=result.mwu_p)
    diff = result.mean_b - result.mean_a
    return _signed("RQ2", unit, len(a) + len(b), diff, result.welch_p, numbers, want=1)


def _complete_pairs(
    x: Sequence[float], y: Sequence[float], need: str
) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` as float arrays without the pairs where either is NaN; ``need`` says
    what a shape mismatch lacks."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"need {need}, got {a.shape} and {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


def rq3_collapse_tracks_zeroshot_loss(
    d_entropy: Sequence[float], zeroshot_change: Sequence[float]
) -> Verdict:
    """RQ3 from each fine-tuned run's Δ entropy (%) and change in zero-shot accuracy (any unit;
    negative: accuracy lost). A run missing either value is left out."""
    x, y = _complete_pairs(d_entropy, zeroshot_change, "one zero-shot change per run")
    unit = "fine-tuned run"
    reason = ""
    if len(x) < MIN_CORRELATION:
        reason = f"{len(x)} runs with both values; a correlation needs {MIN_CORRELATION}"
    elif np.ptp(x) == 0 or np.ptp(y) == 0:
        which = "Δ entropy" if np.ptp(x) == 0 else "the zero-shot change"
        reason = f"{which} is the same in all {len(x)} runs"
    if reason:
        return Verdict("RQ3", INCONCLUSIVE, unit, len(x), {}, reason)
    c = correlation(x, y, "spearman")
    exact = c.p_exact is not None
    p = c.p_exact if exact else c.p
    numbers = {"rho": c.r, "p": p, "exact": float(exact)}
    return _signed("RQ3", unit, len(x), c.r, p, numbers, want=1)


def rq4_regularizer_limits_change(tests: pd.DataFrame) -> Verdict:
    """RQ4 from one row per regularized run (index: run) with ``mean_diff`` (its per-layer Δ
    entropy minus the reference's, points; positive: less collapse), ``p`` (paired test, not
    adjusted) and ``acc_change`` (its best accuracy minus the reference's, points; NaN: not
    known, which fails the accuracy condition)."""
    unit = "layer pair"
    rows = tests.dropna(subset=["mean_diff", "p"])
    if rows.empty:
        reason = "no regularized run with a paired test against the reference"
        return Verdict("RQ4", INCONCLUSIVE, unit, 0, {}, reason)
    p_holm = pd.Series(holm(rows["p"]), index=rows.index)
    significant = p_holm < ALPHA
    cheap = rows["acc_change"].astype(float) >= -ACCURACY_COST
    good = significant & (rows["mean_diff"] > 0) & cheap
    best = p_holm.idxmin()
    numbers = {
        "n_runs": len(rows),
        "min_p_holm": float(p_holm.min()),
        "best_mean_diff": float(rows.loc[best, "mean_diff"]),
        "best_acc_change": float(rows.loc[best, "acc_change"]),
        "n_significant": int(significant.sum()),
    }
    if good.any():
        verdict = SUPPORTED
    elif significant.any():
        verdict = CONTRADICTED
    else:
        verdict = INCONCLUSIVE
    return Verdict("RQ4", verdict, unit, len(rows), numbers, focus=str(best))


def rq5_learning_rate_drives_collapse(lr: Sequence[float], d_entropy: Sequence[float]) -> Verdict:
    """RQ5 (learning rate) from one (learning rate, Δ entropy %) pair per run of the sweep."""
    columns = {"lr": np.asarray(lr, dtype=float), "d_entropy_pct": np.asarray(d_entropy, float)}
    points = pd.DataFrame(columns).dropna()
    points.insert(1, "log10_lr", np.log10(points["lr"]))
    unit = "learning rate"
    if len(points) < MIN_CORRELATION or points["lr"].nunique() < 2:
        reason = f"{len(points)} learning rates; a correlation needs {MIN_CORRELATION}"
        return Verdict("RQ5_lr", INCONCLUSIVE, unit, len(points), {}, reason)
    if points["d_entropy_pct"].nunique() < 2:
        reason = "Δ entropy is the same at every learning rate"
        return Verdict("RQ5_lr", INCONCLUSIVE, unit, len(points), {}, reason)
    table = stat_tables.lr_correlations(points)
    rho = float(table.loc["spearman", "r"])
    p_holm = float(table.loc["spearman", "p_claim_holm"])
    numbers = {
        "rho": rho,
        "p": float(table.loc["spearman", "p_claim"]),
        "p_holm": p_holm,
        "exact": float(table.loc["spearman", "p_used"] == "exact"),
        "pearson_r": float(table.loc["pearson", "r"]),
        "pearson_p": float(table.loc["pearson", "p_claim"]),
    }
    return _signed("RQ5_lr", unit, len(points), rho, p_holm, numbers, want=-1)


def rq5_layer_position_matters(group_means: pd.DataFrame) -> Verdict:
    """RQ5 (layer position) with runs as the unit: one row per run (index) with its mean Δ
    entropy (%) in the early, middle and late layers (``early_mean``, ``middle_mean``,
    ``late_mean``); Friedman's test of the three positions over the runs."""
    columns = ["early_mean", "middle_mean", "late_mean"]
    rows = group_means.reindex(columns=columns).dropna() if len(group_means) else group_means
    unit = "run (its mean Δ entropy in early, middle and late layers)"
    if len(rows) < MIN_FRIEDMAN_RUNS:
        runs = ", ".join(map(str, rows.index)) or "none"
        reason = (f"{len(rows)} runs with layer groups ({runs}); a test with runs as the unit "
                  f"needs {MIN_FRIEDMAN_RUNS}")  # fmt: skip
        return Verdict("RQ5_layers", INCONCLUSIVE, unit, len(rows), {}, reason)
    test = scipy.stats.friedmanchisquare(*(rows[c] for c in columns))
    means = rows.mean()
    numbers = {"chi2": float(test.statistic), "p": float(test.pvalue),
               **{c: float(means[c]) for c in columns}}  # fmt: skip
    verdict = CONTRADICTED if test.pvalue < ALPHA else INCONCLUSIVE
    return Verdict("RQ5_layers", verdict, unit, len(rows), numbers)


# --- matched grids (Study B): judged per group ------------------------------------------------


def _per_group(significant_signs: Sequence[float], groups: int) -> str:
    """The verdict of a rule that asks every group for the same significant sign."""
    signs = set(np.sign(significant_signs))
    if not significant_signs:
        return INCONCLUSIVE
    if signs == {1.0} and len(significant_signs) == groups:
        return SUPPORTED
    if signs == {-1.0} and len(significant_signs) == groups:
        return CONTRADICTED
    return UNSTABLE


def rq2_per_dataset(table: pd.DataFrame) -> Verdict:
    """RQ2 per dataset. ``table``: one row per dataset (index) with ``pairs``, ``diff`` (mean of
    LoRA − Full FT Δ entropy, points), ``p`` (paired t), ``d_z``, and the same for the sizes
    ``abs_diff`` and ``abs_p``."""
    unit = "matched pair (lr, seed), per dataset"
    tested = table.dropna(subset=["p"]) if not table.empty else table
    if tested.empty:
        reason = f"no dataset with {MIN_GROUP} matched pairs that differ"
        return Verdict("RQ2", INCONCLUSIVE, unit, int(table.get("pairs", pd.Series()).sum()),
                       {}, reason)  # fmt: skip
    p_holm = pd.Series(holm(tested["p"]), index=tested.index)
    significant = [row["diff"] for name, row in tested.iterrows() if p_holm[name] < ALPHA]
    verdict = _per_group(significant, len(tested))  # a dataset not yet tested cannot disagree
    parts = []
    for name, row in table.iterrows():
        if name not in p_holm:
            parts.append(f"{name}: not tested ({row['pairs']:.0f} pairs)")
            continue
        parts.append(
            f"{name}: LoRA − Full FT {row['diff']:+.2f} points (d_z {row['d_z']:+.2f}, Holm p "
            f"{_p(p_holm[name])}; in size |Δ| {row['abs_diff']:+.2f}, p {_p(row['abs_p'])})"
        )
    numbers = {"datasets": len(table), "significant": len(significant),
               "min_p_holm": float(p_holm.min())}  # fmt: skip
    return Verdict("RQ2", verdict, unit, int(table["pairs"].sum()), numbers,
                   detail="; ".join(parts))  # fmt: skip


def rq3_within_groups(groups: pd.DataFrame, pooled: pd.Series | None = None) -> Verdict:
    """RQ3 within groups. ``groups``: one row per dataset × method (index) with ``rho``, ``p``,
    ``n`` (runs) and ``lrs`` (learning rates) of Δ entropy against retention; ``pooled``: the
    same over all runs together (shown, never judged)."""
    unit = "run, within dataset × method"
    powered = groups[(groups["n"] >= MIN_POWER_RUNS) & (groups["lrs"] >= MIN_POWER_LRS)
                     & groups["rho"].notna()] if not groups.empty else groups  # fmt: skip
    if powered.empty:
        reason = (f"no dataset × method group with {MIN_POWER_RUNS} runs at {MIN_POWER_LRS} "
                  "learning rates and a defined ρ")  # fmt: skip
        n = int(groups["n"].sum()) if not groups.empty else 0
        return Verdict("RQ3", INCONCLUSIVE, unit, n, {}, reason)
    p_holm = pd.Series(holm(powered["p"]), index=powered.index)
    significant = [powered.loc[k, "rho"] for k in powered.index if p_holm[k] < ALPHA]
    verdict = _per_group(significant, len(powered))
    numbers = {
        "groups": len(powered),
        "positive": sum(1 for r in significant if r > 0),
        "negative": sum(1 for r in significant if r < 0),
        "mean_abs_rho": float(powered["rho"].abs().mean()),
        "pooled_rho": float(pooled["rho"]) if pooled is not None else float("nan"),
    }
    parts = [
        f"{' / '.join(map(str, key))}: ρ = {powered.loc[key, 'rho']:+.2f} (Holm p "
        f"{_p(p_holm[key])}, n = {int(powered.loc[key, 'n'])})"
        for key in powered.index
    ]
    return Verdict("RQ3", verdict, unit, int(powered["n"].sum()), numbers,
                   detail="; ".join(parts))  # fmt: skip


def _p(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.1e}" if value < 0.001 else f"{value:.3f}"
