"""Measurements of a model during a run: [CLS] attention snapshots, accuracy, zero-shot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from collapse_utils.config import EvalSpec, RunConfig
from collapse_utils.measurement.attention import capture_cls_attention
from collapse_utils.measurement.metrics import METRICS, layer_metrics
from collapse_utils.measurement.regularizers import attention_kl
from collapse_utils.run_record import ZeroShotRecord
from collapse_utils.storage import cache_key, cached
from collapse_utils.training.data import ImageSet, normalize
from collapse_utils.training.environment import autocast
from collapse_utils.training.model import merged_clip
from collapse_utils.training.zeroshot import cached_text_classifier, zeroshot_accuracy

EVAL_BATCH = 256


@torch.no_grad()
def cls_attention(model: nn.Module, images: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Eval-mode [CLS] attention of ``images`` (N, 3, S, S) uint8 → (N, layers, heads, tokens)."""
    was_training = model.training
    model.eval()
    rows = []
    for start in range(0, len(images), EVAL_BATCH):
        with capture_cls_attention(model) as cap, autocast(images.device, dtype):
            model(normalize(images[start : start + EVAL_BATCH]))
        rows.append(cap.tensor)
    model.train(was_training)
    return torch.cat(rows)


@dataclass(frozen=True)
class Snapshot:
    """One tracking point: per-layer metrics, per-layer KL(initial ‖ current) in nats, and the
    [CLS] maps (map_images, layers, heads, tokens) of the first metric images, float16."""

    metrics: dict[str, list[float]]
    kl_to_initial: list[float]
    maps: Tensor


def snapshot(
    model: nn.Module,
    images: Tensor,
    initial: Tensor,
    map_images: int,
    dtype=None,
    eval_spec: EvalSpec | None = None,
) -> Snapshot:
    """Track attention on the metric subset ``images``; ``initial`` is its pre-trained attention.
    ``eval_spec`` sets the head-diversity mode and the metric batch (see ``layer_metrics``)."""
    attn = cls_attention(model, images, dtype)
    spec = eval_spec or EvalSpec()
    metrics = layer_metrics(attn, diversity=spec.head_diversity, metric_batch=spec.metric_batch)
    kl = attention_kl(attn, initial, reduce_dims=(0, 2))
    return Snapshot(
        metrics={name: metrics[name].tolist() for name in METRICS},
        kl_to_initial=kl.tolist(),
        maps=attn[:map_images].to(torch.float16).cpu(),
    )


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, dtype=None) -> float:
    """Top-1 accuracy of the classifier on uint8 ``images`` (N, 3, S, S), ``labels`` (N,)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), EVAL_BATCH):
        with autocast(images.device, dtype):
            logits = model(normalize(images[start : start + EVAL_BATCH]))
        correct += (logits.argmax(-1) == labels[start : start + EVAL_BATCH]).sum().item()
    model.train(was_training)
    return correct / len(images)


def evaluate_zeroshot(
    model: nn.Module, base_clip, config: RunConfig, test_sets: dict[str, ImageSet]
) -> dict[str, ZeroShotRecord]:
    """Zero-shot accuracy of the fine-tuned vision tower (LoRA merged) with the original text
    tower, and of the pre-trained CLIP, per dataset."""
    clip = merged_clip(model, base_clip)
    cache = Path(config.output_root) / "cache"
    results = {}
    for name, images in test_sets.items():
        weights = cached_text_classifier(
            base_clip, config.model, images.class_names, config.eval.templates,
            cache / "text", config.seed,
        )  # fmt: skip
        pretrained = _cached_pretrained_zeroshot(base_clip, config, name, images, weights, cache)
        results[name] = ZeroShotRecord(
            accuracy=zeroshot_accuracy(clip, images, weights, desc=f"zero-shot {name}"),
            pretrained_accuracy=pretrained,
            templates=config.eval.templates,
            n_images=len(images),
            checkpoint=config.eval.zeroshot_checkpoint,
        )
    return results


def _cached_pretrained_zeroshot(base_clip, config, name, images, weights, cache: Path) -> float:
    # The pre-trained model's accuracy is the same for every run that shares these inputs.
    key = cache_key(config.model, config.seed, name, config.data, images.class_names,
                    config.eval.templates, len(images))  # fmt: skip
    path = cache / "zeroshot_pretrained" / f"{key}.json"

    def compute() -> dict[str, float]:
        desc = f"zero-shot {name} (pre-trained)"
        return {"accuracy": zeroshot_accuracy(base_clip, images, weights, desc=desc)}

    return cached(path, compute, fmt="json")["accuracy"]
