"""The report's transcribed numbers: every number names its section, the checks of the report
against itself (computed from those numbers), the comparison flags on a hand-made build, and
the reproduction chapter on fake studies."""

from __future__ import annotations

import nbformat
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import yaml

from collapse_utils.analysis import reproduction as rp
from collapse_utils.analysis.stats import compare_groups
from collapse_utils.analysis.verdicts import INCONCLUSIVE, SUPPORTED
from collapse_utils.book.findings_chapter import run_settings
from collapse_utils.book.page import profile_note
from collapse_utils.book.reproduction_chapter import ReproductionChapter
from collapse_utils.config import REPO_ROOT, ConfigError, available_experiments
from tests.fake_records import FULL_CHANGE, START, histories, write_study

NUMBERS = rp.load_report_numbers()
FLOOR = 0.7  # reg.floor_ratio of the full profile (the report authors' code)


def checks_by_topic(floor: float = FLOOR) -> dict[str, rp.ReportCheck]:
    return {c.topic: c for c in rp.report_checks(NUMBERS, floor)}


# --- the data file ---------------------------------------------------------------------------


def test_every_number_in_the_data_file_names_its_report_section():
    raw = yaml.safe_load(rp.REPORT_NUMBERS.read_text())
    numbers = 0
    for name, table in raw["tables"].items():
        assert str(table["section"]).startswith("§"), name
        for row, values in table["rows"].items():
            for column in values:
                assert column in table["columns"], (name, row, column)
                numbers += 1
    assert numbers == len(rp.report_values(NUMBERS)) == 445
    assert all(s["section"] for s in raw["settings"].values())
    assert all(c["section"] and c["text"] for c in raw["claims"].values())
    assert {k for t in raw["tables"].values() for k in t["columns"].values()} <= set(raw["kinds"])


def test_run_rows_are_experiments_of_this_study():
    experiments = set(available_experiments())
    assert set(NUMBERS.runs.index) == set(NUMBERS.tables["appendix_runs"].rows)
    assert NUMBERS.runs_with("lora") == ["E4", "E5", "E6", "E7", "A2_qkvo"]
    assert NUMBERS.runs_with(regularizer="entropy_floor") == ["R2_entfloor0.01", "R2_entfloor0.1"]
    for name in ("appendix_runs", "grand_comparison", "lr_sweep", "per_layer_extremes"):
        assert set(NUMBERS.tables[name].rows) <= experiments, name
    assert len(NUMBERS.tables["appendix_runs"].rows) == 21
    assert set(NUMBERS.tables["zeroshot"].rows) - experiments == {"pretrained"}


def test_a_table_without_its_section_is_rejected_naming_the_field(tmp_path):
    raw = yaml.safe_load(rp.REPORT_NUMBERS.read_text())
    del raw["tables"]["zeroshot"]["section"]
    path = tmp_path / "numbers.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    with pytest.raises(ConfigError, match=r"tables\.zeroshot\.section.*report section"):
        rp.load_report_numbers(path)
    raw = yaml.safe_load(rp.REPORT_NUMBERS.read_text())
    raw["tables"]["zeroshot"]["rows"]["E2"]["zs_cifar100_pct"] = "twelve"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    with pytest.raises(ConfigError, match="zeroshot.rows.E2.zs_cifar100_pct"):
        rp.load_report_numbers(path)


@pytest.mark.parametrize("tolerance", [float("nan"), -1, "tight", True])
def test_a_tolerance_that_is_not_a_finite_non_negative_number_is_rejected(tmp_path, tolerance):
    raw = yaml.safe_load(rp.REPORT_NUMBERS.read_text())
    kind = next(iter(raw["kinds"]))
    raw["kinds"][kind]["tolerance"] = tolerance
    path = tmp_path / "numbers.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    with pytest.raises(ConfigError, match=f"kinds.{kind}.tolerance.*finite number >= 0"):
        rp.load_report_numbers(path)


def test_a_printed_bound_keeps_its_relation():
    values = rp.report_values(NUMBERS).set_index(["table", "row", "column"])
    spearman = values.loc[("lr_correlation", "spearman", "p_asymptotic")]
    assert spearman["relation"] == "<" and spearman["report"] == 0.001


# --- the report against itself ---------------------------------------------------------------


def test_spearman_p_at_n5_is_2_of_120_not_below_0001():
    check = checks_by_topic()["Spearman p at n = 5"]
    assert not check.holds
    assert "2/120 = 0.0167" in check.recomputed
    assert "4/120 = 0.033" in check.recomputed  # Pearson's exact p


