"""The one way the book shows a table: :func:`format_table` turns a results frame (raw column
names such as ``d_entropy_pct``, ``p_holm``, ``lr``; numbers as computed) into the text a reader
sees; :func:`show_table` displays it. Pages keep the raw frame (tests read it) and show this.

Each column's label and kind come from :data:`COLUMNS`, then from a name pattern (``d_<m>_pct``,
``<m>_0``/``<m>_f``, ``zs_<d>…``, ``…_holm``), else from the name and the values. Cells:

- accuracy (stored as a fraction): in %, two decimals — 0.8731 → ``87.31``;
- change in % or in points: sign and two decimals — ``+1.23``, ``-0.40``; ``0.00`` when it
  rounds to zero (never ``-0.00``);
- p-value: three decimals, scientific below 0.001 — ``0.012``, ``2.0e-21``;
- learning rate: ``1e-5``, ``2.5e-4``;
- counts, ranks, layers: ints — 4.0 → ``4``;
- other numbers: fixed decimals, scientific when a non-zero value would print as zero;
- missing (NaN, None, NA): blank.

Units go in the column name (``Best accuracy (%)``, ``Δ Entropy (%)``), never in the cells.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from html import escape
from typing import Any

import pandas as pd
from IPython.display import HTML, display

from collapse_utils.analysis.published import short_name
from collapse_utils.analysis.stat_tables import UNIT_TITLES
from collapse_utils.book.style import (
    DATASET_NAMES,
    METHOD_NAMES,
    METRIC_NAMES,
    METRIC_UNITS,
    REGULARIZER_NAMES,
    delta_label,
    metric_label,
)

TEXT, INT, ACC, CHANGE, P, LR, NUMBER, GENERAL, BOOL = (
    "text", "int", "accuracy", "change", "p", "lr", "number", "general", "bool"
)  # fmt: skip


@dataclass(frozen=True)
class Column:
    """How one column is shown: ``label`` (with its unit), ``kind`` (one of the kinds above),
    ``digits`` (decimals of a ``number``) and ``values`` (names of text values)."""

    label: str
    kind: str = TEXT
    digits: int = 3
    values: Mapping[str, str] | Callable[[str], str] | None = None


def _targets(value: str) -> str:
    """``q_proj,v_proj`` → ``q, v``."""
    names = [t.strip().removesuffix("_proj").replace("out", "o") for t in value.split(",")]
    return ", ".join(names)


_METHODS = {**METHOD_NAMES, "pearson": "Pearson r", "spearman": "Spearman ρ"}

COLUMNS: dict[str, Column] = {
    # what a run is (analysis.results.run_summary)
    "run": Column("Run"),
    "seed": Column("Seed", INT),
    "seeds": Column("Seeds", INT),
    "family": Column("Family", values=lambda v: v.replace("_", " ")),
    "method": Column("Method", values=_METHODS),
    "dataset": Column("Dataset", values=DATASET_NAMES),
    "lr": Column("Learning rate", LR),
    "weight_decay": Column("Weight decay", GENERAL),
    "rank": Column("LoRA rank", INT),
    "targets": Column("LoRA targets", values=_targets),
    "freeze_layers": Column("Frozen layers", INT),
    "reg_kind": Column("Regularizer", values=REGULARIZER_NAMES),
    "lam": Column("λ", GENERAL),
    "best_acc": Column("Best accuracy (%)", ACC),
    "final_acc": Column("Final accuracy (%)", ACC),
    "status": Column("Status"),
    "layer": Column("Layer", INT),
    "metric": Column("Metric"),
    "mean": Column("Mean", NUMBER),
    "std": Column("SD", NUMBER),
    "min": Column("Min", NUMBER),
    "max": Column("Max", NUMBER),
    "value": Column("Value"),
    **{metric: Column(metric_label(metric), NUMBER) for metric in METRIC_NAMES},
    # §6.4 A (stat_tables.unit_comparison_table)
    "unit": Column("Unit of analysis", values=UNIT_TITLES),
    "n_full": Column("n Full FT", INT),
    "n_lora": Column("n LoRA", INT),
    "mean_full": Column("Mean Δ Entropy, Full FT (%)", CHANGE),
    "ci_full_low": Column("95% CI low, Full FT (%)", CHANGE),
    "ci_full_high": Column("95% CI high, Full FT (%)", CHANGE),
    "mean_lora": Column("Mean Δ Entropy, LoRA (%)", CHANGE),
    "ci_lora_low": Column("95% CI low, LoRA (%)", CHANGE),
    "ci_lora_high": Column("95% CI high, LoRA (%)", CHANGE),
    "welch_t": Column("Welch t", NUMBER, 2),
    "welch_dof": Column("Welch df", NUMBER, 1),
    "welch_p": Column("Welch p", P),
    "mwu_u": Column("Mann-Whitney U", NUMBER, 1),
    "mwu_p": Column("Mann-Whitney p", P),
    "cohen_d": Column("Cohen's d", NUMBER, 2),
    # §6.4 B (lr_sweep_points, lr_correlations)
    "log10_lr": Column("log₁₀ learning rate", NUMBER, 2),
    "n": Column("n", INT),
    "r": Column("r", NUMBER, 3),
    "p_asymptotic": Column("p (asymptotic)", P),
    "p_exact": Column("p (exact)", P),
    "p_used": Column("p used"),
    "p_claim": Column("p of the claim", P),
    # §6.4 C (regularizer_tests)
    "n_layers": Column("Layers", INT),
    "mean_diff": Column("Mean layer difference (points)", CHANGE),
    "t": Column("t", NUMBER, 2),
    "dof": Column("df", NUMBER, 1),
    "p": Column("p", P),
    "d_av": Column("Cohen's d (average SD)", NUMBER, 2),
    "d_z": Column("Cohen's dz (paired)", NUMBER, 2),
    # §6.4 D (layer_anova_table)
    "f": Column("F", NUMBER, 2),
    # §3.10 (correlation_pairs)
    "a": Column("Metric A", values=delta_label),
    "b": Column("Metric B", values=delta_label),
    # §3.9 and convergence (dynamics_table, convergence_table)
    "onset_fraction": Column("Collapse onset (fraction of training)", NUMBER, 2),
    "max_abs_velocity": Column("Largest |entropy velocity| (nats per training)", NUMBER, 3),
    "at_fraction": Column("At (fraction of training)", NUMBER, 2),
    "epochs": Column("Epochs", INT),
    "late_std": Column("SD of the last epochs' accuracy (points)", ACC),
    "converged": Column("Converged", BOOL),
    # Study B (analysis.study_b): representation signals, retention, paired tests, rankings
    "test_acc": Column("Test accuracy (%)", ACC),
    "cka_mean_f": Column("CKA to pre-trained, layer mean", NUMBER),
    "cka_last_f": Column("CKA to pre-trained, last layer", NUMBER),
    "embedding_drift_f": Column("Embedding drift", NUMBER),
    "weight_drift_f": Column("Relative weight drift", NUMBER, 4),
    "cka_mean_e1": Column("CKA to pre-trained after epoch 1", NUMBER),
    "cka_last_e1": Column("CKA last layer after epoch 1", NUMBER),
    "embedding_drift_e1": Column("Embedding drift after epoch 1", NUMBER),
    "weight_drift_e1": Column("Relative weight drift after epoch 1", NUMBER, 4),
    "cka_mean_sel": Column("CKA to pre-trained, layer mean", NUMBER),
    "cka_last_sel": Column("CKA to pre-trained, last layer", NUMBER),
    "embedding_drift_sel": Column("Embedding drift", NUMBER),
    "weight_drift_sel": Column("Relative weight drift", NUMBER, 4),
    "d_entropy_last_pct_sel": Column("Δ Entropy, last layer (%)", CHANGE),
    "abs_d_entropy_last_pct_sel": Column("|Δ Entropy|, last layer (%)", NUMBER, 2),
    "train_loss_f": Column("Final training loss", NUMBER),
    "probe_retention_e1": Column("Labelled-probe retention after epoch 1 (%)", ACC),
    "selected_epoch": Column("Selected epoch", INT),
    "model": Column("Backbone", values=short_name),
    "unit_rho": Column("Spearman ρ over the bootstrap units", NUMBER, 2),
    "n_units": Column("Bootstrap units", INT),
    "kind": Column("Kind"),
    "rho_within": Column("Mean ρ within dataset", NUMBER, 2),
    "rho_within_method": Column("Mean ρ within dataset × method", NUMBER, 2),
    "lrs": Column("Learning rates", INT),
    "auc": Column("Cell-level AUC for damage", NUMBER, 2),
    "damaged_low": Column("Damaged cells score lower", BOOL),
    "n_damaged": Column("Damaged cells", INT),
    "n_healthy": Column("Other cells", INT),
    "picked": Column("Picked run"),
    "retention": Column("Retention of the pick (%)", ACC),
    "regret": Column("Regret against the oracle (points)", ACC),
    "range_fraction": Column("Place between worst and oracle (0–1)", NUMBER, 2),
    "candidates": Column("Candidates", INT),
    "cutoff": Column("Validation cut-off (%)", NUMBER, 2),
    "oracle": Column("Oracle retention (%)", ACC),
    "random": Column("Random pick, expected (%)", ACC),
    "worst": Column("Worst candidate (%)", ACC),
    "on_frontier": Column("On the frontier", BOOL),
    "corruption_mean_acc": Column("Corruption accuracy, mean of 7 splits (%)", ACC),
    "corruption_gap": Column("Clean − corruption accuracy (points)", ACC),
    "outcome": Column("Outcome", values=lambda v: column_spec(v).label),
    "predictor": Column("Signal", values=lambda v: column_spec(v).label),
    "quantity": Column("Quantity"),
    "authors": Column("The authors' summary.json", NUMBER),
    "ours": Column("This book's code", NUMBER),
    "agree": Column("Agree", BOOL),
    "claim": Column("Question"),
    "verdict": Column("Our rule's verdict"),
    "conclusion": Column("The authors' revised conclusion"),
    "mean_a": Column("Mean, Full FT", NUMBER),
    "mean_b": Column("Mean, LoRA", NUMBER),
    "diff": Column("Mean difference (Full FT − LoRA)", NUMBER),
    "p_t": Column("Paired t p", P),
    "p_wilcoxon": Column("Wilcoxon p", P),
    "rho": Column("Spearman ρ", NUMBER, 2),
    "abs_rho_within": Column("Mean |ρ| within dataset", NUMBER, 2),
    "abs_rho_within_method": Column("Mean |ρ| within dataset × method", NUMBER, 2),
    "ci_low": Column("|ρ| 95% CI low", NUMBER, 2),
    "ci_high": Column("|ρ| 95% CI high", NUMBER, 2),
    "gap": Column("|ρ| gap to the best", NUMBER, 2),
    "gap_low": Column("Gap 95% CI low", NUMBER, 2),
    "gap_high": Column("Gap 95% CI high", NUMBER, 2),
    # reproducibility
    "config_hash": Column("Config hash"),
    "device": Column("Device"),
    "wall_time_s": Column("Wall time (s)", NUMBER, 1),
    "package": Column("Package"),
    "version": Column("Version"),
    # the WiSE-FT path (book.interpolation_page.recovery)
    "zs_loss": Column("Zero-shot accuracy lost, α = 0 → 1 (points)", ACC),
    "alpha_half": Column("α½: half the loss back", NUMBER, 2),
    **{
        f"{m}_back": Column(f"{name} change back at α½ (%)", NUMBER, 0)
        for m, name in METRIC_NAMES.items()
    },  # fmt: skip
    "linear_back": Column("A straight line at α½ (%)", NUMBER, 0),
}


def _metric(name: str) -> str:
    return METRIC_NAMES.get(name, name.replace("_", " "))


def _unit(metric: str) -> str:
    return f" ({METRIC_UNITS[metric]})" if metric in METRIC_UNITS else ""


def _dataset(name: str) -> str:
    return DATASET_NAMES.get(name, name)


PATTERNS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], Column]]] = [
    (re.compile(r"d_(\w+)_pct"), lambda m: Column(f"Δ {_metric(m[1])} (%)", CHANGE)),
    (re.compile(r"d_(\w+)_pct_sel"), lambda m: Column(f"Δ {_metric(m[1])} (%)", CHANGE)),
    (re.compile(r"d_(\w+)_pct_e1"),
     lambda m: Column(f"Δ {_metric(m[1])} after epoch 1 (%)", CHANGE)),
    (re.compile(r"abs_d_(\w+)_pct(?:_sel)?"),
     lambda m: Column(f"|Δ {_metric(m[1])}| (%)", NUMBER, 2)),
    (re.compile(r"abs_d_(\w+)_pct_e1"),
     lambda m: Column(f"|Δ {_metric(m[1])}| after epoch 1 (%)", NUMBER, 2)),
    (re.compile(r"zs_(\w+)_pretrained"),
     lambda m: Column(f"Zero-shot {_dataset(m[1])}, pre-trained (%)", ACC)),
    (re.compile(r"zs_(\w+)_merged"),
     lambda m: Column(f"Zero-shot {_dataset(m[1])}, trained model (%)", ACC)),
    (re.compile(r"zs_(\w+)_change"),
     lambda m: Column(f"Zero-shot {_dataset(m[1])} change (points)", CHANGE)),
    (re.compile(r"zs_(\w+)"), lambda m: Column(f"Zero-shot {_dataset(m[1])} (%)", ACC)),
    (re.compile(rf"({'|'.join(METRIC_NAMES)})_0"),
     lambda m: Column(f"{_metric(m[1])} before{_unit(m[1])}", NUMBER)),
    (re.compile(rf"({'|'.join(METRIC_NAMES)})_f"),
     lambda m: Column(f"{_metric(m[1])} final{_unit(m[1])}", NUMBER)),
    (re.compile(r"(early|middle|late)_layers"), lambda m: Column(f"{m[1].capitalize()} layers")),
    (re.compile(r"(early|middle|late)_mean"),
     lambda m: Column(f"{m[1].capitalize()} mean Δ Entropy (%)", CHANGE)),
    (re.compile(r"(early|middle|late)_sd"),
     lambda m: Column(f"{m[1].capitalize()} SD (points)", NUMBER, 2)),
    (re.compile(r"(\w+)_holm"), lambda m: Column(f"{column_spec(m[1]).label} (Holm)", P)),
    (re.compile(r"rho_(\w+)"),
     lambda m: Column(f"ρ with retention: {column_spec(m[1]).label.split(' (')[0]}", NUMBER, 2)),
    (re.compile(r"retention_([a-z0-9]+)"),
     lambda m: Column(f"Zero-shot retention {_dataset(m[1])} (%)", ACC)),
    (re.compile(r"(\w+)_mean"), lambda m: _summary_of(m[1], "mean")),
    (re.compile(r"(\w+)_sd"), lambda m: _summary_of(m[1], "SD")),
]  # fmt: skip


def _summary_of(name: str, statistic: str) -> Column:
    """``<column>_mean``/``_sd`` of a cell table: the column's label and kind, then the
    statistic. An SD carries no sign: a change's SD shows as a plain number."""
    spec = column_spec(name)
    kind = NUMBER if statistic == "SD" and spec.kind == CHANGE else spec.kind
    digits = 2 if spec.kind == CHANGE else spec.digits
    return Column(f"{spec.label}, {statistic}", kind, digits, spec.values)


