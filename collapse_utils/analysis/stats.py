"""Every statistical test of the report, on top of pingouin and scipy.

Tests return frozen dataclasses; p-values are two-sided. Inputs are 1-D sequences of floats
(typically changes in %); NaN raise ``ValueError`` rather than being dropped silently.

Units of analysis matter more than the choice of test here. The report pooled the 12 per-layer
changes of each run as if they were independent observations (§6.4 A). The helpers
:func:`layer_pooled_test`, :func:`run_level_test`, :func:`seed_level_test` and
:func:`paired_layer_test` run the same comparison at each unit and say, in ``supports``, what
that unit can and cannot support.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pingouin as pg
import scipy.stats

EXACT_MAX_N = 10
"""Largest n for which :func:`correlation` enumerates all n! pairings (10! ≈ 3.6 M, seconds)."""

DELTA_COLUMNS = ("d_entropy_pct", "d_erf_pct", "d_gini_pct", "d_head_diversity_pct", "best_acc")


def _array(values: Sequence[float] | np.ndarray | pd.Series) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D sequence, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError("input contains NaN; drop or impute missing values first")
    return array


# --- two groups --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupComparison:
    """Independent groups ``a`` and ``b``. ``cohen_d`` is signed, (mean_a − mean_b) / pooled SD.
    ``ci_a``/``ci_b`` are bootstrap 95% CIs of each group's mean."""

    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    sd_a: float
    sd_b: float
    welch_t: float
    welch_dof: float
    welch_p: float
    mwu_u: float
    mwu_p: float
    cohen_d: float
    ci_a: tuple[float, float]
    ci_b: tuple[float, float]


