"""Datasets as uint8 image tensors, splits, the metric subset, and batched CLIP preprocessing.

Every split is decoded and resized once (shortest side → 224, centre crop) into a uint8 tensor
``(N, 3, 224, 224)``, cached under ``<root>/cache/``. Per batch only indexing, the optional flip,
float conversion and normalisation remain (:func:`normalize`), on whatever device the tensor is.

Sources: torchvision datasets, or the Hugging Face builds the report's code used
(:mod:`~collapse_utils.training.hf_datasets`). Split protocols (``data.split``): ``heldout`` cuts
train/val from the training pool and the metric subset from val; ``original`` trains on the
dataset's train split, reports test accuracy each epoch and draws the metric subset from test by
the original rule.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import math
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm  # text bars: TQDM_DISABLE silences them in executed pages

from collapse_utils.config import ConfigError, DataSpec
from collapse_utils.storage import cached
from collapse_utils.training.labels import CLASS_NAMES
from collapse_utils.training.needs import EUROSAT_CORRUPTIONS, decoded_cache, splits_needed

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DatasetUnavailableError(RuntimeError):
    """A dataset is not on disk and cannot be downloaded; the message says how to fetch it."""


@dataclass(frozen=True)
class ImageSet:
    """images: (N, 3, S, S) uint8; labels: (N,) int64; class_names[label] is readable text;
    build_names[label] the name as the source stores it ('aquarium_fish', Flowers-102's '1'),
    which the report's code put in its prompts (empty: the source has none of its own)."""

    name: str
    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    build_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> ImageSet:
        return dataclasses.replace(self, images=self.images[index], labels=self.labels[index])


@dataclass(frozen=True)
class Splits:
    train: ImageSet
    val: ImageSet  # accuracy each epoch, selects the best epoch (the test split in 'original')
    metric: ImageSet  # fixed subset of val for attention metrics, in a fixed order
    test: ImageSet | None = None  # 'heldout': the dataset's test split, scored once at the end


# --- preprocessing --------------------------------------------------------------------------


_MODES = {"bicubic": TF.InterpolationMode.BICUBIC, "bilinear": TF.InterpolationMode.BILINEAR}


def resize_center_crop(images: Tensor, size: int = 224, interpolation: str = "bicubic") -> Tensor:
    """CLIP geometry on uint8 tensors: antialiased resize of the shortest side to ``size``
    (``bicubic`` or ``bilinear``), then centre crop. (..., 3, H, W) → (..., 3, size, size)."""
    mode = _MODES[interpolation]
    resized = TF.resize(images, [size], interpolation=mode, antialias=True)
    return TF.center_crop(resized, [size, size])


def image_to_uint8(image: Image.Image, size: int = 224, interpolation: str = "bicubic") -> Tensor:
    """One PIL image → RGB, CLIP geometry, uint8 (3, size, size): what the split cache holds.
    ``bilinear`` resizes the PIL image itself, exactly torchvision ``Resize(size)`` +
    ``CenterCrop(size)`` of the report's code; ``bicubic`` resizes the uint8 tensor."""
    image = image.convert("RGB")
    if interpolation == "bilinear":
        resized = TF.resize(image, [size], interpolation=TF.InterpolationMode.BILINEAR)
        return TF.pil_to_tensor(TF.center_crop(resized, [size, size]))
    return resize_center_crop(TF.pil_to_tensor(image), size, interpolation)


def random_flip(images: Tensor, flips: Tensor) -> Tensor:
    """Horizontal flip of the images where ``flips`` (B,) bool is true. images: (B, 3, S, S)."""
    return torch.where(flips[:, None, None, None], images.flip(-1), images)


def normalize(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 (B, 3, S, S) → CLIP-normalised float (B, 3, S, S) on the same device."""
    mean, std = _clip_constants(images.device, dtype)
    # One new tensor, then in place: the same operations (bit-identical) as
    # ``(images.to(dtype) / 255 - mean) / std`` at a third of the cost on CPU.
    return images.to(dtype, copy=True).div_(255).sub_(mean).div_(std)


def _clip_constants(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """CLIP's mean and std (1, 3, 1, 1) on ``device``. Eagerly they are made once (from Python
    lists every step they were a blocking host-to-device copy on a GPU); a compiled graph
    holds them as its own constants."""
    if torch.compiler.is_compiling():
        return _constants(device, dtype)
    return _cached_constants(device, dtype)


def _constants(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(CLIP_MEAN, dtype=dtype, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=dtype, device=device).view(1, 3, 1, 1)
    return mean, std


_cached_constants = functools.cache(_constants)


# --- splits ---------------------------------------------------------------------------------


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Per class, a seeded shuffle puts ``ceil(val_fraction·n_c)`` items in val (sorted indices)."""
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique(sorted=True):
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(len(members) - 1, math.ceil(val_fraction * len(members)))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def balanced_subset(labels: Tensor, size: int, seed: int) -> Tensor:
    """``size`` indices spread evenly over classes (round-robin over seeded per-class orders)."""
    generator = torch.Generator().manual_seed(seed)
    queues = []
    for c in labels.unique(sorted=True):
        members = (labels == c).nonzero().flatten()
        queues.append(members[torch.randperm(len(members), generator=generator)].tolist())
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(size, len(labels)):
        for queue in queues:
            if depth < len(queue) and len(chosen) < size:
                chosen.append(queue[depth])
        depth += 1
    return torch.tensor(sorted(chosen), dtype=torch.long)


def fixed_split(labels: Tensor, per_class: tuple[int, ...], seed: int) -> tuple[Tensor, ...]:
    """study2's split (``study2/data_splits.py``): with one ``numpy.random.RandomState(seed)``,
    validation, then probe, then training items are taken per class (:func:`take_per_class`).
    ``per_class``: (train, val, probe) per class. Returns sorted (train, val, probe) indices; a
    class with too few items gives what is left."""
    rng = np.random.RandomState(seed)
    used: set[int] = set()
    taken = []
    for count in (per_class[1], per_class[2], per_class[0]):  # val, probe, train: study2's order
        picked = take_per_class(labels, count, rng, used)
        used.update(picked.tolist())
        taken.append(picked)
    val, probe, train = taken
    return train, val, probe


def take_per_class(
    labels: Tensor, count: int, rng: np.random.RandomState, used: set[int] = frozenset()
) -> Tensor:
    """study2's ``_stratified_take``: per class in label order, ``count`` items from a shuffle
    (by ``rng``) of the class's items not in ``used``. Sorted indices."""
    values = labels.numpy()
    picked: list[int] = []
    for c in sorted(set(values.tolist())):
        pool = [int(i) for i in np.flatnonzero(values == c) if int(i) not in used]
        rng.shuffle(pool)
        picked.extend(pool[:count])
    return torch.tensor(sorted(picked), dtype=torch.long)


# --- sources --------------------------------------------------------------------------------


def synthetic_images(
    n_classes: int, per_class: int, seed: int, size: int = 64
) -> tuple[Tensor, Tensor]:
    """Class-dependent patterns: class c is a sinusoidal grating with its own orientation,
    frequency and colour, with a random phase and pixel noise per image.
    Returns uint8 (N, 3, size, size) and int64 (N,) labels, N = n_classes·per_class."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    angle = labels.float() * math.pi / n_classes
    freq = 2 + (labels % 3).float() * 2
    phase = torch.rand(len(labels), generator=generator) * 2 * math.pi
    hue = labels.float() / n_classes * 2 * math.pi
    colour = torch.stack([hue.cos(), (hue + 2.1).cos(), (hue + 4.2).cos()], dim=1) * 0.35 + 0.5
    grid = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    proj = angle.cos()[:, None, None] * xx + angle.sin()[:, None, None] * yy
    wave = 0.5 + 0.5 * torch.sin(2 * math.pi * freq[:, None, None] * proj + phase[:, None, None])
    images = colour[:, :, None, None] * wave[:, None] + 0.15 * torch.randn(
        len(labels), 3, size, size, generator=generator
    )
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def _torchvision_source(name: str, root: Path, split: str, download: bool):
    """The torchvision dataset object for one of our names and splits ('pool' or 'test')."""
    from torchvision import datasets

    if name == "eurosat":
        return datasets.EuroSAT(root, download=download)
    if name == "pets":
        pets_split = "trainval" if split == "pool" else "test"
        return datasets.OxfordIIITPet(root, split=pets_split, download=download)
    if name == "cifar100":
        return datasets.CIFAR100(root, train=split == "pool", download=download)
    if name == "cifar10":
        return datasets.CIFAR10(root, train=split == "pool", download=download)
    if name == "flowers102":
        return datasets.Flowers102(
            root, split="train" if split == "pool" else "test", download=download
        )
    raise ValueError(f"unknown dataset {name!r}")


_CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
# torchvision's folder of each dataset under ``data.root`` and what must be in it (its own
# ``_check_exists``), and what its download writes beside that folder.
TORCHVISION_LAYOUT: dict[str, tuple[str, tuple[str, ...]]] = {
    "eurosat": ("eurosat", ("2750",)),
    "pets": ("oxford-iiit-pet", ("images", "annotations/trainval.txt", "annotations/test.txt")),
    "cifar100": ("cifar-100-python", ("train", "test", "meta")),
    "cifar10": ("cifar-10-batches-py", (*_CIFAR10_BATCHES, "test_batch", "batches.meta")),
    "flowers102": ("flowers-102", ("jpg", "imagelabels.mat", "setid.mat")),
}
_TORCHVISION_ARCHIVES = {
    "cifar100": ("cifar-100-python.tar.gz",), "cifar10": ("cifar-10-python.tar.gz",),
}  # fmt: skip
_TORCHVISION_CLASSES = {
    "eurosat": "EuroSAT", "pets": "OxfordIIITPet", "cifar100": "CIFAR100", "cifar10": "CIFAR10",
    "flowers102": "Flowers102",
}  # fmt: skip
# What a download that cannot reach its host raises: urllib's URLError, socket errors and
# timeouts, ConnectionError (all OSError), http.client's protocol errors, and torchvision's
# RuntimeError ("Dataset not found or corrupted", a checksum mismatch).
DOWNLOAD_ERRORS = (OSError, http.client.HTTPException, RuntimeError)
# Seconds a download socket may stall (connect or read) before it fails; urllib's default is
# to wait forever on a host that drops packets.
DOWNLOAD_STALL_S = 15.0


def torchvision_fetch_command(name: str, root: Path) -> str:
    """The shell command that downloads every split of ``name`` into ``root`` (absolute)."""
    root = Path(root).resolve()
    return (
        f'python -c "from torchvision import datasets; '
        f"datasets.{_TORCHVISION_CLASSES[name]}('{root}', download=True)\""
    )


def torchvision_missing(name: str, root: Path) -> list[Path]:
    """The paths of ``name``'s torchvision layout under ``root`` that are absent (absolute)."""
    folder, required = TORCHVISION_LAYOUT[name]
    base = Path(root).resolve() / folder
    return [base / part for part in required if not (base / part).exists()]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def _download_guard(name: str, root: Path) -> Iterator[None]:
    """Bound socket stalls to :data:`DOWNLOAD_STALL_S` while torchvision downloads, and on any
    failure remove what the attempt created: the dataset's folder or archive if absent before,
    new entries inside a folder that existed, and ``root`` itself if it was created and is left
    empty. Nothing that existed before is touched."""
    folder = root / TORCHVISION_LAYOUT[name][0]
    artefacts = [folder, *(root / a for a in _TORCHVISION_ARCHIVES.get(name, ()))]
    root_existed = root.exists()
    existed = {path for path in artefacts if path.exists()}
    inside = set(folder.iterdir()) if folder.is_dir() else set()
    timeout = socket.getdefaulttimeout()
    if timeout is None:
        socket.setdefaulttimeout(DOWNLOAD_STALL_S)
    try:
        yield
    except BaseException:
        for path in artefacts:
            if path not in existed and path.exists():
                _remove(path)
        if folder in existed and folder.is_dir():
            for path in set(folder.iterdir()) - inside:
                _remove(path)
        if not root_existed and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        raise
    finally:
        if timeout is None:
            socket.setdefaulttimeout(None)


def _unavailable_message(name: str, split: str, root: Path, download: bool, err: Exception) -> str:
    folder = root / TORCHVISION_LAYOUT[name][0]
    if download:
        what, cleaned = "could not be downloaded", " (what this attempt created there is removed)"
    else:
        what, cleaned = "is not on disk (data.download is false)", ""
    return (
        f"dataset {name!r} ({split}) {what}: looked in {folder}{cleaned}; "
        f"{type(err).__name__}: {err}. On a machine with internet run\n"
        f"    {torchvision_fetch_command(name, root)}\n"
        f"and copy the {folder.name}/ folder it writes to {folder} on this machine."
    )


def _decode(data: DataSpec, name: str, split: str) -> dict:
    """{images, labels, class_names (None: labels.py's), build_names (the source's own, None:
    it has none)} of split 'pool' or 'test'."""
    root = Path(data.root)
    if data.source == "hf":
        # Imported here: ``datasets`` is slow to import and only this source needs it.
        from collapse_utils.training.hf_datasets import load_hf_split

        hf_split = "train" if split == "pool" else split
        images = load_hf_split(name, hf_split, root / "hf", data.image_size, data.interpolation)
        return {"images": images.images, "labels": images.labels,
                "class_names": images.class_names, "build_names": images.build_names}  # fmt: skip
    if name not in TORCHVISION_LAYOUT:
        raise ValueError(f"unknown dataset {name!r}; torchvision: {sorted(TORCHVISION_LAYOUT)}")
    root = root.resolve()
    try:
        with _download_guard(name, root):
            source = _torchvision_source(name, root, split, data.download)
    except DOWNLOAD_ERRORS as err:
        message = _unavailable_message(name, split, root, data.download, err)
        raise DatasetUnavailableError(message) from err
    images, labels = [], []
    for image, label in tqdm(source, desc=f"decode {name}/{split}", leave=False):
        images.append(image_to_uint8(image, data.image_size, data.interpolation))
        labels.append(int(label))
    return {"images": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.long),
            "class_names": None, "build_names": getattr(source, "classes", None)}  # fmt: skip


