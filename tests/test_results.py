from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest

from collapse_utils.analysis.results import (
    histories_of,
    load_histories,
    pct_change,
    per_layer_delta,
    run_means,
    run_summary,
    trajectory,
    zeroshot_change,
    zeroshot_datasets,
)
from collapse_utils.analysis.stats import collapse_onset
from collapse_utils.config import LoraSpec, RegSpec, RunConfig, TrainSpec
from collapse_utils.run_record import RecordError, RunRecord, find_runs, read_record
from collapse_utils.storage import write_json
from tests.fake_records import history as fake_history

LAYERS = 3


def evals(entropy_per_eval: list[list[float]], steps: list[int], total: int) -> list[dict]:
    """Evals whose entropy per layer is given; the other metrics are fixed functions of it."""
    return [
        {
            "step": step,
            "epoch": step / 10,
            "fraction": step / total if total else 0.0,
            "train_loss": None if step == 0 else 1.0 / step,
            "metrics": {
                "entropy": entropy,
                "erf": [e / 4 for e in entropy],
                "gini": [1 / e for e in entropy],
                "head_diversity": [0.1] * LAYERS,
            },
            "kl_to_initial": [0.01 * step] * LAYERS,
        }
        for step, entropy in zip(steps, entropy_per_eval, strict=True)
    ]


def make_history(config: RunConfig, status: str, evals_: list[dict], zs: float | None) -> dict:
    method = config.train.method
    trained = method != "none" and status == "complete"
    return {
        "id": config.id,
        "family": config.family,
        "description": config.description,
        "profile": config.profile,
        "seed": config.seed,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "status": status,
        "failure": None if status != "failed" else {"step": 20, "reason": "loss is nan"},
        "versions": {"torch": "2.4"},
        "device": "cpu",
        "steps_per_epoch": 10,
        "total_steps": 40 if method != "none" else 0,
        "evals": evals_,
        "epochs": []
        if method == "none"
        else [
            {"epoch": 1, "step": 10, "train_loss": 0.5, "val_acc": 0.9, "samples_per_s": 100.0},
            {"epoch": 2, "step": 20, "train_loss": 0.3, "val_acc": 0.95, "samples_per_s": 101.0},
        ],
        "best_val_acc": 0.95 if trained else None,
        "final_val_acc": 0.94 if trained else None,
        "zeroshot": {}
        if zs is None
        else {
            "cifar100": {
                "accuracy": zs,
                "pretrained_accuracy": 0.6,
                "templates": "ensemble",
                "n_images": 100,
            }
        },
        "wall_time_s": 12.0,
    }


BASE = RunConfig(id="E1_eurosat", family="baseline", train=TrainSpec(method="none"))
FULL = RunConfig(id="E2", family="full_vs_lora", train=TrainSpec(method="full", lr=1e-5))
LORA = RunConfig(
    id="E5",
    family="full_vs_lora",
    train=TrainSpec(method="lora", lr=1e-4),
    lora=LoraSpec(rank=8, targets=("q_proj", "v_proj")),
)
FAILED = RunConfig(
    id="R1_apr0.1",
    family="regularization",
    train=TrainSpec(method="full", lr=1e-5),
    reg=RegSpec(kind="apr", lam=0.1),
)

FULL_ENTROPY = [[4.0, 3.0, 2.0], [3.96, 2.97, 1.9], [3.8, 2.85, 1.8]]
LORA_ENTROPY = [[4.0, 3.0, 2.0], [4.02, 3.03, 2.02], [4.04, 3.06, 2.04]]


def histories() -> list[dict]:
    return [
        make_history(BASE, "complete", evals([[4.0, 3.0, 2.0]], [0], 0), zs=0.6),
        make_history(FULL, "complete", evals(FULL_ENTROPY, [0, 20, 40], 40), zs=0.3),
        make_history(FULL.with_seed(7), "complete", evals(FULL_ENTROPY[:2], [0, 40], 40), zs=0.4),
        make_history(LORA, "complete", evals(LORA_ENTROPY, [0, 20, 40], 40), zs=0.5),
        make_history(FAILED, "failed", evals(FULL_ENTROPY[:1], [0], 40), zs=None),
    ]


