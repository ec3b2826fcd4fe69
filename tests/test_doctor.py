from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml
from transformers import CLIPConfig, CLIPModel

import collapse_utils.config as config_module
import collapse_utils.training.data as data_module
from collapse_utils import doctor
from collapse_utils.__main__ import main
from collapse_utils.config import PARAMS_DIR, REPO_ROOT, load_config
from collapse_utils.doctor import ClipSize, GpuInfo, run_doctor
from collapse_utils.families import FAMILIES_FILE
from collapse_utils.storage import write_json
from collapse_utils.training.hf_datasets import hf_folder
from collapse_utils.training.model import (
    CLIPClassifier,
    count_trainable,
    load_clip,
    prepare_for_training,
)
from collapse_utils.training.needs import EUROSAT_CORRUPTIONS

# The report's datasets, all in the full profile; Study B's experiments add CIFAR-10 (zero-shot).
REPORT_DATASETS = ("eurosat", "pets", "cifar100", "flowers102")
BIG_GPU = GpuInfo("Fake GPU 80GB", 80 * 2**30, 79 * 2**30, bf16=True)
Usage = namedtuple("Usage", "total used free")


def lines(checks, topic: str, ok: bool | None = None) -> list[str]:
    return [c.message for c in checks if c.topic == topic and (ok is None or c.ok == ok)]


@pytest.fixture
def params(tmp_path) -> Path:
    """A copy of params/ whose full profile points at empty folders under tmp_path."""
    copy = tmp_path / "params"
    shutil.copytree(PARAMS_DIR / "profiles", copy / "profiles")
    shutil.copytree(PARAMS_DIR / "experiments", copy / "experiments")
    shutil.copy(PARAMS_DIR / FAMILIES_FILE, copy / FAMILIES_FILE)
    (tmp_path / "models" / "clip").mkdir(parents=True)
    profile = copy / "profiles" / "full.yaml"
    raw = yaml.safe_load(profile.read_text())
    raw["output_root"] = str(tmp_path / "outputs")
    raw["model"]["mirrors"] = {
        "openai/clip-vit-base-patch32": str(tmp_path / "models" / "clip"),
        "openai/clip-vit-base-patch16": str(tmp_path / "models" / "b16"),
    }
    raw["data"]["root"] = str(tmp_path / "data")
    profile.write_text(yaml.safe_dump(raw))
    return copy


def full_plan(params: Path):
    return doctor.load_plan("full", params)


def plan_datasets(params: Path) -> list[str]:
    """The datasets the full profile decodes: the report's four, and CIFAR-10 where params/
    has experiments that score it."""
    names = sorted({name for c in full_plan(params) for name, _ in doctor.dataset_needs(c)})
    assert set(REPORT_DATASETS) <= set(names) <= {*REPORT_DATASETS, "cifar10"}
    return names


# --- the whole report ----------------------------------------------------------------------


