from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from collapse_utils.book.runner import BookPaths, run_book
from collapse_utils.config import PARAMS_DIR, ModelSpec
from collapse_utils.families import FAMILIES_FILE
from collapse_utils.training.data import normalize, resize_center_crop, synthetic_images
from collapse_utils.training.model import load_clip

TINY = ModelSpec(source="tiny", vision_layers=3, tiny_hidden=32, tiny_heads=4)
REPO = Path(__file__).resolve().parent.parent
BOOK_CONFIGS = ("E1_eurosat", "E2")  # LoRA runs are in the tiny Study B grid
BROKEN = """id: E9_broken
family: full_vs_lora
description: Full FT on a dataset that is not on disk
data: {dataset: eurosat, synthetic_stand_in: false, split: heldout, root: no-such-data}
train: {method: full}
"""


# Study B's design in miniature: two methods × two learning rates × two seeds, one epoch.
TINY_GRID = """id: Bt
family: study_b
description: a tiny matched grid
grid:
  train.method: [full, lora]
  train.lr: [1.0e-3, 1.0e-2]
  seed: [7, 11]
data: {dataset: eurosat, split: heldout}
train: {epochs: 1}
eval: {zeroshot_datasets: [cifar100, cifar10]}
"""


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    return TINY


@pytest.fixture(scope="session")
def tiny_clip():
    return load_clip(TINY, seed=0)


@pytest.fixture(scope="session")
def pixels() -> torch.Tensor:
    """(6, 3, 224, 224) normalised synthetic images."""
    images, _ = synthetic_images(n_classes=3, per_class=2, seed=0)
    return normalize(resize_center_crop(images))


@pytest.fixture(scope="session")
def book(tmp_path_factory):
    """A smoke book of a few configurations (``E9_broken`` fails on purpose) and a tiny Study B
    grid, built once per session with the real notebooks, warnings as errors: (paths, report)."""
    root = tmp_path_factory.mktemp("book")
    params = root / "params"
    shutil.copytree(PARAMS_DIR / "profiles", params / "profiles")
    shutil.copy(PARAMS_DIR / FAMILIES_FILE, params / FAMILIES_FILE)
    (params / "experiments").mkdir()
    for i in BOOK_CONFIGS:
        shutil.copy(PARAMS_DIR / "experiments" / f"{i}.yaml", params / "experiments")
    (params / "experiments" / "E9_broken.yaml").write_text(BROKEN)
    (params / "experiments" / "Bt.yaml").write_text(TINY_GRID)
    shutil.copytree(REPO / "book", root / "book", ignore=shutil.ignore_patterns("executed"))
    shutil.copy(REPO / "_config.yml", root / "_config.yml")
    paths = BookPaths(root=root, notebooks=REPO / "notebooks", params=params, book=root / "book")
    report = run_book("smoke", paths, jobs=2)
    return paths, report
