"""The reproduction check: every number the report publishes (``params/report/
report_numbers.yaml``, :mod:`~collapse_utils.analysis.reproduction`) beside this build's, with
the difference and a flag where it exceeds the quantity's tolerance; and what the report's own
numbers say about the numbers it quotes. ``notebooks/12_reproduction_check.ipynb`` shows it,
one table of the report per call of :meth:`ReproductionChapter.table`.

The build's side comes from the same tables as the rest of the book (``analysis.results``,
``analysis.stat_tables``), on the runs ``params/families.yaml`` names for each test; a number
whose run is missing is *not in this build*, never an error.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from collapse_utils.analysis import reproduction as rp
from collapse_utils.analysis import stat_tables
from collapse_utils.analysis.stats import DELTA_COLUMNS, metric_correlations
from collapse_utils.book import figures
from collapse_utils.book.findings_chapter import StudyRuns
from collapse_utils.book.page import Page
from collapse_utils.book.style import DATASET_NAMES, delta_label
from collapse_utils.book.tables import (
    TEXT,
    Column,
    column_spec,
    format_lr,
    format_number,
    format_p,
    show_table,
)
from collapse_utils.config import (
    METRICS,
    PARAMS_DIR,
    ConfigError,
    available_experiments,
    load_config,
)

ROW_NAMES = {
    "pretrained": "pre-trained model",
    "layer": "layers pooled",
    "pearson": "Pearson r",
    "spearman": "Spearman ρ",
    "mean": "mean over layers",
    "std": "SD over layers",
    "min": "lowest layer",
    "max": "highest layer",
}
QUANTITY_NAMES = {
    "best_acc_pct": "Best accuracy",
    "zs_cifar100_pct": "Zero-shot CIFAR-100 accuracy",
    "zs_cifar100_change_pct": "Zero-shot CIFAR-100 change",
    "sd_full": "SD, Full FT",
    "sd_lora": "SD, LoRA",
    "abs_cohen_d": "|Cohen's d|",
    "layer": "Most affected layer",
    "p_asymptotic": "p (asymptotic)",
}
SHOWN = {  # what a reader compares first (the two values) comes first
    "row": Column("Row"),
    "quantity": Column("Quantity"),
    "report": Column("Report", TEXT),
    "ours": Column("This build", TEXT),
    "flag": Column("Flag"),
    "difference": Column("Difference", TEXT),
    "tolerance": Column("Tolerance", TEXT),
    "unit": Column("Unit"),
}
KIND_COLUMNS = {
    "kind": Column("Kind"),
    "unit": Column("Unit"),
    "tolerance": Column("Tolerance", TEXT),
    "why": Column("Why this tolerance"),
}


def row_name(table: str, row: str) -> str:
    """How the page names a row of a report table."""
    if table == "baseline_layers":
        return f"layer {row}"
    if table == "correlations":
        a, b = row.split("~")
        return f"{delta_label(a)} ↔ {delta_label(b)}"
    return ROW_NAMES.get(row, row)


def quantity_name(column: str) -> str:
    """A column's label without its unit (the unit has a column of its own)."""
    if column in QUANTITY_NAMES:
        return QUANTITY_NAMES[column]
    return re.sub(r" \([^)]*\)$", "", column_spec(column).label)


def format_quantity(value: float, kind: rp.Kind, relation: str = "=") -> str:
    """A value as the report prints its kind (p-values as the book prints them); blank if
    missing; a bound with its relation."""
    if np.isnan(value):
        return ""
    if kind.name == "p_value":
        text = format_p(value)
    elif kind.name == "learning_rate":
        text = format_lr(value) if value else "0"
    else:
        text = format_number(value, kind.decimals)
    return f"{relation} {text}" if relation != "=" else text


def format_difference(value: float, kind: rp.Kind) -> str:
    if np.isnan(value):
        return ""
    if kind.name == "learning_rate":
        return ("+" if value >= 0 else "-") + format_lr(abs(value)) if value else "0"
    digits = 3 if kind.name == "p_value" else kind.decimals
    return ("+" if value >= 0 else "-") + format_number(abs(value), digits)


