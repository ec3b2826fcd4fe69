"""Measurements of a model during a run: [CLS] attention and representation snapshots,
accuracy, zero-shot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from collapse_utils.config import EvalSpec, RunConfig
from collapse_utils.measurement.attention import capture_cls_attention
from collapse_utils.measurement.metrics import METRICS, layer_metrics
from collapse_utils.measurement.regularizers import attention_kl
from collapse_utils.measurement.representation import embedding_drift, layer_cka, weight_drift
from collapse_utils.run_record import ZeroShotRecord
from collapse_utils.storage import cache_key, cached
from collapse_utils.training.data import ImageSet, normalize
from collapse_utils.training.environment import autocast
from collapse_utils.training.model import zeroshot_clip
from collapse_utils.training.zeroshot import (
    cached_text_classifier,
    prompt_names,
    zeroshot_accuracy,
)

EVAL_BATCH = 256


@dataclass(frozen=True)
class EvalPass:
    """One eval-mode forward of N images: [CLS] attention (N, layers, heads, tokens) and, when
    asked for, the [CLS] token after each encoder layer (layers, N, D) and the image embeddings
    (N, P) (``features()``: pooler → visual projection), both float32."""

    attention: Tensor
    cls_tokens: Tensor | None = None
    embeddings: Tensor | None = None


@torch.no_grad()
def eval_pass(model: nn.Module, images: Tensor, dtype=None, features: bool = False) -> EvalPass:
    """:class:`EvalPass` of uint8 ``images`` (N, 3, S, S), a classifier plain or PEFT-wrapped
    (or a CLIPModel: anything with ``vision_model`` and ``visual_projection``)."""
    base = _base(model)
    was_training = model.training
    model.eval()
    attention, tokens, embeddings = [], [], []
    with capture_cls_attention(model) as cap:
        for start in range(0, len(images), EVAL_BATCH):
            pixels = normalize(images[start : start + EVAL_BATCH])
            with autocast(images.device, dtype):
                out = base.vision_model(pixel_values=pixels, output_hidden_states=features)
                if features:
                    embeddings.append(base.visual_projection(out.pooler_output).float())
                    tokens.append(torch.stack([h[:, 0] for h in out.hidden_states[1:]]).float())
            attention.append(cap.take())
    model.train(was_training)
    if not features:
        return EvalPass(torch.cat(attention))
    return EvalPass(torch.cat(attention), torch.cat(tokens, dim=1), torch.cat(embeddings))


def cls_attention(model: nn.Module, images: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Eval-mode [CLS] attention of ``images`` (N, 3, S, S) uint8 → (N, layers, heads, tokens)."""
    return eval_pass(model, images, dtype).attention


@torch.no_grad()
def vision_weights(model: nn.Module) -> dict[str, Tensor]:
    """The vision tower's effective parameters under their plain names: a LoRA-adapted Linear
    counts as W + Σ B·A·α/r over its active adapters (unless merged already). The parameters
    themselves, not copies, except those merged weights."""
    vision = _base(model).vision_model
    weights = {}
    for name, module in vision.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            delta = sum(module.get_delta_weight(a) for a in adapters)
            weights[f"{name}.weight"] = module.get_base_layer().weight + delta
    for name, param in vision.named_parameters():
        if "lora_" not in name:
            weights.setdefault(name.replace(".base_layer.", "."), param)
    return weights


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


@dataclass(frozen=True)
class Reference:
    """The pre-trained model on the metric subset, measured once per run before training:
    [CLS] attention (N, layers, heads, tokens) and, for the representation signals, [CLS]
    tokens (layers, N, D), embeddings (N, P) and the vision tower's weights θ₀ (copies)."""

    attention: Tensor
    cls_tokens: Tensor | None = None
    embeddings: Tensor | None = None
    weights: dict[str, Tensor] | None = None

    @classmethod
    def of(cls, model: nn.Module, images: Tensor, dtype=None, representation: bool = True):
        measured = eval_pass(model, images, dtype, features=representation)
        if not representation:
            return cls(measured.attention)
        weights = {name: w.detach().clone() for name, w in vision_weights(model).items()}
        return cls(measured.attention, measured.cls_tokens, measured.embeddings, weights)

    @property
    def representation(self) -> bool:
        return self.weights is not None


