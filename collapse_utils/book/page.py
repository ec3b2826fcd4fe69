"""A book page as its notebook shows it: tables, figures and notes in order, then the findings
paragraph. Every page notebook ends with a markdown cell ``{glue:md} findings``, so every page
glues the key ``findings``: its summary when it renders, the error when it fails
(:func:`failure_findings`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display
from matplotlib.figure import Figure
from myst_nb import glue

from collapse_utils.book.figures import show_figure
from collapse_utils.book.tables import show_table
from collapse_utils.config import profile_about

SMOKE_NOTE = (
    "*Smoke profile: a tiny random CLIP on synthetic images. These numbers check the pipeline; "
    "they are not findings.*"
)


def profile_note(profile: str) -> str:
    """The line every page starts its findings with: which profile built it (and, for smoke,
    that its numbers are not findings)."""
    about = profile_about(profile)
    note = f"*Built with the `{profile}` profile" + (f": {about}*" if about else ".*")
    return note + ("\n\n" + SMOKE_NOTE if profile == "smoke" else "")


def findings_markdown(profile: str, text: str, source: str = "") -> Markdown:
    """A page's findings after the profile note (or ``source``, the note of a page that shows
    no number of the profile's runs)."""
    return Markdown((source or profile_note(profile)) + "\n\n" + text)


def glue_findings(profile: str, text: str, source: str = "") -> None:
    """Glue ``findings`` (:func:`findings_markdown`)."""
    glue("findings", findings_markdown(profile, text, source), display=False)


@contextmanager
def failure_findings(profile: str) -> Iterator[None]:
    """On an error, glue ``findings`` saying the page failed and why, then re-raise: the page
    shows the error cell and its summary paragraph names the failure instead of a stale text."""
    try:
        yield
    except BaseException as err:
        glue_findings(profile, f"**This page failed** with `{type(err).__name__}`: {err}")
        raise


@dataclass
class Page:
    """What one page shows. With ``show`` each block is displayed as it is added (tables through
    the one formatter, :mod:`~collapse_utils.book.tables`; figures saved under
    ``<output_root>/figures/`` first, then shown numbered with their caption) and
    :meth:`conclude` glues the findings; without it the page is only recorded (tests read the
    raw ``tables``, ``figures`` and ``captions``, ``notes``, ``findings``).

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

    def table(self, name: str, frame: pd.DataFrame) -> pd.DataFrame:
        """Record ``frame`` (raw column names and numbers) and show it formatted."""
        self.tables[self.prefix + name] = frame
        if self.show:
            show_table(frame)
        return frame

    def figure(self, name: str, fig: Figure, caption: str) -> None:
        """``name`` is also the file name under ``figures/`` (the report's figure index) and the
        figure's label; ``caption`` is one sentence saying what to look at."""
        name = self.prefix + name
        self.figures[name] = fig
        self.captions[name] = caption
        if self.show:
            show_figure(fig, self.output_root, name, caption)

    def note(self, text: str) -> None:
        self.notes.append(text)
        if self.show:
            display(Markdown(text))

    def finding(self, text: str) -> str:
        """Show one step's conclusion under its evidence and keep it for the page's findings
        (:meth:`conclude` with no text joins them); empty text shows nothing."""
        if text:
            self.sentences.append(text)
            if self.show:
                display(Markdown(f"**Finding.** {text}"))
        return text

    def conclusion(self, findings: str | None = None) -> None:
        """Show the page's conclusion as this cell's output (under the notebook's own
        ``## Conclusion`` heading), after the profile note: visible in Jupyter and in the book
        alike, where :meth:`conclude`'s glue renders only in the book."""
        self.findings = findings if findings is not None else " ".join(self.sentences)
        if self.show:
            display(findings_markdown(self.profile, self.findings, self.source))

    def conclude(self, findings: str | None = None) -> None:
        """Glue ``findings`` (default: every :meth:`finding` of the page, in order)."""
        self.findings = findings if findings is not None else " ".join(self.sentences)
        if self.show:
            glue_findings(self.profile, self.findings, self.source)
