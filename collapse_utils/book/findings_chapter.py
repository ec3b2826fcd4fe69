"""The findings chapter: for each research question (``book/intro.md``, report §1.3) the
report's answer, what the same verdict rule says on the report's own published numbers and on
this build's runs, and links to the pages with the detail. ``notebooks/00_findings.ipynb``
shows it.

The rules are :mod:`~collapse_utils.analysis.verdicts`; the report's numbers come from
:mod:`~collapse_utils.analysis.reproduction`; the tests behind the build's evidence are those of
the statistics chapter (:mod:`~collapse_utils.analysis.stat_tables`), on the runs that
``params/families.yaml`` names for them. Any subset of runs renders: a claim whose runs are
missing is *inconclusive at this n* with the reason.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pandas as pd

from collapse_utils.analysis import published, stat_tables, study_b, verdicts
from collapse_utils.analysis.reproduction import (
    ReportNumbers,
    load_report_numbers,
    report_verdicts,
)
from collapse_utils.analysis.results import (
    load_histories,
    per_layer_delta,
    per_layer_final,
    run_means,
    run_summary,
    zeroshot_change,
    zeroshot_datasets,
)
from collapse_utils.analysis.verdicts import Verdict
from collapse_utils.book.page import EXECUTED, Page, doc_link
from collapse_utils.book.style import SETTING_NAMES
from collapse_utils.book.tables import (
    CHANGE,
    INT,
    TEXT,
    Column,
    format_change,
    format_p,
    show_table,
)
from collapse_utils.config import (
    PARAMS_DIR,
    available_experiments,
    load_config,
    load_family,
    profile_output_root,
)
from collapse_utils.families import (
    REPORT_STUDY,
    comparison_ids,
    load_families,
    load_statistics_runs,
    report_ids,
)

STATISTICS = ("08_statistics", "Statistics")
PUBLISHED = ("14_study_b_published", "Study B on the authors' published runs")
PUBLISHED_LINK = f"{{doc}}`the authors' published runs <{EXECUTED}/{PUBLISHED[0]}>`"
ZERO_SHOT = ("07_zero_shot", "Zero-shot transfer")
REPRODUCTION = ("12_reproduction_check", "Reproduction check")


def run_settings(profile: str, params_dir: Path | str = PARAMS_DIR) -> pd.DataFrame:
    """What each configuration of ``params_dir`` is (index: id): method, reg_kind, family,
    dataset, lr; from the experiment files, whether or not the run exists."""
    rows = {}
    for run in available_experiments(Path(params_dir)):
        config = load_config(profile, run, params_dir)
        rows[run] = {
            "method": config.train.method,
            "reg_kind": config.reg.kind,
            "family": config.family,
            "dataset": config.data.dataset,
            "lr": config.train.lr,
        }
    return pd.DataFrame.from_dict(
        rows, orient="index", columns=["method", "reg_kind", "family", "dataset", "lr"]
    )


class StudyRuns:
    """What both chapters read: the complete runs of ``profile`` as tables (``summary`` of the
    trained runs, seed ``means``, per-layer ``delta`` and ``final``), what each configuration is
    (``settings``), the families and the runs the statistics single out."""

    def __init__(self, profile: str, params_dir: Path | str = PARAMS_DIR):
        self.profile = profile
        self.params_dir = params_dir = Path(params_dir)
        self.output_root = profile_output_root(profile, params_dir)
        self.families = load_families(params_dir)
        self.chosen = load_statistics_runs(params_dir)
        self.settings = run_settings(profile, params_dir)
        # Study B has its own page: the report's chapters read the report's runs.
        self.histories = load_histories(self.output_root, ids=set(report_ids(profile, params_dir)))
        self.trained = stat_tables.trained(self.histories)
        self.summary = run_summary(self.trained)
        self.means = run_means(self.summary) if not self.summary.empty else pd.DataFrame()
        self.delta = per_layer_delta(self.trained) if self.trained else pd.DataFrame()
        # Final per-layer entropy (nats): the report's §6.4 C pairs these, not the changes.
        self.final = per_layer_final(self.trained) if self.trained else pd.DataFrame()
        self.reference = self.families[self.chosen.regularizers].reference
        # Families of other designs (Study B), whose pages the matched evidence links to.
        self.separate = [n for n, f in self.families.items() if f.study != REPORT_STUDY]

    def family_runs(self, family: str) -> list[str]:
        """A family's comparison runs (references first), run or not."""
        return comparison_ids(self.profile, self.families[family], self.params_dir)

    def column(self, runs: list[str] | pd.Index, column: str) -> pd.Series:
        """``column`` of the seed means of those ``runs`` that are complete, in their order."""
        if self.means.empty or column not in self.means:
            return pd.Series(dtype=float)
        return self.means[column].reindex([r for r in runs if r in self.means.index]).astype(float)


