"""The report's published numbers (``params/report/report_numbers.yaml``) beside a build's, and
what the report's own numbers say about its claims.

- :func:`load_report_numbers` reads and checks the data file (every table names its section,
  every column a tolerance kind).
- :func:`report_values` lists every published number, one row each; :func:`compare` sets a
  build's numbers beside them (:func:`build_values` collects those from the build's tables,
  named like the report's columns) with the difference and a flag when it exceeds the kind's
  tolerance.
- :func:`report_checks` recomputes what the report's own tables imply about numbers it quotes:
  exact p-values, correlations from its appendix, its zero-shot table, its entropy floor.
- :func:`report_verdicts` applies the findings chapter's verdict rules
  (:mod:`~collapse_utils.analysis.verdicts`) to the report's numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from collapse_utils.analysis import verdicts
from collapse_utils.analysis.results import pct_change
from collapse_utils.analysis.stats import GroupComparison, compare_groups, correlation, holm
from collapse_utils.config import METRICS, REPO_ROOT, ConfigError, read_params_yaml

REPORT_NUMBERS = REPO_ROOT / "params" / "report" / "report_numbers.yaml"
WITHIN, DIFFERS, NOT_RUN = "within tolerance", "differs", "not in this build"
_KIND_FIELDS = ("unit", "tolerance", "decimals", "why")
_TABLE_FIELDS = {"section", "title", "columns", "rows", "run"}


# --- the data file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind of quantity: its unit, the tolerance of a comparison, the decimals the report
    prints, and where the tolerance comes from."""

    name: str
    unit: str
    tolerance: float
    decimals: int
    why: str


@dataclass(frozen=True)
class ReportTable:
    """One table of the report: ``rows`` maps a row (run id or test) to its printed values, a
    float or a bound such as ``"<0.001"``; ``columns`` maps each column to its kind; ``run``
    names the experiment that gives a baseline table's build side."""

    name: str
    section: str
    title: str
    columns: dict[str, str]
    rows: dict[str, dict[str, float | str]]
    run: str | None = None

    def value(self, row: str, column: str) -> float:
        """A printed value as a float (a bound gives its limit); NaN when not printed."""
        return _number(self.rows.get(row, {}).get(column))

    def frame(self) -> pd.DataFrame:
        """Rows × columns as floats (bounds give their limit, cells not printed NaN)."""
        return pd.DataFrame(
            {c: [self.value(r, c) for r in self.rows] for c in self.columns}, index=list(self.rows)
        )


@dataclass(frozen=True)
class ReportNumbers:
    source: str
    kinds: dict[str, Kind]
    tables: dict[str, ReportTable]
    settings: dict[str, tuple[float, str]]  # name → (value, section)
    claims: dict[str, tuple[str, str]]  # claim → (section, quoted text)
    runs: pd.DataFrame  # index: run id; method, regularizer (§2.4)

    def runs_with(self, method: str | None = None, regularizer: str | None = None) -> list[str]:
        """The report's runs of that method and regularizer (None: any), in its order."""
        keep = pd.Series(True, index=self.runs.index)
        if method is not None:
            keep &= self.runs["method"] == method
        if regularizer is not None:
            keep &= self.runs["regularizer"] == regularizer
        return list(self.runs.index[keep])


def _number(value: Any) -> float:
    if value is None:
        return float("nan")
    if isinstance(value, str):
        return float(value.lstrip("<>"))
    return float(value)


def _bound(value: Any) -> str:
    return value[0] if isinstance(value, str) and value[:1] in "<>" else "="


