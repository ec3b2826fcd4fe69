"""The original study's Hugging Face builds, read from a local folder, and its metric subset.

The original study loads four Hugging Face builds with ``datasets.load_dataset`` and uses each
build's own train/test splits (no split of ours); CIFAR-10 (``uoft-cs/cifar10``) is read the same
way. This module reads the builds from disk only (no hub, no network) and returns them in this
project's form: :class:`~data.ImageSet` with uint8 images ``(N, 3, S, S)``, int64 labels ``(N,)``
and class names.

Each build lives in its own folder ``<root>/<owner>__<name>`` (e.g. ``data/hf/tanganke__eurosat``)
in either layout:

- a ``DatasetDict`` written by ``save_to_disk`` (the folder holds ``dataset_dict.json``), or one
  ``Dataset`` per split in ``<folder>/<split>/``;
- the parquet files as the hub stores them, e.g. ``<folder>/data/train-00000-of-00001.parquet``
  (``hf download <build> --repo-type dataset --local-dir <folder>``), also
  ``<folder>/<config>/<split>/0000.parquet`` (the hub's parquet conversion).

Geometry: ``interpolation="bilinear"`` (default) replays the original's evaluation transform,
torchvision ``Resize(S)`` + ``CenterCrop(S)`` on the PIL image (bilinear, shorter side to S, PIL's
antialiased resampling), so the uint8 pixels are exactly what the original normalised.
``"bicubic"`` uses this project's geometry (:func:`data.image_to_uint8`).

:func:`original_metric_subset` replays the original's fixed 200-image metric subset of the test
split, in the original's order (which matters for batch-wise metrics, see
``metrics.layer_metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm  # text bars: TQDM_DISABLE silences them in executed pages

from collapse_utils.training.data import DatasetUnavailableError, ImageSet, image_to_uint8
from collapse_utils.training.labels import CLASS_NAMES
from collapse_utils.training.needs import EUROSAT_CORRUPTIONS

INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class HFBuild:
    """One Hugging Face build: its hub id, the image and label columns, and the split names the
    hub build has (for reference; any split present on disk can be loaded)."""

    repo: str
    image_column: str
    label_column: str
    splits: tuple[str, ...]

    @property
    def folder_name(self) -> str:
        return self.repo.replace("/", "__")


# Keyed by this project's dataset names. Column and split names: the original's src/dataset.py
# and study2/data_splits.py, and the builds' dataset cards.
HF_BUILDS: dict[str, HFBuild] = {
    # image, label (ClassLabel, 10 CLIP-style names); train 21,600 / test 2,700, plus seven
    # corrupted copies of the test split.
    "eurosat": HFBuild(
        "tanganke/eurosat",
        "image",
        "label",
        ("train", "test", *EUROSAT_CORRUPTIONS),
    ),
    # image, label (ClassLabel, 37 breeds), image_id, label_cat_dog; train 3,680 / test 3,669.
    "pets": HFBuild("timm/oxford-iiit-pet", "image", "label", ("train", "test")),
    # img, fine_label (ClassLabel, 100), coarse_label (20); train 50,000 / test 10,000.
    "cifar100": HFBuild("uoft-cs/cifar100", "img", "fine_label", ("train", "test")),
    # img, label (ClassLabel, 10: airplane … truck); train 50,000 / test 10,000.
    "cifar10": HFBuild("uoft-cs/cifar10", "img", "label", ("train", "test")),
    # image, label (ClassLabel whose names are the official class numbers '1'…'102' as strings,
    # sorted as text: label 0 is class '1', label 1 is class '10'); train 7,169 / test 1,020.
    "flowers102": HFBuild("nelorth/oxford-flowers", "image", "label", ("train", "test")),
}


class HFDatasetMissingError(DatasetUnavailableError, FileNotFoundError):
    """A Hugging Face build is not in its local folder; the message says how to fetch it."""


def hf_folder(root: str | Path, name: str) -> Path:
    """The local folder of build ``name`` (one of :data:`HF_BUILDS`): ``<root>/<owner>__<repo>``."""
    return Path(root) / _build(name).folder_name


def _build(name: str) -> HFBuild:
    if name not in HF_BUILDS:
        raise ValueError(f"unknown dataset {name!r}; Hugging Face builds: {sorted(HF_BUILDS)}")
    return HF_BUILDS[name]


def _fetch_hint(build: HFBuild, folder: Path) -> str:
    return (
        f"On a machine with hub access run\n"
        f"    python -c \"import datasets; datasets.load_dataset('{build.repo}')"
        f".save_to_disk('{folder}')\"\n"
        f"or download its parquet files with\n"
        f"    hf download {build.repo} --repo-type dataset --local-dir {folder}\n"
        f"and copy the folder to {folder.resolve()}."
    )


# --- locating a split on disk ---------------------------------------------------------------


def _parquet_files(folder: Path, split: str) -> list[Path]:
    """Parquet files of ``split`` under ``folder``: named ``<split>-*`` / ``*-<split>`` /
    ``<split>.parquet``, or inside a directory named ``<split>``. All must share one directory
    (two copies of a split in different layouts would silently double it)."""
    found = []
    for path in sorted(folder.rglob("*.parquet")):
        stem, parents = path.stem, path.relative_to(folder).parts[:-1]
        if stem == split or stem.startswith(f"{split}-") or stem.endswith(f"-{split}"):
            found.append(path)
        elif split in parents:
            found.append(path)
    directories = sorted({str(path.parent) for path in found})
    if len(directories) > 1:
        raise ValueError(
            f"split {split!r} has parquet files in several directories {directories}; keep one "
            "layout so that no image is read twice"
        )
    return found


def _open_split(build: HFBuild, folder: Path, split: str, cache_dir: str | Path | None):
    """The ``datasets.Dataset`` of one split, from ``save_to_disk`` output or parquet files."""
    import datasets

    if not folder.is_dir():
        raise HFDatasetMissingError(
            f"Hugging Face build {build.repo!r} not found: no folder {folder.resolve()}.\n"
            + _fetch_hint(build, folder)
        )
    if (folder / "dataset_dict.json").exists():
        splits = datasets.load_from_disk(str(folder))
        if split not in splits:
            raise ValueError(
                f"{build.repo!r} in {folder} has splits {sorted(splits)}, not {split!r}"
            )
        return splits[split]
    if (folder / split / "state.json").exists():
        return datasets.load_from_disk(str(folder / split))
    files = _parquet_files(folder, split)
    if files:
        return datasets.load_dataset(
            "parquet",
            data_files={split: [str(path) for path in files]},
            split=split,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    raise HFDatasetMissingError(
        f"split {split!r} of Hugging Face build {build.repo!r} not found in {folder.resolve()} "
        f"(no dataset_dict.json, no {split}/state.json, no {split} parquet files).\n"
        + _fetch_hint(build, folder)
    )


# --- decoding -------------------------------------------------------------------------------


def original_geometry(image: Image.Image, size: int = 224) -> Tensor:
    """The original's evaluation geometry on one PIL image: RGB, shorter side resized to
    ``size`` with PIL's bilinear filter, centre crop; uint8 (3, size, size). Identical to
    torchvision ``Resize(size)`` + ``CenterCrop(size)`` before ``ToTensor``."""
    resized = TF.resize(image.convert("RGB"), [size], interpolation=TF.InterpolationMode.BILINEAR)
    return TF.pil_to_tensor(TF.center_crop(resized, [size, size]))


def _decode_images(dataset, column: str, size: int, interpolation: str, desc: str) -> Tensor:
    to_uint8 = original_geometry if interpolation == "bilinear" else image_to_uint8
    images = torch.empty((len(dataset), 3, size, size), dtype=torch.uint8)
    rows = dataset.select_columns([column])
    for i, row in enumerate(tqdm(rows, desc=desc, leave=False)):
        images[i] = to_uint8(row[column], size)
    return images


def _build_names(build: HFBuild, dataset, labels: Tensor) -> tuple[str, ...]:
    """The build's ClassLabel names as stored (what the report's code put in its prompts)."""
    import datasets

    feature = dataset.features[build.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names)
    # No ClassLabel metadata: the original falls back to the label ids as text.
    return tuple(str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0))


def readable_class_names(build: HFBuild, names: tuple[str, ...]) -> tuple[str, ...]:
    """Class names fit for prompts. Flowers-102's build names its classes by their official
    numbers ('1'…'102', sorted as text); those are mapped to the flower names (labels.py, in
    official order). Elsewhere underscores become spaces ('aquarium_fish' → 'aquarium fish')."""
    flowers = CLASS_NAMES["flowers102"]
    if build.repo == HF_BUILDS["flowers102"].repo and all(n.isdigit() for n in names):
        if all(1 <= int(n) <= len(flowers) for n in names):
            return tuple(flowers[int(n) - 1] for n in names)
    return tuple(n.replace("_", " ") for n in names)


def load_hf_split(
    name: str,
    split: str,
    root: str | Path = "data/hf",
    size: int = 224,
    interpolation: str = "bilinear",
    cache_dir: str | Path | None = None,
) -> ImageSet:
    """One split ('train', 'test', …) of the Hugging Face build of ``name`` ('eurosat', 'pets',
    'cifar100', 'cifar10', 'flowers102'), decoded from ``hf_folder(root, name)``.

    Returns an :class:`ImageSet`: images uint8 (N, 3, size, size) in the build's row order,
    labels int64 (N,), class names indexed by label: ``class_names`` readable (see
    :func:`readable_class_names`), ``build_names`` the build's ClassLabel names as stored.
    ``interpolation``: 'bilinear' (the original's, :func:`original_geometry`) or 'bicubic' (this
    project's). ``cache_dir``: where ``datasets`` may write its Arrow cache when reading parquet
    (its default cache when None). Raises :class:`HFDatasetMissingError` (a
    ``FileNotFoundError``) when the folder or split is missing.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    build = _build(name)
    dataset = _open_split(build, hf_folder(root, name), split, cache_dir)
    labels = torch.tensor(list(dataset[build.label_column]), dtype=torch.long)
    images = _decode_images(
        dataset, build.image_column, size, interpolation, desc=f"decode {build.repo}/{split}"
    )
    names = _build_names(build, dataset, labels)
    return ImageSet(name, images, labels, readable_class_names(build, names), names)


def load_hf_splits(
    name: str,
    root: str | Path = "data/hf",
    size: int = 224,
    splits: tuple[str, ...] = ("train", "test"),
    **kwargs,
) -> dict[str, ImageSet]:
    """``{split: ImageSet}`` for each of ``splits``; other arguments as :func:`load_hf_split`."""
    return {split: load_hf_split(name, split, root, size, **kwargs) for split in splits}


# --- the original metric subset -------------------------------------------------------------


def original_metric_subset(labels, n: int = 200, seed: int = 42) -> np.ndarray:
    """Indices (into ``labels``, the test split in row order) of the original's fixed metric
    subset, in the original's order; int64 (n,).

    Replays the original rule with ``numpy.random.RandomState(seed)``: with K the number of
    distinct labels present, for each label in ascending order draw ``min(n // K, count)`` of its
    indices (ascending) with ``rng.choice(..., replace=False)``; if fewer than ``n`` were drawn,
    draw the rest with ``rng.choice(remaining, n - drawn, replace=False)`` where ``remaining`` is
    ``list(set(range(len(labels))) - set(drawn))`` (CPython's set order, reproduced by building
    the same set). The result is those per-label draws followed by the remainder draws.
    labels: (N,) integers (array, list or CPU tensor).
    """
    labels = np.asarray(labels).reshape(-1)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if n > len(labels):
        raise ValueError(f"cannot draw {n} images from {len(labels)}")
    rng = np.random.RandomState(seed)
    classes = sorted(set(labels.tolist()))
    per_class = n // len(classes)
    chosen: list[int] = []
    for label in classes:
        members = np.flatnonzero(labels == label).tolist()
        picked = rng.choice(members, size=min(per_class, len(members)), replace=False)
        chosen.extend(int(i) for i in picked)
    if len(chosen) < n:
        remaining = list(set(range(len(labels))) - set(chosen))
        extra = rng.choice(remaining, size=n - len(chosen), replace=False)
        chosen.extend(int(i) for i in extra)
    return np.asarray(chosen[:n], dtype=np.int64)