def test_cross_metric_r_recomputed_from_the_appendix():
    changes = rp.appendix_changes(NUMBERS)
    r = scipy.stats.pearsonr(changes["d_entropy_pct"], changes["d_head_diversity_pct"]).statistic
    assert r == pytest.approx(-0.887, abs=0.005)  # §3.10 prints −0.07
    checks = checks_by_topic()
    assert not checks["r of ΔEntropy ↔ ΔHeadDiv"].holds
    assert "r = -0.89" in checks["r of ΔEntropy ↔ ΔHeadDiv"].recomputed
    assert not checks["r of ΔEntropy ↔ ΔGini"].holds  # −0.99, printed −0.86
    assert checks["r of ΔEntropy ↔ ΔERF"].holds  # +0.99, printed +0.92: within 0.1
    assert checks["r of ΔEntropy ↔ BestAcc"].holds


def test_lora_zero_shot_equal_to_the_baseline_to_the_image_does_not_show_preservation():
    check = checks_by_topic()["LoRA zero-shot at exactly the baseline"]
    assert not check.holds
    assert "3 of 3 LoRA runs" in check.recomputed and "6022 of 10000" in check.recomputed


def test_entropy_floor_at_07_of_baseline_is_never_reached_by_any_printed_layer_entropy():
    check = checks_by_topic()["Was the entropy floor active?"]
    assert not check.holds
    assert "2.505–2.696 nats" in check.recomputed  # 0.7 × the §6.2 layers
    assert "-17.14%" in check.recomputed and "0.83 × its start" in check.recomputed
    # A floor at 0.9 × baseline would have been reached by A1 lr=1e-4's layer 7.
    assert checks_by_topic(0.9)["Was the entropy floor active?"].holds


def test_no_regularizer_is_significant_after_holm():
    check = checks_by_topic()["Regularizer p after Holm"]
    assert not check.holds and "0.115" in check.recomputed


def test_full_vs_lora_t_comes_from_12_layers_against_36():
    assert rp.pooled_sizes(NUMBERS) == pytest.approx(
        {"n_full": 12, "n_lora": 36, "ddof": 0, "t": -2.497}, abs=0.005
    )
    runs = rp.run_level_comparison(NUMBERS)
    assert (runs.n_a, runs.n_b) == (2, 4)
    by_hand = compare_groups([-0.14, -1.82], [0.98, 0.58, 0.44, -0.73])  # §3.2.1
    assert runs.welch_p == pytest.approx(by_hand.welch_p)
    assert not checks_by_topic()["Full FT vs LoRA: unit of analysis"].holds


def test_consistent_statements_of_the_report_hold():
    checks = checks_by_topic()
    for topic in ("Baseline summary", "Zero-shot change from baseline",
                  "Layer ANOVA from its group statistics", "Paired tests' p from t",
                  "Printed Δ% and rounding"):  # fmt: skip
        assert checks[topic].holds, topic
    f, p = rp.anova_from_groups([-0.23, 0.14, -0.36], [0.16, 0.64, 1.27], n=4, ddof=0)
    assert (round(f, 2), round(p, 2)) == (0.30, 0.75)  # printed F = 0.29, p = 0.755


def test_no_floor_configuration_leaves_the_floor_check_out():
    topics = {c.topic for c in rp.report_checks(NUMBERS, None)}
    assert "Was the entropy floor active?" not in topics and len(topics) == 14


def test_the_verdict_rules_on_the_reports_own_numbers():
    found = rp.report_verdicts(NUMBERS, "E2", ["E2", "E5"])
    assert found["RQ1"].verdict == SUPPORTED and found["RQ1"].n == 11
    assert found["RQ2"].verdict == INCONCLUSIVE  # one value per run: 2 vs 4 runs
    assert found["RQ2"].numbers["welch_p"] == pytest.approx(0.339, abs=0.001)
    assert found["RQ3"].verdict == SUPPORTED
    assert found["RQ3"].n == 5 and "E4, E5, E6" in found["RQ3"].detail  # LoRA rows: artefacts
    assert found["RQ3"].numbers["rho"] == pytest.approx(1.0)
    assert found["RQ4"].verdict == INCONCLUSIVE and found["RQ4"].focus == "R2_entfloor0.1"
    assert found["RQ5_lr"].verdict == SUPPORTED
    assert found["RQ5_lr"].numbers["p"] == pytest.approx(2 / 120)
    assert found["RQ5_layers"].verdict == INCONCLUSIVE
    assert "2 runs with layer groups (E2, E5)" in found["RQ5_layers"].reason