@dataclass(frozen=True)
class Snapshot:
    """One tracking point: per-layer metrics, per-layer KL(initial ‖ current) in nats, the
    [CLS] maps (map_images, layers, heads, tokens) of the first metric images, float16, and,
    with a representation reference, per-layer linear CKA of the [CLS] tokens, embedding drift
    and relative weight drift of the vision tower (see ``measurement.representation``)."""

    metrics: dict[str, list[float]]
    kl_to_initial: list[float]
    maps: Tensor
    cka: list[float] | None = None
    embedding_drift: float | None = None
    weight_drift: float | None = None


def snapshot(
    model: nn.Module,
    images: Tensor,
    initial: Tensor | Reference,
    map_images: int,
    dtype=None,
    eval_spec: EvalSpec | None = None,
) -> Snapshot:
    """Track the model on the metric subset ``images``; ``initial`` is its pre-trained attention
    or a :class:`Reference` (which adds the representation signals when it holds them).
    ``eval_spec`` sets the head-diversity mode and the metric batch (see ``layer_metrics``)."""
    reference = initial if isinstance(initial, Reference) else Reference(initial)
    measured = eval_pass(model, images, dtype, features=reference.representation)
    attn = measured.attention
    spec = eval_spec or EvalSpec()
    metrics = layer_metrics(attn, diversity=spec.head_diversity, metric_batch=spec.metric_batch)
    kl = attention_kl(attn, reference.attention, reduce_dims=(0, 2))
    signals = {}
    if reference.representation:
        signals = {
            "cka": layer_cka(reference.cls_tokens, measured.cls_tokens),
            "embedding_drift": embedding_drift(reference.embeddings, measured.embeddings),
            "weight_drift": weight_drift(vision_weights(model), reference.weights),
        }
    return Snapshot(
        metrics={name: metrics[name].tolist() for name in METRICS},
        kl_to_initial=kl.tolist(),
        maps=attn[:map_images].to(torch.float16).cpu(),
        **signals,
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
    model: nn.Module,
    base_clip,
    config: RunConfig,
    test_sets: dict[str, ImageSet],
    trained_too: bool = True,
) -> dict[str, ZeroShotRecord]:
    """Zero-shot accuracy of the fine-tuned vision tower (``eval.zeroshot_weights``: LoRA
    merged, or the report's vision-base-only path, then with ``trained_too`` also the trained
    model's, ``merged_accuracy``) with the original text tower, and of the pre-trained CLIP,
    per dataset."""
    weights = config.eval.zeroshot_weights
    clip = zeroshot_clip(model, base_clip, weights)
    trained = None
    if trained_too and weights != "merged":
        trained = zeroshot_clip(model, base_clip, "merged")
    cache = Path(config.output_root) / "cache"
    results = {}
    for name, images in test_sets.items():
        names = prompt_names(images, config.eval.class_names)
        text = cached_text_classifier(
            base_clip, config.model, names, config.eval.templates, cache / "text", config.seed
        )
        pretrained = _cached_pretrained_zeroshot(
            base_clip, config, name, images, text, cache, prompts=names
        )
        merged = None
        if trained is not None:
            merged = zeroshot_accuracy(trained, images, text, desc=f"zero-shot {name} (trained)")
        results[name] = ZeroShotRecord(
            accuracy=zeroshot_accuracy(clip, images, text, desc=f"zero-shot {name}"),
            pretrained_accuracy=pretrained,
            templates=config.eval.templates,
            n_images=len(images),
            checkpoint=config.eval.zeroshot_checkpoint,
            weights=weights,
            merged_accuracy=merged,
        )
    return results


def _cached_pretrained_zeroshot(
    base_clip, config, name, images, weights, cache: Path, *, prompts: tuple[str, ...]
) -> float:
    # The pre-trained model's accuracy is the same for every run that shares these inputs.
    key = cache_key(config.model, config.seed, name, config.data, prompts,
                    config.eval.templates, len(images))  # fmt: skip
    path = cache / "zeroshot_pretrained" / f"{key}.json"

    def compute() -> dict[str, float]:
        desc = f"zero-shot {name} (pre-trained)"
        return {"accuracy": zeroshot_accuracy(base_clip, images, weights, desc=desc)}

    return cached(path, compute, fmt="json")["accuracy"]
