from __future__ import annotations

import math

import pytest
import torch

from collapse_utils.measurement.metrics import cls_to_patch, entropy
from collapse_utils.measurement.regularizers import (
    apr_penalty,
    attention_kl,
    entropy_floor_penalty,
)


def _row(*patches: float, cls_weight: float = 0.2) -> list[float]:
    """A [CLS] row whose patch part renormalises to ``patches``."""
    return [cls_weight] + [(1 - cls_weight) * w for w in patches]


def _one(row: list[float]) -> torch.Tensor:
    """(1 image, 1 layer, 1 head, tokens)."""
    return torch.tensor(row).view(1, 1, 1, -1)


# Pre-trained [.5, .5], current [.75, .25] (with CLS weights that renormalisation drops).
INITIAL = _one(_row(0.5, 0.5, cls_weight=0.2))
CURRENT = _one(_row(0.75, 0.25, cls_weight=0.6))
KL_INITIAL_CURRENT = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # ½ ln(4/3)
KL_CURRENT_INITIAL = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)


def test_apr_default_is_kl_from_initial_to_current_the_original_direction_swaps_it():
    assert apr_penalty(CURRENT, INITIAL, lam=2.0).item() == pytest.approx(2 * KL_INITIAL_CURRENT)
    original = apr_penalty(CURRENT, INITIAL, lam=2.0, direction="current_to_initial")
    assert original.item() == pytest.approx(2 * KL_CURRENT_INITIAL)
    assert KL_INITIAL_CURRENT == pytest.approx(0.143841, abs=1e-6)
    assert KL_CURRENT_INITIAL == pytest.approx(0.130812, abs=1e-6)


def test_attention_kl_direction_per_layer():
    current = torch.cat([CURRENT, INITIAL], dim=1)  # layer 1 unchanged
    initial = torch.cat([INITIAL, INITIAL], dim=1)
    default = attention_kl(current, initial, reduce_dims=(0, 2))
    swapped = attention_kl(current, initial, reduce_dims=(0, 2), direction="current_to_initial")
    assert default.tolist() == pytest.approx([KL_INITIAL_CURRENT, 0.0], abs=1e-7)
    assert swapped.tolist() == pytest.approx([KL_CURRENT_INITIAL, 0.0], abs=1e-7)


def test_apr_default_equals_todays_formula_on_random_rows():
    torch.manual_seed(0)
    current = torch.rand(3, 4, 2, 10).softmax(-1)
    initial = torch.rand(3, 4, 2, 10).softmax(-1)
    p, p0 = cls_to_patch(current), cls_to_patch(initial)
    today = (p0 * (p0.log() - p.log())).sum(-1).mean()
    assert apr_penalty(current, initial, 0.3).item() == pytest.approx(0.3 * today.item(), rel=1e-5)


def test_original_apr_has_finite_gradient_when_a_current_patch_weight_is_zero():
    current = _one(_row(1.0, 0.0)).requires_grad_(True)
    loss = apr_penalty(current, INITIAL, 1.0, direction="current_to_initial")
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(current.grad).all()


def _floor_case() -> torch.Tensor:
    """(2 images, 2 layers, 1 head, 3 tokens). Entropies in nats:
    layer 0: image 0 one-hot (0), image 1 uniform (ln 2);
    layer 1: image 0 [.75, .25] (H ≈ 0.5623), image 1 one-hot (0)."""
    rows = [
        [_row(1.0, 0.0), _row(0.75, 0.25)],
        [_row(0.5, 0.5), _row(0.0, 1.0)],
    ]
    return torch.tensor(rows).unsqueeze(2)


BASELINE = torch.tensor([math.log(2), 0.5])
H_75_25 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))


def test_floor_case_entropies_are_as_described():
    h = entropy(cls_to_patch(_floor_case().double()))[:, :, 0]
    assert h.flatten().tolist() == pytest.approx([0.0, H_75_25, math.log(2), 0.0], rel=1e-6)


def test_original_entropy_floor_is_seventy_percent_of_baseline_summed_over_layers():
    penalty = entropy_floor_penalty(
        _floor_case(), BASELINE, lam=0.5, ratio=0.7, layer_reduction="sum"
    )
    # floors 0.7·ln 2 and 0.35; per layer the mean over the two images of relu(floor − H).
    layer0 = ((0.7 * math.log(2) - 0.0) + 0.0) / 2  # image 0 (H 0) below, image 1 (ln 2) above
    layer1 = (0.0 + (0.7 * 0.5 - 0.0)) / 2  # image 0 (0.5623) above, image 1 (H 0) below
    assert penalty.item() == pytest.approx(0.5 * (layer0 + layer1), rel=1e-6)
    assert penalty.item() == pytest.approx(0.208800, abs=1e-6)


def test_default_entropy_floor_is_the_full_baseline_averaged_over_layers():
    penalty = entropy_floor_penalty(_floor_case(), BASELINE, 0.5)
    layer0 = ((math.log(2) - 0.0) + 0.0) / 2  # floor ln 2: image 0 below, image 1 at the floor
    layer1 = (0.0 + (0.5 - 0.0)) / 2  # floor 0.5: image 0 (0.5623) above, image 1 below
    assert penalty.item() == pytest.approx(0.5 * (layer0 + layer1) / 2, rel=1e-6)
    explicit = entropy_floor_penalty(
        _floor_case(), BASELINE, 0.5, ratio=1.0, layer_reduction="mean"
    )
    assert torch.equal(penalty, explicit)


def test_regularizers_reject_unknown_options():
    with pytest.raises(ValueError, match="direction"):
        apr_penalty(CURRENT, INITIAL, 1.0, direction="both")
    with pytest.raises(ValueError, match="layer_reduction"):
        entropy_floor_penalty(_floor_case(), BASELINE, 1.0, layer_reduction="max")