def load_report_numbers(path: Path | str = REPORT_NUMBERS) -> ReportNumbers:
    """Read the report's numbers (by default the repository's ``params/report/
    report_numbers.yaml``, whatever params folder a build uses: the report does not change with
    the build); :class:`ConfigError` names the file and the field of anything malformed (a
    table without section, a column of unknown kind, a value that is not a number or a bound)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: missing; it holds the report's published numbers")
    raw = read_params_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")

    def fail(where: str, what: str) -> ConfigError:
        return ConfigError(f"{path}: field {where!r} {what}")

    kinds = {}
    for name, fields in (raw.get("kinds") or {}).items():
        if not isinstance(fields, dict) or sorted(fields) != sorted(_KIND_FIELDS):
            raise fail(f"kinds.{name}", f"must have exactly the fields {list(_KIND_FIELDS)}")
        tolerance = fields["tolerance"]
        # NaN would flag every comparison "within tolerance", a negative one every "differs"
        if (isinstance(tolerance, bool) or not isinstance(tolerance, int | float)
                or not math.isfinite(tolerance) or tolerance < 0):  # fmt: skip
            raise fail(
                f"kinds.{name}.tolerance", f"must be a finite number >= 0, got {tolerance!r}"
            )
        kinds[name] = Kind(
            name,
            str(fields["unit"]),
            float(tolerance),
            int(fields["decimals"]),
            str(fields["why"]),
        )
    tables = {}
    for name, fields in (raw.get("tables") or {}).items():
        where = f"tables.{name}"
        if not isinstance(fields, dict) or set(fields) - _TABLE_FIELDS:
            raise fail(where, f"must be a mapping with fields among {sorted(_TABLE_FIELDS)}")
        if not str(fields.get("section", "")).strip():
            raise fail(f"{where}.section", "is required: every number names its report section")
        columns = {str(c): str(k) for c, k in (fields.get("columns") or {}).items()}
        unknown = sorted({k for k in columns.values() if k not in kinds})
        if unknown or not columns:
            raise fail(f"{where}.columns", f"needs columns of known kinds; unknown {unknown}")
        rows: dict[str, dict[str, float | str]] = {}
        for row, values in (fields.get("rows") or {}).items():
            if not isinstance(values, dict):
                raise fail(f"{where}.rows.{row}", "must map columns to values")
            for column, value in values.items():
                if column not in columns:
                    raise fail(f"{where}.rows.{row}.{column}", "is not a column of the table")
                if not _is_value(value):
                    raise fail(f"{where}.rows.{row}.{column}", f"is {value!r}, not a number")
            rows[str(row)] = dict(values)
        tables[name] = ReportTable(
            name,
            str(fields["section"]),
            str(fields.get("title", "")),
            columns,
            rows,
            fields.get("run"),
        )
    settings = {}
    for name, fields in (raw.get("settings") or {}).items():
        if not isinstance(fields, dict) or not str(fields.get("section", "")).strip():
            raise fail(f"settings.{name}", "needs a value and its section")
        settings[name] = (float(fields["value"]), str(fields["section"]))
    claims = {}
    for name, fields in (raw.get("claims") or {}).items():
        if not isinstance(fields, dict) or not fields.get("section") or not fields.get("text"):
            raise fail(f"claims.{name}", "needs a section and the quoted text")
        claims[name] = (str(fields["section"]), " ".join(str(fields["text"]).split()))
    runs = raw.get("runs") or {}
    if not str(runs.get("section", "")).strip() or not isinstance(runs.get("rows"), dict):
        raise fail("runs", "needs its section and a row (method, regularizer) per run")
    frame = pd.DataFrame.from_dict(runs["rows"], orient="index")
    if list(frame.columns) != ["method", "regularizer"]:
        raise fail("runs.rows", "must give each run exactly a method and a regularizer")
    return ReportNumbers(str(raw.get("source", "")), kinds, tables, settings, claims, frame)


def _is_value(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return math.isfinite(value)
    if isinstance(value, str) and value[:1] in "<>":
        try:
            float(value[1:])
        except ValueError:
            return False
        return True
    return False


# --- report against build ----------------------------------------------------------------------

KEY = ["table", "row", "column"]


def report_values(numbers: ReportNumbers) -> pd.DataFrame:
    """Every published number, one row each: table, section, row, column, kind, relation
    (``=``, or ``<`` for a printed bound) and ``report`` (the value, or the bound's limit)."""
    rows = [
        {
            "table": table.name,
            "section": table.section,
            "row": row,
            "column": column,
            "kind": table.columns[column],
            "relation": _bound(value),
            "report": _number(value),
        }
        for table in numbers.tables.values()
        for row, values in table.rows.items()
        for column, value in values.items()
    ]
    return pd.DataFrame(
        rows, columns=["table", "section", "row", "column", "kind", "relation", "report"]
    )


def build_values(numbers: ReportNumbers, frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """A build's numbers in the report's layout: for each report table with a frame in
    ``frames`` (index: the report's rows as strings, columns: the report's column names), the
    value of every printed cell. Columns table, row, column, ours; NaN where the build has no
    such row or column (a run not trained)."""
    rows = []
    for name, table in numbers.tables.items():
        frame = frames.get(name)
        for row, values in table.rows.items():
            for column in values:
                ours = float("nan")
                if frame is not None and row in frame.index and column in frame.columns:
                    ours = _number(frame.loc[row, column])
                rows.append({"table": name, "row": row, "column": column, "ours": ours})
    return pd.DataFrame(rows, columns=[*KEY, "ours"])


def compare(numbers: ReportNumbers, ours: pd.DataFrame) -> pd.DataFrame:
    """:func:`report_values` with ``ours`` (columns table, row, column, ours) beside them:
    ``difference`` = ours − report, ``tolerance`` of the kind, and ``flag``: ``differs`` when
    |difference| exceeds the tolerance (for a bound ``< x``: when ours exceeds x + tolerance),
    ``within tolerance`` otherwise, ``not in this build`` when ours is missing."""
    table = report_values(numbers).merge(ours[[*KEY, "ours"]], on=KEY, how="left")
    table["difference"] = table["ours"] - table["report"]
    table["tolerance"] = [numbers.kinds[k].tolerance for k in table["kind"]]
    slack = 1e-9 * np.maximum(1.0, table["report"].abs())  # floating-point noise, not a result
    excess = np.where(table["relation"] == "<", table["difference"], table["difference"].abs()) - (
        table["tolerance"] + slack
    )
    table["flag"] = np.where(table["ours"].isna(), NOT_RUN, np.where(excess > 0, DIFFERS, WITHIN))
    return table


def run_frame(means: pd.DataFrame, dataset: str = "cifar100") -> pd.DataFrame:
    """A ``results.run_means`` frame (index: run) with the report's derived columns added:
    ``best_acc_pct``, ``zs_<dataset>_pct`` (accuracy in %) and ``zs_<dataset>_change_pct`` (the
    change from the pre-trained accuracy, in % of it), and a row ``pretrained`` holding the
    pre-trained zero-shot accuracy (the mean over runs, which all measure the same model)."""
    frame = means.copy()
    if "best_acc" in frame:
        frame["best_acc_pct"] = 100 * frame["best_acc"].astype(float)
    zs, pre = f"zs_{dataset}", f"zs_{dataset}_pretrained"
    if zs in frame and pre in frame:
        acc, base = frame[zs].astype(float), frame[pre].astype(float)
        frame[f"{zs}_pct"] = 100 * acc
        frame[f"{zs}_change_pct"] = 100 * (acc - base) / base
        frame.loc["pretrained", f"{zs}_pct"] = 100 * float(base.mean())
    return frame


def baseline_frames(layers: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The report's two baseline tables from one pre-trained model's per-layer metrics
    (``layers``: index 1..L, columns the metrics): ``baseline_layers`` (index "1".."L") and
    ``baseline_summary`` (rows mean, std with ddof 1 as §3.1 prints it, min, max)."""
    by_layer = layers.copy()
    by_layer.index = [str(i) for i in layers.index]
    summary = pd.DataFrame(
        {
            "mean": layers.mean(),
            "std": layers.std(ddof=1),
            "min": layers.min(),
            "max": layers.max(),
        }
    ).T
    return {"baseline_layers": by_layer, "baseline_summary": summary}


def per_layer_extremes(delta: pd.DataFrame) -> pd.DataFrame:
    """Per run (seeds averaged per layer) of a ``per_layer_delta`` frame: the layer with the
    largest |Δ entropy| and that change (§3.8's "most affected layer")."""
    if delta.empty:
        return pd.DataFrame(columns=["layer", "d_entropy_pct"])
    per_run = delta.groupby(level="run").mean()
    layer = per_run.abs().idxmax(axis=1)
    value = [per_run.loc[run, column] for run, column in layer.items()]
    return pd.DataFrame({"layer": layer.astype(float), "d_entropy_pct": value})


def full_vs_lora_frame(result: GroupComparison | None) -> pd.DataFrame:
    """§6.4 A's columns from the layer-pooled comparison. The report prints population SDs
    (ddof 0: its t follows from them, see :func:`report_checks`) and |d|; so does this."""
    if result is None:
        return pd.DataFrame()

    def population_sd(sd: float, n: int) -> float:
        return sd * math.sqrt((n - 1) / n)

    row = {
        "mean_full": result.mean_a,
        "sd_full": population_sd(result.sd_a, result.n_a),
        "ci_full_low": result.ci_a[0],
        "ci_full_high": result.ci_a[1],
        "mean_lora": result.mean_b,
        "sd_lora": population_sd(result.sd_b, result.n_b),
        "ci_lora_low": result.ci_b[0],
        "ci_lora_high": result.ci_b[1],
        "welch_t": result.welch_t,
        "welch_p": result.welch_p,
        "mwu_u": result.mwu_u,
        "mwu_p": result.mwu_p,
        "abs_cohen_d": abs(result.cohen_d),
    }
    return pd.DataFrame([row], index=["layer"])


def layer_anova_frame(table: pd.DataFrame) -> pd.DataFrame:
    """``stat_tables.layer_anova_table`` with its group SDs (ddof 1) as population SDs, the
    report's convention (its F follows from its SDs only with ddof 0)."""
    if table.empty:
        return table
    frame = table.copy()
    for group in ("early", "middle", "late"):
        size = frame[f"{group}_layers"].map(_group_size)
        frame[f"{group}_sd"] = frame[f"{group}_sd"] * np.sqrt((size - 1) / size)
    return frame


def _group_size(label: str) -> int:
    first, last = label.removeprefix("L").split("–")
    return int(last) - int(first) + 1


def correlation_frame(pairs: pd.DataFrame) -> pd.DataFrame:
    """``stat_tables.correlation_pairs`` (index (a, b)) with rows named ``a~b`` as in the data
    file, both orders."""
    if pairs.empty:
        return pd.DataFrame(columns=["r", "p"])
    rows = {}
    for (a, b), values in pairs.iterrows():
        rows[f"{a}~{b}"] = rows[f"{b}~{a}"] = {"r": values["r"], "p": values["p"]}
    return pd.DataFrame.from_dict(rows, orient="index")


def floor_margin(entropy_by_eval: np.ndarray, ratio: float) -> float:
    """How far above an entropy floor a run's layer means stayed: the smallest, over evals and
    layers, of layer-mean entropy / (ratio × the layer's entropy at the first eval). Below 1,
    some layer mean went under the floor. entropy_by_eval: (evals, layers)."""
    values = np.asarray(entropy_by_eval, dtype=float)
    return float((values / (ratio * values[0])).min())


# --- what the report's own numbers say ------------------------------------------------------------


@dataclass(frozen=True)
class ReportCheck:
    """One quoted number or claim of the report against what its own tables imply: ``holds`` is
    whether the report's numbers bear it out."""

    section: str
    topic: str
    report_says: str
    recomputed: str
    holds: bool


def report_checks(numbers: ReportNumbers, floor_ratio: float | None) -> list[ReportCheck]:
    """Every check of the report against itself. ``floor_ratio``: the entropy floor as a
    fraction of the pre-trained layer entropy in the report's code (``reg.floor_ratio`` of the
    ``full`` profile; None: not known, and no floor check)."""
    floor = [] if floor_ratio is None else [check_entropy_floor(numbers, floor_ratio)]
    return [
        check_spearman_exact_p(numbers),
        *check_cross_metric_correlations(numbers),
        check_lora_zeroshot(numbers),
        *floor,
        check_regularizers_after_holm(numbers),
        check_full_vs_lora_units(numbers),
        check_baseline_summary(numbers),
        check_zeroshot_change(numbers),
        check_anova_f(numbers),
        check_paired_p(numbers),
        check_printed_changes(numbers),
    ]


def _section(numbers: ReportNumbers, table: str) -> str:
    return numbers.tables[table].section


def _fraction(p: float, total: int) -> str:
    count = round(p * total)
    return f"{count}/{total}" if math.isclose(count / total, p, rel_tol=1e-9) else f"{p:.3g}"


def check_spearman_exact_p(numbers: ReportNumbers) -> ReportCheck:
    """§3.4/§6.4 B: the exact permutation p of the learning-rate correlations, n = 5."""
    sweep = numbers.tables["lr_sweep"].frame()
    printed = numbers.tables["lr_correlation"]
    x, y = np.log10(sweep["lr"].to_numpy()), sweep["d_entropy_pct"].to_numpy()
    spearman, pearson = correlation(x, y, "spearman"), correlation(x, y, "pearson")
    n = len(x)
    orderings = math.factorial(n)
    bound = printed.rows["spearman"]["p_asymptotic"]
    says = (
        f"Spearman ρ = {printed.value('spearman', 'r'):.3f}, p {bound[0]} {bound[1:]} and "
        f"Pearson r = {printed.value('pearson', 'r'):.3f}, p = "
        f"{printed.value('pearson', 'p_asymptotic'):.3f}, over the {n} learning rates of "
        f"{numbers.tables['lr_sweep'].section}."
    )
    recomputed = (
        f"ρ = {spearman.r:.3f}; with n = {n} there are only {orderings} orderings, so the exact "
        f"two-sided p of this ρ is {_fraction(spearman.p_exact, orderings)} = "
        f"{spearman.p_exact:.4f}, never below 0.001 (the asymptotic p, {spearman.p:.1e}, is an "
        f"artefact of the formula). Pearson's asymptotic p = {pearson.p:.3f} is as printed; its "
        f"exact p is {_fraction(pearson.p_exact, orderings)} = {pearson.p_exact:.3f}."
    )
    return ReportCheck(
        printed.section,
        "Spearman p at n = 5",
        says,
        recomputed,
        holds=spearman.p_exact < _number(bound),
    )


def appendix_changes(numbers: ReportNumbers) -> pd.DataFrame:
    """Per run of §6.1: Δ% of every metric (entropy as printed, the others recomputed from the
    printed start and final values) and best accuracy: the columns of §3.10."""
    runs = numbers.tables["appendix_runs"].frame()
    changes = pd.DataFrame(index=runs.index)
    changes["d_entropy_pct"] = runs["d_entropy_pct"]
    for metric in METRICS[1:]:
        changes[f"d_{metric}_pct"] = [
            pct_change(a, b) for a, b in zip(runs[f"{metric}_0"], runs[f"{metric}_f"], strict=True)
        ]
    changes["best_acc"] = runs["best_acc"]
    return changes


def check_cross_metric_correlations(numbers: ReportNumbers) -> list[ReportCheck]:
    """§3.10: each printed Pearson r against the r of the §6.1 appendix's 21 runs."""
    printed = numbers.tables["correlations"]
    tolerance = numbers.kinds[printed.columns["r"]].tolerance
    changes = appendix_changes(numbers)
    appendix = numbers.tables["appendix_runs"].section
    checks = []
    for pair in printed.rows:
        a, b = pair.split("~")
        result = scipy.stats.pearsonr(changes[a], changes[b])
        r = float(result.statistic)
        p = printed.rows[pair]["p"]
        says = f"{_label(a)} ↔ {_label(b)}: r = {printed.value(pair, 'r'):+.2f}, p "
        says += f"{p[0]} {p[1:]}." if isinstance(p, str) else f"= {p:.3f}."
        recomputed = (
            f"r = {r:+.2f} (p = {result.pvalue:.2g}) over the {len(changes)} runs of {appendix}"
            + ("" if a == "d_entropy_pct" else "; Δ% from its start and final values")
            + "."
        )
        holds = abs(r - printed.value(pair, "r")) <= tolerance
        checks.append(
            ReportCheck(printed.section, f"r of {_label(a)} ↔ {_label(b)}", says, recomputed, holds)
        )
    return checks


_LABELS = {
    "d_entropy_pct": "ΔEntropy",
    "d_erf_pct": "ΔERF",
    "d_gini_pct": "ΔGini",
    "d_head_diversity_pct": "ΔHeadDiv",
    "best_acc": "BestAcc",
}


def _label(column: str) -> str:
    return _LABELS.get(column, column)


def check_lora_zeroshot(numbers: ReportNumbers) -> ReportCheck:
    """§3.3/§6.3: LoRA zero-shot accuracy "perfectly preserved" — equal to the pre-trained
    model's to the image."""
    table = numbers.tables["zeroshot"]
    images = int(numbers.settings["zeroshot_test_images"][0])
    base = table.value("pretrained", "zs_cifar100_pct")
    lora = [r for r in table.rows if r in numbers.runs_with("lora")]
    correct = {r: round(table.value(r, "zs_cifar100_pct") / 100 * images) for r in lora}
    base_correct = round(base / 100 * images)
    same = [r for r in lora if correct[r] == base_correct]
    says = f"All LoRA variants ({', '.join(lora)}) perfectly preserve zero-shot accuracy."
    recomputed = (
        f"{len(same)} of {len(lora)} LoRA runs score exactly {base:.2f}% = {base_correct} of "
        f"{images} CIFAR-100 images, the pre-trained model's count to the image, although their "
        "adapters differ. Identical counts mean the evaluated model was the "
        "pre-trained one: the adapters were dropped at evaluation (§4.6 (7): LoRA checkpoints "
        "load into the original CLIP architecture), so the table cannot show preservation."
    )
    return ReportCheck(
        table.section,
        "LoRA zero-shot at exactly the baseline",
        says,
        recomputed,
        holds=len(same) < len(lora) or not lora,
    )


def check_entropy_floor(numbers: ReportNumbers, floor_ratio: float) -> ReportCheck:
    """§3.7.2: could the entropy floor (``floor_ratio`` × the pre-trained layer entropy) have
    been active? Compared with every layer-level entropy the report prints."""
    layers = numbers.tables["baseline_layers"].frame()["entropy"]
    runs = numbers.tables["appendix_runs"].frame()
    extremes = numbers.tables["per_layer_extremes"].frame()
    floor = floor_ratio * layers
    floored = [r for r in numbers.runs_with(regularizer="entropy_floor") if r in runs.index]
    final_ratio = {r: runs.loc[r, "entropy_f"] / runs.loc[r, "entropy_0"] for r in floored}
    deepest = extremes["d_entropy_pct"].idxmin()
    deepest_change = extremes.loc[deepest, "d_entropy_pct"]
    deepest_layer = int(extremes.loc[deepest, "layer"])
    reached = 1 + deepest_change / 100
    inactive = reached > floor_ratio and all(v > floor_ratio for v in final_ratio.values())
    says = (
        "Entropy floor λ=0.1 is the only statistically significant regularizer, demonstrating "
        "that explicit entropy constraints effectively prevent collapse (§5 (5))."
    )
    finals = ", ".join(
        f"{r} {runs.loc[r, 'entropy_f']:.3f} ({v:.3f} × start)" for r, v in final_ratio.items()
    )
    recomputed = (
        f"The floor is {floor_ratio:g} × the pre-trained entropy of each layer: "
        f"{floor.min():.3f}–{floor.max():.3f} nats by {_section(numbers, 'baseline_layers')}. The "
        "entropy-floor runs end with "
        f"layer-mean entropy {finals}; the deepest single-layer drop of any run the report "
        f"shows is {deepest_change:+.2f}% ({deepest}, layer {deepest_layer}, "
        f"{_section(numbers, 'per_layer_extremes')}), to "
        f"{reached:.2f} × its start. "
    )
    if inactive:
        recomputed += (
            f"No layer entropy in the report comes near {floor_ratio:g} × baseline, so by layer "
            "means the penalty was zero and the floor never acted; only single images or heads "
            f"{100 * (1 - floor_ratio):.0f}% below their layer's pre-trained mean could have "
            "triggered it, and the report prints no such entropy."
        )
    else:
        recomputed += "Some printed layer entropy is at or below the floor."
    return ReportCheck(
        numbers.claims["RQ4"][0],
        "Was the entropy floor active?",
        says,
        recomputed,
        holds=not inactive,
    )


def check_regularizers_after_holm(numbers: ReportNumbers) -> ReportCheck:
    """§6.4 C: the five paired tests of one family, Holm-adjusted."""
    table = numbers.tables["regularizers"]
    p = table.frame()["p"]
    adjusted = pd.Series(holm(p), index=p.index)
    top = p.idxmin()
    says = f"{top} is significant (p = {p[top]:.3f}), the only regularizer that is."
    recomputed = (
        f"The {len(p)} paired tests are one family; after Holm the smallest p is "
        f"{adjusted.min():.3f} ({adjusted.idxmin()}): no regularizer is significant at 0.05."
    )
    return ReportCheck(
        table.section,
        "Regularizer p after Holm",
        says,
        recomputed,
        holds=bool((adjusted < verdicts.ALPHA).any()),
    )


def pooled_sizes(numbers: ReportNumbers) -> dict[str, float]:
    """The group sizes and SD convention behind §6.4 A's t: of every (n_full, n_lora), multiples
    of the layer count up to the report's number of runs of each method, and SDs printed with
    ddof 0 or 1, the one whose Welch t from the printed means and SDs is closest to the printed
    t. Returns n_full, n_lora, ddof and that t."""
    row = numbers.tables["full_vs_lora"].frame().loc["layer"]
    layers = int(numbers.settings["layers"][0])
    n_runs = {m: len(numbers.runs_with(m)) for m in ("full", "lora")}

    def variance(sd: float, n: int, ddof: int) -> float:  # the sample variance behind an SD
        return sd**2 * n / (n - 1) if ddof == 0 else sd**2

    best: dict[str, float] = {}
    for ddof in (0, 1):
        for k_full in range(1, n_runs["full"] + 1):
            for k_lora in range(1, n_runs["lora"] + 1):
                n_a, n_b = k_full * layers, k_lora * layers
                se = math.sqrt(
                    variance(row["sd_full"], n_a, ddof) / n_a
                    + variance(row["sd_lora"], n_b, ddof) / n_b
                )
                t = (row["mean_full"] - row["mean_lora"]) / se
                if not best or abs(t - row["welch_t"]) < abs(best["t"] - row["welch_t"]):
                    best = {"n_full": n_a, "n_lora": n_b, "ddof": ddof, "t": t}
    return best


def run_level_comparison(numbers: ReportNumbers) -> GroupComparison:
    """Welch's test on one value per run: the Δ entropy (%) of the Full FT and LoRA runs of the
    grand comparison (§3.2.1)."""
    changes = numbers.tables["grand_comparison"].frame()["d_entropy_pct"]
    full = changes.reindex(numbers.runs_with("full")).dropna()
    lora = changes.reindex(numbers.runs_with("lora")).dropna()
    return compare_groups(full, lora)


def check_full_vs_lora_units(numbers: ReportNumbers) -> ReportCheck:
    """§6.4 A: which observations the printed t compares, and the test at one value per run."""
    table = numbers.tables["full_vs_lora"]
    sizes = pooled_sizes(numbers)
    layers = int(numbers.settings["layers"][0])
    runs = run_level_comparison(numbers)
    says = (
        f"Full FT and LoRA differ significantly: Welch t = {table.value('layer', 'welch_t'):.2f}, "
        f"p = {table.value('layer', 'welch_p'):.3f}, d = {table.value('layer', 'abs_cohen_d'):.2f}."
    )
    recomputed = (
        f"The printed t follows from the printed means and SDs (t = {sizes['t']:.2f}, SDs with "
        f"ddof {sizes['ddof']}) with {sizes['n_full']} Full FT against {sizes['n_lora']} LoRA "
        f"values: the {layers} layers of {_runs(sizes['n_full'] // layers, 'Full FT')} against "
        f"those of {_runs(sizes['n_lora'] // layers, 'LoRA')}, layers counted as independent "
        "observations. "
        f"With one value per run ({_section(numbers, 'grand_comparison')}: {runs.n_a} Full FT "
        f"vs {runs.n_b} LoRA runs), Welch t = {runs.welch_t:.2f}, p = {runs.welch_p:.2f}."
    )
    return ReportCheck(
        table.section,
        "Full FT vs LoRA: unit of analysis",
        says,
        recomputed,
        holds=runs.welch_p < verdicts.ALPHA,
    )


def _runs(count: int, method: str) -> str:
    return f"{'one' if count == 1 else count} {method} run{'' if count == 1 else 's'}"


def check_baseline_summary(numbers: ReportNumbers) -> ReportCheck:
    """§3.1's mean, SD (ddof 1) and range against the per-layer table of §6.2."""
    printed = numbers.tables["baseline_summary"].frame()
    layers = numbers.tables["baseline_layers"].frame()
    recomputed = baseline_frames(layers)["baseline_summary"]
    diff = (recomputed - printed).abs()
    worst = diff.stack().idxmax()
    rounding = 0.0015  # two roundings to 3 decimals
    says = "Baseline mean ± SD and per-layer range of each metric."
    text = (
        f"Recomputed from the {len(layers)} layers of {_section(numbers, 'baseline_layers')} "
        f"(SD with ddof 1), every value agrees within {diff.max().max():.4f} (largest: "
        f"{worst[1]} {worst[0]}, printed {printed.loc[worst]:.3f}, recomputed "
        f"{recomputed.loc[worst]:.4f})."
    )
    return ReportCheck(
        _section(numbers, "baseline_summary"),
        "Baseline summary",
        says,
        text,
        holds=bool(diff.max().max() <= rounding),
    )


def check_zeroshot_change(numbers: ReportNumbers) -> ReportCheck:
    """§6.3: each printed change from baseline against the printed accuracies."""
    table = numbers.tables["zeroshot"]
    frame = table.frame()
    base = frame.loc["pretrained", "zs_cifar100_pct"]
    rows = frame.drop(index="pretrained")
    recomputed = 100 * (rows["zs_cifar100_pct"] - base) / base
    diff = (recomputed - rows["zs_cifar100_change_pct"]).abs()
    says = "Change from baseline of every zero-shot accuracy."
    text = (
        f"Recomputed from the printed accuracies, each within {diff.max():.2f} of the printed "
        "change (in % of the baseline)."
    )
    return ReportCheck(
        table.section, "Zero-shot change from baseline", says, text, holds=bool(diff.max() <= 0.06)
    )


def anova_from_groups(
    means: list[float], sds: list[float], n: int, ddof: int
) -> tuple[float, float]:
    """One-way ANOVA F and p from group means and SDs, ``n`` values per group; ``ddof``: the
    convention of the SDs (0: population)."""
    k = len(means)
    grand = float(np.mean(means))
    between = n * sum((m - grand) ** 2 for m in means) / (k - 1)
    within = sum(s**2 * (n - ddof) for s in sds) / (k * n - k)
    f = between / within
    return f, float(scipy.stats.f.sf(f, k - 1, k * n - k))


def check_anova_f(numbers: ReportNumbers) -> ReportCheck:
    """§3.8: F recomputed from the printed group means and SDs (4 layers per group)."""
    table = numbers.tables["layer_anova"]
    frame = table.frame()
    n = int(numbers.settings["layers"][0]) // 3
    parts, holds = [], True
    for run, row in frame.iterrows():
        means = [row[f"{g}_mean"] for g in ("early", "middle", "late")]
        sds = [row[f"{g}_sd"] for g in ("early", "middle", "late")]
        f0, p0 = anova_from_groups(means, sds, n, ddof=0)
        f1, _ = anova_from_groups(means, sds, n, ddof=1)
        holds &= abs(f0 - row["f"]) <= 0.05
        parts.append(
            f"{run}: F = {f0:.2f} (p = {p0:.3f}) with population SDs, {f1:.2f} with "
            f"sample SDs; printed {row['f']:.2f}"
        )
    says = "ANOVA F and p of the layer position test, with group means ± SDs."
    text = "; ".join(parts) + ". The printed SDs are population SDs (ddof 0)."
    return ReportCheck(table.section, "Layer ANOVA from its group statistics", says, text, holds)


def check_paired_p(numbers: ReportNumbers) -> ReportCheck:
    """§6.4 C: p from t with layers − 1 degrees of freedom."""
    table = numbers.tables["regularizers"]
    frame = table.frame()
    dof = int(numbers.settings["layers"][0]) - 1
    p = 2 * scipy.stats.t.sf(frame["t"].abs(), dof)
    diff = np.abs(p - frame["p"])
    says = "Paired t and p of each regularizer against no regularization."
    text = (
        f"Each p follows from its t with {dof} degrees of freedom ({dof + 1} layer pairs) within "
        f"{diff.max():.4f}; the printed d is d_av (t/√{dof + 1} would be d_z = "
        f"{frame['t'].iloc[0] / math.sqrt(dof + 1):.2f} for {frame.index[0]})."
    )
    return ReportCheck(
        table.section, "Paired tests' p from t", says, text, holds=bool(diff.max() <= 0.002)
    )


def _change_interval(start: float, final: float, half: float) -> tuple[float, float]:
    """The range of 100·(final − start)/start when both were rounded to ± ``half``."""
    low = 100 * ((final - half) / (start + half) - 1)
    high = 100 * ((final + half) / (start - half) - 1)
    return low, high


def check_printed_changes(numbers: ReportNumbers) -> ReportCheck:
    """§3.2.1 and §6.1: every printed Δ% against the range its printed start and final values
    (3 decimals) allow."""
    runs = numbers.tables["appendix_runs"].frame()
    grand = numbers.tables["grand_comparison"].frame()
    outside = []
    total = 0
    for table, frame in (("§6.1", runs), ("§3.2.1", grand)):
        for run in frame.index:
            for metric in METRICS:
                column = f"d_{metric}_pct"
                if column not in frame or math.isnan(frame.loc[run, column]):
                    continue
                total += 1
                low, high = _change_interval(
                    runs.loc[run, f"{metric}_0"], runs.loc[run, f"{metric}_f"], 0.0005
                )
                if not low - 0.005 <= frame.loc[run, column] <= high + 0.005:
                    outside.append(f"{table} {run} {_label(column)}")
    says = "Δ% of every metric in the grand comparison and the appendix, and its start and end."
    text = (
        f"{total - len(outside)} of {total} printed changes lie within the range their printed "
        "start and final values allow after rounding"
        + (f"; outside: {', '.join(outside)}." if outside else ".")
    )
    return ReportCheck(
        _section(numbers, "grand_comparison"),
        "Printed Δ% and rounding",
        says,
        text,
        holds=not outside,
    )


# --- the verdict rules on the report's numbers ----------------------------------------------------


def report_verdicts(
    numbers: ReportNumbers,
    reference: str,
    anova_runs: list[str],
    settings: pd.DataFrame | None = None,
) -> dict[str, verdicts.Verdict]:
    """Each verdict rule applied to the report's published numbers. ``reference``: the
    unregularized run the regularizers are compared with; ``anova_runs``: the runs of the layer
    ANOVA (both from ``params/families.yaml``); ``settings``: dataset and lr per run id (from
    the experiment files), to name the runs that repeat one configuration.

    Where the report's design asks for it: RQ1 names its near-duplicate runs, RQ3 leaves out
    the LoRA rows (the report's code scored them without their adapters), RQ5b takes runs, not
    layers, as the unit."""
    runs = numbers.tables["appendix_runs"].frame()
    changes = runs["d_entropy_pct"]
    plain = changes.reindex(numbers.runs_with("full", "none")).dropna()
    grand = numbers.tables["grand_comparison"].frame()["d_entropy_pct"]
    regs = numbers.tables["regularizers"].frame()
    acc = runs["best_acc"]
    reg_tests = pd.DataFrame(
        {
            # The report prints t but not the mean layer difference; the difference of the runs'
            # layer-mean Δ entropy (§6.1) stands in for it.
            "mean_diff": [
                changes.get(r, np.nan) - changes.get(reference, np.nan) for r in regs.index
            ],
            "p": regs["p"],
            "acc_change": [
                100 * (acc.get(r, np.nan) - acc.get(reference, np.nan)) for r in regs.index
            ],
        },
        index=regs.index,
    )
    sweep = numbers.tables["lr_sweep"].frame()
    anova = numbers.tables["layer_anova"].frame().reindex(anova_runs)
    rq1 = verdicts.rq1_fine_tuning_lowers_entropy(plain)
    return {
        "RQ1": dataclasses.replace(rq1, detail=near_duplicates(list(plain.index), settings)),
        "RQ2": verdicts.rq2_lora_preserves_better(
            grand.reindex(numbers.runs_with("full")).dropna(),
            grand.reindex(numbers.runs_with("lora")).dropna(),
        ),
        "RQ3": _report_zeroshot_verdict(numbers, changes),
        "RQ4": verdicts.rq4_regularizer_limits_change(reg_tests),
        "RQ5_lr": verdicts.rq5_learning_rate_drives_collapse(sweep["lr"], sweep["d_entropy_pct"]),
        "RQ5_layers": verdicts.rq5_layer_position_matters(anova),
    }


def _report_zeroshot_verdict(numbers: ReportNumbers, changes: pd.Series) -> verdicts.Verdict:
    """RQ3 on the report's §6.3 rows without its LoRA rows: the report's code loaded only the
    vision tower's base weights into a fresh CLIP, dropping the adapters, so every LoRA row
    repeats the pre-trained accuracy and carries no evidence."""
    zs = numbers.tables["zeroshot"].frame().drop(index="pretrained")
    lora = [r for r in zs.index if r in numbers.runs_with("lora")]
    kept = zs.drop(index=lora)
    verdict = verdicts.rq3_collapse_tracks_zeroshot_loss(
        changes.reindex(kept.index), kept["zs_cifar100_change_pct"]
    )
    if not lora:
        return verdict
    detail = (
        f"left out: {', '.join(lora)} (LoRA, scored by the report's code without their "
        "adapters, so their zero-shot equals the pre-trained model's)"
    )
    return dataclasses.replace(verdict, detail=detail)


def near_duplicates(runs: list[str], settings: pd.DataFrame | None) -> str:
    """A sentence naming the ``runs`` that share a dataset and learning rate (they differ only
    in weight decay or frozen layers, so they repeat one configuration); empty when none do or
    ``settings`` (index: run; dataset, lr) is not given."""
    if settings is None or settings.empty:
        return ""
    known = settings.reindex([r for r in runs if r in settings.index])
    groups = [g for _, g in known.groupby(["dataset", "lr"], sort=True) if len(g) > 1]
    parts = [
        f"{', '.join(g.index)} share {g['dataset'].iloc[0]} at lr {g['lr'].iloc[0]:g}"
        for g in groups
    ]
    if not parts:
        return ""
    repeated = sum(len(g) for g in groups)
    return (
        f"near-duplicates: {'; '.join(parts)} ({repeated} of the {len(runs)} values repeat one "
        "configuration varied only in weight decay or frozen layers, so they are not "
        "independent replicates)"
    )