def test_smoke_profile_passes_the_doctor(capsys):
    assert main(["doctor", "--profile", "smoke"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("doctor: ready") and "FIX" not in out
    assert str((REPO_ROOT / "outputs" / "smoke").resolve()) in out


def test_doctor_needs_no_torch_for_a_cpu_profile():
    code = (
        "import sys; from collapse_utils.doctor import run_doctor, problems; "
        "assert not problems(run_doctor('smoke')); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tempfile.gettempdir())


def test_missing_model_and_each_missing_dataset_is_one_line_and_fails(
    params, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(config_module, "PARAMS_DIR", params)
    monkeypatch.setattr(doctor, "cuda_gpu", lambda index=0: BIG_GPU)
    assert main(["doctor", "--profile", "full"]) == 1
    out = capsys.readouterr().out.splitlines()
    fixes = [line for line in out if line.startswith("FIX")]
    model = [line for line in fixes if line.split()[1] == "model"]
    assert len(model) == 2  # ViT-B/32 and Study B's ViT-B/16, each from its mirror folder
    for line, folder, hub_id in zip(model, ("clip", "b16"), ("patch32", "patch16"), strict=True):
        assert str(tmp_path / "models" / folder) in line and ".save_pretrained(" in line
        assert f"from_pretrained('openai/clip-vit-base-{hub_id}')" in line
    data = [line for line in fixes if line.split()[1] == "data"]
    assert sorted(line.split()[2] for line in data) == plan_datasets(params)
    for line in data:
        folder = hf_folder(tmp_path / "data" / "hf", line.split()[2])
        assert f"--local-dir {folder}" in line and "hf download" in line
    assert len(fixes) == 2 + len(data)
    assert out[-1] == f"doctor: {len(fixes)} problems (lines marked FIX)"


def test_model_in_a_folder_and_datasets_on_disk_or_decoded_pass(params, tmp_path):
    for folder, patch in (("clip", 32), ("b16", 16)):
        config = CLIPConfig(vision_config={"patch_size": patch})
        CLIPModel(config).config.save_pretrained(tmp_path / "models" / folder)
        (tmp_path / "models" / folder / "model.safetensors").write_bytes(b"")
    root = tmp_path / "data"
    for name in ("eurosat", "pets", "cifar10"):  # save_to_disk layout
        folder = hf_folder(root / "hf", name)
        folder.mkdir(parents=True)
        corrupted = list(EUROSAT_CORRUPTIONS) if name == "eurosat" else []  # Study B reads them
        splits = {"splits": ["train", "test", *corrupted]}
        (folder / "dataset_dict.json").write_text(json.dumps(splits))
    parquet = hf_folder(root / "hf", "flowers102") / "data" / "test-00000-of-00001.parquet"
    parquet.parent.mkdir(parents=True)
    parquet.write_bytes(b"")
    # CIFAR-100 only as a decoded cache (with its checksum): no source needed.
    configs = full_plan(params)
    cache = doctor.cache_file(configs[0], "cifar100", "test")
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"")
    cache.with_name(cache.name + ".sha256").write_text("0\n")
    checks = run_doctor("full", params, gpu=BIG_GPU, bench_file=tmp_path / "none.json")
    assert not doctor.problems(checks), doctor.report(checks)
    assert len(lines(checks, "data")) == len(plan_datasets(params))


def test_torchvision_source_lists_its_folders_and_fetch_command(params, tmp_path):
    profile = params / "profiles" / "full.yaml"
    raw = yaml.safe_load(profile.read_text())
    raw["data"] |= {"source": "torchvision", "split": "heldout"}
    profile.write_text(yaml.safe_dump(raw))
    (tmp_path / "data" / "eurosat" / "2750").mkdir(parents=True)
    checks = doctor.check_datasets(full_plan(params))
    missing = lines(checks, "data", ok=False)
    assert sorted(m.split()[0] for m in missing) == [
        name for name in plan_datasets(params) if name != "eurosat"
    ]
    root = tmp_path / "data"
    [cifar] = [m for m in missing if m.startswith("cifar100")]
    assert f"datasets.CIFAR100('{root}', download=True)" in cifar
    assert str(root / "cifar-100-python" / "test") in cifar
    assert lines(checks, "data", ok=True) == [f"eurosat (pool): torchvision in {root}"]


@pytest.mark.parametrize("source", ["hf", "torchvision"])
def test_cifar10_zero_shot_is_checked_fetched_and_sized_like_cifar100(params, tmp_path, source):
    profile = params / "profiles" / "full.yaml"
    raw = yaml.safe_load(profile.read_text())
    raw["data"] |= {"source": source, "split": "heldout"}
    raw["eval"]["zeroshot_datasets"] = ["cifar100", "cifar10"]
    profile.write_text(yaml.safe_dump(raw))
    configs = full_plan(params)
    [cifar10] = [m for m in lines(doctor.check_datasets(configs), "data", ok=False)
                 if m.split()[0] == "cifar10"]  # fmt: skip
    root = tmp_path / "data"
    if source == "hf":
        folder = hf_folder(root / "hf", "cifar10")
        assert f"hf download uoft-cs/cifar10 --repo-type dataset --local-dir {folder}" in cifar10
    else:
        assert f"datasets.CIFAR10('{root}', download=True)" in cifar10
        assert str(root / "cifar-10-batches-py" / "test_batch") in cifar10
    e2 = next(c for c in configs if c.id == "E2")
    without = e2.with_overrides(eval={"zeroshot_datasets": ("cifar100",)})

    def caches(config) -> int:
        return sum(n.bytes for n in doctor.disk_needs([config], ClipSize()) if n.what == "caches")

    assert caches(e2) - caches(without) == 10000 * 3 * 224 * 224  # CIFAR-10's test split
    assert doctor.split_images(e2, "cifar10", "pool") == 50000


def test_a_run_trained_on_cifar10_has_a_ten_class_head(params):
    e2 = next(c for c in full_plan(params) if c.id == "E2")  # EuroSAT: 10 classes too
    cifar10 = e2.with_overrides(data={"dataset": "cifar10"})
    cifar100 = e2.with_overrides(data={"dataset": "cifar100"})
    size = ClipSize()
    total, trainable = doctor.parameter_counts(cifar10, size)
    assert (total, trainable) == doctor.parameter_counts(e2, size)
    head_of_90 = 90 * (size.projection_dim + 1)  # 90 more classes: weights and biases
    assert doctor.parameter_counts(cifar100, size) == (total + head_of_90, trainable + head_of_90)


def test_doctor_decodes_the_same_splits_as_prepare_datasets(params, monkeypatch):
    configs = full_plan(params)
    decoded = []
    monkeypatch.setattr(
        data_module, "_cached", lambda d, name, split: decoded.append((name, split))
    )
    data_module.prepare_datasets(configs)
    assert set(decoded) == {need for c in configs for need in doctor.dataset_needs(c)}


# --- sizes ---------------------------------------------------------------------------------


def test_clip_sizes_match_transformers_vit_b32():
    with torch.device("meta"):
        clip = CLIPModel(CLIPConfig())
    vision = [clip.vision_model, clip.visual_projection]
    text = [clip.text_model, clip.text_projection]
    size = ClipSize()
    assert size.vision_params == sum(p.numel() for m in vision for p in m.parameters())
    assert size.text_params == sum(p.numel() for m in text for p in m.parameters())


def test_sizes_read_from_config_json(tmp_path):
    CLIPConfig().save_pretrained(tmp_path)
    assert ClipSize.of_config_json(tmp_path / "config.json") == ClipSize()


@pytest.mark.parametrize("experiment", ["E1_pets", "E2", "E5", "A2_qkvo", "A3_freeze6"])
def test_parameter_counts_match_the_real_classifier(experiment):
    config = load_config("smoke", experiment)
    classifier = CLIPClassifier(load_clip(config.model), config.data.synthetic_classes)
    model = prepare_for_training(classifier, config.train, config.lora)
    real = (sum(p.numel() for p in model.parameters()), count_trainable(model))
    assert doctor.parameter_counts(config, ClipSize.of_tiny(config.model)) == real


# --- disk, outputs, GPU, time --------------------------------------------------------------


def test_disk_need_of_a_full_fine_tuning_run(params):
    e2 = next(c for c in full_plan(params) if c.id == "E2")
    size = ClipSize()
    needs = {}
    for need in doctor.disk_needs([e2], size):
        needs[need.what] = needs.get(need.what, 0) + need.bytes
    total, _ = doctor.parameter_counts(e2, size)
    assert needs["checkpoints"] == 2 * 4 * total  # best + final, fp32
    assert needs["resume"] == 3 * 4 * total  # weights + AdamW's two moments
    images = {"eurosat": 21600 + 2700, "cifar100": 10000, "flowers102": 1020, "pets": 3669}
    assert needs["caches"] == sum(images.values()) * 3 * 224 * 224


def test_too_little_free_disk_is_a_problem_naming_the_amounts(params, monkeypatch):
    configs = full_plan(params)
    needs = doctor.disk_needs(configs, ClipSize(), jobs=2)
    need = sum(n.bytes for n in needs)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**13, 0, need - 1))
    [check] = doctor.check_disk(needs)
    assert not check.ok and f"~{need / 1e9:.1f} GB needed" in check.message
    assert "only" in check.message and "output_root" in check.message
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**13, 0, need))
    assert all(c.ok for c in doctor.check_disk(needs))


