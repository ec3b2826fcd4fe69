"""Pages across the study: zero-shot transfer of every run, and reproducibility (what every run
was and where it ran). The statistics chapter is :mod:`~collapse_utils.book.statistics_chapter`.
"""

from __future__ import annotations

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
from collapse_utils.book.page import Page, failure_findings
from collapse_utils.book.style import DATASET_NAMES, METHOD_NAMES
from collapse_utils.config import PARAMS_DIR, profile_output_root
from collapse_utils.families import report_ids


def zeroshot_page(profile: str, params_dir: Path | str = PARAMS_DIR, show: bool = True) -> Page:
    """Report §3.3: zero-shot accuracy of every run (seed means) against the pre-trained model,
    for every zero-shot dataset of the profile. Changes are in accuracy points (×100)."""
    with failure_findings(profile):
        output_root = profile_output_root(profile, params_dir)
        page = Page(profile, output_root, show)
        report = set(report_ids(profile, params_dir))  # Study B has its own page
        histories = [h for h in load_histories(output_root, ids=report) if h.method != "none"]
        if not histories:
            page.conclude("No fine-tuned run is complete yet.")
            return page
        runs = run_means(run_summary(histories)).reset_index()
        datasets = zeroshot_datasets(runs)
        table = runs.set_index("run")[["method", "lr", "seeds", "d_entropy_pct"]].copy()
        text = []
        for dataset in datasets:
            pretrained = runs[f"zs_{dataset}_pretrained"]
            table[f"zs_{dataset}"] = runs[f"zs_{dataset}"].to_numpy()
            table[f"zs_{dataset}_change"] = zeroshot_change(runs, dataset).to_numpy()
            by_method = runs.groupby("method")[f"zs_{dataset}"].mean()
            named = DATASET_NAMES.get(dataset, dataset)
            text.append(
                f"{named}: pre-trained {100 * pretrained.iloc[0]:.2f} %; "
                + ", ".join(
                    f"mean over {METHOD_NAMES.get(m, m)} runs {100 * v:.2f} %"
                    for m, v in by_method.items()
                )
                + "."
            )
            if (
                f"zs_{dataset}_merged" in runs
            ):  # the report's path: say what the trained model gives
                table[f"zs_{dataset}_merged"] = runs[f"zs_{dataset}_merged"].to_numpy()
                text.append(_trained_model_sentence(runs, dataset))
        page.table("zeroshot", table)
        first = datasets[0]
        named = DATASET_NAMES.get(first, first)
        page.figure(
            "fig7_collapse_vs_zeroshot",
            figures.zeroshot_vs_collapse(runs, first),
            f"Change in zero-shot {named} accuracy against the change in layer-mean entropy, "
            "one point per fine-tuned run (nearby runs share a label): if collapse costs "
            "transfer, the points fall from right to left.",
        )
        for dataset in datasets:
            named = DATASET_NAMES.get(dataset, dataset)
            page.figure(
                "fig15_zeroshot_extended"
                if dataset == first
                else f"fig15_zeroshot_extended_{dataset}",
                figures.zeroshot_bars(runs, dataset),
                f"Zero-shot {named} accuracy of every fine-tuned run, coloured by method, "
                "against the pre-trained model (dashed line): bars below the line lost "
                "transfer.",
            )
        page.conclude("Zero-shot accuracy — " + " ".join(text))
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


def reproducibility_page(
    profile: str, params_dir: Path | str = PARAMS_DIR, show: bool = True
) -> Page:
    """Profile, config hashes, package versions, hardware and wall time of every run and seed
    (complete or not)."""
    with failure_findings(profile):
        output_root = profile_output_root(profile, params_dir)
        page = Page(profile, output_root, show)
        histories = load_histories(output_root, complete_only=False)
        columns = ["run", "seed", "status", "config_hash", "device", "wall_time_s"]
        table = pd.DataFrame(
            [
                {
                    "run": h.id,
                    "seed": h.seed,
                    "status": h.status,
                    "config_hash": h.config_hash,
                    "device": h.device,
                    "wall_time_s": h.wall_time_s,
                }
                for h in histories
            ],
            columns=columns,
        ).set_index("run")
        page.table("runs", table)
        versions = pd.DataFrame(
            sorted({(k, v) for h in histories for k, v in h.versions.items()}),
            columns=["package", "version"],
        )
        page.table("versions", versions)
        total = float(table["wall_time_s"].sum())
        complete = int((table["status"] == "complete").sum())
        page.conclude(
            f"{len(table)} runs of the {profile} profile, {complete} complete, took "
            f"{total / 60:.1f} minutes of training and evaluation in all (output root "
            f"`{Path(output_root)}`).",
        )
        return page