def test_rq1_on_the_reports_numbers_names_the_runs_that_repeat_one_configuration():
    settings = run_settings("full")
    found = rp.report_verdicts(NUMBERS, "E2", ["E2", "E5"], settings)
    detail = found["RQ1"].detail
    assert "E2, A3_freeze3, A3_freeze6, A3_freeze9, R3_wd0.0, R3_wd0.1 share eurosat" in detail
    assert "6 of the 11 values" in detail


# --- the comparison --------------------------------------------------------------------------


def test_flags_on_a_hand_made_build():
    tol = NUMBERS.kinds
    ours = pd.DataFrame(
        [
            ("appendix_runs", "E2", "best_acc", 0.9930),  # equal
            ("appendix_runs", "E2", "entropy_f", 3.678 + 0.9 * tol["entropy"].tolerance),
            (
                "appendix_runs",
                "E2",
                "d_entropy_pct",
                -0.14 - 2 * tol["change_pct_entropy"].tolerance,
            ),
            ("lr_correlation", "spearman", "p_asymptotic", 0.0005),  # below the bound
            ("lr_correlation", "pearson", "p_asymptotic", 0.041 + 0.019),
            ("correlations", "d_entropy_pct~d_head_diversity_pct", "r", -0.887),
            ("regularizers", "R2_entfloor0.1", "p", 0.5),
        ],
        columns=["table", "row", "column", "ours"],
    )
    compared = rp.compare(NUMBERS, ours).set_index(["table", "row", "column"])
    flag = compared["flag"]
    assert flag[("appendix_runs", "E2", "best_acc")] == rp.WITHIN
    assert flag[("appendix_runs", "E2", "entropy_f")] == rp.WITHIN
    assert flag[("appendix_runs", "E2", "d_entropy_pct")] == rp.DIFFERS
    assert compared.loc[("appendix_runs", "E2", "d_entropy_pct"), "difference"] == pytest.approx(
        -1.0
    )
    assert flag[("lr_correlation", "spearman", "p_asymptotic")] == rp.WITHIN
    assert flag[("lr_correlation", "pearson", "p_asymptotic")] == rp.WITHIN
    assert flag[("correlations", "d_entropy_pct~d_head_diversity_pct", "r")] == rp.DIFFERS
    assert flag[("regularizers", "R2_entfloor0.1", "p")] == rp.DIFFERS
    assert flag[("appendix_runs", "E3", "best_acc")] == rp.NOT_RUN
    assert (flag == rp.NOT_RUN).sum() == len(compared) - len(ours)


def test_bound_rows_flag_only_a_value_above_the_bound_plus_tolerance():
    ours = pd.DataFrame([("lr_correlation", "spearman", "p_asymptotic", 0.5)],
                        columns=["table", "row", "column", "ours"])  # fmt: skip
    compared = rp.compare(NUMBERS, ours).set_index(["table", "row", "column"])
    assert compared.loc[("lr_correlation", "spearman", "p_asymptotic"), "flag"] == rp.DIFFERS


def test_the_builds_tables_in_the_reports_layout():
    means = pd.DataFrame(
        {"best_acc": [0.99, 0.98], "zs_cifar100": [0.1, 0.6], "zs_cifar100_pretrained": [0.6, 0.6]},
        index=["E2", "E4"],
    )
    runs = rp.run_frame(means)
    assert runs.loc["E2", "best_acc_pct"] == pytest.approx(99.0)
    assert runs.loc["E2", "zs_cifar100_change_pct"] == pytest.approx(100 * (0.1 - 0.6) / 0.6)
    assert runs.loc["pretrained", "zs_cifar100_pct"] == pytest.approx(60.0)
    layers = pd.DataFrame({"entropy": [3.0, 3.5, 4.0]}, index=[1, 2, 3])
    base = rp.baseline_frames(layers)
    assert list(base["baseline_layers"].index) == ["1", "2", "3"]
    assert base["baseline_summary"].loc["std", "entropy"] == pytest.approx(0.5)  # ddof 1
    delta = pd.DataFrame([[1.0, -3.0, 2.0], [0.5, 0.2, 0.1]],
                         index=pd.MultiIndex.from_tuples([("A", 1), ("B", 1)],
                                                         names=["run", "seed"]),
                         columns=pd.Index([1, 2, 3], name="layer"))  # fmt: skip
    extremes = rp.per_layer_extremes(delta)
    assert extremes.loc["A"].tolist() == [2.0, -3.0] and extremes.loc["B", "layer"] == 1.0
    pooled = rp.full_vs_lora_frame(compare_groups([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0]))
    assert pooled.loc["layer", "sd_full"] == pytest.approx(np.std([1, 2, 3, 4]))  # ddof 0
    assert pooled.loc["layer", "abs_cohen_d"] > 0
    assert rp.floor_margin(np.array([[2.0, 4.0], [1.5, 4.4]]), 0.5) == pytest.approx(1.5)