def _cached(data: DataSpec, name: str, split: str) -> dict:
    """Decode once, then read :func:`~collapse_utils.training.needs.decoded_cache`."""
    return cached(decoded_cache(data, name, split), lambda: _decode(data, name, split))


def _stand_in_seed(name: str, seed: int) -> int:
    # Each stand-in dataset gets its own synthetic images, stable across runs.
    return seed * 1000 + sum(ord(ch) for ch in name)


def load_images(data: DataSpec, name: str, split: str, seed: int) -> ImageSet:
    """All images of ``name``'s 'pool' (its training split), 'test' split or (EuroSAT, Hugging
    Face source) one of its corruption splits (:data:`EUROSAT_CORRUPTIONS`).
    With ``data.synthetic_stand_in`` (or name 'synthetic') the images are synthetic."""
    if data.synthetic_stand_in or name == "synthetic":
        offsets = {"pool": 0, "test": 1} | {c: 2 + i for i, c in enumerate(EUROSAT_CORRUPTIONS)}
        offset = offsets[split]
        images, labels = synthetic_images(
            data.synthetic_classes, data.synthetic_per_class, _stand_in_seed(name, seed) + offset
        )
        images = resize_center_crop(images, data.image_size, data.interpolation)
        classes = CLASS_NAMES["synthetic"][: data.synthetic_classes]
        return ImageSet(f"{name} (synthetic stand-in)", images, labels, classes)
    blob = _cached(data, name, split)
    names = blob["class_names"] or CLASS_NAMES[name]
    build_names = tuple(blob["build_names"] or ())
    return ImageSet(name, blob["images"], blob["labels"], tuple(names), build_names)