class FindingsChapter:
    """The verdict of every claim on this build's runs (``build``) and on the report's numbers
    (``report``), claim → :class:`Verdict`, and the links to the detail. With ``show`` each
    step (:meth:`overview`, :meth:`claim`, :meth:`knobs`, :meth:`conclusion`) shows its part."""

    def __init__(self, profile: str, params_dir: Path | str = PARAMS_DIR, show: bool = True):
        self.profile = profile
        self.page = Page(profile, profile_output_root(profile, Path(params_dir)), show)
        self.numbers: ReportNumbers = load_report_numbers()
        self.study = study = StudyRuns(profile, params_dir)
        self.report = report_verdicts(
            self.numbers, study.reference, list(study.chosen.layer_anova), study.settings
        )
        self.build = self._build_verdicts()
        self.matched = matched_verdicts(profile, params_dir)
        self.published = published_verdicts()

    # --- the build's evidence -----------------------------------------------------------------

    def _build_verdicts(self) -> dict[str, Verdict]:
        study = self.study
        means = study.means
        method = means["method"] if not means.empty else pd.Series(dtype=str)
        reg = means["reg_kind"] if not means.empty else pd.Series(dtype=str)
        plain_full = method.index[(method == "full") & (reg == "none")]
        compared = [
            r for r in study.family_runs(study.chosen.method_comparison) if r in means.index
        ]
        full = [r for r in compared if method[r] == "full"]
        lora = [r for r in compared if method[r] == "lora"]
        return {
            "RQ1": verdicts.rq1_fine_tuning_lowers_entropy(
                study.column(plain_full, "d_entropy_pct")
            ),
            "RQ2": verdicts.rq2_lora_preserves_better(
                study.column(full, "d_entropy_pct"), study.column(lora, "d_entropy_pct")
            ),
            "RQ3": self._zeroshot_verdict(),
            "RQ4": verdicts.rq4_regularizer_limits_change(self.regularizer_tests()),
            "RQ5_lr": self._lr_verdict(),
            "RQ5_layers": verdicts.rq5_layer_position_matters(self.layer_groups()),
        }

    def _zeroshot_verdict(self) -> Verdict:
        means = self.study.means
        datasets = zeroshot_datasets(means) if not means.empty else []
        if not datasets:
            return verdicts.rq3_collapse_tracks_zeroshot_loss([], [])
        change = zeroshot_change(means, datasets[0])
        return verdicts.rq3_collapse_tracks_zeroshot_loss(means["d_entropy_pct"], change)

    def regularizer_tests(self) -> pd.DataFrame:
        """§6.4 C's paired tests (``stat_tables.regularizer_tests``) with ``acc_change``: best
        accuracy minus the reference's, in points."""
        study = self.study
        columns = ["mean_diff", "p", "acc_change"]
        if study.summary.empty or study.delta.empty:
            return pd.DataFrame(columns=columns)
        tests = stat_tables.regularizer_tests(study.summary, study.delta, study.reference)
        if tests.empty:
            return pd.DataFrame(columns=columns)
        reference_acc = stat_tables.cell(study.means, study.reference, "best_acc")
        tests["acc_change"] = 100 * (tests["best_acc"].astype(float) - reference_acc)
        return tests

    def _lr_verdict(self) -> Verdict:
        study = self.study
        points = stat_tables.lr_sweep_points(
            study.summary, study.family_runs(study.chosen.lr_sweep)
        )
        return verdicts.rq5_learning_rate_drives_collapse(points["lr"], points["d_entropy_pct"])

    def layer_groups(self) -> pd.DataFrame:
        """Mean Δ entropy in the early, middle and late layers of every trained run (seeds
        averaged): RQ5b's runs."""
        study = self.study
        if study.delta.empty:
            return pd.DataFrame(columns=["early_mean", "middle_mean", "late_mean"])
        runs = list(dict.fromkeys(study.delta.index.get_level_values(0)))
        return stat_tables.layer_anova_table(study.delta, runs)

    def layer_anova(self) -> pd.DataFrame:
        study = self.study
        if study.delta.empty:
            return pd.DataFrame(columns=["p"])
        table = stat_tables.layer_anova_table(study.delta, list(study.chosen.layer_anova))
        return table if not table.empty else pd.DataFrame(columns=["p"])

    # --- what the page shows --------------------------------------------------------------------

    def links(self, claim: str) -> list[str]:
        """Pages with the detail of a claim: its families' comparison pages (those with
        configurations) and the study pages."""
        chosen, families = self.study.chosen, self.study.families
        family_pages = {
            "RQ1": [chosen.method_comparison, chosen.lr_sweep],
            "RQ2": [chosen.method_comparison],
            "RQ3": [],
            "RQ4": [chosen.regularizers],
            "RQ5_lr": [chosen.lr_sweep],
            "RQ5_layers": [],
        }[claim]
        study = {"RQ3": [ZERO_SHOT, REPRODUCTION], "RQ4": [STATISTICS, REPRODUCTION]}
        if claim in self.matched:
            family_pages = [*family_pages, *self.study.separate]
        present = set(self.study.settings["family"])
        links = [
            doc_link(f"{families[f].notebook}/summary", families[f].title)
            for f in family_pages
            if f in present
        ]
        published_page = [doc_link(*PUBLISHED)] if claim in self.published else []
        return links + published_page + [doc_link(*p) for p in study.get(claim, [STATISTICS])]

    def claim_markdown(self, claim: str) -> str:
        """One research question: the report's answer, the verdict on the report's numbers and
        on this build's, with evidence and unit, the rule, and the links."""
        section, text = self.numbers.claims[claim]
        # (who, verdict, on this build's runs)
        rows = [
            ("The report's own numbers", self.report[claim], False),
            (f"This build (`{self.profile}`)", self.build[claim], True),
        ]
        matched = self.matched.get(claim)
        if matched is not None:
            rows.append((f"Study B, matched grid (`{self.profile}`)", matched, True))
        theirs = self.published.get(claim)
        if theirs is not None:
            rows.append((f"Study B, {PUBLISHED_LINK}", theirs, False))
        table = "\n".join(
            f"| {who} | {self.ours(v.verdict) if mine else f'**{v.verdict}**'} | "
            f"{_cell(evidence(v))} | {v.unit}, n = {v.n} |"
            for who, v, mine in rows
        )
        rule = f"*Rule.* {verdicts.RULES[claim]}"
        if claim in verdicts.MATCHED_RULES and (matched is not None or theirs is not None):
            rule += f"\n\n*Rule (Study B).* {verdicts.MATCHED_RULES[claim]}"
        return (
            f"**The report** ({section}): “{text}”\n\n"
            "| Numbers | Verdict | Evidence | Unit of analysis |\n| --- | --- | --- | --- |\n"
            f"{table}\n\n{rule}\n\n"
            f"Detail: {', '.join(self.links(claim))}."
        )

    def ours(self, verdict: str, bold: bool = True) -> str:
        """A verdict on this build's runs: bold, except on the smoke profile, where it is
        greyed and marked, since its runs check the pipeline and are not findings."""
        if self.profile == "smoke":
            return f'<span class="smoke-verdict">{verdict} (smoke: not a finding)</span>'
        return f"**{verdict}**" if bold else verdict

    def overview_markdown(self) -> str:
        lines = [
            "| Question | The report's own numbers | This build | Study B, the authors' published "
            "runs (real ViT-B/32) | Detail |",
            "| --- | --- | --- | --- | --- |",
        ]
        for claim in verdicts.CLAIMS:
            question = f"**{verdicts.LABELS.get(claim, claim)}** {verdicts.QUESTIONS[claim]}"
            theirs = self.published.get(claim)
            published_cell = theirs.verdict if theirs else "not tested by Study B"
            lines.append(
                f"| {question} | {self.report[claim].verdict} | "
                f"{self.ours(self.build[claim].verdict, bold=False)} | "
                f"{published_cell} | {self.links(claim)[0]} |"
            )
        return "\n".join(lines)

    def summary_text(self) -> str:
        def count(found: dict[str, Verdict]) -> str:
            tally = Counter(v.verdict for v in found.values())
            return ", ".join(f"{tally[name]} {name}" for name in verdicts.VERDICTS)

        return (
            f"Of the report's {len(verdicts.CLAIMS)} answers to its research questions, under the "
            f"rules stated with each: this build gives {count(self.build)}; the report's own "
            f"published numbers give {count(self.report)}."
        )

    # --- the steps of the notebook: each shows its part of the page ----------------------------

    def overview(self) -> None:
        """Every question's verdicts in one table."""
        self.page.note(self.overview_markdown())

    def claim(self, claim: str) -> None:
        """One research question: the report's answer, the verdicts, their evidence and rule."""
        self.page.note(self.claim_markdown(claim))

    def conclusion(self) -> None:
        """The tally of verdicts, shown under the notebook's ``## Conclusion``."""
        self.page.conclusion(self.summary_text())

    def knobs(self) -> pd.DataFrame:
        """Which knobs move Δ entropy most: per family with a setting, the range of its runs' Δ
        entropy (references included) in the report and in this build. Descriptive: no test."""
        report = self.numbers.tables["appendix_runs"].frame()["d_entropy_pct"]
        rows = []
        for name, family in self.study.families.items():
            runs = self.study.family_runs(name)
            theirs = report.reindex(runs).dropna()
            ours = self.study.column(runs, "d_entropy_pct").dropna()
            if theirs.empty and ours.empty:
                continue
            rows.append(
                {
                    "family": family.title,
                    "setting": SETTING_NAMES.get(family.axis, family.axis),
                    "report_runs": len(theirs),
                    "report_range": _spread(theirs),
                    "build_runs": len(ours),
                    "build_range": _spread(ours),
                }
            )
        table = pd.DataFrame(
            rows,
            columns=[
                "family",
                "setting",
                "report_runs",
                "report_range",
                "build_runs",
                "build_range",
            ],
        )
        self.page.tables["knobs"] = table
        if self.page.show:
            show_table(
                table.set_index("family"),
                self.page.numbered(
                    "Per family: the range of layer-mean entropy change over its runs, in the "
                    "report and in this build."
                ),
                KNOB_COLUMNS,
            )
        return table