def column_spec(name: Any, values: pd.Series | pd.Index | None = None) -> Column:
    """How the column (or index level) ``name`` is shown: :data:`COLUMNS`, then
    :data:`PATTERNS`, else the name with spaces for underscores and a kind from ``values``."""
    key = str(name)
    if key in COLUMNS:
        return COLUMNS[key]
    for pattern, spec in PATTERNS:
        match = pattern.fullmatch(key)
        if match:
            return spec(match)
    label = key.replace("_", " ")
    label = label[:1].upper() + label[1:]
    return Column(label, _kind_of(values) if values is not None else TEXT)


def _kind_of(values: pd.Series | pd.Index) -> str:
    if pd.api.types.is_bool_dtype(values):
        return BOOL
    if pd.api.types.is_integer_dtype(values):
        return INT
    if pd.api.types.is_float_dtype(values):
        finite = pd.Series(values, dtype=float).dropna()
        return INT if len(finite) and (finite == finite.round()).all() else NUMBER
    return TEXT


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def format_lr(value: float) -> str:
    """A learning rate as ``1e-5``, ``2.5e-4`` (shortest mantissa, no exponent padding)."""
    mantissa, exponent = f"{value:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def format_p(value: float) -> str:
    """A p-value: three decimals, ``2.0e-21`` below 0.001 (``<1e-300`` when it underflowed)."""
    if value == 0:
        return "<1e-300"
    return f"{value:.1e}" if value < 0.001 else f"{value:.3f}"