def _check_metric_subset(data: DataSpec, available: int) -> None:
    if data.metric_subset > available:
        raise ConfigError(
            f"field 'data.metric_subset' is {data.metric_subset} but the {data.dataset} "
            f"evaluation split has {available} images ({data.split} split); lower it"
        )


def load_splits(data: DataSpec, seed: int) -> Splits:
    """The training split, the per-epoch evaluation split and the metric subset (``data.split``).

    original: the dataset's own train split; its test split is evaluated each epoch and the
    metric subset is drawn from it by the original rule, in the original order. heldout: a
    stratified train/val split of the training pool, a class-balanced metric subset of val, and
    the test split (where the dataset has one) for one score at the selected epoch. fixed:
    study2's split (:func:`fixed_split`): train, val and a probe set (the metric subset) drawn
    per class with ``data.data_seed``, the same images for every run seed."""
    from collapse_utils.training.hf_datasets import original_metric_subset

    pool = load_images(data, data.dataset, "pool", seed)
    if data.split == "original":
        test = load_images(data, data.dataset, "test", seed)
        _check_metric_subset(data, len(test))
        order = original_metric_subset(test.labels.numpy(), data.metric_subset, data.metric_seed)
        return Splits(train=pool, val=test, metric=test.subset(torch.from_numpy(order)))
    test = (
        load_images(data, data.dataset, "test", seed) if data.has_test_split(data.dataset) else None
    )
    if data.split == "fixed":
        train_idx, val_idx, probe_idx = fixed_split(pool.labels, _per_class(data), data.data_seed)
        empty = [n for n, i in (("train", train_idx), ("val", val_idx), ("probe", probe_idx))
                 if not len(i)]  # fmt: skip
        if empty:
            raise ConfigError(f"field 'data.fixed_per_class' leaves the {data.dataset} split(s) "
                              f"{empty} empty: the pool has {len(pool)} images")  # fmt: skip
        return Splits(pool.subset(train_idx), pool.subset(val_idx), pool.subset(probe_idx), test)
    train_idx, val_idx = stratified_split(pool.labels, data.val_fraction, seed)
    val = pool.subset(val_idx)
    _check_metric_subset(data, len(val))
    metric = val.subset(balanced_subset(val.labels, data.metric_subset, seed))
    return Splits(train=pool.subset(train_idx), val=val, metric=metric, test=test)


