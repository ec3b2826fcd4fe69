"""The built smoke book (the session fixture ``book``) as a reader sees it, in headless Chromium:
every page of the toc is opened at 1280 × 900 and measured in the browser (headings, figures,
table headers and cells, tables' captions and key columns, widths as laid out); a screenshot of
each kind of page, and the measurements, are kept under ``outputs/browser/``.

Needs a Chromium (Debian's ``chromium`` package; ``make test`` installs it where apt-get can run
as root; ``CHROMIUM=/path`` picks another); without one the check skips and says so."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from matplotlib.colors import to_hex
from PIL import Image

from collapse_utils.book.figures import METHODS_KEY
from collapse_utils.book.style import METHOD_COLORS
from tests.chromium import Chromium, find_chromium

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "outputs" / "browser"
SCREENSHOTS = {
    "run_page": "book/executed/02_full_ft_vs_lora/E2",
    "family_page": "book/executed/02_full_ft_vs_lora/summary",
    "statistics": "book/executed/08_statistics",
    "study_b": "book/executed/13_study_b/summary",
    "findings": "book/executed/00_findings",
    "zero_shot": "book/executed/07_zero_shot",
    "reproduction_check": "book/executed/12_reproduction_check",
    "explore": "book/executed/09_explore",
}
# A table's row labels and this many columns after them are what a reader compares first: they
# must be in view without scrolling the table sideways.
KEY_COLUMNS = 3
NUMBERED_HEADING = re.compile(r"^\d+(\.\d+)*\.\s*")  # "7. " before a chapter's title
SNAKE_CASE = re.compile(r"(?<![A-Za-z0-9])[a-z][a-z0-9]*_[a-z0-9_]+")
RAW_CELLS = {"nan", "NaN", "-nan", "<NA>", "None", "NaT", "0.0000", "-0.0000"}
# What the page shows, measured after layout. Images inside live widgets (the explorer) are the
# widgets' own drawing, not the book's figures; a header in code font (a profile name in the
# method's table) is a literal name on purpose. "clipped": tables, images and code blocks whose
# right edge is cut off by an ancestor that hides overflow instead of scrolling it.
PROBE = r"""
(() => {
  const article = document.querySelector("article.bd-article") || document.body;
  const text = (node) => node.textContent.replace(/[#¶]\s*$/, "").trim();
  const prose = (node) => {
    const copy = node.cloneNode(true);
    copy.querySelectorAll("code").forEach((code) => code.remove());
    return text(copy);
  };
  const cut = (el) => {
    const right = el.getBoundingClientRect().right;
    for (let box = el.parentElement; box && box !== article; box = box.parentElement) {
      const overflow = getComputedStyle(box).overflowX;
      if (overflow === "auto" || overflow === "scroll") return false;
      if ((overflow === "hidden" || overflow === "clip")
          && right > box.getBoundingClientRect().right + 1) return true;
    }
    return false;
  };
  const clipped = [...article.querySelectorAll("table, img, pre")].filter(cut)
    .map((el) => `${el.tagName.toLowerCase()} ${el.textContent.trim().slice(0, 40)}`);
  const images = [...article.querySelectorAll("img")]
    .filter((img) => !img.closest(".jupyter-widgets"))
    .map((img) => {
      const figure = img.closest("figure");
      const caption = figure && figure.querySelector("figcaption");
      return {src: img.getAttribute("src"), figure: !!figure,
              caption: caption ? caption.textContent.trim() : ""};
    });
  // Folded long tables are opened to be measured; each table of the book's formatter: its
  // caption, and which of its first header cells end beyond its scrolling block's right edge.
  article.querySelectorAll("details").forEach((d) => { d.open = true; });
  const tables = [...article.querySelectorAll("table.book-table")].map((table) => {
    const block = table.closest(".table-block");
    const caption = block ? block.querySelector("p.table-caption")
      : table.closest("details.table-fold")?.querySelector("summary");
    const scroll = table.closest(".table-scroll");
    scroll.scrollLeft = 0;
    const edge = scroll.getBoundingClientRect().right + 1;
    const heads = [...table.querySelectorAll("thead th")];
    const index = heads.filter((th) => th.classList.contains("index")).length;
    const hidden = heads.slice(0, index + __KEY__)
      .filter((th) => th.getBoundingClientRect().right > edge).map(text);
    return {caption: caption ? text(caption) : "", hidden: hidden};
  });
  const main = document.querySelector(".bd-main") || article;
  const page = document.documentElement;
  return {
    title: document.title,
    h1: [...article.querySelectorAll("h1")].map(text),
    images: images,
    headers: [...article.querySelectorAll("thead th")].map(prose),
    cells: [...article.querySelectorAll("tbody td, tbody th")].map(text),
    overflow: {
      article: article.scrollWidth - article.clientWidth,
      main: main.scrollWidth - main.clientWidth,
      page: page.scrollWidth - page.clientWidth,
    },
    clipped: clipped,
    tables: tables,
  };
})()
""".replace("__KEY__", str(KEY_COLUMNS))


@pytest.fixture(scope="module")
def seen(book) -> dict[str, dict[str, Any]]:
    """Every page of the book's toc → what :data:`PROBE` measured on it."""
    binary = find_chromium()
    if binary is None:
        pytest.skip(
            "no Chromium found (Debian: apt-get install chromium, which `make test` does where "
            "apt-get runs as root; or CHROMIUM=/path/to/chrome): the browser check of the book "
            "did not run"
        )
    paths, _ = book
    html = paths.build / "html"
    toc = yaml.safe_load(paths.toc.read_text())
    chapters = [c for part in toc["parts"] for c in part["chapters"]]
    sections = [s for c in chapters for s in c.get("sections", [])]  # a grid's run pages
    files = [toc["root"], *(c["file"] for c in chapters), *(s["file"] for s in sections)]
    shots = {file: name for name, file in SCREENSHOTS.items()}
    SHOTS.mkdir(parents=True, exist_ok=True)
    pages = {}
    with Chromium(binary, width=1280, height=900) as browser:
        for file in files:
            # a page to photograph gets a second to finish its scripted scrolling first
            browser.open((html / f"{file}.html").as_uri(), settle_s=1.0 if file in shots else 0.2)
            pages[file] = browser.evaluate(PROBE)
            if file in shots:
                browser.screenshot(SHOTS / f"{shots[file]}.png")
    (SHOTS / "pages.json").write_text(json.dumps(pages, indent=1, ensure_ascii=False))
    assert set(SCREENSHOTS.values()) <= set(pages)
    return pages


def run_pages(seen: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pages of one configuration: ``book/executed/<notebook>/<id>``, not the family summary."""
    return {
        file: page
        for file, page in seen.items()
        if file.count("/") == 3 and not file.endswith(("/summary", "/runs"))
    }


def study_pages(seen: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Family comparisons and the pages across the study."""
    runs = run_pages(seen)
    return {f: p for f, p in seen.items() if f.startswith("book/executed/") and f not in runs}


@pytest.mark.slow
def test_each_run_page_is_headed_by_its_id_and_description(seen):
    pages = run_pages(seen)
    grid = {
        f"Bt_{m}_lr{lr}_s{s}" for m in ("full", "lora") for lr in ("1e-3", "1e-2") for s in (7, 11)
    }
    assert {Path(f).stem for f in pages} == {"E1_eurosat", "E2", "E9_broken", *grid}
    for file, page in pages.items():
        run = Path(file).stem
        heading = [NUMBERED_HEADING.sub("", h) for h in page["h1"]]
        assert len(heading) == 1 and heading[0].startswith(f"{run}: "), (file, page["h1"])
        assert NUMBERED_HEADING.sub("", page["title"]).startswith(f"{run}: "), page["title"]


@pytest.mark.slow
def test_every_image_on_study_pages_is_a_numbered_captioned_figure(seen):
    pages = study_pages(seen)
    assert len(pages) >= 5
    assert seen[SCREENSHOTS["statistics"]]["images"], "the statistics chapter shows no figure"
    for file, page in pages.items():
        for image in page["images"]:
            assert image["figure"], (file, image["src"])
            # numbered within its chapter: Fig. 7.2
            assert re.match(r"Fig\. \d+\.\d+ \S", image["caption"]), (file, image["caption"])


@pytest.mark.slow
def test_no_table_header_is_a_raw_column_name(seen):
    raw = {f: [h for h in p["headers"] if SNAKE_CASE.search(h)] for f, p in seen.items()}
    assert not {f: h for f, h in raw.items() if h}
    assert any(p["headers"] for p in seen.values())


@pytest.mark.slow
def test_no_cell_shows_nan_or_a_number_rounded_to_zero(seen):
    raw = {f: sorted(set(p["cells"]) & RAW_CELLS) for f, p in seen.items()}
    assert not {f: c for f, c in raw.items() if c}


@pytest.mark.slow
def test_the_main_column_never_scrolls_sideways_and_nothing_wide_is_cut_off(seen):
    wide = {f: p["overflow"] for f, p in seen.items() if max(p["overflow"].values()) > 1}
    assert not wide
    assert not {f: p["clipped"] for f, p in seen.items() if p["clipped"]}


MOVE_CONTROLS = r"""
(async () => {
  const root = document.querySelector(".cls-explorer");
  if (!root) return null;
  const canvas = root.querySelector("canvas");
  const settle = () => new Promise((done) => setTimeout(done, 150));
  await settle();
  const seen = [[canvas.dataset.drawn, canvas.toDataURL()]];
  const move = async (name, value, event) => {
    const control = root.querySelector(`[data-control="${name}"]`);
    control.value = value;
    control.dispatchEvent(new Event(event));
    await settle();
    seen.push([canvas.dataset.drawn, canvas.toDataURL()]);
  };
  // it opens on E2 (trained: several steps), its last layer and step
  await move("layer", "1", "input");
  await move("step", "0", "input");
  await move("head", "1", "change");
  await move("image", "1", "change");
  const run = root.querySelector('[data-control="run"]');
  const other = [...run.options].find((o) => o.value !== run.value);
  await move("run", other.value, "change");
  return seen;
})()
"""


@pytest.mark.slow
def test_the_static_explorer_redraws_when_a_control_moves_without_a_kernel(book):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium found: the static explorer was not checked in a browser")
    paths, _ = book
    page = paths.build / "html" / "book" / "executed" / "09_explore.html"
    with Chromium(binary, width=1280, height=900) as browser:
        browser.open(page.as_uri(), settle_s=1.0)
        seen = browser.evaluate(MOVE_CONTROLS)
    assert seen is not None, "the explore page has no static explorer"
    states = [state for state, _ in seen]
    run, step, image, layer, head = states[0].split("|")
    assert (run, image, head) == ("E2", "0", "0")  # the widget explorer's start: E2, image 1
    assert int(step) > 0 and int(layer) > 0  # …its last step and layer
    pictures = [picture for _, picture in seen]
    assert len(set(states)) == len(states) == 6  # each move drew a new view
    # every move within the trained run changes the picture (a switch of run may land on the
    # same pre-trained attention)
    assert all(a != b for a, b in zip(pictures[:4], pictures[1:5], strict=True))


@pytest.mark.slow
def test_every_table_is_captioned_and_its_key_columns_need_no_scrolling(seen):
    tables = {f: p["tables"] for f, p in seen.items() if p["tables"]}
    assert len(tables) >= 5
    uncaptioned = {f: len([t for t in ts if not t["caption"]]) for f, ts in tables.items()}
    assert not {f: n for f, n in uncaptioned.items() if n}
    assert all(re.match(r"Table \d+\. \S", t["caption"]) for ts in tables.values() for t in ts)
    hidden = {f: [t["hidden"] for t in ts if t["hidden"]] for f, ts in tables.items()}
    assert not {f: h for f, h in hidden.items() if h}


@pytest.mark.slow
def test_each_method_has_one_colour_in_every_figure_of_the_book(seen, book):
    paths, _ = book
    html = paths.build / "html"
    colours: dict[str, set[str]] = {}
    for file, page in seen.items():
        for image in page["images"]:
            path = ((html / file).parent / image["src"]).resolve()
            with Image.open(path) as png:
                recorded = json.loads(png.text.get(METHODS_KEY, "{}"))
            for method, colour in recorded.items():
                colours.setdefault(method, set()).update(colour.split(","))
    assert {"full", "lora", "none"} <= set(colours)  # read from the figures' own metadata
    assert colours == {m: {to_hex(METHOD_COLORS[m])} for m in colours}