def test_unwritable_output_folder_is_a_problem(params, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    checks = doctor.check_writable(full_plan(params))
    bad = lines(checks, "outputs", ok=False)
    assert any(str(tmp_path / "outputs") in m and "not writable" in m for m in bad)
    assert any(str(tmp_path / "data" / "cache") in m for m in bad)


@pytest.mark.parametrize(
    ("gpu", "expected"),
    [
        (None, "no CUDA GPU"),
        (GpuInfo("Small", 2 * 2**30, 2 * 2**30, True), "use a larger GPU"),
        (GpuInfo("Busy", 80 * 2**30, 2**30, True), "stop the other processes"),
    ],
)
def test_gpu_problems(params, gpu, expected):
    checks = doctor.check_gpu(full_plan(params), ClipSize(), gpu)
    assert any(expected in m for m in lines(checks, "gpu", ok=False))


def test_allow_cpu_accepts_auto_devices_but_not_explicit_cuda(params):
    configs = full_plan(params)
    [check] = doctor.check_gpu(configs, ClipSize(), None, allow_cpu=True)
    assert check.ok and check.info and "train on CPU" in check.message
    configs[0] = configs[0].with_overrides(train={"device": "cuda"})
    [check] = doctor.check_gpu(configs, ClipSize(), None, allow_cpu=True)
    assert not check.ok and "which 1 of the runs want (train.device cuda" in check.message


def test_bf16_is_checked_when_the_profile_asks_for_it(params):
    configs = [c.with_overrides(train={"precision": "bf16"}) for c in full_plan(params)]
    no_bf16 = GpuInfo("T4", 16 * 2**30, 16 * 2**30, bf16=False)
    assert any("no bf16" in m for m in lines(doctor.check_gpu(configs, ClipSize(), no_bf16), "gpu"))
    assert not doctor.problems(doctor.check_gpu(configs, ClipSize(), BIG_GPU))


def test_full_study_gpu_estimate_is_a_few_gib_for_vit_b32(params):
    need = max(doctor.gpu_need_bytes(c, ClipSize()) for c in full_plan(params))
    assert 3 * 2**30 < need < 16 * 2**30


def test_time_estimate_from_the_benchmark(params, tmp_path):
    configs = full_plan(params)
    bench = tmp_path / "latest.json"
    study = {"train": 7200.0, "tracking": 360.0, "evaluation": 720.0, "apr_reference": 0.0}
    write_json(bench, {
        "created": "2025-01-01T00:00:00+00:00", "hardware": {"device_name": "Fake GPU"},
        "sizes": {"full": {"implied_study_s": study | {"total": 8280.0}}},
    })  # fmt: skip
    [check] = doctor.estimate_time(configs, bench)
    assert check.ok and check.info and "~2.3 h" in check.message and "Fake GPU" in check.message
    [missing] = doctor.estimate_time(configs, tmp_path / "absent.json")
    assert missing.ok and "make bench" in missing.message
