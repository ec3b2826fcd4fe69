from __future__ import annotations

import dataclasses

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from collapse_utils.training.data import ImageSet, image_to_uint8
from collapse_utils.training.hf_datasets import (
    HF_BUILDS,
    hf_folder,
    load_hf_split,
    load_hf_splits,
    original_geometry,
    original_metric_subset,
)
from collapse_utils.training.labels import CLASS_NAMES, FLOWERS102
from collapse_utils.training.zeroshot import prompt_names

SIZE = 24

# The real builds' features (names, kinds, label vocabularies) and split names.
FLOWER_IDS = sorted(str(i) for i in range(1, 103))  # as text: '1', '10', '100', '101', …
# uoft-cs/cifar10's label names (its card), written out here rather than read from labels.py.
CIFAR10_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()
FAKE_BUILDS = {
    "eurosat": {
        "features": {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(CLASS_NAMES["eurosat"])),
        },
        "splits": ("train", "test", "contrast"),
    },
    "pets": {
        "features": {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(CLASS_NAMES["pets"])),
            "image_id": datasets.Value("string"),
            "label_cat_dog": datasets.ClassLabel(names=["cat", "dog"]),
        },
        "splits": ("train", "test"),
    },
    "cifar100": {
        "features": {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(
                names=[n.replace(" ", "_") for n in CLASS_NAMES["cifar100"]]
            ),
            "coarse_label": datasets.ClassLabel(names=[f"super_{i}" for i in range(20)]),
        },
        "splits": ("train", "test"),
    },
    "cifar10": {
        "features": {
            "img": datasets.Image(),
            "label": datasets.ClassLabel(names=CIFAR10_NAMES),
        },
        "splits": ("train", "test"),
    },
    "flowers102": {
        "features": {"image": datasets.Image(), "label": datasets.ClassLabel(names=FLOWER_IDS)},
        "splits": ("train", "test"),
    },
}

# Sizes (w, h) and PIL modes of the fake images: wide, tall, square, smaller than SIZE (upscaled,
# like CIFAR's 32×32 to 224); RGB, grey, RGBA.
SHAPES = [
    ((40, 30), "RGB"), ((26, 57), "L"), ((33, 33), "RGBA"), ((90, 24), "RGB"), ((16, 12), "RGB"),
]  # fmt: skip


def _fake_rows(name: str, split: str) -> dict[str, list]:
    rng = np.random.default_rng(len(split) + len(name))
    build = HF_BUILDS[name]
    images = []
    for (w, h), mode in SHAPES:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        images.append(Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode))
    labels = [0, 5, 1, 9, 5]
    rows = {build.image_column: images, build.label_column: labels}
    if name == "pets":
        rows["image_id"] = [f"pet_{i}" for i in range(len(images))]
        rows["label_cat_dog"] = [0, 1, 0, 1, 1]
    if name == "cifar100":
        rows["coarse_label"] = [3, 1, 4, 1, 5]
    return rows


def _fake_build(name: str) -> datasets.DatasetDict:
    spec = FAKE_BUILDS[name]
    features = datasets.Features(spec["features"])
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(_fake_rows(name, split), features=features)
            for split in spec["splits"]
        }
    )


@pytest.fixture(scope="module")
def builds() -> dict[str, datasets.DatasetDict]:
    return {name: _fake_build(name) for name in FAKE_BUILDS}


@pytest.fixture()
def disk_root(tmp_path, builds):
    """Every fake build saved with ``save_to_disk`` under <root>/<owner>__<name>."""
    root = tmp_path / "saved"
    for name, build in builds.items():
        build.save_to_disk(str(hf_folder(root, name)))
    return root


@pytest.fixture()
def parquet_root(tmp_path, builds):
    """Every fake build as the hub stores it: <root>/<owner>__<name>/data/<split>-*.parquet."""
    root = tmp_path / "parquet"
    for name, build in builds.items():
        data = hf_folder(root, name) / "data"
        data.mkdir(parents=True)
        for split, dataset in build.items():
            dataset.to_parquet(str(data / f"{split}-00000-of-00001.parquet"))
    return root