def format_change(value: float, digits: int = 2) -> str:
    """A signed change, ``+1.25``; no sign on what rounds to zero (``0.00``, never ``-0.00``)."""
    text = f"{value:+.{digits}f}"
    return text[1:] if not text.strip("+-0.") else text


def format_number(value: float, digits: int = 3) -> str:
    """``digits`` decimals; scientific (two significant digits) when a non-zero value would
    print as zero; ``inf`` as ``∞``."""
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if value != 0 and abs(value) < 0.5 * 10**-digits:
        return f"{value:.1e}"
    return _unsigned_zero(f"{value:.{digits}f}")


def _unsigned_zero(text: str) -> str:
    """``-0.00`` (a negative value, or -0.0, that rounds to zero) as ``0.00``."""
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text


def format_value(value: Any, spec: Column) -> str:
    """One cell as text, by ``spec.kind``; missing values are blank."""
    if _missing(value):
        return ""
    kind = spec.kind
    if kind == BOOL:
        return "yes" if bool(value) else "no"
    if kind == TEXT and isinstance(value, (int, float)) and not isinstance(value, bool):
        kind = NUMBER  # a number in a column of text still reads as a number
    if kind == TEXT or isinstance(value, str):
        text = str(value)
        if isinstance(spec.values, Mapping):
            return spec.values.get(text, text)
        return spec.values(text) if spec.values is not None else text
    value = float(value)
    if kind == INT:
        return str(int(round(value)))
    if kind == ACC:
        return _unsigned_zero(f"{100 * value:.2f}")
    if kind == CHANGE:
        return format_change(value)
    if kind == P:
        return format_p(value)
    if kind == LR:
        return format_lr(value)
    if kind == GENERAL:
        return f"{value:g}"
    return format_number(value, spec.digits)


