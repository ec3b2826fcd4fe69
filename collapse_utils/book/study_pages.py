"""Pages across the study: zero-shot transfer of every run, and reproducibility (what every run
was and where it ran). The statistics chapter is :mod:`~collapse_utils.book.statistics_chapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from collapse_utils.analysis.results import (
    load_histories,
    run_means,
    run_summary,
    zeroshot_change,
    zeroshot_datasets,
)
from collapse_utils.book import figures
from collapse_utils.book.page import Page, show_step
from collapse_utils.book.style import DATASET_NAMES, METHOD_NAMES
from collapse_utils.config import PARAMS_DIR, profile_output_root
from collapse_utils.families import report_ids


@dataclass(frozen=True)
class ZeroShotRuns:
    """Every fine-tuned run of the report's families with zero-shot results: ``runs`` one row per
    run (seed means, ``results.run_means``), ``datasets`` the zero-shot datasets measured."""

    runs: pd.DataFrame
    datasets: list[str]

    @property
    def empty(self) -> bool:
        return self.runs.empty


def open_zeroshot(
    profile: str, params_dir: Path | str = PARAMS_DIR, show: bool = True
) -> tuple[ZeroShotRuns, Page]:
    """The zero-shot page's first step: its runs (Study B has its own page) and the page."""
    output_root = profile_output_root(profile, params_dir)
    page = Page(profile, output_root, show)
    report = set(report_ids(profile, params_dir))
    histories = [h for h in load_histories(output_root, ids=report) if h.method != "none"]
    if not histories:
        page.sentences.append("No fine-tuned run is complete yet.")
        return ZeroShotRuns(pd.DataFrame(), []), page
    runs = run_means(run_summary(histories)).reset_index()
    return ZeroShotRuns(runs, zeroshot_datasets(runs)), page


def zeroshot_table(page: Page, zs: ZeroShotRuns) -> str:
    """Every run's zero-shot accuracy and change per dataset; the mean per method in words.
    Changes are in accuracy points."""
    runs = zs.runs
    table = runs.set_index("run")[["method", "lr", "seeds", "d_entropy_pct"]].copy()
    text = []
    for dataset in zs.datasets:
        table[f"zs_{dataset}"] = runs[f"zs_{dataset}"].to_numpy()
        table[f"zs_{dataset}_change"] = zeroshot_change(runs, dataset).to_numpy()
        if f"zs_{dataset}_merged" in runs:  # the report's path: also the trained model's score
            table[f"zs_{dataset}_merged"] = runs[f"zs_{dataset}_merged"].to_numpy()
        by_method = runs.groupby("method")[f"zs_{dataset}"].mean()
        pretrained = runs[f"zs_{dataset}_pretrained"].iloc[0]
        text.append(
            f"{DATASET_NAMES.get(dataset, dataset)}: pre-trained {100 * pretrained:.2f} %; "
            + ", ".join(
                f"mean over {METHOD_NAMES.get(m, m)} runs {100 * v:.2f} %"
                for m, v in by_method.items()
            )
            + "."
        )
    page.table(
        "zeroshot",
        table,
        "Zero-shot accuracy of every fine-tuned run (seed means) and its change from the "
        "pre-trained model in points, beside the run's change in layer-mean entropy.",
    )
    return "Zero-shot accuracy — " + " ".join(text)


def trained_model(page: Page, zs: ZeroShotRuns) -> str:
    """Under the report's zero-shot path, what the model that was trained scores instead."""
    return " ".join(
        _trained_model_sentence(zs.runs, d) for d in zs.datasets if f"zs_{d}_merged" in zs.runs
    )


