"""Every glue key a notebook pastes is written out in full in the library (so grep finds where
it is made), and the library glues nothing that no notebook pastes."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

from collapse_utils.book import statistics_chapter

REPO = Path(__file__).resolve().parent.parent
# {glue:text}`key:.2f`, {glue:md}`key`, {glue}`key` and the ```{glue:md} key directive
PASTED = re.compile(r"\{glue(?::\w+)?\}(?:`([A-Za-z0-9_]+)|\s+([A-Za-z0-9_]+))")
GLUED = re.compile(r"""\bglue\(\s*["']([A-Za-z0-9_]+)["']""")


def pasted_keys() -> set[str]:
    keys = set()
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "markdown":
                keys |= {a or b for a, b in PASTED.findall(cell.source)}
    return keys


def library_source() -> str:
    return "\n".join(p.read_text() for p in sorted((REPO / "collapse_utils").rglob("*.py")))


def test_no_glue_key_is_built_at_run_time():
    assert not re.search(r"\bglue\(\s*f[\"']", library_source())


def test_every_pasted_key_is_written_out_in_the_library():
    source = library_source()
    keys = pasted_keys()
    assert {"a_layer_welch_p", "b_runs", "c_reference", "d_results"} <= keys
    assert not [k for k in sorted(keys) if f'"{k}"' not in source]


def test_the_library_glues_only_keys_that_a_notebook_pastes():
    tables = (
        statistics_chapter.A_GLUE,
        statistics_chapter.B_GLUE,
        statistics_chapter.C_TOP_GLUE,
        statistics_chapter.CORRELATION_GLUE,
    )
    glued = set(GLUED.findall(library_source())) | {k for table in tables for k in table}
    assert glued == pasted_keys()