@pytest.fixture
def root(tmp_path):
    for history in histories():
        run_dir = tmp_path / "runs" / history["id"] / f"seed{history['seed']}"
        run_dir.mkdir(parents=True)
        write_json(run_dir / "history.json", history)  # with its checksum, as a run writes it
    (tmp_path / "runs" / "E2" / "seed42" / "metrics.jsonl").write_text("{}")
    return tmp_path


def test_find_runs_lists_every_run_and_seed(root):
    runs = find_runs(root)
    assert len(runs) == 5
    assert all(r.history.name == "history.json" for r in runs)
    assert root / "runs" / "E2" / "seed7" / "history.json" in [r.history for r in runs]


def test_find_runs_on_missing_root_is_empty(tmp_path):
    assert find_runs(tmp_path / "nowhere") == []
    assert load_histories(tmp_path / "nowhere") == []


def test_tables_of_no_histories_are_empty():
    assert run_summary([]).empty
    assert per_layer_delta([]).empty


def test_load_histories_keeps_complete_runs_in_id_seed_order(root):
    loaded = load_histories(root)
    assert [(h.id, h.seed) for h in loaded] == [
        ("E1_eurosat", 42),
        ("E2", 7),
        ("E2", 42),
        ("E5", 42),
    ]
    everything = load_histories(root, complete_only=False)
    assert [h.status for h in everything if h.id == "R1_apr0.1"] == ["failed"]


def test_load_histories_of_some_runs_reads_only_their_folders(root):
    (root / "runs" / "E5" / "seed42" / "history.json").write_text("not json")  # never read
    assert [(h.id, h.seed) for h in load_histories(root, ids={"E2"})] == [("E2", 7), ("E2", 42)]
    assert load_histories(root, ids=set()) == []


def test_read_record_names_the_file_when_a_key_is_missing(tmp_path):
    path = tmp_path / "history.json"
    write_json(path, {"id": "E2"})
    with pytest.raises(RecordError, match="history.json.*lacks"):
        read_record(path)


def test_record_round_trips_through_json_with_its_schema_version(root):
    record = read_record(root / "runs" / "E2" / "seed42" / "history.json")
    assert record.schema_version == 1 and record.evals[1].metrics["entropy"][0] == 3.96
    record.write(root / "copy.json")
    assert json.loads((root / "copy.json").read_text())["schema_version"] == 1
    assert read_record(root / "copy.json") == record


def test_history_without_a_version_loads_and_a_newer_one_fails_clearly(root):
    path = root / "runs" / "E2" / "seed42" / "history.json"
    assert "schema_version" not in json.loads(path.read_text())  # written as before versioning
    assert read_record(path).schema_version == 1
    write_json(path, json.loads(path.read_text()) | {"schema_version": 2})
    with pytest.raises(RecordError, match="seed42/history.json: history schema_version 2"):
        read_record(path)


def test_malformed_eval_and_unknown_status_are_named(tmp_path):
    good = make_history(FULL, "complete", evals(FULL_ENTROPY, [0, 20, 40], 40), zs=None)
    bad_eval = good | {"evals": [{"step": 0}]}
    with pytest.raises(RecordError, match="malformed"):
        RunRecord.from_dict(bad_eval, "x.json")
    with pytest.raises(RecordError, match="status 'done'"):
        RunRecord.from_dict(good | {"status": "done"}, "x.json")


