"""The chapter "Study B on the authors' published runs" (``14_study_b_published``): the sections
that only that chapter has — where its numbers come from, what the published tables hold, the
authors' own numbers and conclusions beside ours, the sign of each signal per backbone. The
analyses it shares with our Study B page are :mod:`~collapse_utils.book.study_b_page`."""

from __future__ import annotations

import pandas as pd

from collapse_utils.analysis import published, study_b
from collapse_utils.book.page import Page
from collapse_utils.book.study_b_page import ENTROPY, N_BOOT, backbone_slug
from collapse_utils.config import profile_output_root


def published_page(profile: str, model: str = "", show: bool = True) -> Page:
    """A page of the authors' published runs (of one backbone ``model``, when given): its
    tables and figures named ``study2_[<model>_]…`` (figures share the profile's folder with
    our own Study B page), and a note saying where its numbers come from instead of the
    profile's."""
    prefix = f"study2_{backbone_slug(model)}_" if model else "study2_"
    about = published.provenance()
    source = (
        "*Real-model data: the report authors' published Study B runs "
        f"([{about['repository'].removeprefix('https://github.com/')}]({about['repository']}), "
        f"commit `{about['commit'][:7]}`, copied to `params/report/study2/`), analysed by this "
        f"book's code. No number on this page comes from the `{profile}` profile's runs.*"
    )
    output_root = profile_output_root(profile)
    return Page(profile, output_root, show, prefix=prefix, source=source)


def runs_section(page: Page, frame: pd.DataFrame) -> str:
    """What the published table holds, per backbone, dataset and method."""
    counts = published.run_counts(frame)
    page.table(
        "runs",
        counts,
        "How many runs the authors' published table holds, per backbone, dataset and method.",
    )
    models = counts.groupby(level="model")["n"].sum()
    return (
        "The published tables hold "
        + ", ".join(f"{n} runs of `{model}`" for model, n in models.items())
        + "."
    )


def authors_section(page: Page, frame: pd.DataFrame) -> str:
    """The numbers the authors' revised conclusions rest on, theirs (``summary.json``) beside
    ours computed from their run table by this book's code."""
    ours = published.key_numbers(
        study_b.signal_ranking(frame, n_boot=N_BOOT),
        study_b.paired_table(frame, [ENTROPY]),
        study_b.early_warning(frame),
    )
    table = published.beside_authors(ours, published.authors_key_numbers())
    page.table(
        "beside_authors",
        table.reset_index(drop=True),
        "Each number the authors' revised conclusions rest on: theirs (summary.json) beside "
        "ours computed from their run table, and whether the two agree.",
    )
    differ = table[~table["agree"]]
    if differ.empty:
        return (
            f"All {len(table)} numbers on which the authors' revised conclusions rest come out "
            "the same from our code (bootstrap quantities within resampling noise)."
        )
    return "Our code differs from the authors' summary on: " + "; ".join(differ["quantity"]) + "."


def conclusions_section(page: Page, frame: pd.DataFrame, target: str) -> str:
    """Our verdict rules on the authors' runs beside what the authors concluded."""
    table = published.against_authors(study_b.verdicts(frame, target))
    page.table(
        "against_authors",
        table.rename(columns={"authors": "conclusion"}),
        "Our verdict rules applied to the authors' runs, beside the authors' own conclusion.",
    )
    differ = table[~table["agree"]]
    if differ.empty:
        return (
            f"On {' and '.join(table.index)} our rules, applied to the authors' runs, say what "
            "the authors' revised analysis concluded."
        )
    return (
        "Our rules part from the authors' conclusion on "
        + "; ".join(
            f"{claim} (ours: {row['verdict']}; the rule asks for the same significant sign in "
            "every dataset × method group, or dataset, with the power to show one, where the "
            "authors read the pooled and within-group correlations together)"
            for claim, row in differ.iterrows()
        )
        + "."
    )
