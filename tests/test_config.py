from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from collapse_utils.config import (
    PARAMS_DIR,
    REPO_ROOT,
    ConfigError,
    available_experiments,
    config_seeds,
    grid_limits,
    load_config,
    load_family,
    plan_runs,
    profile_experiments,
    profile_output_root,
)

BAD = sorted((Path(__file__).parent / "bad_configs").glob("*.yaml"))


def test_study_has_every_configuration_of_the_report():
    families = {}
    for i in available_experiments():
        families.setdefault(load_config("full", i).family, []).append(i)
    report = [i for family, ids in families.items() if family != "study_b" for i in ids]
    assert len(report) == 23  # 21 configurations + E1 on two datasets
    assert len(families["lr_sweep"]) == 4
    assert len(families["layer_freezing"]) == 3
    assert len(families["regularization"]) == 7
    assert len(families["full_vs_lora"]) == 6
    assert len(families["baseline"]) == 2


@pytest.mark.parametrize("profile", ["full", "smoke"])
@pytest.mark.parametrize("experiment", available_experiments())
def test_every_experiment_loads_and_validates(profile, experiment):
    config = load_config(profile, experiment)
    assert config.id == experiment
    assert config.profile == profile
    assert config.seed == config_seeds(profile, experiment)[0]
    if config.train.method != "none":
        assert config.train.lr > 0 and config.train.epochs >= 1


def test_full_profile_carries_the_report_hyper_parameters():
    e2, e5, e3 = (load_config("full", i) for i in ("E2", "E5", "E3"))
    assert (e2.train.lr, e5.train.lr) == (1e-5, 1e-4)
    assert (e2.train.epochs, e3.train.epochs) == (20, 30)
    assert e2.train.batch_size == 64 and e2.train.weight_decay == 0.01
    assert e2.train.warmup_fraction == 0.05 and e2.train.grad_clip == 1.0
    assert e2.data.metric_subset == 200 and e2.model.name == "openai/clip-vit-base-patch32"
    assert load_config("full", "A1_lr5e-5").train.lr == 5e-5
    assert load_config("full", "A2_qkvo").lora.targets == ("q_proj", "k_proj", "v_proj", "out_proj")
    assert load_config("full", "A3_freeze9").train.freeze_layers == 9
    assert load_config("full", "R1_apr0.1").reg.lam == 0.1
    assert load_config("full", "R3_wd0.0").train.weight_decay == 0.0


def test_config_hash_is_stable_and_tracks_changes():
    a, b = load_config("smoke", "E2"), load_config("smoke", "E2")
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != load_config("smoke", "R3_wd0.1").config_hash()
    assert a.config_hash() != a.with_seed(7).config_hash()
    assert a.config_hash() != load_config("full", "E2").config_hash()


