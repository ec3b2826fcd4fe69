"""Fake run records for the analysis and book tests: histories whose metrics move by a known
amount, built from ``RunConfig``s so ``run_summary`` reads them like real runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from collapse_utils.code_hash import TRAINING_CODE, training_code_hash
from collapse_utils.config import DataSpec, LoraSpec, RegSpec, RunConfig, TrainSpec
from collapse_utils.run_record import (
    EpochRecord,
    EvalRecord,
    RunFiles,
    RunRecord,
    ZeroShotRecord,
)

LAYERS = 6
START = [2.0 + 0.1 * layer for layer in range(LAYERS)]


def record(
    config: RunConfig,
    change: list[float],
    accuracies: tuple[float, ...] = (0.5, 0.8, 0.9),
    representation: bool = False,
) -> RunRecord:
    """A complete history of ``config`` whose entropy moves linearly from START to
    START·(1 + change) over 3 evals (one eval, step 0, when nothing trains); ERF tracks entropy,
    Gini is its inverse, head diversity drifts with a run-specific slope. With
    ``representation``, the evals also hold CKA 1 − 0.05·layer·fraction (layers 1-based),
    embedding drift 0.1·fraction and weight drift 0.01·fraction."""
    trained = config.train.method != "none"
    fractions = [0.0, 0.5, 1.0] if trained else [0.0]
    slope = 0.3 + 0.1 * (len(config.id) % 5)
    evals = []
    for fraction in fractions:
        entropy = [s * (1 + c * fraction) for s, c in zip(START, change, strict=True)]
        metrics = {
            "entropy": entropy,
            "erf": [e / 4 for e in entropy],
            "gini": [1 / e for e in entropy],
            "head_diversity": [0.1 * (1 + slope * c * fraction) for c in change],
        }
        signals = {}
        if representation:
            signals = {
                "cka": [1 - 0.05 * layer * fraction for layer in range(1, LAYERS + 1)],
                "embedding_drift": 0.1 * fraction,
                "weight_drift": 0.01 * fraction,
            }
        evals.append(
            EvalRecord(
                int(40 * fraction), 3 * fraction, fraction, 1.0, metrics, [0.0] * LAYERS, **signals
            )
        )
    return RunRecord(
        id=config.id,
        family=config.family,
        description=config.description,
        profile=config.profile,
        seed=config.seed,
        config=config.to_dict(),
        config_hash=config.config_hash(),
        versions={TRAINING_CODE: training_code_hash()},  # made by this checkout's code
        device="cpu",
        steps_per_epoch=10,
        total_steps=40,
        status="complete",
        evals=evals,
        epochs=[
            EpochRecord(
                epoch=i + 1, step=10 * (i + 1), train_loss=1.0, val_acc=acc, samples_per_s=1.0
            )  # fmt: skip
            for i, acc in enumerate(accuracies if trained else ())
        ],
        best_val_acc=max(accuracies) if trained else None,
        final_val_acc=accuracies[-1] if trained else None,
        zeroshot={"cifar100": ZeroShotRecord(0.4, 0.5, "single", 100)},
    )


def history(
    run: str,
    family: str,
    change: list[float],
    method: str = "full",
    dataset: str = "eurosat",
    lr: float = 1e-3,
    reg: RegSpec | None = None,
    seed: int = 42,
    accuracies: tuple[float, ...] = (0.5, 0.8, 0.9),
    representation: bool = False,
) -> RunRecord:
    """:func:`record` of a config built from these settings (LoRA rank 8)."""
    config = RunConfig(
        id=run,
        family=family,
        seed=seed,
        data=DataSpec(dataset=dataset),
        train=TrainSpec(method=method, lr=None if method == "none" else lr),
        lora=LoraSpec(rank=8, train_projection=True),  # as every profile trains it
        reg=reg or RegSpec(),
    )
    return record(config, change, accuracies, representation)


FULL_CHANGE = [-0.02, -0.01, 0.0, -0.03, -0.04, -0.05]
LORA_CHANGES = {
    "E4": [0.01, 0.02, 0.0, 0.01, 0.03, 0.02],
    "E5": [0.02, 0.01, 0.01, 0.02, 0.02, 0.04],
    "E6": [0.0, 0.01, 0.02, 0.03, 0.01, 0.01],
}


def histories() -> list[RunRecord]:
    """A study like the report's: baseline, Full FT vs LoRA on two datasets, a learning-rate
    sweep and three regularized runs, one seed each."""
    lora = [
        history(run, "full_vs_lora", change, method="lora", lr=1e-2)
        for run, change in LORA_CHANGES.items()
    ]
    return [
        history("E1_eurosat", "baseline", [0.0] * LAYERS, method="none"),
        history("E2", "full_vs_lora", FULL_CHANGE),
        history("E3", "full_vs_lora", [-0.05, -0.02, -0.01, -0.03, -0.02, -0.06], dataset="pets"),
        *lora,
        history("E7", "full_vs_lora", [0.01, -0.01, 0.0, 0.02, 0.0, 0.01], "lora", "pets"),
        history("A1_lr1e-6", "lr_sweep", [0.001] * LAYERS, lr=1e-6, accuracies=(0.2, 0.2, 0.2)),
        history("A1_lr1e-5", "lr_sweep", [-0.001] * LAYERS, lr=1e-5),
        history("A1_lr1e-4", "lr_sweep", [-0.01] * LAYERS, lr=1e-4),
        history(
            "R1_apr0.1", "regularization", [c + 0.01 for c in FULL_CHANGE], reg=RegSpec("apr", 0.1)
        ),
        history(
            "R2_entfloor0.1",
            "regularization",
            [c + 0.005 * (i % 2) for i, c in enumerate(FULL_CHANGE)],
            reg=RegSpec("entropy_floor", 0.1),
        ),
        history("R3_wd0.1", "regularization", FULL_CHANGE),
    ]


def write_records(output_root: Path | str, records: Iterable[RunRecord]) -> None:
    """Write each record as ``<output_root>/runs/<id>/seed<k>/history.json``."""
    for r in records:
        files = RunFiles.of(output_root, r.id, r.seed)
        files.run_dir.mkdir(parents=True, exist_ok=True)
        r.write(files.history)


# The runs of §6.4 A and B as params/families.yaml gives them (families full_vs_lora, lr_sweep).
METHOD_RUNS = ["E2", "E3", "E4", "E5", "E6", "E7"]
LR_RUNS = ["E2", "A1_lr1e-6", "A1_lr1e-5", "A1_lr1e-4"]


def study_tables() -> dict:
    """The fake study as the statistics code reads it: all records, the trained ones, their run
    summary and per-layer Δentropy."""
    from collapse_utils.analysis import stat_tables
    from collapse_utils.analysis.results import per_layer_delta, run_summary

    all_runs = histories()
    trained = stat_tables.trained(all_runs)
    return {
        "all": all_runs,
        "trained": trained,
        "summary": run_summary(all_runs),
        "delta": per_layer_delta(trained),
    }


def write_study(root: Path, records: Iterable[RunRecord]) -> Path:
    """A params copy in ``root`` whose smoke output root (beside it) holds ``records``; returns
    the params folder. Its smoke profile plans every grid point (no ``max_grid_values``), so
    records of the whole grid belong to the study."""
    import shutil

    from collapse_utils.config import PARAMS_DIR

    shutil.copytree(PARAMS_DIR, root / "params")
    smoke = root / "params" / "profiles" / "smoke.yaml"
    kept, inside = [], False
    for line in smoke.read_text().splitlines(keepends=True):
        # The max_grid_values block: its line and the indented lines under it.
        inside = line.startswith("max_grid_values:") or (inside and line.startswith(" "))
        kept += [] if inside else [line]
    smoke.write_text("".join(kept))
    write_records(root / "outputs" / "smoke", records)
    return root / "params"


GRID_LRS = (3e-6, 1e-5, 3e-5, 1e-4)  # Study B's learning rates


def grid_records(seeds=(7, 11), b16: bool = False):
    """Study B's matched grid under its real ids: full FT and LoRA on both datasets at the
    grid's lrs. Entropy falls with lr alike for both methods; embedding drift (and with it
    forgetting) grows with lr, four times faster for full FT. With ``b16``, also the ViT-B/16
    arm (EuroSAT, lrs 1e-5 to 1e-4) on which entropy *rises* with lr."""
    records = []
    for dataset in ("eurosat", "pets"):
        for method in ("full", "lora"):
            for k, lr in enumerate(GRID_LRS):
                for seed in seeds:
                    records.append(_grid_record("B", dataset, method, k, lr, seed))
    if b16:
        for method in ("full", "lora"):
            for k, lr in enumerate(GRID_LRS[1:], start=1):
                for seed in seeds:
                    records.append(_grid_record("B_b16", "eurosat", method, k, lr, seed, 16))
    return records


def _grid_record(prefix, dataset, method, k, lr, seed, patch=32):
    wobble = 0.002 * (seed % 3) + 0.001 * len(dataset)
    drift = (0.08 if method == "full" else 0.02) * (k + 1) + wobble
    run = f"{prefix}_{dataset}_{method}_lr{lr:.0e}".replace("e-0", "e-")
    change = [(0.01 if patch == 16 else -0.01) * (k + 1) - wobble] * LAYERS
    base = history(run, "study_b", change, method, dataset, lr, seed=seed, representation=True)
    last = dataclasses.replace(base.evals[-1], embedding_drift=drift)
    zeroshot = {
        "cifar100": ZeroShotRecord(0.6 * (1 - drift), 0.6, "single", 100),
        "cifar10": ZeroShotRecord(0.9 * (1 - drift / 2), 0.9, "single", 100),
    }
    model = {**base.config["model"], "patch_size": patch,
             "name": f"openai/clip-vit-base-patch{patch}"}  # fmt: skip
    config = {**base.config, "model": model}
    return dataclasses.replace(base, evals=[*base.evals[:-1], last], zeroshot=zeroshot,
                               config=config)  # fmt: skip
