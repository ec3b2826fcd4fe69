from __future__ import annotations

import math

import pytest

import collapse_utils.book.statistics_chapter as chapter_module
from collapse_utils.book.statistics_chapter import StatisticsChapter, mwu_floor
from collapse_utils.training.experiment import run_experiment
from tests.test_train import small


def test_mann_whitney_floor_is_two_over_the_number_of_rankings():
    assert mwu_floor(2, 4) == pytest.approx(2 / 15)
    assert math.isnan(mwu_floor(float("nan"), 4))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    for experiment in ("E1_eurosat", "E2", "E4", "E5", "R2_entfloor0.1"):
        run_experiment(small(root, experiment, output_root=str(root)), progress=False)
    patch = pytest.MonkeyPatch()
    patch.setattr(chapter_module, "profile_output_root", lambda profile, params_dir: root)
    yield StatisticsChapter("smoke")
    patch.undo()


def test_every_section_runs_on_a_partial_study(page):
    overview = page.overview()
    assert sorted(overview["run"]) == ["E1_eurosat", "E2", "E4", "E5", "R2_entfloor0.1"]
    table_a = page.full_vs_lora()
    assert "layer" in table_a.index
    assert table_a.loc["layer", "n_full"] == 3  # E2's three layers (small test model)
    assert page.lr_sweep().empty  # one learning rate only: the section says so instead
    table_c = page.regularizers()
    assert list(table_c.index) == ["R2_entfloor0.1"]
    # smoke follows the report's code: §6.4 C pairs final per-layer entropy in nats
    assert page.c_nats
    layers = page.c_layers.groupby(level="run").mean()
    expected = (layers.loc["R2_entfloor0.1"] - layers.loc["E2"]).mean()
    assert table_c.loc["R2_entfloor0.1", "mean_diff"] == pytest.approx(expected)
    assert page.layer_position().index.tolist() == ["E2", "E5"]
    assert len(page.correlations()) == 10  # pairs of the 5 summary columns
    assert {run for run, _ in page.dynamics().index} >= {"E2", "E5"}
    assert len(page.convergence()) == 4
    page.per_layer_figure()
    page.dashboard()
    page.summary_figure()
    assert (page.output_root / "figures" / "fig11_statistical_summary.png").is_file()


def test_a_profile_without_trained_runs_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(chapter_module, "profile_output_root", lambda profile, params_dir: tmp_path)
    with pytest.raises(RuntimeError, match="no complete trained run"):
        StatisticsChapter("smoke")