class ReproductionChapter:
    """The report's numbers (``numbers``), this build's beside them (``comparison``, one row
    per published number) and the report's checks against itself (``checks``)."""

    def __init__(self, profile: str, params_dir: Path | str = PARAMS_DIR, show: bool = True):
        self.profile = profile
        self.params_dir = Path(params_dir)
        self.study = StudyRuns(profile, self.params_dir)
        self.page = Page(profile, self.study.output_root, show)
        self.numbers = rp.load_report_numbers()
        ours = rp.build_values(self.numbers, self.build_frames())
        self.comparison = rp.compare(self.numbers, ours)
        self.checks = rp.report_checks(self.numbers, self.report_floor_ratio())

    # --- this build's numbers in the report's layout ------------------------------------------

    def build_frames(self) -> dict[str, pd.DataFrame]:
        """One frame per report table the build has numbers for (index: the report's rows,
        columns: the report's column names)."""
        study = self.study
        frames: dict[str, pd.DataFrame] = {}
        if not study.means.empty:
            runs = rp.run_frame(study.means)
            for name in ("appendix_runs", "grand_comparison", "lr_sweep", "zeroshot"):
                frames[name] = runs
        for name, table in self.numbers.tables.items():
            layers = self.baseline_layers(table.run) if table.run else None
            if layers is not None:
                frames[name] = rp.baseline_frames(layers)[name]
        if study.delta.empty:
            return frames
        frames["per_layer_extremes"] = rp.per_layer_extremes(study.delta)
        frames["layer_anova"] = rp.layer_anova_frame(
            stat_tables.layer_anova_table(study.delta, list(study.chosen.layer_anova))
        )
        # Like with like: the report's §6.4 C paired final per-layer entropy in nats.
        frames["regularizers"] = stat_tables.regularizer_tests(
            study.summary, study.final, study.reference
        )
        points = stat_tables.lr_sweep_points(
            study.summary, study.family_runs(study.chosen.lr_sweep)
        )
        frames["lr_correlation"] = stat_tables.lr_correlations(points)
        frames["full_vs_lora"] = rp.full_vs_lora_frame(self.layer_pooled())
        columns = study.summary[list(DELTA_COLUMNS)].dropna()
        if len(columns) >= 3 and (columns.nunique() > 1).all():  # r is undefined otherwise
            matrix = metric_correlations(study.summary)
            frames["correlations"] = rp.correlation_frame(stat_tables.correlation_pairs(matrix))
        return frames

    def baseline_layers(self, run: str) -> pd.DataFrame | None:
        """Per-layer metrics (index 1..L, columns the metrics) of ``run`` at its first eval."""
        found = [h for h in self.study.histories if h.id == run and h.evals]
        if not found:
            return None
        metrics = found[0].evals[0].metrics
        frame = pd.DataFrame({m: metrics[m] for m in METRICS})
        frame.index = range(1, len(frame) + 1)
        return frame

    def layer_pooled(self):
        """§6.4 A's layer-pooled comparison, as the statistics chapter computes it."""
        study = self.study
        family = study.families[study.chosen.method_comparison]
        dataset = load_config(self.profile, family.reference, self.params_dir).data.dataset
        comparisons, _ = stat_tables.full_vs_lora_comparisons(
            study.summary, study.delta, study.family_runs(study.chosen.method_comparison), dataset
        )
        return comparisons["layer"].result if "layer" in comparisons else None

    def report_floor_ratio(self) -> float | None:
        """The entropy floor of the report's code: ``reg.floor_ratio`` under the ``full``
        profile (the authors' protocol) of the report's entropy-floor runs, or of any
        configuration when those are not in the params (it is a profile setting)."""
        available = available_experiments(self.params_dir)
        floored = [r for r in self.numbers.runs_with(regularizer="entropy_floor") if r in available]
        candidates = floored or available
        if not candidates:
            return None
        try:
            return load_config("full", candidates[0], self.params_dir).reg.floor_ratio
        except ConfigError:
            return None  # a params folder without the full profile: the check is left out

    # --- what the page shows ------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        flags = self.comparison["flag"].value_counts()
        return {flag: int(flags.get(flag, 0)) for flag in (rp.WITHIN, rp.DIFFERS, rp.NOT_RUN)}

    def expectation_markdown(self) -> str:
        """What to expect of the comparison, said once: on a smoke build, that every row differs."""
        if self.profile == "smoke":
            return (
                "**This is a smoke build**: a tiny random CLIP trained for a few steps on "
                "synthetic images. Every row below is expected to differ from the report and to "
                "be flagged; what the comparison checks here is that every published number has a "
                "counterpart in the build, not the numbers."
            )
        return (
            f"This build uses the `{self.profile}` profile. A row is flagged when the difference "
            "exceeds the tolerance of its kind of quantity (table below); rows whose run is not "
            "in this build are marked so."
        )

    def checks_markdown(self) -> str:
        lines = []
        for check in self.checks:
            verdict = "holds" if check.holds else "**does not hold**"
            lines.append(
                f"- **{check.topic}** ({check.section}) — {verdict}.\n"
                f"  *The report:* {check.report_says}\n"
                f"  *From its own numbers:* {check.recomputed}"
            )
        return "\n".join(lines)

    def this_build_markdown(self) -> str:
        """The same two questions on this build's runs: was the entropy floor reached, and is
        LoRA's zero-shot accuracy exactly the pre-trained model's."""
        lines = []
        for h in self.study.trained:
            reg = h.config["reg"]
            if reg["kind"] != "entropy_floor" or not h.evals:
                continue
            entropy = np.array([e.metrics["entropy"] for e in h.evals], dtype=float)
            margin = rp.floor_margin(entropy, reg["floor_ratio"])
            reached = "reached it" if margin <= 1 else "never reached it"
            lines.append(
                f"- {h.id} (seed {h.seed}): the lowest layer-mean entropy over its evaluations is "
                f"{margin:.2f} × its floor ({reg['floor_ratio']:g} × the layer's entropy at the "
                f"start): a layer mean {reached}."
            )
        lora = [h for h in self.study.trained if h.method == "lora" and h.zeroshot]
        for dataset in sorted({d for h in lora for d in h.zeroshot}):
            runs = [h for h in lora if dataset in h.zeroshot]
            same = [
                h.id
                for h in runs
                if h.zeroshot[dataset].accuracy == h.zeroshot[dataset].pretrained_accuracy
            ]
            name = DATASET_NAMES.get(dataset, dataset)
            lines.append(
                f"- {len(same)} of {len(runs)} LoRA runs have {name} zero-shot accuracy equal to "
                "the pre-trained model's" + (f" ({', '.join(same)})." if same else ".")
            )
        if not lines:
            return "No entropy-floor run and no LoRA run with zero-shot results is complete."
        return "\n".join(lines)

    def counts_sentence(self) -> str:
        counts = self.counts()
        return (
            f"Of the report's {len(self.comparison)} published numbers, {counts[rp.WITHIN]} are "
            f"within tolerance in this build, {counts[rp.DIFFERS]} differ and "
            f"{counts[rp.NOT_RUN]} have no counterpart in it (their run is not complete)."
        )

    # --- the steps of the notebook: each shows its part of the page ----------------------------

    def expectation(self) -> None:
        """What to expect of the comparison, and how many numbers reproduce."""
        self.page.note(self.expectation_markdown() + "\n\n" + self.counts_sentence())

    def own_checks(self) -> None:
        """The report's quoted numbers recomputed from its own tables."""
        self.page.note(self.checks_markdown())

    def this_build(self) -> None:
        """The same two questions asked of this build's runs."""
        self.page.note(self.this_build_markdown())

    def conclusion(self) -> None:
        """The page's conclusion in two sentences, shown under the notebook's heading."""
        failed = [c.topic for c in self.checks if not c.holds]
        self.page.conclusion(
            self.counts_sentence().removesuffix(" (their run is not complete).") + ". "
            f"Checked against its own tables, {len(failed)} of the report's {len(self.checks)} "
            "checked statements do not hold" + (": " + "; ".join(failed) if failed else "") + "."
        )

    def overview(self) -> None:
        """Every published number against this build's, one panel per kind of quantity."""
        units = {k.name: k.unit for k in self.numbers.kinds.values()}
        self.page.figure(
            "extra_reproduction_scatter",
            figures.report_vs_build(self.comparison, units),
            "Each published number (x) against this build's (y), one panel per kind of "
            "quantity: points on the diagonal reproduce; red points differ by more than the "
            "kind's tolerance. The tables below list every point.",
        )

    def tolerances(self) -> pd.DataFrame:
        """The tolerance of each kind of quantity, with its reason."""
        kinds = self.numbers.kinds.values()
        table = pd.DataFrame(
            [
                {
                    "kind": k.name.replace("_", " "),
                    "unit": k.unit,
                    "tolerance": format_quantity(k.tolerance, k),
                    "why": k.why,
                }
                for k in kinds
            ]
        )
        self.page.tables["tolerances"] = table
        if self.page.show:
            show_table(
                table.set_index("kind"),
                self.page.numbered(
                    "How close a number of this build must come to the report's, per kind of "
                    "quantity, and why."
                ),
                KIND_COLUMNS,
            )
        return table

    def table(self, name: str) -> pd.DataFrame:
        """One report table: its heading and section, then every published number of it beside
        this build's. Returns the raw rows (numbers, not text)."""
        report_table = self.numbers.tables[name]
        rows = self.comparison[self.comparison["table"] == name].reset_index(drop=True)
        self.page.tables[name] = rows
        if self.page.show:
            show_table(
                self.shown(rows),
                self.page.numbered(
                    f"{report_table.title} (report {report_table.section}): every published "
                    "number beside this build's, their difference and the kind's tolerance."
                ),
                SHOWN,
            )
        return rows

    def shown(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The comparison rows as the page shows them: every number as text in its kind's
        format."""
        kinds = [self.numbers.kinds[k] for k in rows["kind"]]
        return pd.DataFrame(
            {
                "row": [row_name(t, r) for t, r in zip(rows["table"], rows["row"], strict=True)],
                "quantity": [quantity_name(c) for c in rows["column"]],
                "report": [
                    format_quantity(v, k, rel)
                    for v, k, rel in zip(rows["report"], kinds, rows["relation"], strict=True)
                ],
                "ours": [format_quantity(v, k) for v, k in zip(rows["ours"], kinds, strict=True)],
                "flag": rows["flag"],
                "difference": [
                    format_difference(v, k) for v, k in zip(rows["difference"], kinds, strict=True)
                ],
                "tolerance": [format_quantity(k.tolerance, k) for k in kinds],
                "unit": [k.unit for k in kinds],
            }
        ).set_index("row")
