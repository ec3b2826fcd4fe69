"""Every page notebook reads as its analysis: the library's steps called one by one in the
library's order under their own headings, and a conclusion in words as the last output, never a
glue directive that only the book renders."""

from __future__ import annotations

import re

import nbformat
import pytest

from collapse_utils.book import interpolation_page, study_pages
from collapse_utils.config import REPO_ROOT

NOTEBOOKS = REPO_ROOT / "notebooks"
# notebooks with a step tuple in the library (family notebooks: tests/test_family_pages.py)
STEPS = {
    "07_zero_shot": study_pages.ZEROSHOT_STEPS,
    "11_interpolation": interpolation_page.INTERPOLATION_STEPS,
}


def cells(stem: str) -> list:
    return nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4).cells


@pytest.mark.parametrize("stem", list(STEPS))
def test_the_notebook_calls_the_librarys_steps_in_order(stem):
    code = "\n".join(c.source for c in cells(stem) if c.cell_type == "code")
    assert re.findall(r"show_step\(steps\.(\w+),", code) == [s.__name__ for s in STEPS[stem]]
    headings = [c.source.splitlines()[0] for c in cells(stem) if c.cell_type == "markdown"]
    assert sum(h.startswith("## ") for h in headings) == len(STEPS[stem]) + 2  # runs, conclusion


@pytest.mark.parametrize("stem", sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")))
def test_every_page_ends_on_its_conclusion_and_pastes_no_paragraph(stem):
    notebook = cells(stem)
    assert not [c for c in notebook if "{glue:md}" in c.source], stem
    assert notebook[-2].cell_type == "markdown" and notebook[-2].source == "## Conclusion"
    assert notebook[-1].cell_type == "code" and "conclusion(" in notebook[-1].source
