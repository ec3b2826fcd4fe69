"""A book page as its notebook shows it: its steps' tables (numbered, captioned), figures, notes
and findings in order, then the conclusion. Every page notebook ends with a ``## Conclusion``
heading over a cell calling :meth:`Page.conclusion`: the conclusion is that cell's output, read
alike in Jupyter and in the book. A page whose step fails stops there: papermill keeps the error
cell, and the runner marks the page failed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
from IPython.display import Markdown, display
from matplotlib.figure import Figure

from collapse_utils.book.figures import show_figure, watermark_of
from collapse_utils.book.tables import Column, show_table
from collapse_utils.config import profile_about

EXECUTED = "/book/executed"
"""Where the runner writes executed pages (``runner.BookPaths.executed``), as a docname root."""


def doc_link(stem: str, title: str) -> str:
    """A MyST link to the executed page ``book/executed/<stem>`` (in a page's Markdown)."""
    return f"{{doc}}`{title} <{EXECUTED}/{stem}>`"


STATISTICS_LINK = doc_link("08_statistics", "the statistics chapter")

# Said once, in the line that opens a smoke page's conclusion (the banner says it on every page).
SMOKE_CLAUSE = "; its numbers are not findings"


def profile_note(profile: str) -> str:
    """The line every page starts its conclusion with: which profile built it (and, for smoke,
    that its numbers are not findings)."""
    about = profile_about(profile)
    note = f"*Built with the `{profile}` profile" + (f": {about}" if about else "")
    return note + (SMOKE_CLAUSE if profile == "smoke" else "") + ".*"


def findings_markdown(profile: str, text: str, source: str = "") -> Markdown:
    """A page's findings after the profile note (or ``source``, the note of a page that shows
    no number of the profile's runs)."""
    return Markdown((source or profile_note(profile)) + "\n\n" + text)


class Runs(Protocol):
    """What a page's steps read: any runs object that can say it has none."""

    @property
    def empty(self) -> bool: ...


def show_step(step: Callable[[Page, Any], str], page: Page, runs: Runs) -> str:
    """One step of a page's notebook: its evidence and its sentence (shown as a finding), or
    nothing while no run is complete (the page's first step said so)."""
    return "" if runs.empty else page.finding(step(page, runs))


@dataclass
class Page:
    """What one page shows. With ``show`` each block is displayed as it is added (tables through
    the one formatter, :mod:`~collapse_utils.book.tables`; figures saved under
    ``<output_root>/figures/`` first, then shown numbered with their caption); without it the
    page is only recorded (tests read the raw ``tables``, ``figures`` and ``captions``,
    ``notes``, ``findings``).

    ``prefix`` goes before every table and figure name (two analyses on one page, or two pages
    writing figures into one folder, keep theirs apart); ``source`` replaces the profile note
    on a page whose numbers come from elsewhere (published data)."""

    profile: str
    output_root: Path
    show: bool = True
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    findings: str = ""
    prefix: str = ""
    source: str = ""
    sentences: list[str] = field(default_factory=list)
    table_count: int = 0

    def table(
        self,
        name: str,
        frame: pd.DataFrame,
        caption: str,
        columns: Mapping[str, Column] | None = None,
    ) -> pd.DataFrame:
        """Record ``frame`` (raw column names and numbers) and show it formatted (``columns``:
        labels of its own, beside the formatter's), numbered on the page, under ``caption`` (one
        sentence: what a row is, what to read); an empty frame shows nothing."""
        self.tables[self.prefix + name] = frame
        self.captions[self.prefix + name] = caption
        if self.show and not frame.empty:
            show_table(frame, self.numbered(caption), columns)
        return frame

    def numbered(self, caption: str) -> str:
        """``caption`` as the page's next table, ``Table n. …`` (for a table shown through
        :func:`~collapse_utils.book.tables.show_table` with its own columns)."""
        self.table_count += 1
        return f"Table {self.table_count}. {caption}"

    def figure(self, name: str, fig: Figure, caption: str) -> None:
        """``name`` is also the file name under ``figures/`` (the report's figure index) and the
        figure's label; ``caption`` is one sentence saying what to look at."""
        name = self.prefix + name
        self.figures[name] = fig
        self.captions[name] = caption
        if self.show:
            # published numbers (``source``) are not the profile's runs: no smoke watermark
            mark = "" if self.source else watermark_of(self.profile)
            show_figure(fig, self.output_root, name, caption, mark)

    def note(self, text: str) -> None:
        self.notes.append(text)
        if self.show:
            display(Markdown(text))

    def finding(self, text: str) -> str:
        """Show one step's conclusion under its evidence and keep it for the page's findings
        (:meth:`conclusion` with no text joins them); empty text shows nothing."""
        if text:
            self.sentences.append(text)
            if self.show:
                display(Markdown(f"**Finding.** {text}"))
        return text

    def conclusion(self, findings: str | None = None) -> None:
        """Show the page's conclusion as this cell's output (under the notebook's own
        ``## Conclusion`` heading), after the profile note: read alike in Jupyter and in the
        book."""
        self.findings = findings if findings is not None else " ".join(self.sentences)
        if self.show:
            display(findings_markdown(self.profile, self.findings, self.source))
