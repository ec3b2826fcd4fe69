"""Read run histories into tidy tables.

Every run writes ``<output_root>/runs/<id>/seed<k>/history.json`` (schema and reader:
:mod:`collapse_utils.run_record`). This module turns them into tables: the book's numbers come
from here, never from logs.

Conventions. ``run`` is the experiment id, ``seed`` the training seed; one history is one
(run, seed). Layers are 1-based. "First" and "final" are the first and last entries of
``evals`` (a baseline has a single eval at step 0, so its changes are 0). A change in percent
is ``100 · (final − first) / first``; "layer mean" is the unweighted mean over layers.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from collapse_utils.config import METRICS
from collapse_utils.run_record import EvalRecord, RunRecord, find_runs, read_record


def load_histories(
    root: Path | str, complete_only: bool = True, ids: Collection[str] | None = None
) -> list[RunRecord]:
    """All run records below ``root`` (or those of the runs ``ids``: only their folders are
    read), in (id, seed) order; by default only complete ones.

    Raises ``ValueError`` if two files hold the same (id, seed), e.g. when ``root`` spans two
    profiles: pass ``outputs/<profile>`` instead; :class:`RecordError` names an unreadable
    file."""
    seen: dict[tuple[str, int], Path] = {}
    histories = []
    for files in find_runs(root):
        if ids is not None and files.run_dir.parent.name not in ids:  # runs/<id>/seed<k>
            continue
        history = read_record(files.history)
        if complete_only and history.status != "complete":
            continue
        key = (history.id, history.seed)
        if key in seen:
            raise ValueError(f"run {key} found twice: {seen[key]} and {files.history}")
        seen[key] = files.history
        histories.append(history)
    return sorted(histories, key=lambda h: (h.id, h.seed))


def trajectory(history: RunRecord, metric: str = "entropy") -> tuple[np.ndarray, np.ndarray]:
    """(fraction, layer-mean value) over the evals of one run, both shaped (evals,)."""
    fraction = np.array([e.fraction for e in history.evals], dtype=float)
    values = np.array([e.layer_mean(metric) for e in history.evals], dtype=float)
    return fraction, values


def pct_change(first: float, final: float) -> float:
    """``100 · (final − first) / first``; NaN when ``first`` is 0 or NaN (undefined)."""
    if first == 0 or np.isnan(first):
        return float("nan")
    return 100.0 * (final - first) / first


def run_summary(histories: Iterable[RunRecord]) -> pd.DataFrame:
    """One row per (run, seed).

    Columns: run, seed, family, method, dataset, lr, weight_decay, rank, targets and
    train_projection (missing unless method is ``lora``), freeze_layers, reg_kind, lam,
    best_acc, final_acc, test_acc (held-out test accuracy at the selected epoch; missing under
    the 'original' split); for each metric ``m``: ``m_0`` and ``m_f`` (layer mean at the first
    and final eval) and ``d_m_pct`` (their change in %); the representation signals against the
    pre-trained tower at the final eval, ``cka_mean_f`` and ``cka_last_f`` (linear CKA of the
    [CLS] tokens, mean over layers and last layer), ``embedding_drift_f`` and
    ``weight_drift_f``, and the same at the end of the first epoch (the eval at epoch 1.0) with
    suffix ``_e1`` (NaN where not measured); ``d_entropy_pct_e1`` (Δ entropy after epoch 1); at
    the *selected* checkpoint, the one the zero-shot scored (:func:`selected_epoch`),
    ``selected_epoch``, every ``d_<m>_pct_sel``, ``d_entropy_last_pct_sel`` (last layer) and the
    representation signals with suffix ``_sel``; ``train_loss_f`` (mean training loss of the
    last epoch); ``model`` (the hub name, or ``tiny-patch<p>``) and ``patch_size`` (the
    backbone: Study B analyses each apart); for each zero-shot dataset ``d``:
    ``zs_d``, ``zs_d_pretrained``, ``zs_d_merged`` (the trained model's accuracy where ``zs_d``
    scored the report's path) and ``retention_d`` = zs_d / zs_d_pretrained (NaN when the
    pre-trained accuracy is 0); ``corruption_mean_acc`` (mean accuracy over EuroSAT's corruption
    splits) and ``corruption_gap`` (test accuracy minus it) where measured; status.
    Accuracies are as stored in the history."""
    rows = [_summary_row(h) for h in histories]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    for column in ("seed", "rank", "freeze_layers"):
        frame[column] = frame[column].astype("Int64")
    zs = sorted(c for c in frame.columns if c.startswith("zs_"))
    retention = sorted(c for c in frame.columns if c.startswith("retention_"))
    last = {*zs, *retention, "status"}
    ordered = [c for c in frame.columns if c not in last]
    return frame[ordered + zs + retention + ["status"]]


def _model_name(model: dict) -> str:
    """The hub name a run loaded (a mirror folder keeps it), or ``tiny-patch<p>``."""
    return (
        f"tiny-patch{model.get('patch_size', 32)}" if model["source"] == "tiny" else model["name"]
    )


def _summary_row(h: RunRecord) -> dict[str, Any]:
    config = h.config
    train, lora, reg = config["train"], config["lora"], config["reg"]
    is_lora = train["method"] == "lora"
    row: dict[str, Any] = {
        "run": h.id,
        "seed": h.seed,
        "family": h.family,
        "method": train["method"],
        "dataset": config["data"]["dataset"],
        "lr": train.get("lr"),
        "weight_decay": train.get("weight_decay"),
        "rank": lora["rank"] if is_lora else None,
        "targets": ",".join(lora["targets"]) if is_lora else None,
        "train_projection": bool(lora.get("train_projection", True)) if is_lora else None,
        "freeze_layers": train.get("freeze_layers", 0),
        "reg_kind": reg["kind"],
        "lam": reg["lam"],
        "model": _model_name(config["model"]),
        "patch_size": config["model"].get("patch_size", 32),
        "best_acc": h.best_val_acc,
        "final_acc": h.final_val_acc,
        "test_acc": h.test_acc,
    }
    evals = h.evals
    for metric in METRICS:
        first = float(np.mean(evals[0].metrics[metric])) if evals else float("nan")
        final = float(np.mean(evals[-1].metrics[metric])) if evals else float("nan")
        row[f"{metric}_0"] = first
        row[f"{metric}_f"] = final
        row[f"d_{metric}_pct"] = pct_change(first, final)
    row |= representation_signals(evals[-1] if evals else None, "_f")
    row |= representation_signals(epoch_end(h, 1), "_e1")
    row["d_entropy_pct_e1"] = _change_at(h, epoch_end(h, 1))
    row |= _at_selected(h)
    row["train_loss_f"] = h.epochs[-1].train_loss if h.epochs else math.nan
    for dataset, result in sorted(h.zeroshot.items()):
        row[f"zs_{dataset}"] = result.accuracy
        row[f"zs_{dataset}_pretrained"] = result.pretrained_accuracy
        if result.merged_accuracy is not None:
            row[f"zs_{dataset}_merged"] = result.merged_accuracy
        pretrained = result.pretrained_accuracy
        row[f"retention_{dataset}"] = result.accuracy / pretrained if pretrained else math.nan
    if h.corruption_acc:  # study2's names: the mean over splits and the gap to clean test
        row["corruption_mean_acc"] = float(np.mean(list(h.corruption_acc.values())))
        row["corruption_gap"] = _or_nan(h.test_acc) - row["corruption_mean_acc"]
    row["status"] = h.status
    return row


def selected_epoch(history: RunRecord) -> int | None:
    """The epoch whose weights the zero-shot transfer scored: the first epoch with the best
    validation accuracy when ``eval.zeroshot_checkpoint`` is ``best`` (as the loop keeps it),
    else the last epoch; None before any epoch ended."""
    if not history.epochs:
        return None
    if history.config["eval"].get("zeroshot_checkpoint", "final") != "best":
        return history.epochs[-1].epoch
    return max(history.epochs, key=lambda e: (e.val_acc, -e.epoch)).epoch


def _at_selected(history: RunRecord) -> dict[str, float]:
    """The changes and representation signals at the selected checkpoint (suffix ``_sel``):
    ``d_<metric>_pct_sel``, ``d_entropy_last_pct_sel`` (last layer), ``cka_mean_sel`` …, and
    ``selected_epoch``; NaN where that eval is missing."""
    epoch = selected_epoch(history)
    record = epoch_end(history, epoch) if epoch is not None else None
    row: dict[str, float] = {"selected_epoch": math.nan if epoch is None else epoch}
    for metric in METRICS:
        row[f"d_{metric}_pct_sel"] = _change_at(history, record, metric)
    row["d_entropy_last_pct_sel"] = _change_at(history, record, "entropy", layer=-1)
    return row | representation_signals(record, "_sel")


def _change_at(
    history: RunRecord, record: EvalRecord | None, metric: str = "entropy", layer: int | None = None
) -> float:
    """Change in % of ``metric`` (layer mean, or one ``layer``) from the first eval to
    ``record``; NaN without it."""
    if record is None or not history.evals:
        return math.nan
    first, then = history.evals[0].metrics[metric], record.metrics[metric]
    if layer is not None:
        return pct_change(float(first[layer]), float(then[layer]))
    return pct_change(float(np.mean(first)), float(np.mean(then)))


def epoch_end(history: RunRecord, epoch: int) -> EvalRecord | None:
    """The eval at the end of ``epoch`` (its ``epoch`` field equals it), or None."""
    return next((e for e in history.evals if math.isclose(e.epoch, epoch)), None)


def representation_signals(record: EvalRecord | None, suffix: str) -> dict[str, float]:
    """``cka_mean``, ``cka_last``, ``embedding_drift``, ``weight_drift`` of one eval, each name
    + ``suffix``; NaN for an eval that did not measure them (or no eval)."""
    nan = math.nan
    measured = record is not None and record.cka is not None
    values = {
        "cka_mean": float(np.mean(record.cka)) if measured else nan,
        "cka_last": float(record.cka[-1]) if measured else nan,
        "embedding_drift": _or_nan(record.embedding_drift) if record else nan,
        "weight_drift": _or_nan(record.weight_drift) if record else nan,
    }
    return {f"{name}{suffix}": value for name, value in values.items()}


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def zeroshot_datasets(summary: pd.DataFrame) -> list[str]:
    """The zero-shot datasets ``d`` of a :func:`run_summary` table (``zs_d`` columns), sorted."""
    return sorted(
        c.removeprefix("zs_")
        for c in summary.columns
        if c.startswith("zs_") and not c.endswith(("_pretrained", "_merged"))
    )


def zeroshot_change(summary: pd.DataFrame, dataset: str) -> pd.Series:
    """Zero-shot accuracy on ``dataset`` minus the pre-trained model's, in points (×100)."""
    return 100 * (summary[f"zs_{dataset}"] - summary[f"zs_{dataset}_pretrained"])