KNOB_COLUMNS = {
    "family": Column("Family"),
    "setting": Column("Setting varied", TEXT),
    "report_runs": Column("Runs in the report", INT),
    "report_range": Column("Range of Δ Entropy in the report (points)", CHANGE),
    "build_runs": Column("Runs in this build", INT),
    "build_range": Column("Range of Δ Entropy in this build (points)", CHANGE),
}


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (a ``|`` would end the cell)."""
    return text.replace("|", "\\|")


def _spread(values: pd.Series) -> float:
    return float(values.max() - values.min()) if len(values) >= 2 else float("nan")


def _signed(value: float, unit: str = "%") -> str:
    return f"{format_change(value)} {unit}" if not math.isnan(value) else "missing"


def matched_verdicts(profile: str, params_dir: Path | str = PARAMS_DIR) -> dict[str, Verdict]:
    """RQ2 and RQ3 on this build's matched grid of Study B (families whose ``study`` is not the
    report's), judged per group (``study_b.verdicts``) on the primary backbone (a second one
    is analysed apart, on the Study B page): {} when none of those runs is complete."""
    families = load_families(params_dir)
    ids = {c.id for f in families.values() if f.study != REPORT_STUDY
           for c in load_family(profile, f.name, params_dir)}  # fmt: skip
    runs = load_histories(profile_output_root(profile, params_dir), ids=ids)
    frame = published.primary(study_b.grid_frame(run_summary(runs))) if runs else None
    return study_b.verdicts(frame) if frame is not None and not frame.empty else {}


def published_verdicts() -> dict[str, Verdict]:
    """RQ2 and RQ3 on the authors' published Study B runs (ViT-B/32), by the same rules."""
    return study_b.verdicts(study_b.add_derived(published.primary(published.load_study2())))