def test_run_directory_includes_the_seed_and_resolves_against_the_repository(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # never the current directory
    config = load_config("smoke", "E5", seed=3)
    assert config.run_dir == REPO_ROOT / "outputs/smoke/runs/E5/seed3"
    assert Path(config.data.root) == REPO_ROOT / "data"
    assert profile_output_root("smoke") == REPO_ROOT / "outputs/smoke"


def test_relative_paths_resolve_against_the_folder_holding_params(tmp_path):
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    config = load_config("smoke", "E5", params_dir=tmp_path / "params")
    assert config.run_dir == tmp_path / "outputs/smoke/runs/E5/seed42"
    assert profile_output_root("smoke", tmp_path / "params") == tmp_path / "outputs/smoke"
    # Where outputs live does not change what a run computes.
    assert config.config_hash() == load_config("smoke", "E5").config_hash()


def test_a_local_model_folder_resolves_and_a_hub_id_stays(tmp_path):
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    (tmp_path / "models" / "clip").mkdir(parents=True)
    profile = tmp_path / "params" / "profiles" / "full.yaml"
    profile.write_text(profile.read_text().replace(
        "name: openai/clip-vit-base-patch32", "name: models/clip"))  # fmt: skip
    assert load_config("full", "E2", tmp_path / "params").model.name == str(
        tmp_path / "models/clip"
    )
    assert load_config("full", "E2").model.name == "openai/clip-vit-base-patch32"


def test_configs_are_frozen():
    config = load_config("smoke", "E2")
    with pytest.raises(AttributeError):
        config.train.lr = 1.0  # type: ignore[misc]


def test_load_family_returns_only_that_family():
    ids = [c.id for c in load_family("smoke", "lr_sweep")]
    assert ids == ["A1_lr1e-4", "A1_lr1e-6", "A1_lr5e-5", "A1_lr5e-6"]


def test_unknown_profile_names_the_profile():
    with pytest.raises(ConfigError, match="unknown profile 'laptop'"):
        load_config("laptop", "E2")


def test_unknown_experiment_names_the_experiment():
    with pytest.raises(ConfigError, match="unknown experiment 'E99'"):
        load_config("smoke", "E99")


def test_bad_config_corpus_is_large_enough():
    assert len(BAD) >= 10


@pytest.mark.parametrize("bad", BAD, ids=[p.stem for p in BAD])
def test_bad_config_fails_naming_file_and_field(bad: Path, tmp_path: Path):
    expected = bad.read_text().splitlines()[0].removeprefix("# expect:").strip()
    (tmp_path / "experiments").mkdir()
    shutil.copytree(PARAMS_DIR / "profiles", tmp_path / "profiles")
    shutil.copy(PARAMS_DIR / "families.yaml", tmp_path / "families.yaml")
    shutil.copy(bad, tmp_path / "experiments" / bad.name)
    with pytest.raises(ConfigError) as err:
        load_config("smoke", bad.stem, params_dir=tmp_path)
    message = str(err.value)
    assert bad.name in message
    assert f"'{expected}'" in message


def test_bad_profile_value_names_the_profile_file(tmp_path: Path):
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    profile = tmp_path / "params" / "profiles" / "smoke.yaml"
    profile.write_text(profile.read_text().replace("batch_size: 32", "batch_size: 0"))
    with pytest.raises(ConfigError, match=r"smoke\.yaml: field 'train\.batch_size'"):
        load_config("smoke", "E2", params_dir=tmp_path / "params")


def test_params_file_that_is_not_utf8_is_named(tmp_path: Path):
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    (tmp_path / "params" / "experiments" / "E2.yaml").write_bytes(
        b'id: E2\nfamily: full_vs_lora\ndescription: "caf\xe9"\n'
    )
    with pytest.raises(ConfigError, match=r"E2\.yaml: not UTF-8 text"):
        load_config("smoke", "E2", params_dir=tmp_path / "params")


@pytest.mark.parametrize("bad_id", ["../evil", "a/b", "", ".hidden"])
def test_ids_that_are_not_safe_folder_names_are_refused(bad_id: str):
    with pytest.raises(ConfigError, match="not a safe name"):
        load_config("smoke", bad_id)


@pytest.mark.parametrize("device", ["banana", "cuda:x", "gpu"])
def test_unknown_device_names_the_field(device: str):
    with pytest.raises(ConfigError, match=r"'train.device' is .*must be auto, cpu"):
        load_config("smoke", "E2").with_overrides(train={"device": device})


def test_a_device_this_machine_lacks_fails_before_anything_is_written(tmp_path, monkeypatch):
    import torch

    from collapse_utils.training.experiment import run_experiment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = load_config("smoke", "E2").with_overrides(
        output_root=str(tmp_path), train={"device": "cuda"}
    )
    with pytest.raises(ConfigError, match=r"'train.device' is 'cuda' but this machine has 0 CUDA"):
        run_experiment(config, progress=False)
    assert not any(tmp_path.iterdir())


def test_metric_subset_larger_than_the_evaluation_split_is_refused():
    from collapse_utils.training.data import load_splits

    config = load_config("smoke", "E2").with_overrides(data={"metric_subset": 10_000})
    with pytest.raises(ConfigError, match=r"'data.metric_subset' is 10000 but the eurosat"):
        load_splits(config.data, config.seed)


def test_a_profile_extends_another_field_by_field(tmp_path: Path):
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    (tmp_path / "params" / "profiles" / "mini.yaml").write_text(
        "extends: full\noutput_root: outputs/mini\ntrain: {batch_size: 8}\n"
    )
    mini = load_config("mini", "E5", params_dir=tmp_path / "params")
    full = load_config("full", "E5", params_dir=tmp_path / "params")
    assert mini.train.batch_size == 8 and full.train.batch_size == 64
    assert mini.lora == full.lora and mini.eval == full.eval  # inherited field by field
    assert mini.run_dir == tmp_path / "outputs/mini/runs/E5/seed42"
    assert profile_output_root("mini", tmp_path / "params") == tmp_path / "outputs/mini"


def test_a_cycle_of_extends_and_a_bad_inherited_value_name_their_files(tmp_path: Path):
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    profiles = tmp_path / "params" / "profiles"
    (profiles / "a.yaml").write_text("extends: b\n")
    (profiles / "b.yaml").write_text("extends: a\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: field 'extends' makes a cycle"):
        load_config("a", "E2", params_dir=tmp_path / "params")
    (profiles / "base.yaml").write_text((profiles / "smoke.yaml").read_text().replace(
        "batch_size: 32", "batch_size: 0"))  # fmt: skip
    (profiles / "child.yaml").write_text("extends: base\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: field 'train\.batch_size'"):
        load_config("child", "E2", params_dir=tmp_path / "params")


# --- grids and seeds ---------------------------------------------------------------------------


def _params_with(tmp_path: Path, **experiments: str) -> Path:
    """A params folder with the repository's profiles and families and these experiment files."""
    (tmp_path / "experiments").mkdir()
    shutil.copytree(PARAMS_DIR / "profiles", tmp_path / "profiles")
    shutil.copy(PARAMS_DIR / "families.yaml", tmp_path / "families.yaml")
    for name, text in experiments.items():
        (tmp_path / "experiments" / f"{name}.yaml").write_text(text)
    return tmp_path


GRID = """id: G
family: study_b
grid:
  train.lr: [3.0e-6, 1.0e-5]
  train.method: [full, lora]
  seed: [7, 11, 19]
"""


def test_study_b_grid_expands_into_readable_ids_with_every_point_valid():
    ids = [i for i in available_experiments() if load_config("full", i).family == "study_b"]
    # the matched grid, last block (EuroSAT), linear probe, frozen projection, ViT-B/16
    assert len(ids) == 16 + 2 + 2 + 2 + 6
    assert "B_eurosat_full_lr1e-5" in ids and "B_pets_lora_lr3e-6" in ids
    config = load_config("full", "B_eurosat_lora_lr3e-5")
    assert (config.train.method, config.train.lr, config.lora.rank) == ("lora", 3e-5, 8)
    assert (config.data.dataset, config.data.split, config.seed) == ("eurosat", "fixed", 7)
    assert config_seeds("full", "B_eurosat_lora_lr3e-5") == (7, 11, 19)
    assert config_seeds("smoke", "B_eurosat_lora_lr3e-5") == (7, 11)  # smoke: max_seeds 2
    assert load_config("full", "B_probe_pets").train.method == "linear_probe"
    assert load_config("full", "B_last_eurosat_lr1e-4").train.method == "last_block"
    b16 = load_config("full", "B_b16_eurosat_full_lr3e-5")
    assert (b16.model.name, b16.model.patch_size) == ("openai/clip-vit-base-patch16", 16)
    assert load_config("smoke", "B_b16_eurosat_full_lr3e-5").model.source == "tiny"


def test_grid_limits_are_per_file_with_a_default_and_a_bad_limit_is_named(tmp_path: Path):
    assert grid_limits("smoke") == {"*": 2, "B_b16": {"train.lr": 1}}
    assert grid_limits("full") == {}
    b16 = [i for i in profile_experiments("smoke") if i.startswith("B_b16")]
    assert b16 == ["B_b16_eurosat_full_lr1e-5", "B_b16_eurosat_lora_lr1e-5"]
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    smoke = tmp_path / "params" / "profiles" / "smoke.yaml"
    smoke.write_text(smoke.read_text().replace("{train.lr: 1}", "{train.lr: 0}"))
    with pytest.raises(ConfigError, match=r"'max_grid_values.B_b16.train.lr' must be an integer"):
        profile_experiments("smoke", tmp_path / "params")


def test_a_profiles_caps_lower_what_an_experiment_asks_and_bad_caps_are_named(tmp_path: Path):
    b = load_config("smoke", "B_eurosat_full_lr1e-5")
    assert (b.train.epochs, b.eval.corruption_images) == (3, 50)  # B.yaml: 6 and 1000
    assert load_config("full", "B_eurosat_full_lr1e-5").train.epochs == 6  # full: no caps
    assert load_config("smoke", "E2").train.epochs == 3  # at the cap already
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    smoke = tmp_path / "params" / "profiles" / "smoke.yaml"
    text = smoke.read_text()
    smoke.write_text(text.replace("  train.epochs: 3", "  train.lr: 3"))
    with pytest.raises(ConfigError, match=r"smoke.yaml: field 'caps.train.lr' is not one of"):
        load_config("smoke", "E2", tmp_path / "params")
    smoke.write_text(text.replace("  train.epochs: 3", "  train.epochs: 0"))
    with pytest.raises(ConfigError, match=r"'caps.train.epochs' must be an integer >= 1, got 0"):
        load_config("smoke", "E2", tmp_path / "params")


def test_a_mirror_loads_a_hub_id_from_a_folder_and_a_bad_patch_size_is_named(tmp_path: Path):
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    profile = tmp_path / "params" / "profiles" / "full.yaml"
    mirror = "  mirrors: {openai/clip-vit-base-patch16: models/b16}\n"
    profile.write_text(profile.read_text().replace("  vision_layers: 12\n",
                                                   "  vision_layers: 12\n" + mirror))  # fmt: skip
    b16 = load_config("full", "B_b16_eurosat_full_lr3e-5", tmp_path / "params").model
    assert b16.name == "openai/clip-vit-base-patch16"  # the run still names the model it is
    assert b16.folder() == tmp_path / "models" / "b16"
    assert load_config("full", "E2", tmp_path / "params").model.folder() is None  # B/32: hub
    profile.write_text(
        profile.read_text().replace(
            "  vision_layers: 12\n", "  vision_layers: 12\n  patch_size: 30\n"
        )
    )
    with pytest.raises(ConfigError, match="model.patch_size.*whole patches, got 30"):
        load_config("full", "E2", tmp_path / "params")


def test_grid_ids_follow_dataset_method_lr_order_and_seeds_are_replicates(tmp_path: Path):
    params = _params_with(tmp_path, G=GRID)
    assert available_experiments(params) == [
        "G_full_lr3e-6", "G_full_lr1e-5", "G_lora_lr3e-6", "G_lora_lr1e-5"
    ]  # fmt: skip
    a = load_config("smoke", "G_lora_lr1e-5", params, seed=11)
    assert (a.id, a.seed, a.run_dir.name, a.run_dir.parent.name) == (
        "G_lora_lr1e-5", 11, "seed11", "G_lora_lr1e-5"
    )  # fmt: skip
    assert a.config_hash() != load_config("smoke", "G_lora_lr1e-5", params).config_hash()


def test_grid_ids_name_other_numeric_settings_by_their_field(tmp_path: Path):
    grid = "id: H\nfamily: study_b\ngrid: {train.epochs: [1, 2], lora.rank: [4]}\n"
    params = _params_with(tmp_path, H=grid)
    assert available_experiments(params) == ["H_r4_epochs1", "H_r4_epochs2"]


def test_seeds_list_of_a_plain_experiment_and_its_first_seed_by_default(tmp_path: Path):
    params = _params_with(tmp_path, S="id: S\nfamily: full_vs_lora\nseeds: [3, 5, 8]\n")
    assert config_seeds("full", "S", params) == (3, 5, 8)
    assert config_seeds("smoke", "S", params) == (3, 5)
    assert load_config("full", "S", params).seed == 3


def test_loading_a_grid_file_id_names_its_points(tmp_path: Path):
    params = _params_with(tmp_path, G=GRID)
    with pytest.raises(ConfigError, match="'G' is a grid; .*'G_full_lr3e-6' \\(4 points\\)"):
        load_config("smoke", "G", params)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("grid: {train.lr: [1.0e-5, -1.0]}", "'train.lr' must be in (0"),
        ("grid: {train.speed: [1, 2]}", "axis 'train.speed' is not a setting"),
        ("grid: {train.lr: [1.0e-5, 1.0e-5]}", "'grid.train.lr' must be a list of distinct"),
        ("grid: {train.lr: 1.0e-5}", "'grid.train.lr' must be a list"),
        ("grid: {seed: [1, 2]}", "needs a setting besides 'seed'"),
        ("grid: {train.lr: [1.0e-5]}\ntrain: {lr: 1.0e-4}", "set both in 'grid' and in 'train'"),
        ("seeds: [1, 1]", "'seeds' must be a list of distinct integers"),
        ("seeds: [1, -2]", "'seeds' has -2"),
        ("grid: {train.lr: [1.0e-5], seed: [1, 1]}", "'grid.seed' must be a list of distinct"),
        ("seeds: [1]\nseed: 3", "either 'seeds' or 'seed'"),
        ("grid: {train.method: [full, banana]}", "'train.method' is 'banana'"),
    ],
)
def test_bad_grids_and_seeds_name_the_file_and_field(tmp_path: Path, text: str, expected: str):
    params = _params_with(tmp_path, X=f"id: X\nfamily: study_b\n{text}\n")
    with pytest.raises(ConfigError) as err:
        for i in available_experiments(params):
            load_config("smoke", i, params)
    assert "X.yaml" in str(err.value) and expected in str(err.value)


