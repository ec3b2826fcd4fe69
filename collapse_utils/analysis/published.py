"""The report authors' published Study B runs (``params/report/study2/``) as reference data.

:func:`load_study2` reads their run-level table into one row per run in the column names of our
own run summary (:func:`collapse_utils.analysis.results.run_summary`), so that the functions of
:mod:`collapse_utils.analysis.study_b` analyse their runs and ours alike; :func:`study2_summary`
reads the numbers their own revised analysis concluded from. Each file is checked against the
sha256 in ``provenance.yaml`` before a number is returned.

Column mapping (theirs → ours; every other column is kept under its own name):

=================================  ==============================  ===========================
study2                             ours                            unit change
=================================  ==============================  ===========================
run_id                             run_id; ``run`` drops _seed<k>
model_name                         model
method full_ft / lora_r8 /         full / lora / lora_frozen_proj
lora_r8_frozen_proj
val_acc                            best_acc                        fraction (as theirs)
test_acc                           test_acc                        fraction (as theirs)
delta_{entropy,gini,erf95}_pct     d_{entropy,gini,erf}_pct_sel    % (as theirs)
delta_entropy_last_layer_pct       d_entropy_last_pct_sel          %
cka_mean, cka_last                 cka_mean_sel, cka_last_sel
embedding_drift, weight_drift_rel  embedding_drift_sel,
                                   weight_drift_sel
epoch1_{cka_mean, embedding_drift, {cka_mean,embedding_drift,
weight_drift_rel, delta_entropy_   weight_drift}_e1, d_entropy_pct_e1
pct}
train_loss_final                   train_loss_f
epoch1_transfer_retention          probe_retention_e1              fraction (as theirs)
<d>_acc, <d>_pretrained            zs_<d>, zs_<d>_pretrained       % → fraction
<d>_retention                      retention_<d>                   % → fraction
=================================  ==============================  ===========================

``_sel`` is the selected checkpoint (study2: the best-validation epoch, where they measure every
signal and the zero-shot transfer). Their ``abs_*`` and ``epoch1_*`` duplicates of mapped
columns are dropped: :func:`collapse_utils.analysis.study_b.add_derived` recomputes |Δ| for both
sources.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from collapse_utils.analysis.verdicts import UNSTABLE
from collapse_utils.config import REPO_ROOT, read_params_yaml

STUDY2_DIR = REPO_ROOT / "params" / "report" / "study2"
PRIMARY_MODEL = "openai/clip-vit-base-patch32"
PRIMARY_PATCH = 32  # ViT-B/32 (and the smoke profile's tiny patch-32 CLIP)
METHODS = {"full_ft": "full", "lora_r8": "lora", "lora_r8_frozen_proj": "lora_frozen_proj"}
COLUMNS = {
    "model_name": "model",
    "val_acc": "best_acc",
    "delta_entropy_pct": "d_entropy_pct_sel",
    "delta_gini_pct": "d_gini_pct_sel",
    "delta_erf95_pct": "d_erf_pct_sel",
    "delta_entropy_last_layer_pct": "d_entropy_last_pct_sel",
    "cka_mean": "cka_mean_sel",
    "cka_last": "cka_last_sel",
    "embedding_drift": "embedding_drift_sel",
    "weight_drift_rel": "weight_drift_sel",
    "epoch1_cka_mean": "cka_mean_e1",
    "epoch1_embedding_drift": "embedding_drift_e1",
    "epoch1_weight_drift_rel": "weight_drift_e1",
    "epoch1_delta_entropy_pct": "d_entropy_pct_e1",
    "train_loss_final": "train_loss_f",
    "epoch1_transfer_retention": "probe_retention_e1",
}
TRANSFER_SETS = ("cifar100", "cifar10")


class PublishedDataError(ValueError):
    """A published file is missing, changed since it was copied, or lacks a column."""


def provenance(folder: Path | str = STUDY2_DIR) -> dict[str, Any]:
    """``provenance.yaml`` of ``folder``: repository, commit and, per file, its path there,
    sha256 and what it holds."""
    return read_params_yaml(Path(folder) / "provenance.yaml")


def verified_path(name: str, folder: Path | str = STUDY2_DIR) -> Path:
    """``folder/name`` after checking its sha256 against ``provenance.yaml``."""
    folder = Path(folder)
    expected = provenance(folder)["files"].get(name, {}).get("sha256")
    path = folder / name
    if expected is None:
        raise PublishedDataError(f"{folder / 'provenance.yaml'} lists no file {name!r}")
    if not path.is_file():
        raise PublishedDataError(f"{path} is missing: copy it from the commit in provenance.yaml")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise PublishedDataError(
            f"{path} differs from the published file (sha256 {actual[:12]}…, provenance.yaml "
            f"says {expected[:12]}…): restore it from the commit in provenance.yaml"
        )
    return path


def load_study2(path: Path | str | None = None, all_backbones: bool = False) -> pd.DataFrame:
    """The authors' published runs, one row per run, in our run summary's column names (the
    module docstring gives the mapping).

    ``path``: a run-level CSV of theirs (default: ``run_level.csv``, the 66 ViT-B/32 runs, or
    with ``all_backbones`` ``run_level_all_backbones.csv``, plus 18 ViT-B/16 runs); a file
    listed in ``provenance.yaml`` is checked against its sha256 first. Accuracies and
    retention are fractions, as ours; Δ columns in %. Rows in (model, dataset, method, lr,
    seed) order."""
    if path is None:
        name = "run_level_all_backbones.csv" if all_backbones else "run_level.csv"
        path = verified_path(name)
    raw = pd.read_csv(path)
    missing = [c for c in ("run_id", "dataset", "method", "lr", "seed") if c not in raw.columns]
    if missing:
        raise PublishedDataError(f"{path} lacks the column(s) {missing}: not a study2 run table")
    return _to_our_columns(raw)


def _to_our_columns(raw: pd.DataFrame) -> pd.DataFrame:
    frame = raw.drop(columns=[c for c in raw.columns if _duplicate(c)]).rename(columns=COLUMNS)
    frame["method"] = frame["method"].map(lambda m: METHODS.get(m, m))
    frame.insert(0, "run", frame["run_id"].str.replace(r"_seed\d+$", "", regex=True))
    frame["family"] = "study2"
    frame["rank"] = pd.Series(np.where(frame["method"].str.startswith("lora"), 8, pd.NA),
                              dtype="Int64")  # fmt: skip
    for name in TRANSFER_SETS:
        if f"{name}_retention" in frame:
            frame[f"zs_{name}"] = frame.pop(f"{name}_acc") / 100
            frame[f"zs_{name}_pretrained"] = frame.pop(f"{name}_pretrained") / 100
            frame[f"retention_{name}"] = frame.pop(f"{name}_retention") / 100
    frame["status"] = "complete"
    frame["patch_size"] = frame["model"].str.extract(r"patch(\d+)$", expand=False).astype(int)
    order = ["model", "dataset", "method", "lr", "seed"]
    return frame.sort_values(order, kind="stable").reset_index(drop=True)


def _duplicate(column: str) -> bool:
    """Their derived copies of columns we map or recompute: |Δ| columns, log10 lr, and the
    ``epoch1_`` twins of final-only columns (``epoch1_log10_lr``, ``epoch1_epoch1_…``)."""
    if column.startswith("abs_") or column == "log10_lr":
        return True
    if column.startswith("epoch1_"):
        rest = column.removeprefix("epoch1_")
        return rest not in ("cka_mean", "embedding_drift", "weight_drift_rel",
                            "delta_entropy_pct", "transfer_retention")  # fmt: skip
    return False


def study2_summary(folder: Path | str = STUDY2_DIR) -> dict[str, Any]:
    """``summary.json``: what the authors' revised analysis computed (checked sha256)."""
    return json.loads(verified_path("summary.json", Path(folder)).read_text())