def collapse_vs_zeroshot(page: Page, zs: ZeroShotRuns) -> str:
    """Report fig. 7: zero-shot change against entropy change on the first dataset."""
    first = zs.datasets[0]
    named = DATASET_NAMES.get(first, first)
    page.figure(
        "fig7_collapse_vs_zeroshot",
        figures.zeroshot_vs_collapse(zs.runs, first),
        f"Change in zero-shot {named} accuracy against the change in layer-mean entropy, one "
        "point per fine-tuned run coloured by method (nearby runs share a label): if collapse "
        "costs transfer, the points fall from right to left.",
    )
    return ""


def zeroshot_bars(page: Page, zs: ZeroShotRuns) -> str:
    """Report fig. 15: every run's zero-shot accuracy against the pre-trained model's."""
    for k, dataset in enumerate(zs.datasets):
        named = DATASET_NAMES.get(dataset, dataset)
        page.figure(
            "fig15_zeroshot_extended" if k == 0 else f"fig15_zeroshot_extended_{dataset}",
            figures.zeroshot_bars(zs.runs, dataset),
            f"Zero-shot {named} accuracy of every fine-tuned run, coloured by method, against "
            "the pre-trained model (dashed line): bars below the line lost transfer.",
        )
    return ""


ZEROSHOT_STEPS = (zeroshot_table, trained_model, collapse_vs_zeroshot, zeroshot_bars)
"""The steps of ``07_zero_shot`` in its order (a test holds the notebook to it)."""


def zeroshot_page(profile: str, params_dir: Path | str = PARAMS_DIR, show: bool = True) -> Page:
    """Report §3.3 in one call (tests, scripts): what ``07_zero_shot`` shows step by step."""
    zs, page = open_zeroshot(profile, params_dir, show)
    for step in ZEROSHOT_STEPS:
        show_step(step, page, zs)
    page.conclusion()
    return page


def _trained_model_sentence(runs: pd.DataFrame, dataset: str) -> str:
    """Under the report's zero-shot path (the tower's base weights in a fresh CLIP), what the
    model that was trained scores instead, per method."""
    by_method = runs.groupby("method")[f"zs_{dataset}_merged"].mean().dropna()
    means = ", ".join(f"{METHOD_NAMES.get(m, m)} {100 * v:.2f} %" for m, v in by_method.items())
    return (
        f"These are scored as the report's code scored them: only the vision tower's base weights "
        f"in a fresh pre-trained CLIP, so LoRA runs keep the pre-trained accuracy by "
        f"construction and full fine-tuning is scored with the pre-trained projection. Scored "
        f"with the model that was trained (adapters merged, trained projection), the mean "
        f"{DATASET_NAMES.get(dataset, dataset)} accuracy is: {means}."
    )


def reproducibility_runs(page: Page) -> str:
    """Profile, config hash, device and wall time of every run and seed (complete or not), and
    the package versions they recorded."""
    histories = load_histories(page.output_root, complete_only=False)
    columns = ["run", "seed", "status", "config_hash", "device", "wall_time_s"]
    table = pd.DataFrame(
        [{c: getattr(h, "id" if c == "run" else c) for c in columns} for h in histories],
        columns=columns,
    ).set_index("run")
    page.table(
        "runs",
        table,
        "Every run and seed of the profile: its status, config hash, device and wall time.",
    )
    versions = pd.DataFrame(
        sorted({(k, v) for h in histories for k, v in h.versions.items()}),
        columns=["package", "version"],
    )
    page.table("versions", versions, "The package versions the runs recorded (each pair once).")
    total = float(table["wall_time_s"].sum())
    complete = int((table["status"] == "complete").sum())
    return (
        f"{len(table)} runs of the {page.profile} profile, {complete} complete, took "
        f"{total / 60:.1f} minutes of training and evaluation in all (output root "
        f"`{page.output_root}`)."
    )


def reproducibility_page(
    profile: str, params_dir: Path | str = PARAMS_DIR, show: bool = True
) -> Page:
    """What ``10_reproducibility`` shows, in one call (tests, scripts)."""
    page = Page(profile, profile_output_root(profile, params_dir), show)
    page.finding(reproducibility_runs(page))
    page.conclusion()
    return page