def test_bad_max_seeds_names_the_profile(tmp_path: Path):
    params = _params_with(tmp_path, S="id: S\nfamily: full_vs_lora\nseeds: [3, 5]\n")
    smoke = params / "profiles" / "smoke.yaml"
    smoke.write_text(smoke.read_text().replace("max_seeds: 2", "max_seeds: 0"))
    with pytest.raises(ConfigError, match="smoke.yaml: field 'max_seeds' must be an integer"):
        config_seeds("smoke", "S", params)


def test_the_study_plans_every_configuration_once_per_seed():
    full = plan_runs("full")
    study_b = [c for c in full if c.family == "study_b"]
    # study2's design: ViT-B/32 48 + 6 linear probe + 6 last block + 6 frozen-projection LoRA,
    # and 18 ViT-B/16 runs
    assert len(study_b) == 66 + 18
    assert len(full) == 23 + 66 + 18
    # smoke: a 2-value corner of every grid axis, two seeds (max_grid_values, max_seeds):
    # B 2 × 2 × 2, probe 2, last block 2, frozen projection 2, ViT-B/16 2 × 1, each × 2 seeds
    smoke = plan_runs("smoke")
    assert len(smoke) == 23 + 2 * (8 + 2 + 2 + 2 + 2)
    b = {c.id for c in smoke if c.id.startswith("B_") and c.description == "Study B matched grid"}
    assert b == {f"B_{d}_{m}_lr{lr}" for d in ("eurosat", "pets") for m in ("full", "lora")
                 for lr in ("3e-6", "1e-5")}  # fmt: skip
    assert {c.seed for c in plan_runs("smoke", seeds=(1, 2))} == {1, 2}
    assert len({(c.id, c.seed) for c in full}) == len(full)