NUMERIC = (INT, ACC, CHANGE, P, LR, NUMBER, GENERAL)


def format_table(frame: pd.DataFrame, columns: Mapping[str, Column] | None = None) -> pd.DataFrame:
    """``frame`` as the book shows it: every cell and index value as text (the rules of this
    module), columns and index levels under their human names. ``columns`` overrides
    :func:`column_spec` for some names."""
    shown, _ = _formatted(frame, columns)
    return shown


def _formatted(
    frame: pd.DataFrame, columns: Mapping[str, Column] | None
) -> tuple[pd.DataFrame, list[bool]]:
    """:func:`format_table` and, per column, whether it holds numbers (aligned right)."""
    overrides = dict(columns or {})

    def spec(name: Any, values: pd.Series | pd.Index) -> Column:
        return overrides.get(str(name)) or column_spec(name, values)

    cells, labels, numeric = {}, [], []
    for position, name in enumerate(frame.columns):
        values = frame.iloc[:, position]
        column = spec(name, values)
        cells[position] = [format_value(v, column) for v in values]
        labels.append(column.label)
        numeric.append(column.kind in NUMERIC or pd.api.types.is_numeric_dtype(values))
    shown = pd.DataFrame(cells, index=_format_index(frame.index, spec), dtype=object)
    shown.columns = labels
    return shown, numeric


