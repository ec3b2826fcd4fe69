"""Family pages read their runs from params/families.yaml and the experiment files: a fixture
params folder with one more experiment file (E5_r32) and fake records stand in for a study."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest

from collapse_utils.book.family_pages import FAMILY_STEPS, family_summary
from collapse_utils.book.statistics_chapter import StatisticsChapter
from collapse_utils.code_hash import TRAINING_CODE, training_code_hash
from collapse_utils.config import PARAMS_DIR, load_config
from collapse_utils.families import comparison_ids, load_families
from collapse_utils.run_record import read_record
from tests.fake_records import LAYERS, START, record, write_records

E5_R32 = """id: E5_r32
family: full_vs_lora
description: LoRA r=32 EuroSAT
data: {dataset: eurosat}
train: {method: lora}
lora: {rank: 32, alpha: 64}
"""
R32_CHANGE = [0.05] * LAYERS
FULL_VS_LORA = ["E2", "E3", "E4", "E5", "E5_r32", "E6", "E7"]  # references, then id order


@pytest.fixture
def params(tmp_path: Path) -> Path:
    """The real params folder plus ``E5_r32.yaml``, the smoke profile writing under tmp_path."""
    params = tmp_path / "params"
    shutil.copytree(PARAMS_DIR, params)
    profile = params / "profiles" / "smoke.yaml"
    text = profile.read_text().replace("output_root: outputs/smoke", "output_root: PLACEHOLDER")
    profile.write_text(text.replace("PLACEHOLDER", str(tmp_path / "outputs")))
    (params / "experiments" / "E5_r32.yaml").write_text(E5_R32)
    return params


def write_runs(params: Path, ids: list[str], seeds: tuple[int, ...] = (42,)) -> None:
    """Complete fake records of ``ids`` (every seed); E5_r32 raises entropy by 5 % in every
    layer."""
    records = []
    for i in ids:
        for seed in seeds:
            config = load_config("smoke", i, params, seed=seed)
            base = -0.01 * (len(i) % 4)
            change = R32_CHANGE if i == "E5_r32" else [base - 0.002 * k for k in range(LAYERS)]
            records.append(record(config, change))
    write_records(params.parent / "outputs", records)


def titles(fig) -> list[str]:
    """Panel titles without the method after the run: ``E5_r32 (LoRA)`` → ``E5_r32``."""
    return [ax.get_title().split(" (")[0] for ax in fig.axes]


def legend(fig) -> set[str]:
    """The runs a figure draws: its lines' labels (written at their ends; the legend under the
    figure names the methods)."""
    return {line.get_label() for ax in fig.axes for line in ax.lines}


def test_a_new_experiment_file_appears_in_its_family_table_figures_and_findings(params):
    assert comparison_ids("smoke", load_families(params)["full_vs_lora"], params) == FULL_VS_LORA
    write_runs(params, FULL_VS_LORA)
    page = family_summary("smoke", "full_vs_lora", params, show=False)

    assert not page.notes  # nothing missing
    comparison = page.tables["comparison"]
    assert list(comparison.index) == FULL_VS_LORA
    assert comparison.loc["E5_r32", "d_entropy_pct"] == pytest.approx(5.0)
    assert comparison.loc["E5_r32", "rank"] == 32 and comparison.loc["E5_r32", "seeds"] == 1
    axis = page.tables["axis"]
    assert list(axis.index) == ["E4", "E5", "E6", "E5_r32", "E7"]  # EuroSAT by rank, then Pets
    assert "E5_r32" in titles(page.figures["fig4_layer_entropy_heatmap"])
    assert "E5_r32" in legend(page.figures["fig5_fullft_vs_lora"])
    assert "E5_r32" not in legend(page.figures["fig5b_fullft_vs_lora_pets"])
    assert "E5_r32" in legend(page.figures["fig9_head_diversity"])
    assert "under LoRA (E4, E5, E5_r32, E6, E7)" in page.findings
    lora = comparison.loc[["E4", "E5", "E6", "E7", "E5_r32"], "d_entropy_pct"].mean()
    assert f"by {lora:+.2f} % under LoRA" in page.findings


def test_the_statistics_chapter_compares_the_new_experiment_too(params):
    write_runs(params, FULL_VS_LORA)
    chapter = StatisticsChapter("smoke", params)
    assert chapter.method_runs == FULL_VS_LORA and chapter.method_dataset == "eurosat"
    chapter.full_vs_lora()
    layer = chapter.comparisons["layer"].result
    assert (layer.n_a, layer.n_b) == (LAYERS, 4 * LAYERS)  # E2 vs E4, E5, E6, E5_r32


def test_a_family_page_with_only_the_new_run_names_the_missing_ones(params):
    write_runs(params, ["E5_r32"])
    page = family_summary("smoke", "full_vs_lora", params, show=False)
    assert page.notes == ["**Not complete yet, left out:** E2, E3, E4, E5, E6, E7"]
    assert list(page.tables["comparison"].index) == ["E5_r32"]
    assert "fig5_fullft_vs_lora" in page.figures
    assert "fig5b_fullft_vs_lora_pets" not in page.figures  # no Pets run is complete
    assert "+5.00 % under LoRA (E5_r32)" in page.findings


def test_tables_show_the_seed_mean_and_count_and_curves_every_seed(params):
    write_runs(params, ["E2", "E4"], seeds=(42, 7))
    page = family_summary("smoke", "full_vs_lora", params, show=False)
    comparison = page.tables["comparison"]
    assert comparison.loc["E2", "seeds"] == 2 and len(comparison) == 2
    assert legend(page.figures["fig5_fullft_vs_lora"]) >= {"E2/s7", "E2/s42", "E4/s7", "E4/s42"}


@pytest.mark.parametrize("family", list(load_families()))
def test_every_family_page_renders_with_no_run_and_with_any_single_run_of_each_kind(params, family):
    page = family_summary("smoke", family, params, show=False)
    assert "No run of this comparison is complete yet" in page.findings
    ids = comparison_ids("smoke", load_families(params)[family], params)
    assert page.notes == [f"**Not complete yet, left out:** {', '.join(ids)}"]
    outputs = params.parent / "outputs"
    # One run of each kind (description): Study B's grid repeats its kinds over lr and dataset.
    kinds = {load_config("smoke", i, params).description: i for i in reversed(ids)}
    for run in [i for i in ids if i in kinds.values()]:
        shutil.rmtree(outputs, ignore_errors=True)
        write_runs(params, [run])
        page = family_summary("smoke", family, params, show=False)
        if run.startswith("B_b16"):  # a second backbone alone: its own table, nothing pooled
            assert "None of the 1 complete runs is on the primary backbone" in page.findings
            assert page.tables["tinypatch16_cells"]["seeds"].sum() == 1  # smoke: a tiny patch-16
            assert "cells" not in page.tables
            continue
        assert page.findings and page.figures, (family, run)
        if load_families(params)[family].study == "report":  # Study B tables are per cell
            assert all(run in table.index.get_level_values(0) for table in page.tables.values())
        else:
            assert page.tables["cells"]["seeds"].sum() == 1


def test_baseline_page_tables_the_seed_mean_profile(params):
    write_runs(params, ["E1_eurosat", "E1_pets"])
    page = family_summary("smoke", "baseline", params, show=False)
    table = page.tables["structure"]
    assert table.loc[("E1_eurosat", "Entropy"), "mean"] == pytest.approx(np.mean(START), abs=1e-4)
    assert table.loc[("E1_pets", "Entropy"), "seeds"] == 1
    assert "most concentrated layer is layer 1" in page.findings


def test_runs_made_by_different_training_code_are_named_on_the_comparison(params):
    write_runs(params, ["E2", "E4"])
    assert not any("training code" in n for n in family_summary("smoke", "full_vs_lora", params,
                                                                show=False).notes)  # fmt: skip
    history = params.parent / "outputs" / "runs" / "E4" / "seed42" / "history.json"
    old = dataclasses.replace(read_record(history), versions={TRAINING_CODE: "0ld"})
    old.write(history)
    notes = family_summary("smoke", "full_vs_lora", params, show=False).notes
    warning = next(n for n in notes if "different training code" in n)
    assert "E4 `0ld`" in warning and f"E2 `{training_code_hash()}`" in warning
    assert "--profile smoke --stale" in warning


@pytest.mark.parametrize("family", list(FAMILY_STEPS))
def test_each_family_notebook_shows_its_steps_in_the_librarys_order(family):
    notebook = PARAMS_DIR.parent / "notebooks" / f"{load_families()[family].notebook}.ipynb"
    cells = nbformat.read(notebook, as_version=4).cells
    code = "\n".join(c.source for c in cells if c.cell_type == "code")
    assert re.findall(r"show_step\(steps\.(\w+),", code) == [
        s.__name__ for s in FAMILY_STEPS[family]
    ]
    headings = [c.source.splitlines()[0] for c in cells if c.cell_type == "markdown"]
    assert sum(h.startswith("## ") for h in headings) == len(FAMILY_STEPS[family]) + 2
    assert headings[-1] == "## Conclusion" and cells[-1].source == "page.conclusion()"
