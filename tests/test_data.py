from __future__ import annotations

import dataclasses
import io
import pickle
import shutil
import socket
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPImageProcessorPil

from collapse_utils.config import ConfigError, DataSpec
from collapse_utils.training.data import (
    DOWNLOAD_STALL_S,
    DatasetUnavailableError,
    balanced_subset,
    fixed_split,
    load_images,
    load_splits,
    load_test_set,
    normalize,
    resize_center_crop,
    stratified_split,
    synthetic_images,
    torchvision_missing,
)
from collapse_utils.training.hf_datasets import hf_folder, original_metric_subset
from collapse_utils.training.labels import CLASS_NAMES

# Measured with transformers 5.24 (its CLIPImageProcessor resizes tensors with torchvision too):
# max |difference| 2.4e-7, mean 7e-8 in normalised units. The tolerance leaves room for float
# order of operations, not for a different resampling filter.
MAX_ABS, MEAN_ABS = 1e-4, 1e-5


SIZES = [(64, 64), (300, 200), (500, 375)]
CROP = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}


def smooth_image(size: tuple[int, int]) -> Image.Image:
    """Upsampled noise: smooth like a photograph rather than white noise."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def ours(image: Image.Image) -> torch.Tensor:
    return normalize(resize_center_crop(torch.from_numpy(np.array(image)).permute(2, 0, 1))[None])


@pytest.mark.parametrize("size", SIZES)
def test_batched_preprocessing_matches_clip_image_processor(size):
    image = smooth_image(size)
    expected = CLIPImageProcessor(**CROP)(images=image, return_tensors="pt")["pixel_values"]
    result = ours(image)
    assert result.shape == expected.shape == (1, 3, 224, 224)
    difference = (result - expected).abs()
    assert difference.max() < MAX_ABS
    assert difference.mean() < MEAN_ABS


@pytest.mark.parametrize("size", SIZES)
def test_batched_preprocessing_is_close_to_the_pil_processor_of_the_report(size):
    # The report's transformers 4.44 resized with PIL. Measured: max |difference| 0.030
    # (about 2 uint8 levels at the 64 px upscale), mean 4e-4 in normalised units.
    image = smooth_image(size)
    processor = CLIPImageProcessorPil(**CROP)
    expected = torch.as_tensor(processor(images=image, return_tensors="np")["pixel_values"])
    difference = (ours(image) - expected).abs()
    assert difference.max() < 0.05
    assert difference.mean() < 1e-3


def test_stratified_split_is_disjoint_proportional_and_seeded():
    labels = torch.arange(4).repeat_interleave(25)
    train, val = stratified_split(labels, 0.2, seed=42)
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert len(train) + len(val) == 100
    assert torch.bincount(labels[val]).tolist() == [5, 5, 5, 5]
    again, _ = stratified_split(labels, 0.2, seed=42)
    other, _ = stratified_split(labels, 0.2, seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)


def test_balanced_subset_spreads_evenly_over_classes():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 100)
    subset = balanced_subset(labels, 31, seed=0)
    counts = torch.bincount(labels[subset])
    assert len(subset) == 31 and counts.max() - counts.min() <= 1
    assert torch.equal(subset, balanced_subset(labels, 31, seed=0))


def test_synthetic_images_are_deterministic_and_class_dependent():
    a, labels = synthetic_images(4, 6, seed=3)
    b, _ = synthetic_images(4, 6, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (24, 3, 64, 64)
    assert torch.equal(a, b)
    means = torch.stack([a[labels == c].float().mean(dim=(0, 2, 3)) for c in range(4)])
    assert torch.cdist(means, means).fill_diagonal_(1e9).min() > 1  # colours differ by class


def test_smoke_splits_have_a_fixed_metric_subset():
    data = DataSpec(
        synthetic_stand_in=True, synthetic_classes=5, synthetic_per_class=20, metric_subset=10
    )
    splits = load_splits(data, seed=42)
    assert len(splits.train) == 80 and len(splits.val) == 20
    assert torch.bincount(splits.metric.labels).tolist() == [2] * 5
    assert splits.train.images.shape[1:] == (3, 224, 224)
    assert torch.equal(splits.metric.images, load_splits(data, seed=42).metric.images)
    assert splits.train.class_names == CLASS_NAMES["synthetic"][:5]
    assert "synthetic" in splits.train.name


def test_missing_dataset_offline_names_dataset_root_and_fix(tmp_path):
    data = DataSpec(dataset="eurosat", root=str(tmp_path), download=False)
    with pytest.raises(DatasetUnavailableError) as err:
        load_splits(data, seed=42)
    message = str(err.value)
    assert "'eurosat'" in message and str(tmp_path) in message and "download=True" in message


def test_test_set_can_be_capped_to_a_balanced_subset():
    data = DataSpec(synthetic_stand_in=True, synthetic_classes=4, synthetic_per_class=10)
    test = load_test_set(data, "cifar100", seed=0, max_images=8)
    assert torch.bincount(test.labels).tolist() == [2, 2, 2, 2]


def test_class_name_lists_have_the_dataset_sizes():
    sizes = {name: len(names) for name, names in CLASS_NAMES.items()}
    assert sizes == {
        "eurosat": 10,
        "pets": 37,
        "cifar100": 100,
        "cifar10": 10,
        "flowers102": 102,
        "synthetic": 100,
    }


def test_original_split_trains_on_train_and_scores_test_with_the_original_subset():
    data = DataSpec(synthetic_stand_in=True, synthetic_classes=4, synthetic_per_class=10,
                    metric_subset=10, split="original")  # fmt: skip
    splits = load_splits(data, seed=42)
    test = load_images(data, "eurosat", "test", seed=42)
    assert len(splits.train) == 40 and splits.test is None
    assert torch.equal(splits.val.images, test.images)  # "val" accuracy is test accuracy
    order = original_metric_subset(test.labels.numpy(), 10, 42)
    assert torch.equal(splits.metric.images, test.images[torch.from_numpy(order)])
    assert torch.bincount(splits.metric.labels).tolist() == [3, 3, 2, 2]  # 2 per label + 2


def test_heldout_split_cuts_val_from_train_and_keeps_the_test_split_apart():
    data = DataSpec(synthetic_stand_in=True, synthetic_classes=4, synthetic_per_class=10,
                    metric_subset=4, split="heldout")  # fmt: skip
    splits = load_splits(data, seed=42)
    assert len(splits.train) + len(splits.val) == 40 and len(splits.test) == 40
    assert torch.equal(splits.test.images, load_images(data, "eurosat", "test", 42).images)


def test_fixed_split_takes_val_probe_train_per_class_disjoint_and_by_its_own_seed():
    labels = torch.arange(4).repeat_interleave(10)  # 4 classes × 10
    train, val, probe = fixed_split(labels, (5, 3, 2), seed=0)
    assert (len(train), len(val), len(probe)) == (20, 12, 8)
    assert not (set(train.tolist()) & set(val.tolist()) | set(train.tolist()) & set(probe.tolist())
                | set(val.tolist()) & set(probe.tolist()))  # fmt: skip
    for split, count in ((train, 5), (val, 3), (probe, 2)):
        assert torch.bincount(labels[split]).tolist() == [count] * 4
    again = fixed_split(labels, (5, 3, 2), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again, (train, val, probe), strict=True))
    other = fixed_split(labels, (5, 3, 2), seed=1)
    assert not torch.equal(other[1], val)
    short = fixed_split(labels, (9, 3, 2), seed=0)[0]  # 5 left per class: what is left
    assert len(short) == 20


def test_fixed_splits_hold_the_profile_counts_and_the_probe_is_the_metric_subset():
    data = DataSpec(synthetic_stand_in=True, synthetic_classes=4, synthetic_per_class=10,
                    split="fixed", fixed_per_class={"eurosat": (5, 3, 2)})  # fmt: skip
    splits = load_splits(data, seed=42)
    assert (len(splits.train), len(splits.val), len(splits.metric)) == (20, 12, 8)
    assert len(splits.test) == 40  # the test split stays whole, scored once
    with pytest.raises(ConfigError, match=r"data.fixed_per_class.*'pets'"):
        load_splits(dataclasses.replace(data, dataset="pets"), seed=42)


def test_hf_source_feeds_the_splits_and_is_decoded_once(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)

    def split(n: int):
        pixels = rng.integers(0, 256, (n, 30, 40, 3), dtype=np.uint8)
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(p) for p in pixels], "label": [i % 3 for i in range(n)]},
            features=datasets.Features({"image": datasets.Image(),
                                        "label": datasets.ClassLabel(names=["a_b", "c", "d"])}),
        )  # fmt: skip

    folder = hf_folder(tmp_path / "hf", "eurosat")
    datasets.DatasetDict({"train": split(12), "test": split(9)}).save_to_disk(str(folder))
    data = DataSpec(root=str(tmp_path), source="hf", split="original", metric_subset=6,
                    interpolation="bilinear")  # fmt: skip
    splits = load_splits(data, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.metric)) == (12, 9, 6)
    assert splits.train.class_names == ("a b", "c", "d")
    assert splits.train.images.shape == (12, 3, 224, 224)
    shutil.rmtree(folder)  # a second load reads the decoded cache only
    again = load_splits(data, seed=0)
    assert torch.equal(again.metric.images, splits.metric.images)


# --- offline downloads ----------------------------------------------------------------------


def _failing_download(folder_of, error: BaseException, seen_timeout: list):
    """A torchvision ``download`` that writes a partial file where the real one would, then
    fails as an unreachable host does."""

    def download(self) -> None:
        seen_timeout.append(socket.getdefaulttimeout())
        partial = folder_of(Path(self.root))
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"half an archive")
        raise error

    return download


OFFLINE_ERRORS = [
    urllib.error.URLError(socket.gaierror(-2, "Name or service not known")),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("timed out"),
    RuntimeError("File not found or corrupted."),
]


@pytest.mark.parametrize("error", OFFLINE_ERRORS, ids=lambda e: type(e).__name__)
def test_unreachable_dataset_host_raises_our_error_and_leaves_no_folder(
    tmp_path, monkeypatch, error
):
    torchvision = pytest.importorskip("torchvision")
    seen: list = []
    download = _failing_download(lambda root: root / "eurosat" / "EuroSAT.zip", error, seen)
    monkeypatch.setattr(torchvision.datasets.EuroSAT, "download", download)
    root = tmp_path / "data"
    data = DataSpec(dataset="eurosat", root=str(root), download=True)
    with pytest.raises(DatasetUnavailableError) as err:
        load_splits(data, seed=42)
    message = str(err.value)
    assert "'eurosat'" in message and str(root / "eurosat") in message
    assert f"datasets.EuroSAT('{root}', download=True)" in message
    assert not root.exists()  # the download created data/ and data/eurosat/: both removed
    assert seen == [DOWNLOAD_STALL_S]  # stalls are bounded during the download …
    assert socket.getdefaulttimeout() is None  # … and the default is restored after


# (dataset, torchvision class, its folder, its archive, a file inside the folder, another one)
CIFARS = [
    ("cifar100", "CIFAR100", "cifar-100-python", "cifar-100-python.tar.gz", "meta", "train"),
    ("cifar10", "CIFAR10", "cifar-10-batches-py", "cifar-10-python.tar.gz", "batches.meta",
     "data_batch_1"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "cls", "folder", "archive", "old", "new"), CIFARS)
def test_failed_download_removes_only_what_it_created(
    tmp_path, monkeypatch, name, cls, folder, archive, old, new
):
    torchvision = pytest.importorskip("torchvision")
    root = tmp_path / "data"
    (root / folder).mkdir(parents=True)
    (root / folder / old).write_bytes(b"from before")
    (root / "notes.txt").write_text("mine")
    error = urllib.error.URLError("no route to host")
    download = _failing_download(lambda r: r / archive, error, [])

    def download_and_partial_member(self) -> None:
        (Path(self.root) / folder / new).write_bytes(b"partial")
        download(self)

    monkeypatch.setattr(getattr(torchvision.datasets, cls), "download", download_and_partial_member)
    data = DataSpec(dataset=name, root=str(root), download=True)
    with pytest.raises(DatasetUnavailableError, match=name):
        load_test_set(data, name, seed=0)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        folder, f"{folder}/{old}", "notes.txt",
    ]  # fmt: skip


def test_missing_cifar10_offline_names_its_folder_and_fetch_command(tmp_path):
    data = DataSpec(dataset="cifar10", root=str(tmp_path), download=False)
    with pytest.raises(DatasetUnavailableError) as err:
        load_test_set(data, "cifar10", seed=0)
    message = str(err.value)
    assert "'cifar10' (test) is not on disk" in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert f"datasets.CIFAR10('{tmp_path}', download=True)" in message
    assert list(tmp_path.iterdir()) == []


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING), as the CIFAR batches were pickled: keys read
    back as b"data" by default and as "data" with ``encoding="latin1"`` (torchvision's)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _python2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _cifar10_batches(folder: Path, per_batch: int = 4) -> None:
    """torchvision's cifar-10-batches-py in the real format: Python 2 pickles of dicts with
    b"data", uint8 rows (N, 3072: the red, green, blue 32×32 planes), and b"labels", a list;
    batches.meta has b"label_names". Only the contents are random (so the files' MD5s are not
    the real ones)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"batch_label": batch.encode(), b"labels": [i % 10 for i in range(per_batch)],
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"{batch}_{i}.png".encode() for i in range(per_batch)]}  # fmt: skip
        (folder / batch).write_bytes(_python2_pickle(entry))
    names = [name.encode() for name in CLASS_NAMES["cifar10"]]
    meta = {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(_python2_pickle(meta))


def test_cifar10_folder_is_checked_by_md5_so_a_fake_is_refused_with_our_error(tmp_path):
    # torchvision's CIFAR10 compares each batch file with the MD5 of the real one: a folder in
    # the real layout and format but other pixels is refused, and the message says how to get
    # the real files. (So no fake torchvision CIFAR-10 can be loaded without patching it.)
    folder = tmp_path / "cifar-10-batches-py"
    _cifar10_batches(folder)
    assert torchvision_missing("cifar10", tmp_path) == []  # the layout is complete
    data = DataSpec(dataset="cifar10", root=str(tmp_path), download=False)
    with pytest.raises(DatasetUnavailableError, match="not found or corrupted") as err:
        load_test_set(data, "cifar10", seed=0)
    assert f"datasets.CIFAR10('{tmp_path}', download=True)" in str(err.value)
    assert len(list(folder.iterdir())) == 7  # nothing that was there is removed


def test_torchvision_layout_names_what_is_missing(tmp_path):
    (tmp_path / "flowers-102" / "jpg").mkdir(parents=True)
    (tmp_path / "flowers-102" / "setid.mat").write_bytes(b"")
    assert torchvision_missing("flowers102", tmp_path) == [
        tmp_path.resolve() / "flowers-102" / "imagelabels.mat"
    ]
    (tmp_path / "cifar-10-batches-py").mkdir()
    for batch in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_5", "test_batch"):
        (tmp_path / "cifar-10-batches-py" / batch).write_bytes(b"")
    assert torchvision_missing("cifar10", tmp_path) == [
        tmp_path.resolve() / "cifar-10-batches-py" / name
        for name in ("data_batch_4", "batches.meta")
    ]
