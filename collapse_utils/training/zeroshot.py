"""CLIP zero-shot classification with a (fine-tuned, merged) vision tower and the original text
tower.

Text embeddings depend only on the text tower, the class names and the templates. Every run
keeps the pre-trained text tower, so the class-weight matrix is computed once per model, dataset
and template set and cached on disk under ``<output_root>/cache/text/``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from torch import Tensor
from tqdm import tqdm  # text bars: TQDM_DISABLE silences them in executed pages
from transformers import AutoTokenizer, CLIPModel, CLIPTokenizer

from collapse_utils.config import ModelSpec
from collapse_utils.storage import cache_key, cached
from collapse_utils.training.data import ImageSet, normalize
from collapse_utils.training.model import TINY_VOCAB_SIZE

TEMPLATES: dict[str, tuple[str, ...]] = {
    "original": ("a photo of a {}",),  # the report's code: no period
    "single": ("a photo of a {}.",),
    # CLIP's seven best general-purpose ImageNet templates plus the plain one.
    "ensemble": (
        "a photo of a {}.",
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    ),
}


def prompt_names(images: ImageSet, style: str) -> tuple[str, ...]:
    """The class names that fill the prompts (``eval.class_names``): ``readable`` (CLIP's
    authors' names, labels.py), ``build`` (the source's own, as stored: 'aquarium_fish' and
    Flowers-102's '1'…'102', the report's code) or ``build_spaced`` (those with underscores as
    spaces, study2's). A source with no names of its own gives the readable ones."""
    if style == "readable" or not images.build_names:
        return images.class_names
    if style == "build":
        return images.build_names
    if style == "build_spaced":
        return tuple(name.replace("_", " ") for name in images.build_names)
    raise ValueError(f"eval.class_names must be readable, build or build_spaced, got {style!r}")


def tiny_tokenizer() -> CLIPTokenizer:
    """An offline CLIP tokenizer for the tiny model: byte-level symbols (and their end-of-word
    forms) with no merges, so any text tokenises to bytes. Ids match ``model.TINY_VOCAB_SIZE``."""
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = TINY_VOCAB_SIZE - 2
    vocab["<|endoftext|>"] = TINY_VOCAB_SIZE - 1
    return CLIPTokenizer(vocab=vocab, merges=[])


def load_tokenizer(spec: ModelSpec):
    if spec.source == "tiny":
        return tiny_tokenizer()
    return AutoTokenizer.from_pretrained(spec.folder() or spec.name)


@torch.no_grad()
def text_classifier(
    clip: CLIPModel, tokenizer, class_names: tuple[str, ...], templates: tuple[str, ...]
) -> Tensor:
    """Zero-shot weights (n_classes, dim): per class, the L2-normalised mean of the normalised
    text embeddings of every template filled with the class name."""
    device = next(clip.parameters()).device
    weights = []
    for name in class_names:
        prompts = [t.format(name) for t in templates]
        tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        embeds = clip.get_text_features(**tokens).pooler_output.float()
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        mean = embeds.mean(dim=0)
        weights.append(mean / mean.norm())
    return torch.stack(weights)


def cached_text_classifier(
    clip: CLIPModel,
    spec: ModelSpec,
    class_names: tuple[str, ...],
    template_set: str,
    cache_dir: Path,
    model_seed: int,
) -> Tensor:
    """:func:`text_classifier` read from / written to ``cache_dir`` (keyed by the model spec, its
    init seed for tiny models, the class names and the templates)."""
    path = cache_dir / f"{cache_key(spec, model_seed, class_names, TEMPLATES[template_set])}.pt"

    def compute() -> Tensor:
        templates = TEMPLATES[template_set]
        return text_classifier(clip, load_tokenizer(spec), class_names, templates).cpu()

    return cached(path, compute)


@torch.no_grad()
def zeroshot_accuracy(
    clip: CLIPModel, images: ImageSet, weights: Tensor, batch_size: int = 256, desc: str = ""
) -> float:
    """Top-1 accuracy of CLIP zero-shot classification. weights: (n_classes, dim) normalised."""
    device = next(clip.parameters()).device
    weights = weights.to(device)
    correct = 0
    # disable=None: a bar on a terminal, none in a notebook's saved outputs (seconds of work).
    batches = range(0, len(images), batch_size)
    for start in tqdm(batches, desc=desc or "zero-shot", leave=False, disable=None):
        batch = images.images[start : start + batch_size].to(device)
        feats = clip.get_image_features(pixel_values=normalize(batch)).pooler_output.float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        predicted = (feats @ weights.T).argmax(dim=-1).cpu()
        correct += (predicted == images.labels[start : start + batch_size]).sum().item()
    return correct / len(images)
