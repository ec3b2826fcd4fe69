"""The book's one table formatter: human column names with units, accuracy in %, changes with
sign, p in scientific notation below 0.001, learning rates as 1e-5, ints as ints, blank for
missing, and a block that scrolls when the table is wide."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from collapse_utils.analysis import stat_tables
from collapse_utils.analysis.results import per_layer_delta, run_summary
from collapse_utils.book.tables import (
    BLANK_NOTE,
    FOLD_ROWS,
    NUMBER,
    Column,
    column_spec,
    format_lr,
    format_p,
    format_table,
    show_table,
    table_html,
)
from tests.fake_records import histories

SNAKE_CASE = re.compile(r"(?<![A-Za-z0-9])[a-z][a-z0-9]*_[a-z0-9_]+")


def test_accuracy_is_in_percent_and_changes_carry_their_sign():
    frame = pd.DataFrame({"best_acc": [0.8731, 1.0], "d_entropy_pct": [-0.4, 1.234]})
    shown = format_table(frame)
    assert list(shown.columns) == ["Best accuracy (%)", "Δ Entropy (%)"]
    assert shown["Best accuracy (%)"].tolist() == ["87.31", "100.00"]
    assert shown["Δ Entropy (%)"].tolist() == ["-0.40", "+1.23"]


@pytest.mark.parametrize(
    ("p", "text"),
    [(0.5, "0.500"), (0.0123, "0.012"), (0.001, "0.001"), (2e-21, "2.0e-21"), (0.0, "<1e-300")],
)
def test_p_values_switch_to_scientific_notation_below_a_thousandth(p, text):
    assert format_p(p) == text


@pytest.mark.parametrize(
    ("lr", "text"), [(1e-5, "1e-5"), (5e-6, "5e-6"), (2.5e-4, "2.5e-4"), (0.001, "1e-3")]
)
def test_learning_rates_read_as_powers_of_ten(lr, text):
    assert format_lr(lr) == text


def test_three_learning_rates_no_longer_look_equal():
    shown = format_table(pd.DataFrame({"lr": [1e-6, 5e-6, 1e-5]}))
    assert shown["Learning rate"].tolist() == ["1e-6", "5e-6", "1e-5"]


def test_ints_print_as_ints_and_missing_values_are_blank():
    frame = pd.DataFrame(
        {
            "rank": pd.array([4, None], dtype="Int64").astype("Float64"),  # seed means: 4.0
            "seeds": [1.0, 3.0],
            "welch_p": [np.nan, 0.2],
            "targets": ["q_proj,v_proj", None],
        }
    )
    shown = format_table(frame)
    assert shown.to_dict("list") == {
        "LoRA rank": ["4", ""],
        "Seeds": ["1", "3"],
        "Welch p": ["", "0.200"],
        "LoRA targets": ["q, v", ""],
    }


def test_a_small_number_never_prints_as_zero():
    shown = format_table(pd.DataFrame({"spread": [0.00004, 0.0, 1.23456]}))
    assert shown.iloc[:, 0].tolist() == ["4.0e-05", "0.000", "1.235"]


def test_holm_columns_and_patterns_get_names_from_their_base_column():
    assert column_spec("welch_p_holm").label == "Welch p (Holm)"
    assert column_spec("p_claim_holm").label == "p of the claim (Holm)"
    assert column_spec("zs_cifar100").label == "Zero-shot CIFAR-100 (%)"
    assert column_spec("zs_cifar100_change").label == "Zero-shot CIFAR-100 change (points)"
    assert column_spec("entropy_f").label == "Entropy final (nats)"
    assert column_spec("late_mean").label == "Late mean Δ Entropy (%)"


def test_index_levels_and_their_values_are_named_too():
    pair = pd.MultiIndex.from_tuples([("d_entropy_pct", "best_acc")], names=["a", "b"])
    frame = pd.DataFrame({"r": [0.5]}, index=pair)
    shown = format_table(frame)
    assert list(shown.index.names) == ["Metric A", "Metric B"]
    assert shown.index[0] == ("Δ Entropy (%)", "Best epoch accuracy (%)")
    methods = format_table(pd.DataFrame({"method": ["full", "lora"]}))
    assert methods["Method"].tolist() == ["Full FT", "LoRA"]


def test_an_override_replaces_the_default_column():
    shown = format_table(pd.DataFrame({"t": [1.23456]}), {"t": Column("t statistic", NUMBER, 4)})
    assert shown.to_dict("list") == {"t statistic": ["1.2346"]}


def test_every_table_the_book_shows_has_human_headers_and_no_raw_numbers():
    """The run summary and the statistics tables, as the pages show them."""
    runs = histories()
    summary = run_summary(runs)
    trained = stat_tables.trained(runs)
    points = stat_tables.lr_sweep_points(summary, ["E2", "A1_lr1e-6", "A1_lr1e-5", "A1_lr1e-4"])
    frames = [
        summary,
        stat_tables.convergence_table(trained),
        stat_tables.dynamics_table(trained),
        stat_tables.lr_correlations(points),
        points,
        stat_tables.regularizer_tests(summary, per_layer_delta(trained), "E2"),
    ]
    for frame in frames:
        shown = format_table(frame)
        headers = [*shown.columns, *(n for n in shown.index.names if n)]
        assert not [h for h in headers if SNAKE_CASE.search(h)], headers
        cells = shown.to_numpy().ravel().tolist()
        assert not {"nan", "NaN", "<NA>", "None", "0.0000"} & set(cells)


def test_tables_sit_in_a_block_that_scrolls_sideways_with_numbers_aligned_right():
    html = table_html(pd.DataFrame({"best_acc": [0.5], "method": ["lora"]}))
    assert html.startswith('<div class="table-block"><div class="table-scroll"><table class=')
    assert "<th>0</th>" not in html  # no meaningless 0, 1, 2 row labels
    assert '<th class="num">Best accuracy (%)</th><th class="text">Method</th>' in html
    assert '<td class="num">50.00</td><td class="text">LoRA</td>' in html


def test_a_repeated_outer_index_value_is_left_blank_and_names_share_the_header_row():
    pairs = pd.MultiIndex.from_tuples([("x", "y"), ("x", "z"), ("y", "z")], names=["family", "run"])
    html = table_html(pd.DataFrame({"r": [0.1, 0.2, 0.3]}, index=pairs))
    assert html.count("<tr>") == 4  # one header row, three rows
    assert '<th class="index">Family</th><th class="index">Run</th>' in html
    assert "<tr><th>x</th><th>y</th>" in html and "<tr><th></th><th>z</th>" in html
    assert "<tr><th>y</th><th>z</th>" in html


def test_study_b_columns_read_as_words_with_unsigned_sds():
    frame = pd.DataFrame(
        {
            "d_entropy_pct_mean": [-3.456],
            "d_entropy_pct_sd": [0.4],
            "retention_cifar10": [0.9],
            "retention_cifar100_mean": [0.8],
        }  # fmt: skip
    )
    shown = format_table(frame)
    assert list(shown.columns) == [
        "Δ Entropy (%), mean", "Δ Entropy (%), SD", "Zero-shot retention CIFAR-10 (%)",
        "Zero-shot retention CIFAR-100 (%), mean",
    ]  # fmt: skip
    assert shown.iloc[0].tolist() == ["-3.46", "0.40", "90.00", "80.00"]


def test_selected_and_epoch_one_changes_and_their_sizes_are_named():
    frame = pd.DataFrame({"d_entropy_pct_sel": [-1.5], "abs_d_gini_pct_sel": [2.25],
                          "d_entropy_pct_e1": [0.5], "abs_d_entropy_pct_e1": [0.5]})  # fmt: skip
    shown = format_table(frame)
    assert list(shown.columns) == [
        "Δ Entropy (%)", "|Δ Gini| (%)", "Δ Entropy after epoch 1 (%)",
        "|Δ Entropy| after epoch 1 (%)",
    ]  # fmt: skip
    assert shown.iloc[0].tolist() == ["-1.50", "2.25", "+0.50", "0.50"]


def test_a_change_that_rounds_to_zero_has_no_sign():
    shown = format_table(pd.DataFrame({"d_entropy_pct": [-0.004, 0.003, -0.006]}))
    assert shown.iloc[:, 0].tolist() == ["0.00", "0.00", "-0.01"]


def test_a_value_that_rounds_to_zero_shows_no_minus_sign():
    from collapse_utils.book.tables import ACC, Column, format_number, format_value

    assert format_number(-0.0) == "0.000"  # a non-zero value that rounds to 0 goes scientific
    assert format_value(-0.00001, Column("accuracy", ACC)) == "0.00"
    assert format_value(-0.0001, Column("accuracy", ACC)) == "-0.01"  # not zero: keeps its sign


def test_a_table_is_captioned_long_ones_fold_and_a_blank_is_explained_once():
    frame = pd.DataFrame({"best_acc": [0.5, np.nan]}, index=pd.Index(["E2", "E3"], name="run"))
    html = table_html(frame, caption="Table 1. Two runs.")
    assert '<p class="table-caption">Table 1. Two runs.</p>' in html
    assert html.count(BLANK_NOTE) == 1 and "<details" not in html
    long = pd.DataFrame({"best_acc": np.linspace(0, 1, FOLD_ROWS + 1)})
    folded = table_html(long, caption="Many rows.")
    assert folded.startswith('<details class="table-fold"><summary>Many rows.')
    assert BLANK_NOTE not in folded
    with pytest.raises(ValueError, match="caption"):
        show_table(frame, "")