def _per_class(data: DataSpec) -> tuple[int, ...]:
    counts = data.fixed_per_class.get(data.dataset)
    if counts is None or len(counts) != 3:
        raise ConfigError(
            f"field 'data.fixed_per_class' needs [train, val, probe] images per class for "
            f"{data.dataset!r} (data.split: fixed), got {counts!r}"
        )
    return counts


def load_corruption_sets(data: DataSpec, per_split: int, seed: int) -> dict[str, ImageSet]:
    """EuroSAT's corrupted test splits (``tanganke/eurosat``), each a class-balanced fixed
    subset of about ``per_split`` images drawn as study2 draws them (``per_split // classes``
    per class, ``data.data_seed``); {} for another dataset, and for a source without them
    (torchvision's EuroSAT has no corrupted copies)."""
    if data.dataset != "eurosat" or not (data.source == "hf" or data.synthetic_stand_in):
        return {}
    sets = {}
    for split in EUROSAT_CORRUPTIONS:
        images = load_images(data, "eurosat", split, seed)
        per_class = max(1, per_split // len(images.labels.unique()))
        rng = np.random.RandomState(data.data_seed)
        sets[split] = images.subset(take_per_class(images.labels, per_class, rng))
    return sets


def load_test_set(data: DataSpec, name: str, seed: int, max_images: int | None = None) -> ImageSet:
    """Evaluation images for zero-shot: the dataset's test split (torchvision's EuroSAT has none:
    its held-out val split is used). ``max_images`` keeps a seeded class-balanced subset."""
    if data.has_test_split(name):
        test = load_images(data, name, "test", seed)
    else:
        eurosat = dataclasses.replace(data, dataset="eurosat", split="heldout")
        test = load_splits(eurosat, seed).val
    if max_images is not None and max_images < len(test):
        test = test.subset(balanced_subset(test.labels, max_images, seed))
    return test


def prepare_datasets(configs) -> list[str]:
    """Download and decode, one after another, every real dataset split ``configs`` need
    (:func:`splits_needed`), so runs executed in parallel only read caches. Returns the problems
    found (a missing dataset is reported here and fails its own runs later with the full
    message)."""
    problems, seen = [], set()
    for config in configs:
        data = config.data
        for name, split in splits_needed(config):
            key = (name, split, data.root, data.source, data.image_size, data.interpolation)
            if key in seen:
                continue
            seen.add(key)
            try:
                _cached(data, name, split)
            except DatasetUnavailableError as err:
                problems.append(str(err))
    return problems
