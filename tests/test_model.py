from __future__ import annotations

import pytest
import torch

from collapse_utils.config import LoraSpec, ModelSpec, TrainSpec
from collapse_utils.training.model import (
    CLIPClassifier,
    ModelUnavailableError,
    count_trainable,
    load_clip,
    merged_clip,
    prepare_for_training,
    vision_layers,
)

HIDDEN, LAYERS, CLASSES = 32, 3, 5


def make(tiny_clip, method="full", **train):
    classifier = CLIPClassifier(tiny_clip, n_classes=CLASSES, seed=0)
    return prepare_for_training(
        classifier, TrainSpec(method=method, **train), LoraSpec(rank=4, alpha=8)
    )


def one_step(model, pixels):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(pixels), torch.arange(len(pixels)) % CLASSES)
    loss.backward()
    optimizer.step()


def image_features(clip, pixels):
    with torch.no_grad():
        return clip.get_image_features(pixel_values=pixels).pooler_output


def test_full_fine_tuning_trains_every_parameter(tiny_clip):
    model = make(tiny_clip)
    assert count_trainable(model) == sum(p.numel() for p in model.parameters())


def test_lora_trains_only_adapters_on_vision_attention_and_the_head(tiny_clip):
    model = make(tiny_clip, method="lora")
    rank, modules = 4, 2  # q_proj and v_proj
    lora = LAYERS * modules * (rank * HIDDEN + HIDDEN * rank)
    head = HIDDEN * CLASSES + CLASSES
    assert count_trainable(model) == lora + head
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or ".head." in n for n in trainable)
    assert all("vision_model" in n for n in trainable if "lora_" in n)


def test_lora_qkvo_targets_four_modules(tiny_clip):
    classifier = CLIPClassifier(tiny_clip, n_classes=CLASSES)
    spec = LoraSpec(rank=2, targets=("q_proj", "k_proj", "v_proj", "out_proj"))
    model = prepare_for_training(classifier, TrainSpec(method="lora"), spec)
    lora_modules = {n.split(".lora_")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert len(lora_modules) == LAYERS * 4


def test_frozen_layers_get_no_gradient(tiny_clip, pixels):
    model = make(tiny_clip, freeze_layers=2)
    loss = model(pixels).sum()
    loss.backward()
    layers = vision_layers(model)
    for layer in layers[:2]:
        assert all(p.grad is None and not p.requires_grad for p in layer.parameters())
    assert all(p.grad is not None for p in layers[2].parameters())
    assert model.vision_model.embeddings.patch_embedding.weight.grad is None


@pytest.mark.parametrize("method", ["full", "lora"])
def test_merged_model_differs_from_base_after_one_step(tiny_clip, pixels, method):
    model = make(tiny_clip, method=method)
    one_step(model, pixels)
    merged = merged_clip(model, tiny_clip)
    assert not torch.allclose(image_features(merged, pixels), image_features(tiny_clip, pixels))
    # The text tower stays the pre-trained one.
    for a, b in zip(merged.text_model.parameters(), tiny_clip.text_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_merged_lora_clip_reproduces_the_adapted_features(tiny_clip, pixels):
    model = make(tiny_clip, method="lora")
    one_step(model, pixels)
    model.eval()
    with torch.no_grad():
        adapted = model.base_model.model.features(pixels)
    merged = image_features(merged_clip(model, tiny_clip), pixels)
    assert torch.allclose(merged, adapted, rtol=1e-4, atol=1e-4)


def test_missing_hub_model_offline_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(source="hub", name=str(tmp_path / "no-such-clip"))
    with pytest.raises(ModelUnavailableError, match="no-such-clip"):
        load_clip(spec)


def test_tiny_clip_has_vit_b32_geometry(tiny_clip):
    vision = tiny_clip.config.vision_config
    assert (vision.image_size, vision.patch_size) == (224, 32)
    assert vision.num_hidden_layers == LAYERS