def bootstrap_mean_ci(
    values: Sequence[float],
    n_boot: int = 10_000,
    rng: np.random.Generator | int = 0,
    method: str = "BCa",
) -> tuple[float, float]:
    """95% bootstrap CI of the mean (``scipy.stats.bootstrap``, BCa by default), reproducible
    for a given seed or Generator."""
    x = _array(values)
    result = scipy.stats.bootstrap(
        (x,),
        np.mean,
        n_resamples=n_boot,
        confidence_level=0.95,
        method=method,
        rng=np.random.default_rng(rng),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


MIN_BOOTSTRAP_N = 5


def _ci(values: np.ndarray, n_boot: int, rng: np.random.Generator, method: str):
    if len(values) < MIN_BOOTSTRAP_N:
        return (float("nan"), float("nan"))
    return bootstrap_mean_ci(values, n_boot, rng, method)


def compare_groups(
    a: Sequence[float],
    b: Sequence[float],
    n_boot: int = 10_000,
    seed: int = 0,
    ci_method: str = "BCa",
) -> GroupComparison:
    """Welch t-test, Mann-Whitney U (U of ``a``), signed Cohen's d and bootstrap CIs of both
    means. One seeded Generator draws ``a``'s resamples, then ``b``'s. A group with fewer than
    ``MIN_BOOTSTRAP_N`` values gets a (nan, nan) CI: resampling 2–4 values only spans them and
    is nowhere near 95 % coverage.

    Note: ``pingouin.ttest`` reports ``abs(d)``; here d keeps its sign (negative: a < b)."""
    x, y = _array(a), _array(b)
    welch = pg.ttest(x, y, correction=True).iloc[0]
    mwu = pg.mwu(x, y).iloc[0]
    rng = np.random.default_rng(seed)
    return GroupComparison(
        n_a=len(x),
        n_b=len(y),
        mean_a=float(x.mean()),
        mean_b=float(y.mean()),
        sd_a=float(x.std(ddof=1)),
        sd_b=float(y.std(ddof=1)),
        welch_t=float(welch["T"]),
        welch_dof=float(welch["dof"]),
        welch_p=float(welch["p_val"]),
        mwu_u=float(mwu["U_val"]),
        mwu_p=float(mwu["p_val"]),
        cohen_d=float(pg.compute_effsize(x, y, paired=False, eftype="cohen")),
        ci_a=_ci(x, n_boot, rng, ci_method),
        ci_b=_ci(y, n_boot, rng, ci_method),
    )


@dataclass(frozen=True)
class PairedComparison:
    """Paired samples; differences are ``a − b``. ``cohen_d`` is d_av, ``d_z`` is d_z (see
    :func:`paired`)."""

    n: int
    mean_diff: float
    t: float
    dof: int
    p: float
    cohen_d: float
    d_z: float


def paired(a: Sequence[float], b: Sequence[float]) -> PairedComparison:
    """Paired t-test of ``a`` against ``b``.

    Two effect sizes, both signed (positive: a > b):

    - ``cohen_d`` = d_av = mean(a − b) / sqrt((var a + var b) / 2), Cumming's average-SD d.
      This is what ``pingouin.ttest(paired=True)`` reports (as its absolute value) and what
      the report's regularization table shows.
    - ``d_z`` = mean(a − b) / sd(a − b) = t / sqrt(n), the standardised mean difference of the
      pairs. It is the d that the paired t-test actually tests; it is larger than d_av when the
      pairs are strongly correlated (as layers of two runs from one checkpoint are).
    """
    x, y = _array(a), _array(b)
    if len(x) != len(y):
        raise ValueError(f"paired samples need equal lengths, got {len(x)} and {len(y)}")
    test = pg.ttest(x, y, paired=True).iloc[0]
    return PairedComparison(
        n=len(x),
        mean_diff=float((x - y).mean()),
        t=float(test["T"]),
        dof=len(x) - 1,
        p=float(test["p_val"]),
        cohen_d=float(pg.compute_effsize(x, y, paired=True, eftype="cohen")),
        d_z=float(pg.compute_effsize(x, y, paired=True, eftype="cohen_dz")),
    )


# --- correlation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Correlation:
    """``r``: Pearson r or Spearman ρ. ``p``: scipy's asymptotic p (t distribution).
    ``p_exact``: exact permutation p over all n! pairings, only for n ≤ :data:`EXACT_MAX_N`."""

    method: str
    n: int
    r: float
    p: float
    p_exact: float | None


def _pearson_along_last(x_centered: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson r of a fixed, centred and unit-norm ``x`` with each row of ``y`` (..., n)."""
    yc = y - y.mean(axis=axis, keepdims=True)
    return (yc * x_centered).sum(axis=axis) / np.sqrt((yc**2).sum(axis=axis))


def exact_permutation_p(x: Sequence[float], y: Sequence[float], method: str = "pearson") -> float:
    """Exact two-sided permutation p of a correlation: the share of all n! orderings of ``y``
    whose |r| is at least the observed |r| (Spearman: r of average ranks).

    Uses ``scipy.stats.permutation_test`` on the single sample ``(y,)`` with
    ``permutation_type='pairings'`` and ``n_resamples = n!``: scipy counts n!**k orderings for
    k samples, so passing ``(x, y)`` would need n!² resamples to be exact. Two-sided here is
    |r| ≥ |r_obs|, not scipy's default 2·min(left, right), which differs when the null
    distribution is asymmetric (Pearson with skewed data)."""
    xs, ys = _array(x), _array(y)
    if method == "spearman":
        xs, ys = scipy.stats.rankdata(xs), scipy.stats.rankdata(ys)
    elif method != "pearson":
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    xc = xs - xs.mean()
    xc = xc / np.sqrt((xc**2).sum())

    def abs_r(y_perm: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.abs(_pearson_along_last(xc, y_perm, axis=axis))

    n_orderings = math.factorial(len(ys))
    result = scipy.stats.permutation_test(
        (ys,),
        abs_r,
        permutation_type="pairings",
        vectorized=True,
        n_resamples=n_orderings,
        batch=min(n_orderings, 200_000),
        alternative="greater",
    )
    return float(result.pvalue)


def correlation(x: Sequence[float], y: Sequence[float], method: str = "pearson") -> Correlation:
    """Pearson or Spearman correlation with its asymptotic p and, for n ≤ 10, the exact
    permutation p (:func:`exact_permutation_p`). For tiny n (the LR sweep has 5 runs) only
    ``p_exact`` is trustworthy: a perfect ρ = −1 has asymptotic p = 0 but exact p = 2/120."""
    xs, ys = _array(x), _array(y)
    if len(xs) != len(ys):
        raise ValueError(f"x and y need equal lengths, got {len(xs)} and {len(ys)}")
    if method == "pearson":
        result = scipy.stats.pearsonr(xs, ys)
    elif method == "spearman":
        result = scipy.stats.spearmanr(xs, ys)
    else:
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    n = len(xs)
    p_exact = exact_permutation_p(xs, ys, method) if n <= EXACT_MAX_N else None
    return Correlation(
        method=method, n=n, r=float(result.statistic), p=float(result.pvalue), p_exact=p_exact
    )


@dataclass(frozen=True)
class CorrelationMatrix:
    """Square frames over ``columns``: ``r``, asymptotic ``p`` and ``p_holm`` (Holm over the
    distinct off-diagonal pairs). ``n``: rows used (rows with any NaN are dropped)."""

    method: str
    n: int
    r: pd.DataFrame
    p: pd.DataFrame
    p_holm: pd.DataFrame


def metric_correlations(
    summary: pd.DataFrame,
    columns: Sequence[str] = DELTA_COLUMNS,
    method: str = "pearson",
) -> CorrelationMatrix:
    """Correlations between the Δ% columns and best accuracy of a ``run_summary`` table, one row
    per run (§3.10). Rows with a missing value (e.g. baselines without accuracy) are dropped."""
    data = summary[list(columns)].astype(float).dropna()
    test = {"pearson": scipy.stats.pearsonr, "spearman": scipy.stats.spearmanr}[method]
    names = list(columns)
    r = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    p = pd.DataFrame(np.zeros((len(names), len(names))), index=names, columns=names)
    pairs = list(itertools.combinations(names, 2))
    for i, j in pairs:
        result = test(data[i], data[j])
        r.loc[i, j] = r.loc[j, i] = float(result.statistic)
        p.loc[i, j] = p.loc[j, i] = float(result.pvalue)
    adjusted = holm([p.loc[i, j] for i, j in pairs])
    p_holm = p.copy()
    for (i, j), value in zip(pairs, adjusted, strict=True):
        p_holm.loc[i, j] = p_holm.loc[j, i] = value
    return CorrelationMatrix(method=method, n=len(data), r=r, p=p, p_holm=p_holm)


# --- layers and dynamics -----------------------------------------------------------------------


@dataclass(frozen=True)
class LayerGroupAnova:
    """One-way ANOVA over contiguous layer groups. ``groups``: 1-based layer numbers per group;
    ``means``/``stds`` (ddof 1) per group, in the units of the input."""

    f: float
    p: float
    dof_between: int
    dof_within: int
    groups: tuple[tuple[int, ...], ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]


def layer_groups(n_layers: int, n_groups: int = 3) -> tuple[tuple[int, ...], ...]:
    """Contiguous, near-equal groups of 1-based layers (earlier groups take the remainder):
    12 → (1-4, 5-8, 9-12); 10 → (1-4, 5-7, 8-10)."""
    if n_layers < n_groups:
        raise ValueError(f"need at least {n_groups} layers, got {n_layers}")
    split = np.array_split(np.arange(1, n_layers + 1), n_groups)
    return tuple(tuple(int(layer) for layer in group) for group in split)


def anova_by_layer_group(values_per_layer: Sequence[float]) -> LayerGroupAnova:
    """ANOVA of one run's per-layer values (e.g. Δ% entropy, shape (layers,)) between early,
    middle and late thirds of the network (§3.8)."""
    values = _array(values_per_layer)
    groups = layer_groups(len(values))
    samples = [values[[layer - 1 for layer in group]] for group in groups]
    result = scipy.stats.f_oneway(*samples)
    return LayerGroupAnova(
        f=float(result.statistic),
        p=float(result.pvalue),
        dof_between=len(groups) - 1,
        dof_within=len(values) - len(groups),
        groups=groups,
        means=tuple(float(s.mean()) for s in samples),
        stds=tuple(float(s.std(ddof=1)) for s in samples),
    )


def collapse_onset(
    fraction: Sequence[float], entropy: Sequence[float], threshold: float = 0.01
) -> float | None:
    """First training fraction at which entropy is at least ``threshold`` (relative, 0.01 = 1%)
    below its starting value, or ``None`` if it never gets there (§3.9).
    fraction, entropy: (evals,), in eval order; entropy is typically the layer mean."""
    f, e = _array(fraction), _array(entropy)
    below = np.flatnonzero(e <= e[0] * (1 - threshold))
    return float(f[below[0]]) if below.size else None


@dataclass(frozen=True)
class Velocity:
    """Rate of change of entropy between consecutive evals, in entropy units (nats) per unit
    of training fraction, at the interval midpoints. ``max_abs_rate`` is the largest |rate|,
    reached in the interval centred at ``at_fraction``."""

    midpoints: tuple[float, ...]
    rate: tuple[float, ...]
    max_abs_rate: float
    at_fraction: float


def entropy_velocity(fraction: Sequence[float], entropy: Sequence[float]) -> Velocity:
    """Finite-difference rate Δentropy / Δfraction per interval. fraction, entropy: (evals,),
    at least two evals with strictly increasing fraction."""
    f, e = _array(fraction), _array(entropy)
    if len(f) < 2 or np.any(np.diff(f) <= 0):
        raise ValueError("need at least two evals with strictly increasing fraction")
    rate = np.diff(e) / np.diff(f)
    midpoints = (f[1:] + f[:-1]) / 2
    peak = int(np.argmax(np.abs(rate)))
    return Velocity(
        midpoints=tuple(float(m) for m in midpoints),
        rate=tuple(float(r) for r in rate),
        max_abs_rate=float(abs(rate[peak])),
        at_fraction=float(midpoints[peak]),
    )


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (``pingouin.multicomp``), same order as the input;
    NaN stay NaN and do not count as tests."""
    return pg.multicomp(np.asarray(pvalues, dtype=float), method="holm")[1]


# --- units of analysis -------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitComparison:
    """A comparison at one unit of analysis: ``unit`` is 'layer', 'run', 'seed' or
    'layer_paired'; ``supports`` says in one sentence what the test can support."""

    unit: str
    n_a: int
    n_b: int
    result: GroupComparison | PairedComparison
    supports: str


def layer_pooled_test(
    layers_a: pd.DataFrame, layers_b: pd.DataFrame, n_boot: int = 10_000, seed: int = 0
) -> UnitComparison:
    """The report's §6.4 A test: every layer of every run of group a against every layer of
    group b. layers_a, layers_b: ``per_layer_delta`` frames (runs × layers)."""
    a = layers_a.to_numpy(dtype=float).ravel()
    b = layers_b.to_numpy(dtype=float).ravel()
    supports = (
        f"Treats the layers of a run as independent observations ({len(a)} vs {len(b)} from "
        f"{len(layers_a)} vs {len(layers_b)} runs), although they share one training "
        "trajectory, so n is inflated and p too small: it describes these runs, not the methods."
    )
    return UnitComparison("layer", len(a), len(b), compare_groups(a, b, n_boot, seed), supports)


def _per_run(summary: pd.DataFrame, column: str) -> pd.Series:
    return summary.groupby("run", sort=True)[column].mean()


def run_level_test(
    summary_a: pd.DataFrame,
    summary_b: pd.DataFrame,
    column: str = "d_entropy_pct",
    n_boot: int = 10_000,
    seed: int = 0,
) -> UnitComparison:
    """One value per run (``column`` of ``run_summary``, averaged over seeds) per group."""
    a, b = _per_run(summary_a, column), _per_run(summary_b, column)
    supports = (
        f"One value per run ({len(a)} vs {len(b)} runs): a valid test of whether these sets of "
        "configurations differ, but with so few runs it has little power, and runs that also "
        "differ in dataset, rank or learning rate cannot isolate the method."
    )
    return UnitComparison("run", len(a), len(b), compare_groups(a, b, n_boot, seed), supports)


def seed_level_test(
    summary_a: pd.DataFrame,
    summary_b: pd.DataFrame,
    column: str = "d_entropy_pct",
    n_boot: int = 10_000,
    seed: int = 0,
) -> UnitComparison:
    """One value per (run, seed) of ``run_summary`` per group. Needs a run with several seeds."""
    if summary_a.empty or summary_b.empty:
        raise ValueError("seed-level test needs runs in both groups")
    if max(summary_a.groupby("run").size().max(), summary_b.groupby("run").size().max()) < 2:
        raise ValueError("seed-level test needs at least one run with several seeds")
    a = summary_a[column].astype(float)
    b = summary_b[column].astype(float)
    single = summary_a["run"].nunique() == 1 and summary_b["run"].nunique() == 1
    if single:
        supports = (
            f"Independent seeds of one configuration per group ({len(a)} vs {len(b)}): a "
            "replicated comparison of these two configurations over training randomness, "
            "not of the methods in general."
        )
    else:
        supports = (
            f"Seeds pooled over several runs ({len(a)} vs {len(b)}): seeds of one run are "
            "clustered, so n is inflated unless run-to-run differences are negligible."
        )
    return UnitComparison("seed", len(a), len(b), compare_groups(a, b, n_boot, seed), supports)


def paired_layer_test(layers_a: pd.DataFrame, layers_b: pd.DataFrame) -> UnitComparison:
    """The report's §6.4 C test: layer l of run a paired with layer l of run b. layers_a,
    layers_b: ``per_layer_delta`` frames; several rows (seeds) are averaged per layer first."""
    a, b = layers_a.mean(axis=0), layers_b.mean(axis=0)
    a, b = a.align(b, join="inner")
    supports = (
        f"Pairs layer l of one run with layer l of the other ({len(a)} pairs): shows a "
        "within-network shift for these runs, but layers are not independent replicates and "
        "without several seeds it cannot separate the treatment from seed noise."
    )
    return UnitComparison("layer_paired", len(a), len(b), paired(a, b), supports)


# --- matched grids (study B) -------------------------------------------------------------------


def paired_matched(
    frame: pd.DataFrame, on: Sequence[str], group: str, a: str, b: str, value: str
) -> pd.Series:
    """Group ``a`` against ``b`` at matched cells: rows of the run-level ``frame`` are paired
    when they agree on every column of ``on`` (e.g. dataset, lr, seed) and differ in ``group``.

    Returns one row: n (pairs), mean_a, mean_b, diff (mean of a − b), d_z, p_t (paired t) and
    p_wilcoxon (signed-rank; NaN below 2 pairs or when every difference is 0). Cells without
    both groups are dropped; a cell with two rows of one group is an error."""
    keys = list(on)
    cells = frame[frame[group].isin([a, b])].pivot_table(
        index=keys, columns=group, values=value, aggfunc="count"
    )
    if (cells > 1).any().any():
        raise ValueError(f"cells of {keys} hold several {group} rows; add the column that tells")
    wide = frame.pivot(index=keys, columns=group, values=value).reindex(columns=[a, b])
    wide = wide.dropna(subset=[a, b])
    x, y = _array(wide[a]), _array(wide[b])
    nan = float("nan")
    row = {"n": len(x), "mean_a": nan, "mean_b": nan, "diff": nan, "d_z": nan, "p_t": nan,
           "p_wilcoxon": nan}  # fmt: skip
    if len(x):
        row |= {"mean_a": x.mean(), "mean_b": y.mean(), "diff": (x - y).mean()}
    if len(x) >= 2 and np.any(x != y):  # identical pairs: no test, no effect size
        test = paired(x, y)
        row |= {"d_z": test.d_z, "p_t": test.p}
        row["p_wilcoxon"] = float(scipy.stats.wilcoxon(x, y).pvalue)
    return pd.Series(row)


def dose_response(frame: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Spearman correlation of ``y`` with ``x`` over the rows of ``frame`` (e.g. Δentropy vs
    log10 lr, n = learning rates × seeds): rho, p (scipy's two-sided), n; rho and p are NaN
    below 3 rows or when a column is constant."""
    rows = frame[[x, y]].dropna()
    if len(rows) < 3 or rows[x].nunique() < 2 or rows[y].nunique() < 2:  # ρ undefined
        return pd.Series({"rho": float("nan"), "p": float("nan"), "n": len(rows)})
    result = scipy.stats.spearmanr(rows[x], rows[y])
    return pd.Series({"rho": float(result.statistic), "p": float(result.pvalue), "n": len(rows)})


def predictor_ranking(
    frame: pd.DataFrame,
    target: str,
    predictors: Sequence[str],
    within: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    resample: Sequence[str] | None = None,
    reference: str | None = None,
) -> pd.DataFrame:
    """How well each predictor column ranks ``target`` across the runs of ``frame``.

    Every predictor is scored on the same runs: the rows where all of them and ``target`` are
    known. Indexed by predictor: ``rho``, ``p``, ``n`` (Spearman over those runs);
    ``abs_rho_within`` and ``rho_within``: mean |ρ| and mean signed ρ over the groups of
    ``within`` with at least 3 runs (confounds such as dataset or method cannot carry it; a
    sign that flips between groups shows as a signed mean far below the absolute one; NaN
    without ``within``).

    The bootstrap unit: with ``resample=None`` the runs; with columns (e.g. dataset, method,
    lr) the means of each cell of those columns, so that seeds of one configuration do not
    count as independent evidence. ``unit_rho`` and ``n_units``: Spearman over the units;
    ``ci_low``/``ci_high``: percentile bootstrap 95 % CI of |ρ| over units resampled with
    replacement; ``gap``, ``gap_low``, ``gap_high``: |ρ| of ``reference`` (default: the best
    predictor over the units) minus this one's, with its CI from the same resamples (paired; 0
    for the reference itself). Sorted by |unit_rho|, best first."""
    keys = [*dict.fromkeys([*predictors, target, *(within or []), *(resample or [])])]
    data = frame[keys].dropna()
    overall = {name: dose_response(data, name, target) for name in predictors}
    units = data
    if resample:
        units = data.groupby(list(resample))[[*predictors, target]].mean().reset_index(drop=True)
    unit_rho = {name: dose_response(units, name, target)["rho"] for name in predictors}
    best = reference or max(predictors, key=lambda n: np.nan_to_num(abs(unit_rho[n]), nan=-1.0))
    n_boot = n_boot if len(units) >= 3 else 0  # fewer units: no ρ to resample
    boot = _bootstrap_abs_rho(units, target, predictors, n_boot, np.random.default_rng(seed))
    rows = {}
    for name in predictors:
        gap = boot[best] - boot[name]
        rows[name] = {
            "rho": overall[name]["rho"],
            "p": overall[name]["p"],
            "n": int(overall[name]["n"]),
            **_rho_within(data, name, target, within),
            "unit_rho": unit_rho[name],
            "n_units": len(units),
            **_percentiles(boot[name], "ci_low", "ci_high"),
            "gap": abs(unit_rho[best]) - abs(unit_rho[name]),
            **_percentiles(gap, "gap_low", "gap_high"),
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "predictor"
    return table.reindex(table["unit_rho"].abs().sort_values(ascending=False).index)


def _bootstrap_abs_rho(
    data: pd.DataFrame, target: str, predictors: Sequence[str], n_boot: int, rng
) -> dict[str, np.ndarray]:
    """|Spearman ρ| of each predictor with ``target`` on ``n_boot`` row resamples shared by all
    predictors (NaN where a resample leaves a column constant). Spearman's ρ is Pearson's r of
    the ranks (average ranks for ties), computed for all predictors at once."""
    columns = data[[*predictors, target]].to_numpy(dtype=float)
    values = np.full((n_boot, len(predictors)), np.nan)
    for k in range(n_boot):
        ranks = scipy.stats.rankdata(columns[rng.integers(0, len(data), len(data))], axis=0)
        centred = ranks - ranks.mean(axis=0)
        norms = np.sqrt((centred**2).sum(axis=0))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = centred[:, :-1].T @ centred[:, -1] / (norms[:-1] * norms[-1])
        values[k] = np.where(norms[:-1] * norms[-1] > 0, np.abs(r), np.nan)
    return {name: values[:, i] for i, name in enumerate(predictors)}


def _percentiles(values: np.ndarray, low: str, high: str) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {low: float("nan"), high: float("nan")}
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return {low: float(lo), high: float(hi)}


def _rho_within(
    data: pd.DataFrame, name: str, target: str, within: Sequence[str] | None
) -> dict[str, float]:
    nan = float("nan")
    groups = [g for _, g in data.groupby(list(within))] if within else []
    rhos = np.array([dose_response(g, name, target)["rho"] for g in groups if len(g) >= 3])
    rhos = rhos[np.isfinite(rhos)]
    if not len(rhos):
        return {"abs_rho_within": nan, "rho_within": nan}
    return {"abs_rho_within": float(np.abs(rhos).mean()), "rho_within": float(rhos.mean())}
