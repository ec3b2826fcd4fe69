from __future__ import annotations

import dataclasses

import huggingface_hub.constants
import pytest
import torch
from transformers import CLIPModel

import collapse_utils.training.model as model_module
from collapse_utils.config import REPO_ROOT, LoraSpec, ModelSpec, TrainSpec
from collapse_utils.training.model import (
    CLIPClassifier,
    ModelUnavailableError,
    count_trainable,
    load_clip,
    merged_clip,
    prepare_for_training,
    vision_layers,
    zeroshot_clip,
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


def test_linear_probe_trains_only_the_head_and_keeps_the_encoder(tiny_clip, pixels):
    model = make(tiny_clip, method="linear_probe")
    assert count_trainable(model) == HIDDEN * CLASSES + CLASSES
    one_step(model, pixels)
    merged = merged_clip(model, tiny_clip)
    assert torch.equal(image_features(merged, pixels), image_features(tiny_clip, pixels))


def test_last_block_trains_the_last_layer_post_norm_projection_and_head(tiny_clip, pixels):
    model = make(tiny_clip, method="last_block")
    last = sum(p.numel() for p in vision_layers(model)[-1].parameters())
    norm = sum(p.numel() for p in model.vision_model.post_layernorm.parameters())
    projection = model.visual_projection.weight.numel()
    assert count_trainable(model) == last + norm + projection + HIDDEN * CLASSES + CLASSES
    model(pixels).sum().backward()
    for layer in vision_layers(model)[:-1]:
        assert all(p.grad is None for p in layer.parameters())
    assert all(p.grad is not None for p in vision_layers(model)[-1].parameters())


@pytest.mark.parametrize("method", ["full", "lora", "last_block"])
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


def test_the_reports_zero_shot_path_drops_lora_and_keeps_the_pretrained_projection(
    tiny_clip, pixels
):
    lora = make(tiny_clip, method="lora")
    one_step(lora, pixels)  # adapters and projection move
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    report = zeroshot_clip(lora, tiny_clip, "vision_base")
    assert torch.equal(image_features(report, pixels), image_features(tiny_clip, pixels))
    assert not torch.allclose(
        image_features(zeroshot_clip(lora, tiny_clip, "merged"), pixels),
        image_features(tiny_clip, pixels),
    )
    assert all(torch.equal(v, lora.state_dict()[k]) for k, v in before.items())  # untouched
    full = make(tiny_clip, method="full")
    one_step(full, pixels)
    ours, theirs = (
        zeroshot_clip(full, tiny_clip, "merged"),
        zeroshot_clip(full, tiny_clip, "vision_base"),
    )
    assert torch.equal(theirs.visual_projection.weight, tiny_clip.visual_projection.weight)
    assert torch.equal(ours.visual_projection.weight, full.visual_projection.weight)
    for a, b in zip(theirs.vision_model.parameters(), full.vision_model.parameters(), strict=True):
        assert torch.equal(a, b)  # the fine-tuned tower, in both paths
    with pytest.raises(ValueError, match="merged or vision_base"):
        zeroshot_clip(full, tiny_clip, "adapters")


def test_missing_hub_model_offline_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(source="hub", name=str(tmp_path / "no-such-clip"))
    with pytest.raises(ModelUnavailableError, match="no-such-clip"):
        load_clip(spec)


def test_tiny_clip_has_vit_b32_geometry(tiny_clip):
    vision = tiny_clip.config.vision_config
    assert (vision.image_size, vision.patch_size) == (224, 32)
    assert vision.num_hidden_layers == LAYERS


# --- offline model lookup -------------------------------------------------------------------

MISSING_HUB_ID = "collapse-utils-tests/no-such-clip"


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """Every ``CLIPModel.from_pretrained`` call's keyword arguments (the calls still run)."""
    calls: list[dict] = []
    original = CLIPModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(spy))
    return calls


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_hub_model_missing_with_hf_hub_offline_fails_without_asking_the_hub(
    monkeypatch, empty_hub_cache, from_pretrained_calls
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(model_module, "hub_unreachable", lambda *a: pytest.fail("hub probed"))
    with pytest.raises(ModelUnavailableError) as err:
        load_clip(ModelSpec(source="hub", name=MISSING_HUB_ID))
    message = str(err.value)
    assert MISSING_HUB_ID in message and str(empty_hub_cache) in message
    assert "HF_HUB_OFFLINE" in message
    assert f"CLIPModel.from_pretrained('{MISSING_HUB_ID}').save_pretrained(" in message
    assert from_pretrained_calls and all(c["local_files_only"] for c in from_pretrained_calls)


def test_hub_model_missing_with_the_hub_unreachable_fails_after_one_probe(
    monkeypatch, empty_hub_cache, from_pretrained_calls
):
    # Port 9 (discard) on loopback refuses at once: an unreachable hub without any network.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelUnavailableError) as err:
        load_clip(ModelSpec(source="hub", name=MISSING_HUB_ID))
    message = str(err.value)
    assert "http://127.0.0.1:9 cannot be reached" in message and MISSING_HUB_ID in message
    # Only local lookups ran: no download attempt, so none of the hub client's retries.
    assert from_pretrained_calls and all(c["local_files_only"] for c in from_pretrained_calls)


def test_local_model_folder_without_weights_names_the_folder(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    with pytest.raises(ModelUnavailableError) as err:
        load_clip(ModelSpec(source="hub", name=str(folder)))
    assert str(folder) in str(err.value) and f".save_pretrained('{folder}')" in str(err.value)


def test_model_saved_to_a_folder_loads_by_path_without_the_hub(tmp_path, monkeypatch, tiny_spec):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_clip(tiny_spec, seed=0).save_pretrained(tmp_path / "clip")
    spec = ModelSpec(source="hub", name=str(tmp_path / "clip"), vision_layers=LAYERS)
    assert load_clip(spec).config.vision_config.hidden_size == HIDDEN


def test_model_name_is_a_folder_when_it_exists_or_looks_like_a_path(tmp_path):
    def folder(name: str, **mirrors):
        return ModelSpec(name=name, mirrors=mirrors).folder()

    assert folder("openai/clip-vit-base-patch32") is None
    assert folder(str(tmp_path)) == tmp_path.resolve()
    assert folder(str(tmp_path / "absent")) == (tmp_path / "absent").resolve()
    assert folder("../elsewhere/clip") == (REPO_ROOT / "../elsewhere/clip").resolve()
    assert folder("a/b", **{"a/b": str(tmp_path)}) == tmp_path  # a mirror of a hub id


def test_a_loaded_model_with_another_patch_size_than_the_spec_is_refused(tmp_path, tiny_spec):
    load_clip(dataclasses.replace(tiny_spec, patch_size=16)).save_pretrained(tmp_path / "b16")
    spec = ModelSpec(name=str(tmp_path / "b16"), vision_layers=LAYERS)  # patch 32 expected
    with pytest.raises(ModelUnavailableError, match="patch size 16 but model.patch_size is 32"):
        load_clip(spec)
    b16 = load_clip(dataclasses.replace(spec, patch_size=16))
    images = torch.zeros(1, 3, 224, 224)
    tokens = b16.vision_model(pixel_values=images).last_hidden_state.shape[1]
    assert tokens == 1 + (224 // 16) ** 2  # [CLS] and 14 × 14 patches
