"""The authors' published Study B runs (analysis.published): the loader's mapping, its checksum
guard, and our Study B analysis giving the authors' own revised answers on their runs."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from collapse_utils.analysis import published, study_b


@pytest.fixture(scope="module")
def runs() -> pd.DataFrame:
    return study_b.add_derived(published.load_study2())


@pytest.fixture(scope="module")
def summary() -> dict:
    return published.study2_summary()


@pytest.fixture(scope="module")
def ranking(runs) -> pd.DataFrame:
    return study_b.signal_ranking(runs, n_boot=1000)


def test_loader_maps_their_columns_to_our_run_summary_names(runs):
    raw = pd.read_csv(published.STUDY2_DIR / "run_level.csv")
    assert len(runs) == 66 and runs["model"].eq(published.PRIMARY_MODEL).all()
    assert set(runs["method"]) == {"full", "lora", "lora_frozen_proj", "linear_probe",
                                   "last_block"}  # fmt: skip
    first = raw.set_index("run_id").loc["S2_eurosat_lora_r8_lr3e-5_seed11"]
    ours = runs.set_index("run_id").loc["S2_eurosat_lora_r8_lr3e-5_seed11"]
    assert ours["run"] == "S2_eurosat_lora_r8_lr3e-5" and ours["method"] == "lora"
    assert ours["retention_cifar100"] == pytest.approx(first["cifar100_retention"] / 100)
    assert ours["zs_cifar10"] == pytest.approx(first["cifar10_acc"] / 100)
    assert ours["cka_mean_sel"] == first["cka_mean"]
    assert ours["d_entropy_pct_e1"] == first["epoch1_delta_entropy_pct"]
    assert ours["abs_d_entropy_last_pct_sel"] == first["abs_delta_entropy_last_layer_pct"]
    assert ours["corruption_mean_acc"] == first["corruption_mean_acc"]  # unmapped: kept
    assert "epoch1_log10_lr" not in runs and "delta_entropy_pct" not in runs


def test_the_second_backbone_comes_only_when_asked_and_is_split_off_by_primary():
    both = published.load_study2(all_backbones=True)
    assert len(both) == 84
    assert (both["model"] == "openai/clip-vit-base-patch16").sum() == 18
    assert len(published.primary(both)) == 66


def test_a_changed_published_file_is_refused_by_name(tmp_path):
    folder = tmp_path / "study2"
    shutil.copytree(published.STUDY2_DIR, folder)
    path = folder / "run_level.csv"
    path.write_bytes(path.read_bytes().replace(b"0.9466666666666667", b"0.9566666666666667", 1))
    with pytest.raises(published.PublishedDataError, match=r"run_level\.csv differs"):
        published.verified_path("run_level.csv", folder)
    (folder / "summary.json").unlink()
    with pytest.raises(published.PublishedDataError, match=r"summary\.json is missing"):
        published.study2_summary(folder)


def test_a_table_that_is_not_study2s_is_named(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("run,lr\nE2,1e-5\n")
    with pytest.raises(published.PublishedDataError, match=r"lacks the column.*dataset"):
        published.load_study2(path)


def test_our_ranking_equals_the_authors_on_their_runs(ranking, summary):
    for row in summary["predictor_ranking_final"]:
        name = published.our_column(row["predictor"])
        if name not in ranking.index:
            continue  # a column our ranking leaves to other tables (CKA of the last layer …)
        ours = ranking.loc[name]
        assert ours["rho"] == pytest.approx(row["spearman_overall"], abs=1e-9), name
        assert ours["abs_rho_within_method"] == pytest.approx(
            row["abs_spearman_within_mean"], abs=1e-9
        ), name
    assert len(ranking) == 11


def test_only_the_extremes_separate_under_the_cell_bootstrap(ranking, summary):
    theirs = {published.our_column(r["predictor"]) for r in summary["bootstrap_predictor_gap"]
              if r["gap_ci_low"] > 0}  # fmt: skip
    assert set(study_b.separated(ranking)) == theirs
    assert set(theirs) == {"abs_d_entropy_last_pct_sel", "test_acc", "log10_lr",
                           "d_entropy_pct_sel"}  # fmt: skip
    for row in summary["bootstrap_predictor_gap"]:
        name = published.our_column(row["predictor"])
        assert abs(ranking.loc[name, "unit_rho"]) == pytest.approx(row["abs_rho"], abs=1e-9)


def test_by_runs_cka_beats_embedding_drift_and_by_cells_it_does_not(runs, ranking):
    by_runs = study_b.signal_ranking(runs, resample=None, n_boot=1000)
    assert by_runs.loc["embedding_drift_sel", "gap_low"] > 0
    assert ranking.loc["embedding_drift_sel", "gap_low"] < 0


def test_key_numbers_agree_with_the_authors_summary(runs, ranking, summary):
    paired = study_b.paired_table(runs, ["d_entropy_pct_sel"])
    early = study_b.early_warning(runs)
    ours = published.key_numbers(ranking, paired, early)
    table = published.beside_authors(ours, published.authors_key_numbers(summary))
    assert table["agree"].all(), table[~table["agree"]]
    assert ours["within_entropy"] == pytest.approx(0.860, abs=5e-4)
    assert ours["rho_entropy"] == pytest.approx(0.361, abs=5e-4)
    assert ours["within_lr"] == pytest.approx(0.810, abs=5e-4)


def test_beside_authors_flags_a_disagreement():
    theirs = published.authors_key_numbers()
    ours = theirs.copy()
    ours["within_entropy"] += 0.05
    ours["p_entropy_pets"] *= 2
    table = published.beside_authors(ours, theirs)
    assert not table.loc["within_entropy", "agree"] and not table.loc["p_entropy_pets", "agree"]
    assert table["agree"].sum() == len(table) - 2


def test_signal_based_choice_picks_the_authors_runs(runs, summary):
    table = study_b.selection(runs)
    for record in summary["selection_utility"]:
        dataset = record["dataset"]
        band = table.loc[dataset]
        assert band["candidates"].iloc[0] == record["n_candidates"]
        assert band["oracle"].iloc[0] == pytest.approx(record["oracle_retention"] / 100)
        assert band["random"].iloc[0] == pytest.approx(record["random_choice_retention"] / 100)
        for signal, pick in record["signals"].items():
            run, seed = pick["chosen_run"].rsplit("_seed", 1)
            assert band.loc[published.our_column(signal), "picked"] == f"{run}/s{seed}"


def test_verdicts_on_their_runs_say_the_relation_is_not_stable(runs):
    found = study_b.verdicts(runs)
    rq3 = found["RQ3"]
    assert rq3.verdict == "not stable across configurations"
    assert rq3.numbers["positive"] >= 1 and rq3.numbers["negative"] >= 1
    assert rq3.numbers["pooled_rho"] == pytest.approx(0.361, abs=5e-4)
    assert rq3.numbers["mean_abs_rho"] == pytest.approx(0.860, abs=5e-4)
    rq2 = found["RQ2"]
    assert rq2.verdict == "not stable across configurations"  # Pets differs, EuroSAT does not
    assert (
        "eurosat: LoRA − Full FT +0.41" in rq2.detail and "pets: LoRA − Full FT +1.63" in rq2.detail
    )


def test_the_published_page_states_the_authors_revised_answers(runs):
    from collapse_utils.book import study_b_page as sections
    from collapse_utils.book import study_b_published as chapter

    page = chapter.published_page("smoke", show=False)
    for section in (sections.paired, sections.verdicts, sections.ranking, sections.early_warning):
        page.finding(section(page, runs, "retention_cifar100"))
    page.finding(chapter.authors_section(page, runs))
    page.conclusion()
    text = page.findings
    assert "not a meter of the damage" in text  # a dose meter, not a damage meter
    assert "CKA to pre-trained, layer mean (ρ = +0.96), Embedding drift (ρ = -0.92)" in text
    assert "the gap to it excludes 0 only for |Δ Entropy|, last layer (%)" in text
    assert "All 11 numbers" in text
    assert "3529817" in page.source and "smoke" in page.source  # says where, not "smoke numbers"
    assert set(page.figures) == {
        "study2_study_b_retention_vs_entropy",
        "study2_study_b_signal_ranking",
    }


def test_polarity_without_a_single_correlation_says_why():
    from collapse_utils.book import study_b_page as sections
    from collapse_utils.book import study_b_published as chapter

    runs = study_b.add_derived(published.load_study2(all_backbones=True))
    eurosat = runs[runs["dataset"] == "eurosat"].groupby(["model", "method"]).head(1)  # 1 each
    frames = {model: rows for model, rows in eurosat.groupby("model")}
    text = sections.polarity(chapter.published_page("smoke", show=False), frames,
                             "retention_cifar100")  # fmt: skip
    assert text.endswith("has no value in any dataset × method group of any backbone: too few "
                         "runs that differ.")  # fmt: skip