def _torchvision_original(image: Image.Image) -> torch.Tensor:
    """The original's evaluation transform up to ToTensor (which only divides by 255)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    pipeline = transforms.Compose(
        [transforms.Resize(SIZE), transforms.CenterCrop(SIZE), transforms.PILToTensor()]
    )
    return pipeline(image)


def test_builds_are_the_originals_with_their_image_and_label_columns():
    columns = {n: (b.repo, b.image_column, b.label_column) for n, b in HF_BUILDS.items()}
    assert columns == {
        "eurosat": ("tanganke/eurosat", "image", "label"),
        "pets": ("timm/oxford-iiit-pet", "image", "label"),
        "cifar100": ("uoft-cs/cifar100", "img", "fine_label"),
        "cifar10": ("uoft-cs/cifar10", "img", "label"),
        "flowers102": ("nelorth/oxford-flowers", "image", "label"),
    }
    assert all({"train", "test"} <= set(b.splits) for b in HF_BUILDS.values())
    assert hf_folder("data/hf", "eurosat").as_posix() == "data/hf/tanganke__eurosat"


@pytest.mark.parametrize("name", sorted(FAKE_BUILDS))
def test_saved_build_loads_uint8_images_int64_labels_and_feature_names(name, disk_root, builds):
    test = load_hf_split(name, "test", disk_root, size=SIZE)
    source = builds[name]["test"]
    build = HF_BUILDS[name]
    assert test.images.shape == (len(SHAPES), 3, SIZE, SIZE)
    assert test.images.dtype == torch.uint8
    assert test.labels.dtype == torch.int64
    assert test.labels.tolist() == list(source[build.label_column])
    assert test.build_names == tuple(source.features[build.label_column].names)
    assert test.name == name


@pytest.mark.parametrize("name", sorted(FAKE_BUILDS))
def test_bilinear_geometry_is_the_originals_torchvision_resize_and_center_crop(
    name, disk_root, builds
):
    loaded = load_hf_split(name, "train", disk_root, size=SIZE)
    column = HF_BUILDS[name].image_column
    for i, row in enumerate(builds[name]["train"]):
        assert torch.equal(loaded.images[i], _torchvision_original(row[column]))


def test_bicubic_geometry_is_this_projects_image_to_uint8(disk_root, builds):
    loaded = load_hf_split("pets", "test", disk_root, size=SIZE, interpolation="bicubic")
    for i, row in enumerate(builds["pets"]["test"]):
        assert torch.equal(loaded.images[i], image_to_uint8(row["image"], SIZE))
    assert not torch.equal(loaded.images, load_hf_split("pets", "test", disk_root, SIZE).images)


def test_original_geometry_crops_the_centre_of_the_resized_shorter_side():
    # A 40×20 image: shorter side 20 → SIZE, longer 40 → 2·SIZE; the centre crop keeps the
    # middle half of the width, so a left/right split image becomes half/half as well.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255
    out = original_geometry(Image.fromarray(pixels), SIZE)
    assert out.shape == (3, SIZE, SIZE)
    assert out[:, :, : SIZE // 2 - 2].max() == 0
    assert out[:, :, SIZE // 2 + 2 :].min() == 255


@pytest.mark.parametrize("name", sorted(FAKE_BUILDS))
def test_hub_parquet_layout_loads_the_same_as_save_to_disk(name, disk_root, parquet_root, tmp_path):
    for split in FAKE_BUILDS[name]["splits"]:
        saved = load_hf_split(name, split, disk_root, SIZE)
        parquet = load_hf_split(name, split, parquet_root, SIZE, cache_dir=tmp_path / "cache")
        assert torch.equal(parquet.images, saved.images)
        assert torch.equal(parquet.labels, saved.labels)
        assert parquet.class_names == saved.class_names


def test_parquet_conversion_layout_with_split_directories(tmp_path, builds):
    folder = hf_folder(tmp_path / "conv", "flowers102")
    for split, dataset in builds["flowers102"].items():
        (folder / "default" / split).mkdir(parents=True)
        dataset.to_parquet(str(folder / "default" / split / "0000.parquet"))
    test = load_hf_split("flowers102", "test", tmp_path / "conv", SIZE, cache_dir=tmp_path / "c")
    assert test.labels.tolist() == list(builds["flowers102"]["test"]["label"])


def test_a_split_in_two_parquet_layouts_is_rejected(parquet_root, builds):
    folder = hf_folder(parquet_root, "pets")
    (folder / "default" / "test").mkdir(parents=True)
    builds["pets"]["test"].to_parquet(str(folder / "default" / "test" / "0000.parquet"))
    with pytest.raises(ValueError, match="several directories"):
        load_hf_split("pets", "test", parquet_root, SIZE)


def test_load_hf_splits_returns_train_and_test(disk_root):
    splits = load_hf_splits("cifar100", disk_root, SIZE)
    assert sorted(splits) == ["test", "train"]
    assert all(len(s) == len(SHAPES) for s in splits.values())


def test_missing_build_raises_file_not_found_naming_the_build_and_how_to_fetch_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_hf_split("eurosat", "test", tmp_path / "nowhere", SIZE)
    message = str(err.value)
    assert "tanganke/eurosat" in message
    assert "datasets.load_dataset('tanganke/eurosat').save_to_disk(" in message
    assert str(tmp_path / "nowhere" / "tanganke__eurosat") in message


def test_missing_split_lists_the_splits_present(disk_root):
    with pytest.raises(ValueError, match=r"\['test', 'train'\].*'validation'"):
        load_hf_split("pets", "validation", disk_root, SIZE)


def test_missing_split_in_a_parquet_folder_raises_file_not_found(parquet_root):
    with pytest.raises(FileNotFoundError, match="'validation'"):
        load_hf_split("pets", "validation", parquet_root, SIZE)


def test_flowers_class_numbers_map_to_flower_names_in_label_order(disk_root):
    flowers = load_hf_split("flowers102", "test", disk_root, SIZE)
    readable, raw = flowers.class_names, flowers.build_names
    assert raw[:4] == ("1", "10", "100", "101")
    assert readable[:4] == (FLOWERS102[0], FLOWERS102[9], FLOWERS102[99], FLOWERS102[100])
    assert sorted(readable) == sorted(FLOWERS102)


def test_cifar100_readable_names_have_spaces_for_underscores(disk_root):
    names = load_hf_split("cifar100", "test", disk_root, SIZE).class_names
    assert names == CLASS_NAMES["cifar100"]
    assert names[1] == "aquarium fish"


@pytest.mark.parametrize(
    ("style", "cifar100", "flowers"),
    [
        ("build", "aquarium_fish", "10"),  # the report's code: the builds' names as stored
        ("build_spaced", "aquarium fish", "10"),  # study2's
        ("readable", "aquarium fish", FLOWERS102[9]),  # ours
    ],
)
def test_prompt_names_follow_eval_class_names(disk_root, style, cifar100, flowers):
    names = {n: prompt_names(load_hf_split(n, "test", disk_root, SIZE), style)
             for n in ("cifar100", "flowers102")}  # fmt: skip
    assert (names["cifar100"][1], names["flowers102"][1]) == (cifar100, flowers)
    assert len(names["cifar100"]) == len(CLASS_NAMES["cifar100"])


def test_prompt_names_fall_back_to_readable_where_the_source_has_none():
    images = ImageSet("synthetic", torch.zeros(1, 3, 2, 2, dtype=torch.uint8),
                      torch.zeros(1, dtype=torch.long), ("a thing",))  # fmt: skip
    assert prompt_names(images, "build") == ("a thing",)
    with pytest.raises(ValueError, match="eval.class_names"):
        prompt_names(dataclasses.replace(images, build_names=("x",)), "raw")


def test_cifar10_class_names_are_the_builds_in_label_order(disk_root):
    names = load_hf_split("cifar10", "test", disk_root, SIZE).class_names
    assert names == CLASS_NAMES["cifar10"]
    assert (names[0], names[9]) == ("airplane", "truck")


# --- the original metric subset -----------------------------------------------------------------


def test_metric_subset_replays_the_original_rule_with_a_remainder():
    # 3 classes, n = 10: 10 // 3 = 3 per class (class 2 has only 2: min rule), then the rest
    # from the images not yet drawn.
    labels = np.array([0, 1, 0, 2, 1, 0, 1, 0, 2, 1, 1, 0])
    rng = np.random.RandomState(42)
    expected = []
    expected += rng.choice([0, 2, 5, 7, 11], 3, replace=False).tolist()
    expected += rng.choice([1, 4, 6, 9, 10], 3, replace=False).tolist()
    expected += rng.choice([3, 8], 2, replace=False).tolist()
    remaining = list(set(range(12)) - set(expected))
    expected += rng.choice(remaining, 2, replace=False).tolist()
    subset = original_metric_subset(labels, n=10, seed=42)
    assert subset.tolist() == expected
    assert subset.dtype == np.int64
    assert len(set(subset.tolist())) == 10


def test_metric_subset_with_more_classes_than_its_size_over_two():
    # Flowers-like: 102 classes, 200 // 102 = 1 image each, then 98 from the rest.
    labels = np.repeat(np.arange(102), 4)
    rng = np.random.RandomState(42)
    expected = []
    for c in range(102):
        expected += rng.choice(list(range(4 * c, 4 * c + 4)), 1, replace=False).tolist()
    remaining = list(set(range(len(labels))) - set(expected))
    expected += rng.choice(remaining, 98, replace=False).tolist()
    assert original_metric_subset(labels).tolist() == expected


def test_metric_subset_without_remainder_is_class_blocks_in_label_order():
    labels = torch.arange(10).repeat(30)  # 300 images, 10 classes: 20 each, no remainder
    subset = original_metric_subset(labels)
    assert len(subset) == 200
    blocks = labels[torch.from_numpy(subset)].view(10, 20)
    assert torch.equal(blocks, torch.arange(10)[:, None].expand(10, 20))
    assert original_metric_subset(labels.numpy()).tolist() == subset.tolist()


def test_metric_subset_larger_than_the_split_is_an_error():
    with pytest.raises(ValueError, match="cannot draw"):
        original_metric_subset([0, 1, 1], n=5)
