from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from collapse_utils.analysis.results import run_summary
from collapse_utils.config import (
    PARAMS_DIR,
    ConfigError,
    available_experiments,
    load_config,
    load_family,
)
from collapse_utils.families import (
    AXES,
    FAMILIES_FILE,
    comparison_ids,
    load_families,
    load_statistics_runs,
    report_ids,
)
from tests.fake_records import history


def test_the_report_runs_are_every_configuration_outside_study_b():
    report = report_ids("smoke")
    assert len(report) == 23 and "E2" in report
    assert not [i for i in report if i.startswith("B_")]
    everything = set(available_experiments())
    assert {load_config("smoke", i).family for i in everything - set(report)} == {"study_b"}


def test_families_are_in_book_order_with_notebook_title_references_and_axis():
    families = load_families()
    assert list(families) == [
        "baseline",
        "full_vs_lora",
        "lr_sweep",
        "layer_freezing",
        "lora_targets",
        "regularization",
        "study_b",
    ]
    assert [f.notebook for f in families.values()] == [
        "01_baseline",
        "02_full_ft_vs_lora",
        "03_lr_sweep",
        "04_layer_freezing",
        "05_lora_targets",
        "06_regularization",
        "13_study_b",
    ]
    assert {f.study for name, f in families.items() if name != "study_b"} == {"report"}
    assert families["study_b"].study == "B"
    assert families["lr_sweep"].title == "Learning-rate sweep (A1)"
    assert {name: f.references for name, f in families.items() if f.references} == {
        "full_vs_lora": ("E2",),
        "lr_sweep": ("E2",),
        "layer_freezing": ("E2",),
        "lora_targets": ("E5",),
        "regularization": ("E2",),
    }
    assert families["layer_freezing"].axis == "freeze_layers"
    assert families["lora_targets"].reference == "E5"


def test_every_reference_and_statistics_run_is_an_experiment():
    ids = set(available_experiments())
    runs = load_statistics_runs()
    named = {r for f in load_families().values() for r in f.references}
    assert named | set(runs.layer_anova) | set(runs.dynamics) <= ids
    assert runs.layer_anova == ("E2", "E5")


def test_axes_are_columns_of_the_run_summary():
    summary = run_summary([history("E5", "full_vs_lora", [0.0] * 6, method="lora")])
    assert set(AXES) <= set(summary.columns)
    assert {f.axis for f in load_families().values()} <= set(AXES)


def test_a_comparison_lists_references_then_the_family_in_id_order():
    families = load_families()
    assert comparison_ids("smoke", families["lr_sweep"]) == [
        "E2",
        "A1_lr1e-4",
        "A1_lr1e-6",
        "A1_lr5e-5",
        "A1_lr5e-6",
    ]
    assert comparison_ids("smoke", families["full_vs_lora"]) == ["E2", "E3", "E4", "E5", "E6", "E7"]


@pytest.fixture
def params(tmp_path: Path) -> Path:
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    return tmp_path / "params"


def edit_families(params: Path, change) -> None:
    path = params / FAMILIES_FILE
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda raw: raw["families"]["lr_sweep"].update(axis="colour"), "families.lr_sweep.axis"),
        (lambda raw: raw["families"]["lr_sweep"].pop("notebook"), "families.lr_sweep.notebook"),
        (lambda raw: raw["families"]["baseline"].update(references="E2"), "references"),
        (lambda raw: raw["families"]["baseline"].update(colour=1), "families.baseline"),
        (lambda raw: raw["statistics"].pop("dynamics"), "statistics.dynamics"),
        (lambda raw: raw["statistics"].update(lr_sweep="lr"), "statistics.lr_sweep"),
        (lambda raw: raw.update(extra=1), "top level"),
        (
            lambda raw: raw["families"]["lr_sweep"].update(notebook="02_full_ft_vs_lora"),
            "families.lr_sweep.notebook",
        ),  # a second family on one notebook
    ],
)
def test_a_bad_families_file_fails_naming_the_file_and_the_field(params, change, field):
    edit_families(params, change)
    with pytest.raises(ConfigError) as err:
        load_families(params)
        load_statistics_runs(params)
    assert FAMILIES_FILE in str(err.value) and field in str(err.value)


def test_a_families_file_with_a_key_given_twice_is_refused(params):
    path = params / FAMILIES_FILE
    path.write_text(path.read_text() + "statistics: {}\n")
    with pytest.raises(ConfigError, match="families.yaml.*'statistics' is given twice"):
        load_families(params)


def test_a_family_added_to_the_table_is_valid_for_experiments(params):
    def add(raw):
        raw["families"]["temperature"] = {
            "notebook": "11_temperature",
            "title": "Softmax temperature",
            "references": ["E2"],
            "axis": "lr",
        }

    edit_families(params, add)
    experiment = params / "experiments" / "T1.yaml"
    experiment.write_text("id: T1\nfamily: temperature\ntrain: {method: full}\n")
    assert load_config("smoke", "T1", params).family == "temperature"
    assert [c.id for c in load_family("smoke", "temperature", params)] == ["T1"]


def test_an_experiment_outside_the_table_is_refused(params):
    experiment = params / "experiments" / "X1.yaml"
    experiment.write_text("id: X1\nfamily: favourites\ntrain: {method: full}\n")
    with pytest.raises(ConfigError, match=r"X1\.yaml: field 'family' is 'favourites'"):
        load_config("smoke", "X1", params)
    with pytest.raises(ConfigError, match=r"families\.yaml: field 'family' is 'favourites'"):
        load_family("smoke", "favourites", params)
