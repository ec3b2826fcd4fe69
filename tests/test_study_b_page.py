"""The Study B comparison page on fake records of the real grid's ids (two seeds)."""

from __future__ import annotations

import pytest

from collapse_utils.book.family_pages import family_summary
from tests.fake_records import GRID_LRS, grid_records, write_study


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    params = write_study(tmp_path_factory.mktemp("study_b"), grid_records(b16=True))
    return family_summary("smoke", "study_b", params, show=False)


def test_the_page_names_the_baselines_that_have_not_run(page):
    assert "B_probe_eurosat" in page.notes[0] and "B_last_eurosat_lr1e-4" in page.notes[0]


def test_cell_table_has_one_row_per_dataset_method_lr_with_two_seeds(page):
    cells = page.tables["cells"]
    assert len(cells) == 16 and set(cells["seeds"]) == {2}
    assert {"retention_cifar100_mean", "retention_cifar100_sd", "d_entropy_pct_sel_sd"} <= set(
        cells.columns
    )
    assert "Zero-shot retention CIFAR-100 runs from" in page.findings


def test_paired_tests_find_full_ft_forgets_more_at_matched_lr_and_seed(page):
    paired = page.tables["paired"]
    row = paired.loc[("eurosat", "retention_cifar100")]
    assert row["n"] == 8 and row["diff"] < 0 and row["p_t_holm"] < 0.05
    assert row["mean_b"] > 1  # in % as its label says (stored as a fraction)
    tested = paired.dropna(subset=["p_t"])
    assert len(tested) == 2 and (tested["p_t_holm"] >= tested["p_t"]).all()
    same = paired.loc[("pets", "d_entropy_pct_sel")]  # entropy moves alike: nothing to test
    assert same["diff"] == 0 and same["p_t"] != same["p_t"]


def test_embedding_drift_ranks_retention_first_and_figures_are_captioned(page):
    ranking = page.tables["signal_ranking"]
    assert ranking.index[0] == "embedding_drift_sel"
    assert ranking.loc["embedding_drift_sel", "rho"] < -0.9
    assert ranking.loc["embedding_drift_sel", "n_units"] == 16  # cells, not runs
    assert set(page.figures) == {
        "study_b_dose_response", "study_b_retention_vs_entropy", "study_b_signal_ranking"
    }  # fmt: skip
    assert all(page.captions[name] for name in page.figures)
    assert "Embedding drift" in page.findings and "Full FT minus LoRA" in page.findings


def test_operating_points_are_one_lr_per_dataset_and_method(page):
    points = page.tables["operating_points"]
    assert len(points) == 4 and set(points["lr"]) <= set(GRID_LRS)
    assert "operating points" in page.findings


def test_the_b16_arm_is_analysed_apart_and_never_pooled(page):
    assert len(page.tables["ViTB16_cells"]) == 6  # EuroSAT × 2 methods × 3 lrs, its own table
    assert set(page.tables["ViTB16_cells"].index.get_level_values("dataset")) == {"eurosat"}
    polarity = page.tables["polarity"]
    rho = polarity["rho_d_entropy_pct_sel"]
    # Entropy falls with forgetting on B/32 and rises on B/16: the sign flips per backbone.
    assert (rho.xs("openai/clip-vit-base-patch32", level="model") > 0).all()
    assert (rho.xs("openai/clip-vit-base-patch16", level="model") < 0).all()
    assert "ViT-B/16" in page.findings


def test_the_notebook_asks_the_sections_in_the_librarys_order_and_shows_a_conclusion():
    """13_study_b.ipynb shows each step; study_b_page (this module's fixture) runs the same."""
    import re
    from pathlib import Path

    import nbformat

    from collapse_utils.book import study_b_page

    notebook = Path(__file__).resolve().parent.parent / "notebooks" / "13_study_b.ipynb"
    cells = nbformat.read(notebook, as_version=4).cells
    code = "\n".join(c.source for c in cells if c.cell_type == "code")
    called = re.findall(r"sections\.(\w+)\(page", code)
    assert called == [s.__name__ for s in study_b_page.SECTIONS] + ["backbones"]
    headings = [c.source.splitlines()[0] for c in cells if c.cell_type == "markdown"]
    assert sum(h.startswith("## ") for h in headings) == len(called) + 2  # runs, conclusion
    assert headings[-1] == "## Conclusion" and "page.conclusion()" in cells[-1].source
