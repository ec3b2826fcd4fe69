"""The verdict rules on hand-made result tables (every verdict of every rule reachable), and the
findings chapter on fake studies: complete, partial and empty."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from collapse_utils.analysis import verdicts
from collapse_utils.analysis.verdicts import (
    CONTRADICTED,
    INCONCLUSIVE,
    SUPPORTED,
    rq1_fine_tuning_lowers_entropy,
    rq2_lora_preserves_better,
    rq3_collapse_tracks_zeroshot_loss,
    rq4_regularizer_limits_change,
    rq5_layer_position_matters,
    rq5_learning_rate_drives_collapse,
)
from collapse_utils.book.findings_chapter import FindingsChapter, evidence
from tests.fake_records import grid_records, histories, write_study

# --- RQ1: one Δ entropy per full-FT run, bootstrap CI of the mean ------------------------------


def test_full_ft_runs_that_all_lose_entropy_support_rq1():
    v = rq1_fine_tuning_lowers_entropy([-1.0, -2.0, -1.5, -0.5, -1.2, -0.8])
    assert v.verdict == SUPPORTED
    assert v.numbers["ci_high"] < 0 and v.n == 6 and v.unit == "full-FT run"


def test_full_ft_runs_that_all_gain_entropy_contradict_rq1():
    v = rq1_fine_tuning_lowers_entropy([1.0, 2.0, 1.5, 0.5, 1.2, 0.8])
    assert v.verdict == CONTRADICTED and v.numbers["ci_low"] > 0


def test_full_ft_runs_on_both_sides_of_zero_are_inconclusive():
    v = rq1_fine_tuning_lowers_entropy([-2.0, 1.5, -0.5, 1.0, -1.0, 0.8])
    assert v.verdict == INCONCLUSIVE and v.numbers["ci_low"] < 0 < v.numbers["ci_high"]


def test_too_few_full_ft_runs_for_a_bootstrap_ci_are_inconclusive_and_say_why():
    v = rq1_fine_tuning_lowers_entropy([-5.0, -4.0, np.nan, -6.0])
    assert v.verdict == INCONCLUSIVE and v.n == 3  # the NaN run does not count
    assert "bootstrap CI needs 5" in v.reason


def test_identical_runs_give_a_point_interval():
    v = rq1_fine_tuning_lowers_entropy([-1.0] * 5)
    assert v.verdict == SUPPORTED and v.numbers["ci_low"] == v.numbers["ci_high"] == -1.0


# --- RQ2: one value per run, Welch -------------------------------------------------------------


def test_lora_runs_above_full_ft_runs_support_rq2():
    v = rq2_lora_preserves_better([-1.0, -1.2, -0.9], [0.5, 0.7, 0.6])
    assert v.verdict == SUPPORTED and v.numbers["welch_p"] < 0.05 and v.n == 6


def test_lora_runs_below_full_ft_runs_contradict_rq2():
    assert rq2_lora_preserves_better([0.5, 0.7, 0.6], [-1.0, -1.2, -0.9]).verdict == CONTRADICTED


def test_overlapping_methods_are_inconclusive():
    v = rq2_lora_preserves_better([-1.0, 0.5, 0.2], [0.1, -0.6, 0.4])
    assert v.verdict == INCONCLUSIVE and v.numbers["welch_p"] > 0.05


def test_one_run_per_method_cannot_be_tested():
    v = rq2_lora_preserves_better([-1.0], [0.5, 0.7])
    assert v.verdict == INCONCLUSIVE and "needs 2 each" in v.reason


# --- RQ3: Spearman across runs, exact p for small n --------------------------------------------

D_ENTROPY = [-10.0, -4.0, -1.0, 0.0, 0.5, 1.0]


def test_runs_losing_entropy_and_transfer_together_support_rq3():
    v = rq3_collapse_tracks_zeroshot_loss(D_ENTROPY, [-90.0, -80.0, -60.0, -40.0, -20.0, 0.0])
    assert v.verdict == SUPPORTED
    assert v.numbers["rho"] == pytest.approx(1.0)
    assert v.numbers["p"] == pytest.approx(2 / 720) and v.numbers["exact"] == 1.0


def test_runs_losing_transfer_as_entropy_rises_contradict_rq3():
    v = rq3_collapse_tracks_zeroshot_loss(D_ENTROPY, [0.0, -20.0, -40.0, -60.0, -80.0, -90.0])
    assert v.verdict == CONTRADICTED


def test_unrelated_transfer_loss_is_inconclusive():
    v = rq3_collapse_tracks_zeroshot_loss(D_ENTROPY, [-50.0, -10.0, -70.0, -20.0, -60.0, -30.0])
    assert v.verdict == INCONCLUSIVE and v.numbers["p"] > 0.05


def test_runs_without_zero_shot_are_left_out_and_constant_values_cannot_correlate():
    v = rq3_collapse_tracks_zeroshot_loss([-1.0, 0.0, 1.0, 2.0], [np.nan, -5.0, -5.0, -5.0])
    assert v.verdict == INCONCLUSIVE and v.n == 3
    assert "the zero-shot change is the same" in v.reason
    assert rq3_collapse_tracks_zeroshot_loss([], []).reason.startswith("0 runs")


# --- RQ4: paired tests against the reference, Holm, accuracy cost --------------------------------


def reg_tests(mean_diff, p, acc_change) -> pd.DataFrame:
    index = [f"R{i}" for i in range(len(p))]
    return pd.DataFrame({"mean_diff": mean_diff, "p": p, "acc_change": acc_change}, index=index)


def test_a_regularizer_that_keeps_entropy_at_no_accuracy_cost_supports_rq4():
    v = rq4_regularizer_limits_change(reg_tests([0.8, 0.1], [0.001, 0.4], [-0.2, 0.0]))
    assert v.verdict == SUPPORTED and v.focus == "R0" and v.numbers["n_significant"] == 1


def test_a_regularizer_that_costs_accuracy_contradicts_rq4():
    v = rq4_regularizer_limits_change(reg_tests([0.8, 0.1], [0.001, 0.4], [-3.0, 0.0]))
    assert v.verdict == CONTRADICTED


def test_a_regularizer_that_deepens_collapse_contradicts_rq4():
    v = rq4_regularizer_limits_change(reg_tests([-0.8], [0.001], [0.0]))
    assert v.verdict == CONTRADICTED


def test_regularizers_significant_only_before_holm_are_inconclusive():
    # The report's §6.4 C: p = 0.023 is the smallest of five; Holm makes it 0.115.
    v = rq4_regularizer_limits_change(
        reg_tests([1, 1, 1, 1, 1], [0.056, 0.091, 0.414, 0.055, 0.023], [0, 0, 0, 0, 0])
    )
    assert v.verdict == INCONCLUSIVE
    assert v.numbers["min_p_holm"] == pytest.approx(0.115)


def test_no_regularized_run_is_inconclusive():
    v = rq4_regularizer_limits_change(reg_tests([], [], []))
    assert v.verdict == INCONCLUSIVE and v.n == 0 and v.reason


# --- RQ5: learning rate and layer position --------------------------------------------------------

LRS = [1e-6, 5e-6, 1e-5, 5e-5, 1e-4]


def test_entropy_falling_with_every_higher_learning_rate_supports_rq5a():
    v = rq5_learning_rate_drives_collapse(LRS, [1.45, 0.33, -0.14, -4.19, -10.40])
    assert v.verdict == SUPPORTED
    assert v.numbers["p"] == pytest.approx(2 / 120)  # exact: 2 of the 120 orderings
    assert v.numbers["p_holm"] < 0.05


def test_entropy_rising_with_learning_rate_contradicts_rq5a():
    v = rq5_learning_rate_drives_collapse(LRS, [-10.40, -4.19, -0.14, 0.33, 1.45])
    assert v.verdict == CONTRADICTED


def test_no_order_in_learning_rate_is_inconclusive_and_two_rates_cannot_be_tested():
    v = rq5_learning_rate_drives_collapse(LRS, [0.2, -0.5, 0.4, -0.1, 0.0])
    assert v.verdict == INCONCLUSIVE and v.numbers["p"] > 0.05
    assert "needs 3" in rq5_learning_rate_drives_collapse([1e-5, 1e-4], [0.0, -1.0]).reason
    flat = rq5_learning_rate_drives_collapse(LRS, [0.0] * 5)
    assert flat.verdict == INCONCLUSIVE and "same at every" in flat.reason


def _groups(rows: list[tuple[float, float, float]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["early_mean", "middle_mean", "late_mean"])
    frame.index = [f"R{i}" for i in range(len(rows))]
    return frame


def test_a_layer_position_effect_over_runs_contradicts_rq5b_and_none_is_never_supported():
    late = _groups([(0.1 * i, 0.2 * i, -1.0 - 0.1 * i) for i in range(6)])  # late always lowest
    found = rq5_layer_position_matters(late)
    assert found.verdict == CONTRADICTED and found.n == 6 and found.numbers["p"] < 0.05
    assert found.unit.startswith("run")
    mixed = _groups([(0.0, 0.1, -0.1), (0.1, -0.1, 0.0), (-0.1, 0.0, 0.1), (0.2, 0.0, -0.2),
                     (0.0, -0.2, 0.2), (-0.2, 0.2, 0.0)])  # fmt: skip
    assert rq5_layer_position_matters(mixed).verdict == INCONCLUSIVE


def test_rq5b_with_too_few_runs_names_them():
    two = rq5_layer_position_matters(_groups([(0.1, 0.2, -0.3), (0.0, 1.1, 0.6)]))
    assert two.verdict == INCONCLUSIVE and "2 runs with layer groups (R0, R1)" in two.reason


def test_findings_add_the_matched_grid_evidence_for_rq2_and_rq3(tmp_path):
    chapter = FindingsChapter(
        "smoke", write_study(tmp_path, histories() + grid_records(b16=True)), False
    )
    assert set(chapter.matched) == {"RQ2", "RQ3"}
    assert chapter.matched["RQ2"].n == 16  # 2 datasets × 4 lrs × 2 seeds
    assert chapter.matched["RQ3"].n == 32
    text = chapter.claim_markdown("RQ2")
    assert "Study B, matched grid" in text and verdicts.MATCHED_RULES["RQ2"] in text
    assert "the authors' published runs" in text  # the real-model verdict beside ours
    rows = [line for line in text.splitlines() if line.startswith("| Study B")]
    assert len(rows) == 2  # our grid and theirs, each one row of four cells ("|" escaped)
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 5 for row in rows), rows
    assert chapter.published["RQ3"].verdict == verdicts.UNSTABLE
    assert "not stable across configurations" in chapter.overview_markdown()
    assert "13_study_b/summary" in text
    assert chapter.build["RQ2"].numbers["n_full"] == 2  # the report's design is unchanged
    assert "Study B" not in chapter.claim_markdown("RQ1")


def test_every_rule_is_stated_for_every_claim():
    assert set(verdicts.RULES) == set(verdicts.CLAIMS) == set(verdicts.QUESTIONS)
    assert rq5_layer_position_matters(_groups([])).rule == verdicts.RULES["RQ5_layers"]


# --- the findings chapter on fake studies -----------------------------------------------------


def test_findings_on_a_fake_study_give_a_verdict_and_evidence_for_every_claim(tmp_path):
    chapter = FindingsChapter("smoke", write_study(tmp_path, histories()), show=False)
    assert set(chapter.build) == set(chapter.report) == set(verdicts.CLAIMS)
    assert chapter.build["RQ1"].verdict == SUPPORTED  # every fake full-FT run loses entropy
    assert chapter.build["RQ2"].verdict == SUPPORTED  # fake LoRA runs gain it
    assert chapter.build["RQ2"].numbers["n_full"] == 2  # E2, E3 of the comparison family
    assert chapter.build["RQ4"].focus in {"R1_apr0.1", "R2_entfloor0.1"}
    assert chapter.build["RQ5_lr"].n == 3  # E2 and the two fake sweep runs with a config
    for claim in verdicts.CLAIMS:
        assert chapter.build[claim].verdict in verdicts.VERDICTS
        assert evidence(chapter.build[claim])
        text = chapter.claim_markdown(claim)
        assert verdicts.RULES[claim] in text and "{doc}`" in text
    assert "/book/executed/08_statistics" in chapter.overview_markdown()
    assert "this build gives 3 supported" in chapter.summary_text()  # RQ1, RQ2, RQ4
    knobs = chapter.knobs()
    lr = knobs.set_index("setting").loc["learning rate"]
    assert lr["report_range"] == pytest.approx(1.45 + 10.40)
    assert lr["build_runs"] == 3


def test_findings_of_an_empty_study_are_all_inconclusive(tmp_path):
    chapter = FindingsChapter("smoke", write_study(tmp_path, []), show=False)
    assert {v.verdict for v in chapter.build.values()} == {INCONCLUSIVE}
    assert all(v.n == 0 and v.reason for v in chapter.build.values())
    assert chapter.report["RQ5_lr"].verdict == SUPPORTED  # the report's numbers still count
    assert chapter.knobs()["build_runs"].eq(0).all()


def test_findings_of_a_partial_study_render(tmp_path, capsys):
    records = [h for h in histories() if h.id in {"E2", "E5", "R2_entfloor0.1"}]
    chapter = FindingsChapter("smoke", write_study(tmp_path, records), show=True)
    assert chapter.build["RQ2"].reason.startswith("1 Full FT and 1 LoRA")
    assert chapter.build["RQ4"].n == 1
    chapter.knobs()
    capsys.readouterr()  # the glued and displayed outputs (no kernel here)