def run_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """What a published table holds: per backbone, dataset and method the runs, learning rates
    and seeds."""
    groups = frame.groupby(["model", "dataset", "method"], sort=True)
    return pd.DataFrame({
        "n": groups.size(),
        "lrs": groups["lr"].nunique(),
        "seeds": groups["seed"].nunique(),
    })  # fmt: skip


def short_name(model: str) -> str:
    """``openai/clip-vit-base-patch32`` → ``ViT-B/32``; other names as they are."""
    tail = model.rsplit("/", 1)[-1]
    if tail.startswith("clip-vit-base-patch"):
        return "ViT-B/" + tail.removeprefix("clip-vit-base-patch")
    return tail


def others(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The rows of every backbone but the primary one, by model name (analysed apart)."""
    if "patch_size" not in frame:
        return {}
    rest = frame[frame["patch_size"] != PRIMARY_PATCH]
    return {model: rows.reset_index(drop=True) for model, rows in rest.groupby("model")}


def primary(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``frame`` on the primary backbone (patch 32: ViT-B/32); every row where
    there is no ``patch_size`` column."""
    if "patch_size" not in frame:
        return frame
    return frame[frame["patch_size"] == PRIMARY_PATCH].reset_index(drop=True)


def our_column(theirs: str) -> str:
    """Our name of a study2 column or predictor (``abs_delta_entropy_pct`` →
    ``abs_d_entropy_pct_sel``); names without a mapping come back unchanged."""
    if theirs.startswith("abs_"):
        return "abs_" + our_column(theirs.removeprefix("abs_"))
    extra = {"epoch1_transfer_retention_pct": "probe_retention_e1",
             **{f"{d}_retention": f"retention_{d}" for d in TRANSFER_SETS}}  # fmt: skip
    return {**COLUMNS, **extra}.get(theirs, theirs)


# --- the authors' conclusions beside ours ------------------------------------------------------

KEY_NUMBERS = {
    "rho_entropy": "Δ entropy: Spearman ρ with retention over all core runs",
    "within_entropy": "Δ entropy: mean |ρ| within dataset × method",
    "within_lr": "log₁₀ lr: mean |ρ| within dataset × method",
    "rho_cka": "CKA: ρ over all core runs",
    "rho_embedding": "Embedding drift: ρ over all core runs",
    "cell_rho_cka": "CKA: |ρ| over the cell means",
    "separated": "Rows whose gap to CKA excludes 0 (cell bootstrap)",
    "p_entropy_eurosat": "Paired Δ entropy, Full FT vs LoRA, EuroSAT: p (t)",
    "p_entropy_pets": "Paired Δ entropy, Full FT vs LoRA, Pets: p (t)",
    "auc_embedding": "Epoch-1 embedding drift: cell-level AUC for damaged cells",
    "auc_entropy": "Epoch-1 signed Δ entropy: cell-level AUC for damaged cells",
}
"""The quantities on which the authors' revised conclusions rest, by key: what the book sets
beside the same numbers computed by our code."""


def authors_key_numbers(summary: dict[str, Any] | None = None) -> pd.Series:
    """:data:`KEY_NUMBERS` as ``summary.json`` gives them (``separated``: the count)."""
    summary = summary if summary is not None else study2_summary()
    final = {row["predictor"]: row for row in summary["predictor_ranking_final"]}
    boot = {row["predictor"]: row for row in summary["bootstrap_predictor_gap"]}
    paired = {(r["dataset"], r["metric"]): r for r in summary["paired_method_tests"]}
    cells = summary["temporal_ordering"]["cell_level"]
    return pd.Series({
        "rho_entropy": final["delta_entropy_pct"]["spearman_overall"],
        "within_entropy": final["delta_entropy_pct"]["abs_spearman_within_mean"],
        "within_lr": final["log10_lr"]["abs_spearman_within_mean"],
        "rho_cka": final["cka_mean"]["spearman_overall"],
        "rho_embedding": final["embedding_drift"]["spearman_overall"],
        "cell_rho_cka": boot["cka_mean"]["abs_rho"],
        "separated": float(summary["bootstrap_n_gaps_excluding_zero"]),
        "p_entropy_eurosat": paired[("eurosat", "delta_entropy_pct")]["t_p_value"],
        "p_entropy_pets": paired[("pets", "delta_entropy_pct")]["t_p_value"],
        "auc_embedding": cells["embedding_drift"]["auc_oriented"],
        "auc_entropy": cells["delta_entropy_pct"]["auc_oriented"],
    })  # fmt: skip


def key_numbers(ranking: pd.DataFrame, paired: pd.DataFrame, early: pd.DataFrame) -> pd.Series:
    """:data:`KEY_NUMBERS` from our tables: ``study_b.signal_ranking`` (cell bootstrap),
    ``study_b.paired_table`` (with ``d_entropy_pct_sel``) and ``study_b.early_warning``."""
    gaps = ranking.drop(index=ranking.index[ranking["gap"] == 0])
    return pd.Series({
        "rho_entropy": ranking.loc["d_entropy_pct_sel", "rho"],
        "within_entropy": ranking.loc["d_entropy_pct_sel", "abs_rho_within_method"],
        "within_lr": ranking.loc["log10_lr", "abs_rho_within_method"],
        "rho_cka": ranking.loc["cka_mean_sel", "rho"],
        "rho_embedding": ranking.loc["embedding_drift_sel", "rho"],
        "cell_rho_cka": abs(ranking.loc["cka_mean_sel", "unit_rho"]),
        "separated": float((gaps["gap_low"] > 0).sum()),
        "p_entropy_eurosat": paired.loc[("eurosat", "d_entropy_pct_sel"), "p_t"],
        "p_entropy_pets": paired.loc[("pets", "d_entropy_pct_sel"), "p_t"],
        "auc_embedding": early.loc["embedding_drift_e1", "auc"],
        "auc_entropy": early.loc["d_entropy_pct_e1", "auc"],
    })  # fmt: skip


def beside_authors(ours: pd.Series, theirs: pd.Series, tolerance: float = 0.005) -> pd.DataFrame:
    """One row per key number: what it is, the authors' value, ours and whether they agree
    (within ``tolerance`` in absolute value, relative for p-values below 0.01; counts
    exactly)."""
    rows = []
    for key, what in KEY_NUMBERS.items():
        a, b = float(theirs[key]), float(ours[key])
        small_p = key.startswith("p_") and max(a, b) < 0.01
        agree = np.isclose(a, b, rtol=0.05, atol=0) if small_p else abs(a - b) <= tolerance
        rows.append({"quantity": what, "authors": a, "ours": b, "agree": bool(agree)})
    return pd.DataFrame(rows, index=pd.Index(list(KEY_NUMBERS), name="key"))


AUTHORS_CONCLUSIONS = {
    "RQ2": (
        "LoRA keeps far more zero-shot transfer than full fine-tuning at the same learning rate "
        "and seed on both datasets, but the two methods' Δ entropy differs on Pets and not on "
        "EuroSAT (study2/analysis/paper_numbers.md, rows 31–41)",
        UNSTABLE,
    ),
    "RQ3": (
        "Attention entropy is a dose meter, not a damage meter: within a dataset and method its "
        "change tracks forgetting, across configurations neither its strength nor its sign is "
        "stable (paper_numbers.md, rows 1–2 and 73–82)",
        UNSTABLE,
    ),
}
"""What the authors' revised analysis concluded on the questions our matched-grid rules judge,
in words, and the verdict of our rules that says the same thing."""


def against_authors(found: dict[str, Any]) -> pd.DataFrame:
    """Our matched-grid verdicts (claim → ``Verdict``) beside the authors' conclusions: one row
    per claim with ``verdict``, ``authors`` (their conclusion in words) and ``agree``."""
    rows = {
        claim: {
            "verdict": found[claim].verdict,
            "authors": text,
            "agree": found[claim].verdict == same,
        }
        for claim, (text, same) in AUTHORS_CONCLUSIONS.items()
        if claim in found
    }
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["verdict", "authors", "agree"])
    table.index.name = "claim"
    return table