def test_overrides_are_typed_like_params_files():
    config = load_config("smoke", "E2").with_overrides(
        eval={"zeroshot_datasets": ["cifar100", "cifar10"]}, train={"lr": "1e-4"}
    )
    assert config.eval.zeroshot_datasets == ("cifar100", "cifar10") and config.train.lr == 1e-4
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['speed'\] of 'train'"):
        load_config("smoke", "E2").with_overrides(train={"speed": 1})


@pytest.mark.parametrize("counts", [{"pets": [1, 1, 1]}, {"eurosat": [0, 1, 1]}, {"eurosat": [1]}])
def test_a_fixed_split_needs_three_positive_counts_for_its_dataset(counts):
    config = load_config("smoke", "B_eurosat_full_lr1e-5")
    assert config.data.split == "fixed" and config.data.fixed_per_class["eurosat"] == (6, 4, 4)
    with pytest.raises(ConfigError, match=r"field 'data.fixed_per_class' needs \[train, val"):
        config.with_overrides(data={"fixed_per_class": counts})


def test_a_profiles_model_is_read_without_an_experiment_file():
    from collapse_utils.config import profile_model

    assert profile_model("smoke") == load_config("smoke", "E2").model  # E2 keeps the profile's
    assert profile_model("full").name == "openai/clip-vit-base-patch32"
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        profile_model("nope")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "id: X\nfamily: full_vs_lora\ndescription: &a [1, 2]\ntrain: {method: *a}\n",
            "aliases (*name) are not allowed",
        ),
        (
            "id: X\nfamily: full_vs_lora\ndescription: " + "[" * 20000 + "]" * 20000 + "\n",
            "nested deeper than",
        ),
    ],  # fmt: skip
)
def test_hostile_yaml_is_refused_at_once_naming_the_file(tmp_path: Path, text: str, expected):
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    (tmp_path / "params" / "experiments" / "X.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:  # no expansion, no RecursionError
        load_config("smoke", "X", params_dir=tmp_path / "params")
    assert "X.yaml" in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize("extends", ["nosuch", "[smoke]", "../x"])
def test_a_bad_extends_names_the_profile_file_that_says_it(tmp_path: Path, extends: str):
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    profile = tmp_path / "params" / "profiles" / "rehearsal.yaml"
    profile.write_text(profile.read_text().replace("extends: full", f"extends: {extends}"))
    with pytest.raises(ConfigError, match=r"rehearsal\.yaml: field 'extends'"):
        load_config("rehearsal", "E2", params_dir=tmp_path / "params")


def test_a_yml_file_and_a_grid_point_named_like_a_file_are_errors(tmp_path: Path):
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    experiments = tmp_path / "params" / "experiments"
    (experiments / "E2.yml").write_text((experiments / "E2.yaml").read_text())
    with pytest.raises(ConfigError, match=r"E2\.yml: experiment files end in \.yaml"):
        available_experiments(tmp_path / "params")
    (experiments / "E2.yml").unlink()
    grid = next(p for p in experiments.glob("*.yaml") if "grid:" in p.read_text())
    point = next(i for i in available_experiments(tmp_path / "params")
                 if i.startswith(grid.stem + "_"))  # fmt: skip
    (experiments / f"{point}.yaml").write_text((experiments / "E2.yaml").read_text()
                                               .replace("id: E2", f"id: {point}"))  # fmt: skip
    with pytest.raises(ConfigError, match=f"grid point '{point}' has the id of the experiment"):
        available_experiments(tmp_path / "params")
