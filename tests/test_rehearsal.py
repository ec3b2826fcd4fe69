"""The rehearsal fixtures are what the real loaders read, and the full profile's code path runs
on them end to end with a full-size ViT-B/32."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from collapse_utils.config import PARAMS_DIR, load_config
from collapse_utils.rehearsal import (
    EUROSAT_FOLDERS,
    PER_CLASS,
    bpe_vocabulary,
    build_fixtures,
    clip_tokenizer_files,
    model_fixtures,
    save_hf_builds,
    save_torchvision_layouts,
)
from collapse_utils.training.data import load_corruption_sets, load_images, load_splits
from collapse_utils.training.hf_datasets import hf_folder
from collapse_utils.training.labels import CIFAR10, FLOWERS102, PETS


def test_the_real_clip_tokenizer_is_rebuilt_from_its_bpe_file(tmp_path):
    from transformers import AutoTokenizer, CLIPTokenizer

    vocab, merges = clip_tokenizer_files(bpe_vocabulary())
    assert len(vocab) == 49408 and len(merges) == 48894
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    # The ids openai/clip-vit-base-patch32's tokenizer gives this prompt.
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    save_hf_builds(root)
    save_torchvision_layouts(root)
    return root


def test_hugging_face_builds_feed_the_original_split_protocol(data_root):
    config = load_config("full", "E2")
    data = config.data.__class__(**{**config.data.__dict__, "root": str(data_root),
                                    "metric_subset": 20})  # fmt: skip
    splits = load_splits(data, seed=42)
    train, test = PER_CLASS["eurosat"]
    assert (len(splits.train), len(splits.val), len(splits.metric)) == (10 * train, 10 * test, 20)
    assert splits.train.images.shape[1:] == (3, 224, 224)
    flowers = load_images(data, "flowers102", "test", seed=42)
    # The build's labels are the class numbers sorted as text ("1", "10", "100", ...).
    in_label_order = sorted(str(i) for i in range(1, 103))
    assert flowers.class_names == tuple(FLOWERS102[int(n) - 1] for n in in_label_order)
    cifar = load_images(data, "cifar100", "test", seed=42)
    assert len(cifar) == 100 and "aquarium fish" in cifar.class_names


def test_cifar10_build_can_be_trained_on_and_scored_zero_shot(data_root):
    data = load_config("full", "E2").data
    data = data.__class__(**{**data.__dict__, "root": str(data_root), "dataset": "cifar10",
                             "metric_subset": 20})  # fmt: skip
    splits = load_splits(data, seed=42)
    train, test = PER_CLASS["cifar10"]
    assert (len(splits.train), len(splits.val), len(splits.metric)) == (10 * train, 10 * test, 20)
    assert splits.val.class_names == CIFAR10
    assert torch.bincount(splits.train.labels).tolist() == [train] * 10


def test_a_data_folder_built_before_a_dataset_was_added_is_built_again(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / ".complete").write_text(json.dumps({"seed": 0}))  # the marker before cifar10
    build_fixtures({}, data)
    assert (hf_folder(data / "hf", "cifar10") / "dataset_dict.json").is_file()
    marker = json.loads((data / ".complete").read_text())
    assert [name for name, _ in marker["per_class"]] == sorted(PER_CLASS)
    assert len(marker["corruptions"]) == 7


def test_eurosat_corruption_splits_load_as_balanced_fixed_subsets(data_root):
    data = dataclasses.replace(
        load_config("rehearsal", "B_eurosat_full_lr1e-5").data, root=str(data_root)
    )
    sets = load_corruption_sets(data, per_split=1000, seed=7)
    assert len(sets) == 7 and "jpeg_compression" in sets
    for images in sets.values():
        assert torch.bincount(images.labels).tolist() == [PER_CLASS["eurosat"][1]] * 10
    again = load_corruption_sets(data, per_split=10, seed=11)  # 1 per class, any run seed
    assert len(again["contrast"]) == 10
    assert torch.equal(
        again["contrast"].images, load_corruption_sets(data, 10, 7)["contrast"].images
    )
    assert load_corruption_sets(dataclasses.replace(data, dataset="pets"), 1000, 7) == {}
    torchvision = dataclasses.replace(data, source="torchvision")  # no corrupted copies there
    assert load_corruption_sets(torchvision, 1000, 7) == {}


def test_torchvision_layouts_load_with_the_torchvision_source(data_root):
    data = load_config("full_clean", "E2").data
    data = data.__class__(**{**data.__dict__, "root": str(data_root), "source": "torchvision"})
    eurosat = load_images(data, "eurosat", "pool", seed=0)
    assert len(eurosat) == len(EUROSAT_FOLDERS) * sum(PER_CLASS["eurosat"])
    assert torch.bincount(eurosat.labels).tolist() == [sum(PER_CLASS["eurosat"])] * 10
    pets = load_images(data, "pets", "test", seed=0)
    assert len(pets) == len(PETS) * PER_CLASS["pets"][1] and pets.class_names == PETS


@pytest.mark.slow
def test_a_full_size_lora_run_of_the_full_profile_rehearses_end_to_end(tmp_path):
    from collapse_utils.training.experiment import run_experiment

    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    config = load_config("rehearsal", "E5", params_dir=tmp_path / "params")
    build_fixtures(model_fixtures([config]), Path(config.data.root))
    history = run_experiment(config, progress=False).history
    assert history.status == "complete"
    # the report's cadence: after global step 1, every floor(S / 1) steps, and the last
    assert [e.step for e in history.evals] == [0, 1, history.total_steps]
    assert history.config["model"]["name"] == "openai/clip-vit-base-patch32"  # from its mirror
    assert history.config["model"]["mirrors"][config.model.name] == str(
        tmp_path / "outputs/rehearsal/fixtures/model"
    )
    assert set(history.zeroshot) == {"cifar100", "flowers102", "eurosat", "pets"}
    assert all(
        z.checkpoint == "best" and z.templates == "original" for z in history.zeroshot.values()
    )
    # The report's zero-shot path drops the adapters: every LoRA run scores the pre-trained
    # model's accuracy, image for image (the report's 6022/10000).
    assert all(z.accuracy == z.pretrained_accuracy for z in history.zeroshot.values())
    assert history.eval_split == "test"  # the report's protocol