def run_means(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per run, indexed by run: numeric columns averaged over seeds, the others taken
    from the first seed; ``seeds`` counts the seeds averaged. This is what pages show of a run
    with several seeds."""
    numeric = summary.select_dtypes("number").columns.drop("seed", errors="ignore")
    first = summary.groupby("run", sort=True).first()
    first[numeric] = summary.groupby("run", sort=True)[list(numeric)].mean()
    first["seeds"] = summary.groupby("run", sort=True).size()
    return first


def histories_of(histories: Iterable[RunRecord], runs: Iterable[str]) -> list[RunRecord]:
    """The histories of ``runs`` that exist, in the order of ``runs``, every seed (by seed):
    curves of a run with several seeds show each seed."""
    by_seed = sorted(histories, key=lambda h: h.seed)
    return [h for run in dict.fromkeys(runs) for h in by_seed if h.id == run]


def per_layer_final(histories: Iterable[RunRecord], metric: str = "entropy") -> pd.DataFrame:
    """The final eval's value per layer (entropy in nats), laid out as :func:`per_layer_delta`."""
    return _per_layer(histories, lambda first, final: final, metric)


def per_layer_delta(histories: Iterable[RunRecord], metric: str = "entropy") -> pd.DataFrame:
    """Change in % from first to final eval, per layer.

    Returns a (runs × layers) frame: index (run, seed), columns ``layer`` 1..L. A history
    without evals gives a row of NaN."""
    change = np.vectorize(pct_change, otypes=[float])
    return _per_layer(histories, change, metric)


def _per_layer(histories: Iterable[RunRecord], value, metric: str) -> pd.DataFrame:
    """``value(first, final)`` of each history's per-layer ``metric`` arrays, one row per
    (run, seed), columns ``layer`` 1..L (no columns' values for a history without evals)."""
    rows = {}
    for h in histories:
        values: list[float] = []
        if h.evals:
            first = np.asarray(h.evals[0].metrics[metric], dtype=float)
            final = np.asarray(h.evals[-1].metrics[metric], dtype=float)
            values = list(value(first, final))
        rows[(h.id, h.seed)] = pd.Series(values, index=range(1, len(values) + 1), dtype=float)
    index = pd.MultiIndex.from_tuples(list(rows), names=["run", "seed"])
    frame = pd.DataFrame(list(rows.values()), index=index)
    frame.columns.name = "layer"
    return frame
