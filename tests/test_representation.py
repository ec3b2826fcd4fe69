from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import PeftModel

from collapse_utils.config import LoraSpec, TrainSpec
from collapse_utils.measurement.representation import (
    embedding_drift,
    layer_cka,
    linear_cka,
    weight_drift,
)
from collapse_utils.training.data import normalize, resize_center_crop, synthetic_images
from collapse_utils.training.evaluation import Reference, eval_pass, snapshot, vision_weights
from collapse_utils.training.experiment import run_experiment
from collapse_utils.training.model import CLIPClassifier, prepare_for_training
from tests.test_train import small


def numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019), eq. for linear CKA, written out directly."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """(6, 3, 224, 224) uint8 synthetic images."""
    return resize_center_crop(synthetic_images(n_classes=3, per_class=2, seed=0)[0])


def test_linear_cka_matches_a_direct_numpy_implementation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    y = x[:, :5] @ rng.normal(size=(5, 6)) + 0.5 * rng.normal(size=(50, 6))
    expected = numpy_cka(x, y)
    assert 0.1 < expected < 0.99
    assert linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y)) == pytest.approx(
        expected, rel=1e-6
    )


def test_cka_is_one_under_rotation_isotropic_scale_and_translation():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x @ rotation + 7.0) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x * torch.arange(1.0, 7.0)) < 0.99  # anisotropic scale is a change


def test_layer_cka_gives_one_value_per_layer():
    x = torch.randn(3, 20, 4)
    assert layer_cka(x, x) == pytest.approx([1.0, 1.0, 1.0])


def test_embedding_drift_is_zero_for_equal_directions_and_one_for_orthogonal():
    a = torch.randn(10, 5)
    assert embedding_drift(a, 2.5 * a) == pytest.approx(0.0, abs=1e-12)
    assert embedding_drift(torch.eye(2), torch.eye(2).flip(0)) == pytest.approx(1.0)


def test_weight_drift_of_a_hand_made_pair():
    initial = {"a": torch.tensor([3.0, 4.0]), "b": torch.zeros(2, 2)}
    current = {"a": torch.tensor([4.0, 4.0]), "b": torch.tensor([[0.0, 2.0], [0.0, 0.0]])}
    # ‖θ − θ₀‖ = √(1 + 4), ‖θ₀‖ = 5
    assert weight_drift(current, initial) == pytest.approx(np.sqrt(5) / 5)
    assert weight_drift(initial, initial) == 0.0


def test_vision_weights_of_lora_are_the_merged_weights_under_plain_names(tiny_clip):
    model = prepare_for_training(CLIPClassifier(tiny_clip, 3), TrainSpec(method="lora"),
                                 LoraSpec(rank=4))  # fmt: skip
    assert isinstance(model, PeftModel)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    merged = copy.deepcopy(model).merge_and_unload().vision_model.state_dict()
    weights = vision_weights(model)
    assert set(weights) == set(tiny_clip.vision_model.state_dict())
    assert all(torch.allclose(weights[name], merged[name], atol=1e-6) for name in merged)
    assert weight_drift(weights, tiny_clip.vision_model.state_dict()) > 0.01


def test_snapshot_of_the_pretrained_model_has_cka_one_and_no_drift(tiny_clip, images):
    model = CLIPClassifier(tiny_clip, 3)
    reference = Reference.of(model, images)
    assert reference.cls_tokens.shape == (3, 6, 32) and reference.embeddings.shape == (6, 32)
    snap = snapshot(model, images, reference, map_images=2)
    assert snap.cka == pytest.approx([1.0] * 3)
    assert (snap.embedding_drift, snap.weight_drift) == pytest.approx((0.0, 0.0), abs=1e-7)


def test_embeddings_are_the_classifier_features(tiny_clip, images):
    model = CLIPClassifier(tiny_clip, 3).eval()
    with torch.no_grad():
        features = model.features(normalize(images))
    assert torch.allclose(eval_pass(model, images, features=True).embeddings, features, atol=1e-6)


def test_without_representation_the_snapshot_has_no_signals(tiny_clip, images):
    model = CLIPClassifier(tiny_clip, 3)
    reference = Reference.of(model, images, representation=False)
    assert reference.weights is None
    snap = snapshot(model, images, reference, map_images=2)
    assert (snap.cka, snap.embedding_drift, snap.weight_drift) == (None, None, None)
    assert snapshot(model, images, reference.attention, map_images=2).cka is None


@pytest.mark.parametrize("experiment", ["E2", "E5"])
def test_a_run_starts_at_cka_one_and_no_drift_and_moves_away(tmp_path, experiment):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_experiment(small(tmp_path, experiment), progress=False)
    first, *trained = result.history.evals
    assert first.cka == pytest.approx([1.0] * 3)
    assert (first.embedding_drift, first.weight_drift) == pytest.approx((0.0, 0.0), abs=1e-7)
    last = trained[-1]
    assert len(last.cka) == 3 and all(0 < c < 1 for c in last.cka)
    assert last.embedding_drift > 1e-3 and last.weight_drift > 1e-4
    assert any(e.epoch == 1.0 and e.cka is not None for e in trained)
    events = EventAccumulator(str(result.files.tensorboard)).Reload()
    cka = events.Scalars("representation/cka_mean")
    assert [e.step for e in cka] == [e.step for e in result.history.evals]
    assert cka[-1].value == pytest.approx(np.mean(last.cka))
    assert events.Scalars("representation/weight_drift")[0].value == pytest.approx(0, abs=1e-6)


def test_a_run_without_representation_records_none(tmp_path):
    config = small(tmp_path, "E2", eval={"representation": False}, train={"epochs": 1})
    history = run_experiment(config, progress=False).history
    assert all(e.cka is None and e.weight_drift is None for e in history.evals)
