"""End to end: the runner executes the real notebooks on a few smoke configurations (one of them
broken) and builds the book with warnings as errors (the session fixture ``book`` in
``conftest.py``, shared with the browser check in ``test_book_browser.py``)."""

from __future__ import annotations

import nbformat
import pytest

from collapse_utils.book.page import profile_note


@pytest.mark.slow
def test_broken_configuration_fails_alone_and_the_book_still_builds(book):
    _, report = book
    assert [e.config_id for e, _ in report.failed] == ["E9_broken"]
    assert not report.ok
    assert report.build_returncode == 0


@pytest.mark.slow
def test_executed_notebooks_have_no_error_cells_except_the_broken_one(book):
    paths, report = book
    for execution in report.executed:
        notebook = nbformat.read(execution.output, as_version=4)
        errors = [
            o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"
        ]
        if execution.config_id == "E9_broken":
            assert errors and errors[0].ename == "DatasetUnavailableError"
        else:
            assert not errors, execution.name
        if execution.config_id:  # run pages keep no (empty) progress widget
            view = "application/vnd.jupyter.widget-view+json"
            outputs = [o for c in notebook.cells for o in c.get("outputs", [])]
            assert not [o for o in outputs if view in o.get("data", {})], execution.name


@pytest.mark.slow
def test_every_executed_page_ends_on_its_conclusion_as_jupyter_shows_it(book):
    # What a reader sees opening the executed notebook in Jupyter: the last cell's output is
    # the profile note and a conclusion in words (not a glue directive only the book renders).
    _, report = book
    for execution in report.executed:
        if execution.config_id == "E9_broken":
            continue  # stops at its error cell
        notebook = nbformat.read(execution.output, as_version=4)
        last = [c for c in notebook.cells if c.cell_type == "code"][-1]
        shown = "".join(o.get("data", {}).get("text/markdown", "") for o in last.outputs)
        note, _, conclusion = shown.partition("\n\n")
        # the published runs' page names its real-model source instead of the profile
        published = execution.source.stem == "14_study_b_published"
        assert note.startswith("*Real-model data") if published else note == profile_note("smoke")
        assert len(conclusion.strip()) > 40, execution.name


@pytest.mark.slow
def test_book_has_every_page_with_glued_numbers_and_the_smoke_banner(book):
    paths, _ = book
    html = paths.root / "_build" / "html"
    pages = {
        "intro": html / "book" / "intro.html",
        "E2": html / "book" / "executed" / "02_full_ft_vs_lora" / "E2.html",
        "family": html / "book" / "executed" / "02_full_ft_vs_lora" / "summary.html",
        "broken": html / "book" / "executed" / "02_full_ft_vs_lora" / "E9_broken.html",
        "statistics": html / "book" / "executed" / "08_statistics.html",
        "explore": html / "book" / "executed" / "09_explore.html",
    }
    for name in ("07_zero_shot", "10_reproducibility", "01_baseline/E1_eurosat"):
        pages[name] = html / "book" / "executed" / f"{name}.html"
    for name, page in pages.items():
        assert page.is_file(), name
    e2 = pages["E2"].read_text()
    assert "Best test accuracy over epochs" in e2  # the glued findings (smoke: original split)
    assert "not findings" in e2  # smoke banner / note
    assert "DatasetUnavailableError" in pages["broken"].read_text()
    assert "application/vnd.jupyter.widget-state+json" in pages["explore"].read_text()


@pytest.mark.slow
def test_study_b_pages_of_a_tiny_grid_fold_under_their_analysis(book):
    paths, report = book
    grid = [e for e in report.executed if e.family == "study_b"]
    assert sorted(e.output.stem for e in grid if e.config_id) == sorted(
        f"Bt_{m}_lr{lr}_s{s}" for m in ("full", "lora") for lr in ("1e-3", "1e-2") for s in (7, 11)
    )
    html = paths.root / "_build" / "html" / "book" / "executed" / "13_study_b"
    summary = (html / "summary.html").read_text()
    for text in ("Study B", "Full FT minus LoRA at matched learning rate", "operating points"):
        assert text in summary, text
    assert "CKA to pre-trained" in summary and "Zero-shot retention CIFAR-10" in summary
    toc = (paths.root / "_toc.yml").read_text()
    assert "sections:" in toc and "Bt_lora_lr1e-2_s11" in toc
    assert "Every run of this comparison has its own page" in summary  # linked, not trapped
    assert "Bt_lora_lr1e-2_s11" in (html / "runs.html").read_text()