def _format_index(index: pd.Index, spec: Callable[[Any, pd.Index], Column]) -> pd.Index:
    if _plain_index(index):
        return pd.RangeIndex(len(index))
    levels = []
    for level in range(index.nlevels):
        values = index.get_level_values(level)
        name = index.names[level]
        column = spec(name, values) if name is not None else Column("", _kind_of(values))
        levels.append(([format_value(v, column) for v in values], column.label or None))
    if index.nlevels == 1:
        values, name = levels[0]
        return pd.Index(values, name=name)
    return pd.MultiIndex.from_arrays([v for v, _ in levels], names=[n for _, n in levels])


def _plain_index(index: pd.Index) -> bool:
    """A default 0, 1, 2 … index: row labels that mean nothing, left out of the table."""
    return isinstance(index, pd.RangeIndex) and index.name is None


# A table longer than this many rows is folded: its caption stays in view as the summary of a
# <details> block the reader opens (a page's figure shows the same numbers at a glance).
FOLD_ROWS = 25
BLANK_NOTE = "A blank cell: not measured for that run (or not defined, as a p-value of one run)."


def table_html(
    frame: pd.DataFrame, columns: Mapping[str, Column] | None = None, caption: str = ""
) -> str:
    """:func:`format_table` of ``frame`` as an HTML table: ``caption`` above it, one header row
    (index names, then column names), numbers aligned right, a repeated outer index value left
    blank, inside a block that scrolls sideways when the table is wider than the page
    (``book/_static/book.css``). A table with a blank cell says once, under it, what a blank
    means; one longer than :data:`FOLD_ROWS` rows is folded behind its caption."""
    shown, numeric = _formatted(frame, columns)
    rows = [tuple(r) if isinstance(r, tuple) else (r,) for r in shown.index]
    names = [] if _plain_index(frame.index) else [n or "" for n in shown.index.names]
    align = ["num" if n else "text" for n in numeric]
    head = "".join(f'<th class="index">{escape(n)}</th>' for n in names)
    head += "".join(
        f'<th class="{a}">{escape(c)}</th>' for a, c in zip(align, shown.columns, strict=True)
    )
    body = []
    previous: tuple = ()
    for labels, values in zip(rows, shown.itertuples(index=False), strict=True):
        cells = ""
        if names:
            for level, label in enumerate(labels):
                repeated = level < len(labels) - 1 and labels[: level + 1] == previous[: level + 1]
                cells += f"<th>{'' if repeated else escape(label)}</th>"
        previous = labels
        cells += "".join(
            f'<td class="{a}">{escape(v)}</td>' for a, v in zip(align, values, strict=True)
        )
        body.append(f"<tr>{cells}</tr>")
    table = (
        f'<table class="book-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )
    blank = (shown == "").to_numpy().any()
    note = f'<p class="table-note">{BLANK_NOTE}</p>' if blank else ""
    block = f'<div class="table-scroll">{table}</div>{note}'
    if len(shown) > FOLD_ROWS:
        summary = escape(f"{caption} ({len(shown)} rows: open to read)")
        return f'<details class="table-fold"><summary>{summary}</summary>{block}</details>'
    # The caption sits above the scrolling block, so that a wide table never scrolls it away.
    title = f'<p class="table-caption">{escape(caption)}</p>' if caption else ""
    return f'<div class="table-block">{title}{block}</div>'


def show_table(
    frame: pd.DataFrame, caption: str, columns: Mapping[str, Column] | None = None
) -> None:
    """Display ``frame`` formatted under ``caption`` (:func:`table_html`: one sentence saying
    what a row is and what to read); nothing for an empty frame."""
    if not caption:
        raise ValueError("a table shown in the book needs a caption")
    if not frame.empty:
        display(HTML(table_html(frame, columns, caption)))
