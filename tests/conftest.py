from __future__ import annotations

import pytest
import torch

from collapse_utils.config import ModelSpec
from collapse_utils.training.data import normalize, resize_center_crop, synthetic_images
from collapse_utils.training.model import load_clip

TINY = ModelSpec(source="tiny", vision_layers=3, tiny_hidden=32, tiny_heads=4)


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