def test_load_histories_refuses_the_same_run_under_two_profiles(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("outputs")
    for profile in ("smoke", "full"):
        run_dir = other / profile / "runs" / "E2" / "seed42"
        run_dir.mkdir(parents=True)
        write_json(run_dir / "history.json", json.loads((root / "runs/E2/seed42/history.json")
                                                        .read_text()))  # fmt: skip
    with pytest.raises(ValueError, match="found twice"):
        load_histories(other)
    assert len(load_histories(other / "smoke")) == 1


def test_trajectory_feeds_collapse_onset(root):
    e2 = next(h for h in load_histories(root) if h.id == "E2" and h.seed == 42)
    fraction, entropy = trajectory(e2)
    assert fraction.tolist() == [0.0, 0.5, 1.0]
    assert collapse_onset(fraction, entropy) == 0.5  # 2.9433 is 1.9% below 3.0


def test_run_summary_has_one_row_per_run_and_seed_with_config_and_changes(root):
    summary = run_summary(load_histories(root)).set_index(["run", "seed"])
    assert len(summary) == 4
    e2 = summary.loc[("E2", 42)]
    assert (e2["family"], e2["method"], e2["dataset"]) == ("full_vs_lora", "full", "eurosat")
    assert e2["lr"] == 1e-5 and e2["weight_decay"] == 0.01
    assert pd.isna(e2["rank"]) and pd.isna(e2["targets"])
    assert e2["entropy_0"] == pytest.approx(3.0)
    assert e2["entropy_f"] == pytest.approx((3.8 + 2.85 + 1.8) / 3)
    assert e2["d_entropy_pct"] == pytest.approx(100 * ((3.8 + 2.85 + 1.8) / 3 - 3.0) / 3.0)
    assert e2["d_head_diversity_pct"] == pytest.approx(0.0)
    assert (e2["best_acc"], e2["final_acc"]) == (0.95, 0.94)
    assert (e2["zs_cifar100"], e2["zs_cifar100_pretrained"]) == (0.3, 0.6)
    assert e2.status == "complete"


def test_run_summary_fills_lora_fields_only_for_lora(root):
    summary = run_summary(load_histories(root)).set_index("run")
    assert summary.loc["E5", "rank"] == 8
    assert summary.loc["E5", "targets"] == "q_proj,v_proj"
    assert summary.loc["E5", "d_entropy_pct"] > 0
    assert summary["rank"].isna().sum() == 3


def test_baseline_summary_has_no_change_and_no_accuracy(root):
    baseline = run_summary(load_histories(root)).set_index("run").loc["E1_eurosat"]
    assert baseline["method"] == "none"
    assert pd.isna(baseline["lr"])
    for metric in ("entropy", "erf", "gini", "head_diversity"):
        assert baseline[f"d_{metric}_pct"] == 0.0
    assert pd.isna(baseline["best_acc"])


def test_failed_run_appears_only_when_asked_for(root):
    summary = run_summary(load_histories(root, complete_only=False)).set_index("run")
    failed = summary.loc["R1_apr0.1"]
    assert failed["status"] == "failed"
    assert (failed["reg_kind"], failed["lam"]) == ("apr", 0.1)
    assert failed["d_entropy_pct"] == 0.0  # one eval before it failed
    assert pd.isna(failed["zs_cifar100"])
    assert list(summary.columns)[-1] == "status"


def test_per_layer_delta_is_runs_by_layers_in_percent(root):
    delta = per_layer_delta(load_histories(root))
    assert delta.index.names == ["run", "seed"]
    assert list(delta.columns) == [1, 2, 3]
    assert delta.loc[("E2", 42)].tolist() == pytest.approx([-5.0, -5.0, -10.0])
    assert delta.loc[("E2", 7)].tolist() == pytest.approx([-1.0, -1.0, -5.0])
    assert delta.loc[("E1_eurosat", 42)].tolist() == [0.0, 0.0, 0.0]
    gini = per_layer_delta(load_histories(root), metric="gini")
    assert gini.loc[("E5", 42), 1] == pytest.approx(100 * (1 / 4.04 - 1 / 4.0) / (1 / 4.0))


def test_per_layer_delta_gives_nan_for_a_run_without_evals():
    empty = make_history(dataclasses.replace(FAILED, id="X"), "failed", [], zs=None)
    full = make_history(FULL, "complete", evals(FULL_ENTROPY, [0, 20, 40], 40), zs=None)
    empty, full = RunRecord.from_dict(empty), RunRecord.from_dict(full)
    delta = per_layer_delta([empty, full])
    assert delta.loc[("X", 42)].isna().all()
    summary = run_summary([empty, full]).set_index("run")
    assert math.isnan(summary.loc["X", "d_entropy_pct"])
    assert np.isfinite(summary.loc["E2", "d_entropy_pct"])


def test_run_means_averages_numeric_columns_over_seeds():
    summary = pd.DataFrame(
        {
            "run": ["E2", "E2", "E5"],
            "seed": [1, 2, 1],
            "method": ["full", "full", "lora"],
            "d_entropy_pct": [1.0, 3.0, -1.0],
        }
    )
    means = run_means(summary)
    assert list(means.index) == ["E2", "E5"]
    assert means.loc["E2", "d_entropy_pct"] == 2.0
    assert means.loc["E2", "method"] == "full"
    assert means["seeds"].tolist() == [2, 1]


def test_histories_of_keeps_the_order_asked_for_and_every_seed(root):
    loaded = load_histories(root)
    chosen = histories_of(loaded, ["E5", "missing", "E2", "E5"])
    assert [(h.id, h.seed) for h in chosen] == [("E5", 42), ("E2", 7), ("E2", 42)]


def test_pct_change_is_nan_from_zero_and_zeroshot_change_is_in_points(root):
    assert math.isnan(pct_change(0.0, 1.0)) and pct_change(2.0, 3.0) == 50.0
    summary = run_summary(load_histories(root))
    assert zeroshot_datasets(summary) == ["cifar100"]
    change = zeroshot_change(summary.set_index(["run", "seed"]), "cifar100")
    assert change.loc[("E2", 42)] == pytest.approx(100 * (0.3 - 0.6))


REPRESENTATION = ["cka_mean", "cka_last", "embedding_drift", "weight_drift"]
# (CKA per layer, embedding drift, weight drift) at steps 0, 10, 20: epochs 0, 1 and 2.
SIGNALS = [
    ([1.0, 1.0, 1.0], 0.0, 0.0),
    ([0.99, 0.95, 0.9], 0.05, 0.01),
    ([0.98, 0.9, 0.7], 0.1, 0.02),
]


def signal_history() -> dict:
    evals_ = evals(FULL_ENTROPY, [0, 10, 20], 20)
    for record, (cka, embedding, weight) in zip(evals_, SIGNALS, strict=True):
        record |= {"cka": cka, "embedding_drift": embedding, "weight_drift": weight}
    return make_history(FULL, "complete", evals_, zs=0.3)


def test_run_summary_has_representation_signals_at_the_end_of_epoch_one_and_the_end():
    row = run_summary([RunRecord.from_dict(signal_history())]).iloc[0]
    assert row["cka_mean_f"] == pytest.approx((0.98 + 0.9 + 0.7) / 3)
    assert (row["cka_last_f"], row["embedding_drift_f"], row["weight_drift_f"]) == (0.7, 0.1, 0.02)
    assert row["cka_mean_e1"] == pytest.approx((0.99 + 0.95 + 0.9) / 3)
    assert (row["cka_last_e1"], row["embedding_drift_e1"], row["weight_drift_e1"]) == (
        0.9, 0.05, 0.01,
    )  # fmt: skip


def test_epoch_one_signals_are_nan_without_an_eval_at_epoch_one():
    row = run_summary([fake_history("E2", "full_vs_lora", [0.0] * 6, representation=True)]).iloc[0]
    assert row["cka_last_f"] == pytest.approx(1 - 0.05 * 6)
    assert row["weight_drift_f"] == pytest.approx(0.01)
    assert all(math.isnan(row[f"{name}_e1"]) for name in REPRESENTATION)  # evals at epoch 1.5


def test_history_without_representation_signals_loads_and_gives_nan(root):
    record = read_record(root / "runs" / "E2" / "seed42" / "history.json")
    assert "cka" not in json.loads((root / "runs" / "E2" / "seed42" / "history.json").read_text())
    assert all(e.cka is None and e.weight_drift is None for e in record.evals)
    summary = run_summary(load_histories(root))
    for suffix in ("_f", "_e1"):
        assert summary[[f"{name}{suffix}" for name in REPRESENTATION]].isna().all().all()


def test_representation_signals_and_their_absence_round_trip_through_json(tmp_path):
    data = signal_history()
    data["evals"][0] |= {"cka": None, "embedding_drift": None, "weight_drift": None}
    record = RunRecord.from_dict(data)
    record.write(tmp_path / "history.json")
    again = read_record(tmp_path / "history.json")
    assert again.evals == record.evals  # the config dict holds tuples, JSON lists
    assert again.evals[0].cka is None and again.evals[2].cka[-1] == 0.7


def test_retention_is_zero_shot_over_pretrained_beside_the_zero_shot_columns(root):
    summary = run_summary(load_histories(root)).set_index(["run", "seed"])
    assert summary.loc[("E2", 42), "retention_cifar100"] == pytest.approx(0.3 / 0.6)
    assert summary.loc[("E1_eurosat", 42), "retention_cifar100"] == pytest.approx(1.0)
    tail = ["zs_cifar100", "zs_cifar100_pretrained", "retention_cifar100", "status"]
    assert list(summary.columns)[-4:] == tail
    data = signal_history()
    data["zeroshot"]["cifar100"]["pretrained_accuracy"] = 0.0
    assert math.isnan(run_summary([RunRecord.from_dict(data)]).loc[0, "retention_cifar100"])


def _best_at_epoch_one(history: dict, checkpoint: str) -> RunRecord:
    """``history`` with its best validation accuracy at epoch 1 and zero-shot scored on
    ``checkpoint`` (best or final)."""
    history["epochs"][0]["val_acc"] = 0.99
    history["config"]["eval"]["zeroshot_checkpoint"] = checkpoint
    return RunRecord.from_dict(history)


def test_selected_checkpoint_signals_are_read_where_the_zero_shot_was_scored():
    best = run_summary([_best_at_epoch_one(signal_history(), "best")]).iloc[0]
    first, then = np.mean(FULL_ENTROPY[0]), np.mean(FULL_ENTROPY[1])
    assert best["selected_epoch"] == 1
    assert best["d_entropy_pct_sel"] == pytest.approx(100 * (then - first) / first)
    assert best["d_entropy_last_pct_sel"] == pytest.approx(
        100 * (FULL_ENTROPY[1][-1] - FULL_ENTROPY[0][-1]) / FULL_ENTROPY[0][-1]
    )
    assert best["cka_mean_sel"] == pytest.approx(best["cka_mean_e1"])
    assert best["d_entropy_pct_e1"] == best["d_entropy_pct_sel"]
    final = run_summary([_best_at_epoch_one(signal_history(), "final")]).iloc[0]
    assert final["selected_epoch"] == 2
    assert final["d_entropy_pct_sel"] == pytest.approx(final["d_entropy_pct"])
    assert final["weight_drift_sel"] == final["weight_drift_f"] == 0.02
    assert final["train_loss_f"] == 0.3 and final["model"] == "openai/clip-vit-base-patch32"


def test_the_trained_models_zero_shot_beside_the_reports_path_is_no_dataset_of_its_own():
    data = signal_history()
    data["zeroshot"]["cifar100"] |= {"weights": "vision_base", "merged_accuracy": 0.45}
    summary = run_summary([RunRecord.from_dict(data)])
    assert summary.loc[0, "zs_cifar100_merged"] == 0.45
    assert summary.loc[0, "retention_cifar100"] == pytest.approx(0.3 / 0.6)  # of the path scored
    assert zeroshot_datasets(summary) == ["cifar100"]