# --- the chapter on fake studies ---------------------------------------------------------------


def test_reproduction_chapter_sets_a_fake_build_beside_every_published_number(tmp_path):
    chapter = ReproductionChapter("smoke", write_study(tmp_path, histories()), show=False)
    compared = chapter.comparison.set_index(["table", "row", "column"])
    assert len(compared) == 445
    e2 = compared.loc[("appendix_runs", "E2", "d_entropy_pct"), "ours"]
    start = np.array(START)
    assert e2 == pytest.approx(100 * (start * np.array(FULL_CHANGE)).sum() / start.sum())
    assert compared.loc[("appendix_runs", "A2_qkvo", "best_acc"), "flag"] == rp.NOT_RUN
    # The fake pre-trained model has 6 layers: the report's layers 7–12 have no counterpart.
    assert compared.loc[("baseline_layers", "6", "entropy"), "flag"] != rp.NOT_RUN
    assert compared.loc[("baseline_layers", "7", "entropy"), "flag"] == rp.NOT_RUN
    assert compared.loc[("regularizers", "R2_entfloor0.1", "t"), "flag"] != rp.NOT_RUN
    assert len(chapter.checks) == 15  # the smoke params hold an entropy-floor configuration
    shown = chapter.shown(chapter.table("appendix_runs"))
    assert (
        not shown.isna().any().any()
        and not shown.apply(lambda c: c.str.contains("nan")).any().any()
    )
    assert "R2_entfloor0.1" in chapter.this_build_markdown()
    chapter.conclusion()
    assert "445 published numbers" in chapter.page.findings
    chapter.overview()
    scatter = chapter.page.figures["extra_reproduction_scatter"]
    points = sum(len(c.get_offsets()) for ax in scatter.axes for c in ax.collections)
    assert points == len(chapter.comparison.dropna(subset=["report", "ours"])) > 0
    assert len(chapter.tolerances()) == len(NUMBERS.kinds)


def test_reproduction_chapter_of_an_empty_study_marks_every_number_not_in_the_build(tmp_path):
    chapter = ReproductionChapter("smoke", write_study(tmp_path, []), show=False)
    assert (chapter.comparison["flag"] == rp.NOT_RUN).all()
    assert chapter.counts() == {rp.WITHIN: 0, rp.DIFFERS: 0, rp.NOT_RUN: 445}
    assert "No entropy-floor run" in chapter.this_build_markdown()
    assert "every row below is expected to differ" in chapter.expectation_markdown().lower()


def test_reproduction_chapter_of_a_partial_study_shows_every_table(tmp_path, capsys):
    records = [h for h in histories() if h.id in {"E1_eurosat", "E2", "E4"}]
    chapter = ReproductionChapter("smoke", write_study(tmp_path, records), show=True)
    for name in NUMBERS.tables:
        assert len(chapter.table(name)) == len(rp.report_values(NUMBERS).query("table == @name"))
    chapter.tolerances()
    capsys.readouterr()


# --- the notebooks ---------------------------------------------------------------------------


@pytest.mark.slow
# On a whole fake study here; every page of a smoke book is checked the same way on the book
# fixture's executed notebooks (tests/test_book.py), 10 also from any folder
# (tests/test_notebooks_anywhere.py).
@pytest.mark.parametrize("stem", ["00_findings", "12_reproduction_check"])
def test_notebook_executes_on_fake_records(tmp_path, stem):
    import os
    import subprocess
    import sys

    params = write_study(tmp_path, histories())
    output = tmp_path / f"{stem}.ipynb"
    env = {**os.environ, "COLLAPSE_PARAMS_DIR": str(params)}
    source = REPO_ROOT / "notebooks" / f"{stem}.ipynb"
    command = [sys.executable, "-m", "papermill", str(source), str(output), "-p", "profile",
               "smoke", "--log-level", "ERROR"]  # fmt: skip
    subprocess.run(command, env=env, check=True, capture_output=True)
    notebook = nbformat.read(output, as_version=4)
    outputs = [o for c in notebook.cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    # Read in Jupyter, the notebook ends on its conclusion in words (not a glue directive that
    # only the book renders), and no cell leans on one to show a paragraph.
    assert not [c for c in notebook.cells if "{glue:md}" in c.source]
    last = [c for c in notebook.cells if c.cell_type == "code"][-1]
    shown = "".join(o.get("data", {}).get("text/markdown", "") for o in last.outputs)
    assert shown.startswith(profile_note("smoke"))
    assert len(shown.removeprefix(profile_note("smoke")).strip()) > 40, shown
