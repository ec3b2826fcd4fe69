"""The WiSE-FT path of tiny real smoke runs: its ends are the pre-trained model and the run's
checkpoint as history.json recorded them, LoRA scaling is weight interpolation, the path is
stored and reused, and the page and its notebook render with runs missing."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import collapse_utils.training.interpolation as interpolation
from collapse_utils.book.interpolation_page import (
    RunPath,
    half_back,
    interpolation_page,
    path_runs,
    recovered,
    recovery,
    recovery_sentence,
)
from collapse_utils.config import METRICS, PARAMS_DIR, load_config
from collapse_utils.run_record import RunFiles, read_record
from collapse_utils.storage import read_safetensors, verify
from collapse_utils.training.experiment import run_experiment
from collapse_utils.training.interpolation import (
    RunNotReadyError,
    interpolation_path,
    load_endpoints,
    measure_path,
)
from tests.test_train import SMALL, small

TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, object]:
    """A complete full fine-tuning (E2) and LoRA (E5) run of the SMALL smoke config."""
    root = tmp_path_factory.mktemp("runs")
    configs = {method: small(root, run) for method, run in (("full", "E2"), ("lora", "E5"))}
    for config in configs.values():
        run_experiment(config, progress=False)
    return configs


def _history(config):
    return read_record(config.run_dir / "history.json")


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in state.items()}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_alpha_zero_is_the_pretrained_model(runs, method):
    config = runs[method]
    history = _history(config)
    start = measure_path(config, alphas=(0.0, 1.0), checkpoint="final").points[0]
    for metric in METRICS:
        np.testing.assert_allclose(start.metrics[metric], history.evals[0].metrics[metric],
                                   **TOLERANCE)  # fmt: skip
    np.testing.assert_allclose(start.kl_to_initial, 0.0, atol=1e-6)
    assert set(start.zeroshot) == set(config.eval.zeroshot_datasets)
    for name, result in history.zeroshot.items():
        assert start.zeroshot[name] == result.pretrained_accuracy


@pytest.mark.parametrize("method", ["full", "lora"])
def test_alpha_one_is_the_run_at_its_checkpoint(runs, method):
    config = runs[method]
    history = _history(config)
    final = measure_path(config, alphas=(0.0, 1.0), checkpoint="final").points[-1]
    for metric in METRICS:  # history's last eval is the final step
        np.testing.assert_allclose(final.metrics[metric], history.evals[-1].metrics[metric],
                                   **TOLERANCE)  # fmt: skip
    assert final.task_acc == history.final_val_acc
    best = measure_path(config, alphas=(0.0, 1.0), checkpoint="best").points[-1]
    assert best.task_acc == history.best_val_acc
    assert config.eval.zeroshot_checkpoint == "best"  # the smoke profile's zero-shot weights
    for name, result in history.zeroshot.items():
        assert best.zeroshot[name] == result.accuracy


def test_the_path_table_has_one_row_per_alpha_and_the_history_names(runs):
    table = interpolation_path(runs["full"])  # α: eval.interpolation_points, 5 under smoke
    assert table["alpha"].tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert list(table.columns) == ["alpha", *METRICS, "kl_to_initial", "task_acc",
                                   "task_acc_zeroshot_head", "zs_cifar100"]  # fmt: skip
    assert table[["task_acc", "task_acc_zeroshot_head", "zs_cifar100"]].stack().between(0, 1).all()
    record = measure_path(runs["full"])
    assert record.layers("entropy").shape == (5, SMALL["model"]["vision_layers"])
    assert record.eval_split == "test"  # the smoke profile's 'original' split


def test_full_fine_tuning_interpolates_every_encoder_weight_and_keeps_the_trained_head(runs):
    config = runs["full"]
    ends, _ = load_endpoints(config, "final")
    trained = read_safetensors(config.run_dir / "final.safetensors")
    pretrained = _clone(interpolation.pretrained_state(ends.setup.base_clip))
    state = ends.at(0.25).state_dict()
    assert set(pretrained) | {"head.weight", "head.bias"} == set(state)
    for name, start in pretrained.items():
        torch.testing.assert_close(state[name], 0.75 * start + 0.25 * trained[name])
    assert torch.equal(state["head.weight"], trained["head.weight"])
    assert not torch.equal(
        trained["vision_model.encoder.layers.0.self_attn.q_proj.weight"],
        pretrained["vision_model.encoder.layers.0.self_attn.q_proj.weight"],
    )


def test_lora_scaling_equals_interpolating_the_merged_weights(runs):
    config = runs["lora"]
    ends, _ = load_endpoints(config, "final")
    start, end = _clone(ends.at(0.0).state_dict()), _clone(ends.at(1.0).state_dict())
    state = ends.at(0.3).state_dict()
    assert set(state) == set(start)
    pretrained = interpolation.pretrained_state(ends.setup.base_clip)
    for name, value in start.items():
        if name.startswith("head."):  # the trained head at every α
            assert torch.equal(state[name], end[name])
            continue
        assert torch.equal(value, pretrained[name])  # α = 0: adapters scaled to nothing
        torch.testing.assert_close(state[name], 0.7 * value + 0.3 * end[name])
    moved = [name for name in start if not torch.equal(start[name], end[name])]
    assert any("q_proj" in n for n in moved) and any("v_proj" in n for n in moved)
    assert "visual_projection.weight" in moved  # smoke: the projection trains with LoRA
    assert not any("k_proj" in n or "mlp" in n for n in moved)


def test_the_stored_path_is_reused_until_its_inputs_change(runs, monkeypatch):
    config = runs["lora"]
    first = interpolation_path(config, alphas=(0.0, 0.5, 1.0), checkpoint="final")
    path = RunFiles(config.run_dir).interpolation
    assert verify(path)
    calls = []
    measure = interpolation._measure
    monkeypatch.setattr(interpolation, "_measure", lambda *a: calls.append(a) or measure(*a))
    again = interpolation_path(config, alphas=[0, 0.5, 1], checkpoint="final")
    pd.testing.assert_frame_equal(first, again)
    assert not calls
    interpolation_path(config, alphas=(1.0,), checkpoint="final")
    interpolation_path(config, alphas=(1.0,), checkpoint="best")
    assert len(calls) == 2
    path.write_text(path.read_text().replace('"alpha"', '"alpha" '))  # damaged: no checksum
    with pytest.warns(UserWarning, match="measuring the path again"):
        interpolation_path(config, alphas=(1.0,), checkpoint="best")
    assert len(calls) == 3


def test_a_run_that_is_not_complete_is_named(tmp_path):
    config = small(tmp_path, "E2")
    with pytest.raises(RunNotReadyError, match=str(config.run_dir.resolve())):
        interpolation_path(config)
    assert not config.run_dir.exists()
    with pytest.raises(ValueError, match="checkpoint"):
        interpolation_path(config, checkpoint="last")


# --- the page's arithmetic --------------------------------------------------------------------


def test_half_recovery_of_a_straight_line_is_at_one_half():
    alpha = np.linspace(0, 1, 11)
    fraction = recovered(alpha, 0.6 - 0.2 * alpha)  # loses 0.2 linearly
    np.testing.assert_allclose(fraction, 1 - alpha)
    assert half_back(alpha, fraction) == pytest.approx(0.5)
    # Walking down from α = 1, the first crossing counts: 0.8 → 0.7 interpolates to 0.75.
    bumpy = np.array([1, 1, 1, 1, 1, 1, 1, 0.8, 0.2, 0.0, 0.0])
    assert half_back(alpha, bumpy) == pytest.approx(0.75)
    assert math.isnan(half_back(alpha, np.zeros(11)))
    assert np.isnan(recovered(alpha[1:], alpha[1:])).all()  # no α = 0: undefined


def _run_path(zs: np.ndarray, entropy: np.ndarray, own=0.5) -> RunPath:
    alpha = np.linspace(0, 1, len(zs))
    table = pd.DataFrame({"alpha": alpha, **{m: entropy for m in METRICS},
                          "zs_cifar100": zs, "zs_eurosat": own})  # fmt: skip
    layers = pd.DataFrame({1: entropy, 2: entropy}, index=pd.Index(alpha, name="alpha"))
    return RunPath("E2", load_config("smoke", "E2"), table, layers)


def test_recovery_measures_zero_shot_without_the_task_and_structure_at_half_recovery():
    alpha = np.linspace(0, 1, 21)
    # zero-shot falls by 0.4 but is half back already at α = 0.75; entropy falls on a line
    zs = np.where(alpha <= 0.75, 0.6 - 0.2 * alpha / 0.75, 0.4 - 0.2 * (alpha - 0.75) / 0.25)
    path = _run_path(zs, 2.0 - alpha, own=np.linspace(0.1, 0.9, 21))
    assert path.transfer_datasets == ["cifar100"]  # E2 is EuroSAT: not its own transfer
    row = recovery(path)
    assert row["zs_loss"] == pytest.approx(0.4)
    assert row["alpha_half"] == pytest.approx(0.75)
    assert row["entropy_back"] == pytest.approx(25.0)
    assert row["linear_back"] == pytest.approx(25.0)
    sentence = recovery_sentence(path, row)
    assert "falls by 40.00 points" in sentence and "α = 0.75" in sentence
    assert "25 % of the entropy change" in sentence and "CIFAR-100" in sentence


def test_a_run_that_loses_no_zero_shot_accuracy_has_nothing_to_recover():
    path = _run_path(np.linspace(0.3, 0.35, 11), np.linspace(2.0, 1.5, 11))
    row = recovery(path)
    assert row["zs_loss"] == pytest.approx(-0.05) and math.isnan(row["alpha_half"])
    assert math.isnan(row["entropy_back"])
    assert "nothing to recover" in recovery_sentence(path, row)


# --- the page and its notebook --------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory, runs) -> Path:
    """A params copy whose smoke profile is SMALL and writes where ``runs`` did: E2 and E5 are
    complete (the same config hashes), E3, E4, E6, E7 missing. Layer freezing (A3) needs more
    layers than SMALL has: left out."""
    params = tmp_path_factory.mktemp("study") / "params"
    shutil.copytree(PARAMS_DIR, params, ignore=shutil.ignore_patterns("A3_*"))
    profile = params / "profiles" / "smoke.yaml"
    raw = yaml.safe_load(profile.read_text())
    for section, values in SMALL.items():
        raw[section].update(values)
    raw["output_root"] = runs["full"].output_root
    profile.write_text(yaml.safe_dump(raw))
    for run, config in (("E2", runs["full"]), ("E5", runs["lora"])):
        assert load_config("smoke", run, params).config_hash() == config.config_hash()
    return params


def test_the_page_shows_the_measured_runs_and_names_the_missing(study):
    assert path_runs("smoke", study) == ["E2", "E3", "E4", "E5", "E6", "E7"]
    page = interpolation_page("smoke", study, show=False)
    assert page.notes[0] == ("**Not measured, left out:** E3 (not complete), E4 (not complete), "
                             "E6 (not complete), E7 (not complete)")  # fmt: skip
    assert page.notes[1].startswith("- **E2** (Full FT EuroSAT)")  # one sentence per run
    assert list(page.tables["recovery"].index) == ["E2", "E5"]
    assert set(page.figures) == {"extra_interpolation_frontier", "extra_interpolation_metrics",
                                 "extra_interpolation_layer_entropy"}  # fmt: skip
    assert "2 runs measured at 5 values of α" in page.findings  # smoke: 5
    for run in ("E2", "E5"):
        config = load_config("smoke", run, study)
        assert measure_path(config, checkpoint="best").checkpoint == "best"


def test_the_page_without_runs_says_so(tmp_path):
    params = tmp_path / "params"
    shutil.copytree(PARAMS_DIR, params)
    profile = params / "profiles" / "smoke.yaml"
    text = profile.read_text().replace("output_root: outputs/smoke", f"output_root: {tmp_path}")
    profile.write_text(text)
    page = interpolation_page("smoke", params, show=False)
    assert page.notes[0].startswith("**Not measured, left out:** E2 (not complete)")
    assert page.findings.startswith("No full fine-tuning or LoRA run")
    assert not page.figures
