from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from collapse_utils.config import LoraSpec, TrainSpec
from collapse_utils.measurement.attention import capture_cls_attention, vision_attention_modules
from collapse_utils.measurement.metrics import layer_metrics
from collapse_utils.training.model import CLIPClassifier, load_clip, prepare_for_training


@pytest.fixture(scope="module")
def eager_clip(tiny_clip, tiny_spec):
    """The same weights as ``tiny_clip`` with eager attention (which returns attention maps)."""
    eager = load_clip(dataclasses.replace(tiny_spec, attn_implementation="eager"), seed=0)
    eager.load_state_dict(tiny_clip.state_dict())
    return eager


@pytest.fixture(scope="module")
def double_models(tiny_clip, eager_clip):
    """float64 copies: the 1e-6 comparison then measures the method, not float32 rounding
    (the tiny model's rows are peaked, max weight ≈ 0.9997)."""
    return copy.deepcopy(tiny_clip).double(), copy.deepcopy(eager_clip).double()


def eager_cls_rows(eager_clip, pixels):
    out = eager_clip.vision_model(pixel_values=pixels, output_attentions=True)
    return torch.stack([a[:, :, 0, :] for a in out.attentions], dim=1)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_capture_matches_eager_attention(double_models, pixels, implementation):
    sdpa, eager = double_models
    expected = eager_cls_rows(eager, pixels.double())
    model = sdpa if implementation == "sdpa" else eager
    with torch.no_grad(), capture_cls_attention(model) as cap:
        model.vision_model(pixel_values=pixels.double())
    assert cap.tensor.shape == (6, 3, 4, 50)
    assert (cap.tensor - expected).abs().max() < 1e-6


def test_capture_matches_eager_attention_in_float32(tiny_clip, eager_clip, pixels):
    expected = eager_cls_rows(eager_clip, pixels)
    with torch.no_grad(), capture_cls_attention(tiny_clip) as cap:
        tiny_clip.vision_model(pixel_values=pixels)
    assert (cap.tensor - expected).abs().max() < 1e-5


def test_capture_is_differentiable_through_lora(tiny_clip, pixels):
    model = prepare_for_training(
        CLIPClassifier(tiny_clip, n_classes=3), TrainSpec(method="lora"), LoraSpec(rank=2)
    )
    assert len(vision_attention_modules(model)) == 3
    with capture_cls_attention(model) as cap:
        model(pixels)
    assert torch.allclose(cap.tensor.sum(-1), torch.ones(6, 3, 4), atol=1e-5)
    cap.tensor[..., 1:].pow(2).sum().backward()
    # lora_B starts at zero, so the gradient shows up on B first.
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n and "q_proj" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_hooks_are_removed_after_the_block(tiny_clip, pixels):
    modules = vision_attention_modules(tiny_clip)
    with capture_cls_attention(tiny_clip):
        assert all(m.k_proj._forward_hooks and m.q_proj._forward_hooks for m in modules)
    assert all(not m.k_proj._forward_hooks and not m.q_proj._forward_hooks for m in modules)


def test_capture_without_a_forward_pass_is_an_error(tiny_clip):
    with capture_cls_attention(tiny_clip) as cap, pytest.raises(RuntimeError, match="no forward"):
        _ = cap.tensor


def test_tiny_clip_capture_gives_four_finite_per_layer_metrics(tiny_clip, pixels):
    with torch.no_grad(), capture_cls_attention(tiny_clip) as cap:
        tiny_clip.vision_model(pixel_values=pixels)
    metrics = layer_metrics(cap.tensor)
    assert len(metrics) == 4
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in metrics.values())
