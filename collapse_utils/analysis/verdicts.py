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

from collapse_utils.analysis import stat_tables
from collapse_utils.analysis.stats import (
    EXACT_MAX_N,
    MIN_BOOTSTRAP_N,
    bootstrap_mean_ci,
    compare_groups,
    correlation,
    holm,
    paired,
)

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive at this n"
VERDICTS = (SUPPORTED, CONTRADICTED, INCONCLUSIVE)

ALPHA = 0.05
"""Two-sided significance level of every rule (after Holm where a rule tests several)."""
ACCURACY_COST = 1.0
"""Largest loss of best task accuracy, in points, that RQ4 still calls "without costing"."""
MIN_GROUP = 2
MIN_CORRELATION = 3

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
        "One-way ANOVA of each listed run's per-layer Δ entropy between early, middle and late "
        f"layers, Holm over the runs. Contradicted if a run's Holm p < {ALPHA} (a positional "
        "preference); otherwise inconclusive: a non-significant test with a third of the layers "
        "per group cannot show that there is none, so this rule never says supported."
    ),
}
MATCHED_RULES = {
    "RQ2": (
        "One value per matched pair of Study B (dataset, learning rate, seed): LoRA's Δ entropy "
        f"(%) minus Full FT's. Supported if the mean difference is above 0 with paired t "
        f"p < {ALPHA}, contradicted if below 0 with p < {ALPHA}, otherwise inconclusive (also "
        f"with fewer than {MIN_GROUP} pairs). Matching removes learning rate and seed as "
        "explanations of the difference."
    ),
    "RQ3": (
        "One value per fine-tuned run of Study B: Δ entropy (%) and zero-shot retention "
        "(accuracy over the pre-trained model's, CIFAR-100). The same Spearman rule as above: "
        f"supported if ρ > 0 with p < {ALPHA}, contradicted if ρ < 0 with p < {ALPHA}."
    ),
}
"""Rules of the matched-grid evidence (Study B) for the claims it can test."""


@dataclass(frozen=True)
class Verdict:
    """A rule's answer. ``unit``: the unit of analysis; ``n``: how many units it used;
    ``numbers``: what the verdict rests on, by name (the page's evidence sentence reads them);
    ``reason``: why no test could run, when none could; ``focus``: the run the numbers
    single out, where a rule tests several."""

    claim: str
    verdict: str
    unit: str
    n: int
    numbers: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    focus: str = ""

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


def rq2_matched_lora_preserves_better(full: Sequence[float], lora: Sequence[float]) -> Verdict:
    """RQ2 from matched pairs: ``full[i]`` and ``lora[i]`` are the Δ entropy (%) of a Full FT
    and a LoRA run with the same dataset, learning rate and seed. A pair missing either value
    is left out."""
    a, b = _complete_pairs(full, lora, "one LoRA value per Full FT value")
    unit = "matched pair (dataset, lr, seed)"
    numbers = {"pairs": len(a), "mean_full": _mean(a), "mean_lora": _mean(b)}
    if len(a) < MIN_GROUP or np.all(a == b):
        reason = f"{len(a)} matched pairs" if len(a) < MIN_GROUP else "every pair is equal"
        return Verdict("RQ2", INCONCLUSIVE, unit, len(a), numbers, reason)
    test = paired(b, a)
    numbers.update(diff=float((b - a).mean()), d_z=test.d_z, p=test.p)
    return _signed("RQ2", unit, len(a), numbers["diff"], test.p, numbers, want=1)


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


def rq5_layer_position_matters(p_values: pd.Series | Sequence[float]) -> Verdict:
    """RQ5 (layer position) from the ANOVA p of each run tested (index: run, if a Series)."""
    p = pd.Series(p_values, dtype=float).dropna()
    unit = "run (its layers in 3 groups)"
    if p.empty:
        return Verdict("RQ5_layers", INCONCLUSIVE, unit, 0, {}, "no run with a layer ANOVA")
    p_holm = pd.Series(holm(p), index=p.index)
    numbers = {"min_p": float(p.min()), "min_p_holm": float(p_holm.min())}
    verdict = CONTRADICTED if (p_holm < ALPHA).any() else INCONCLUSIVE
    return Verdict("RQ5_layers", verdict, unit, len(p), numbers)