def evidence(v: Verdict) -> str:
    """The numbers a verdict rests on, as one phrase; the reason when no test could run."""
    x = v.numbers
    if v.reason:
        return f"not tested: {v.reason}"
    if "groups" in x or "datasets" in x:  # a matched-grid verdict: its answer per group
        pooled = x.get("pooled_rho", math.nan)
        tail = f"; pooled over every run ρ = {pooled:+.2f} (not judged)" if pooled == pooled else ""
        return v.detail + tail
    text = _evidence(v)
    return f"{text}; {v.detail}" if v.detail else text


def _evidence(v: Verdict) -> str:
    x = v.numbers
    if v.claim == "RQ2" and "pairs" in x:
        return (
            f"LoRA minus Full FT Δ entropy {_signed(x['diff'], 'points')} over {x['pairs']:.0f} "
            f"matched pairs (Full FT {_signed(x['mean_full'])}, LoRA {_signed(x['mean_lora'])});"
            f" paired t p = {format_p(x['p'])}, d_z = {x['d_z']:.2f}"
        )
    if v.claim == "RQ1":
        return (
            f"mean Δ entropy {_signed(x['mean'])}, 95% bootstrap CI {_signed(x['ci_low'])} to "
            f"{_signed(x['ci_high'])}"
        )
    if v.claim == "RQ2":
        return (
            f"Δ entropy Full FT {_signed(x['mean_full'])} ({x['n_full']:.0f} runs) vs LoRA "
            f"{_signed(x['mean_lora'])} ({x['n_lora']:.0f} runs); Welch t = {x['welch_t']:.2f}, "
            f"p = {format_p(x['welch_p'])}"
        )
    if v.claim == "RQ3":
        kind = "exact" if x["exact"] else "asymptotic"
        return f"Spearman ρ = {x['rho']:+.2f}, {kind} p = {format_p(x['p'])}"
    if v.claim == "RQ4":
        return (
            f"{x['n_significant']:.0f} of {x['n_runs']:.0f} regularized runs significant after "
            f"Holm; smallest Holm p = {format_p(x['min_p_holm'])} ({v.focus}: Δ entropy "
            f"{_signed(x['best_mean_diff'], 'points')} above the reference, best accuracy "
            f"{_signed(x['best_acc_change'], 'points')})"
        )
    if v.claim == "RQ5_lr":
        kind = "exact" if x["exact"] else "asymptotic"
        return (
            f"Spearman ρ = {x['rho']:+.2f}, {kind} p = {format_p(x['p'])} (Holm "
            f"{format_p(x['p_holm'])}); Pearson r = {x['pearson_r']:+.2f}"
        )
    return (
        f"Friedman χ² = {x['chi2']:.2f}, p = {format_p(x['p'])}; mean Δ entropy early "
        f"{_signed(x['early_mean'])}, middle {_signed(x['middle_mean'])}, late "
        f"{_signed(x['late_mean'])}"
    )
