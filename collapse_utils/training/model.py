"""CLIP loading, the image classifier, training modes (full, LoRA, frozen layers) and merging.

``load_clip`` reads a hub id or local folder, or builds a tiny random CLIP for the smoke
profile. :class:`CLIPClassifier` is the fine-tuned model: the CLIP vision tower, its projection
and a linear head. ``merged_clip`` turns a fine-tuned classifier back into a plain
:class:`~transformers.CLIPModel` (LoRA merged) for zero-shot evaluation with the original text
tower.
"""

from __future__ import annotations

import copy
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel

from collapse_utils.config import REPO_ROOT, LoraSpec, ModelSpec, TrainSpec

# Vocabulary of the offline smoke tokenizer (see ``zeroshot.tiny_tokenizer``): 256 byte symbols,
# their end-of-word forms and the two special tokens.
TINY_VOCAB_SIZE = 2 * 256 + 2


class ModelUnavailableError(RuntimeError):
    """The requested CLIP weights cannot be loaded (offline, wrong path)."""


def tiny_clip_config(spec: ModelSpec) -> CLIPConfig:
    """A random CLIP with ViT-B/32 geometry (224 px, patch 32 → 7×7 = 49 patches) but tiny
    widths; ``spec.vision_layers`` layers and ``spec.tiny_heads`` heads."""
    hidden = spec.tiny_hidden
    config = CLIPConfig(
        text_config={
            "vocab_size": TINY_VOCAB_SIZE,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": spec.tiny_heads,
            "max_position_embeddings": 77,
            "bos_token_id": TINY_VOCAB_SIZE - 2,
            "eos_token_id": TINY_VOCAB_SIZE - 1,
            "pad_token_id": TINY_VOCAB_SIZE - 1,
        },
        vision_config={
            "image_size": 224,
            "patch_size": spec.patch_size,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.tiny_heads,
        },
        projection_dim=hidden,
    )
    for part in (config, config.vision_config, config.text_config):
        part.initializer_factor = spec.tiny_init_factor
    config._attn_implementation = spec.attn_implementation
    return config


def load_clip(spec: ModelSpec, seed: int = 0) -> CLIPModel:
    """Load CLIP per ``spec``: hub id / local folder, or a tiny random model seeded by ``seed``."""
    if spec.source == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = CLIPModel._from_config(
                tiny_clip_config(spec), attn_implementation=spec.attn_implementation
            )
    else:
        model = _load_pretrained(spec)
    vision = model.config.vision_config
    for field, value in (("vision_layers", vision.num_hidden_layers),
                         ("patch_size", vision.patch_size)):  # fmt: skip
        if value != getattr(spec, field):
            raise ModelUnavailableError(
                f"{spec.name!r} has {field.replace('_', ' ')} {value} but model.{field} is "
                f"{getattr(spec, field)}; fix the profile or the experiment file"
            )
    return model.eval()


# Seconds to wait for the hub to answer before a model missing locally is declared unavailable.
HUB_PROBE_TIMEOUT_S = 5.0
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no hub access."""
    import huggingface_hub.constants as hub

    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return hub.HF_HUB_OFFLINE or any(flag.strip().lower() in _TRUE for flag in flags)


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached (one HEAD request, no retries), or None if it answers."""
    import huggingface_hub.constants as hub

    request = urllib.request.Request(hub.ENDPOINT, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered, with an error status: reachable
    except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, refused, DNS
        return f"{hub.ENDPOINT} cannot be reached ({type(err).__name__}: {err})"


def _model_message(spec: ModelSpec, looked: Path | str, reason: str) -> str:
    """What is missing, where it was looked for, and the commands that fetch it."""
    name, folder = spec.name, spec.folder()
    hub_id = name if name in spec.mirrors or not folder else ModelSpec().name
    target = folder or REPO_ROOT / "models" / name.split("/")[-1]
    then = "" if folder else f" and list it under model.mirrors ({name}: {target}) in the profile"
    return (
        f"CLIP {name!r} is not available: looked in {looked}; {reason}. On a machine with hub "
        f"access run\n"
        f'    python -c "from transformers import CLIPModel; '
        f"CLIPModel.from_pretrained('{hub_id}').save_pretrained('{target}')\"\n"
        f"then copy that folder to {target} on this machine{then}. The smoke profile needs no "
        "download."
    )


def _load_pretrained(spec: ModelSpec) -> CLIPModel:
    """From a local folder, else the Hugging Face cache, else (only when the hub answers within
    :data:`HUB_PROBE_TIMEOUT_S` and ``HF_HUB_OFFLINE`` is unset) from the hub. Offline, a model
    missing locally raises :class:`ModelUnavailableError` at once instead of retrying the hub."""
    import huggingface_hub.constants as hub

    kwargs = {"attn_implementation": spec.attn_implementation}
    folder = spec.folder()
    if folder is not None:
        if not folder.is_dir():
            raise ModelUnavailableError(_model_message(spec, folder, "no such folder"))
        try:
            return CLIPModel.from_pretrained(folder, local_files_only=True, **kwargs)
        except OSError as err:
            reason = f"{type(err).__name__}: {err}"
            raise ModelUnavailableError(_model_message(spec, folder, reason)) from err
    cache, near = Path(hub.HF_HUB_CACHE).resolve(), (REPO_ROOT / spec.name).resolve()
    looked = f"the Hugging Face cache {cache} and for a folder {near}"
    try:
        return CLIPModel.from_pretrained(spec.name, local_files_only=True, **kwargs)
    except OSError as err:
        missing = err
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else hub_unreachable()
    if reason is not None:
        raise ModelUnavailableError(_model_message(spec, looked, reason)) from missing
    try:
        return CLIPModel.from_pretrained(spec.name, **kwargs)
    except OSError as err:
        reason = f"the hub download failed ({type(err).__name__}: {err})"
        raise ModelUnavailableError(_model_message(spec, looked, reason)) from err


class CLIPClassifier(nn.Module):
    """CLIP vision tower → visual projection → linear head.

    The vision tower and projection are copies of the pre-trained CLIP's. The head is an
    ``nn.Linear(projection_dim, n_classes)`` with PyTorch's default (Kaiming-uniform) init drawn
    under the run's seed, applied to the un-normalised projected image embedding.
    """

    def __init__(self, clip: CLIPModel, n_classes: int, seed: int = 0):
        super().__init__()
        self.vision_model = copy.deepcopy(clip.vision_model)
        self.visual_projection = copy.deepcopy(clip.visual_projection)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.head = nn.Linear(clip.config.projection_dim, n_classes)

    def features(self, pixel_values: Tensor) -> Tensor:
        """pixel_values: (B, 3, 224, 224) normalised → (B, projection_dim)."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return self.visual_projection(pooled)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, 224, 224) → logits (B, n_classes)."""
        return self.head(self.features(pixel_values))


def vision_layers(model: nn.Module) -> nn.ModuleList:
    """The vision encoder's layer list of a classifier, plain or PEFT-wrapped."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.vision_model.encoder.layers


def freeze_first_layers(classifier: CLIPClassifier, k: int, embeddings: bool = True) -> None:
    """Freeze the first ``k`` vision layers and, with ``embeddings``, the patch/position
    embeddings and the pre-norm below them (the report's code freezes the layers only)."""
    if k == 0:
        return
    vision = classifier.vision_model
    below = (vision.embeddings, vision.pre_layrnorm) if embeddings else ()
    for module in (*below, *vision.encoder.layers[:k]):
        module.requires_grad_(False)


def lora_target_pattern(targets: tuple[str, ...]) -> str:
    """Regex PEFT full-matches against module names: only the **vision** tower's attention."""
    return rf".*vision_model\.encoder\.layers\.\d+\.self_attn\.({'|'.join(targets)})"


def prepare_for_training(classifier: CLIPClassifier, train: TrainSpec, lora: LoraSpec) -> nn.Module:
    """Set trainable parameters per method; returns the model to train (PEFT-wrapped for LoRA).

    full: everything trains except ``train.freeze_layers`` first layers (see freeze_first_layers).
    lora: the LoRA matrices on ``lora.targets`` of the vision attention and the head train, and
    the visual projection with ``lora.train_projection``.
    linear_probe: only the head trains (frozen encoder).
    last_block: the last vision layer, the post-LayerNorm, the visual projection and the head
    train (study2's baseline; its parameter count matches theirs).
    none: nothing trains (baseline analysis).
    """
    if train.method == "full":
        classifier.requires_grad_(True)
        freeze_first_layers(classifier, train.freeze_layers, train.freeze_embeddings)
        return classifier
    if train.method == "lora":
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora_target_pattern(lora.targets),
        )
        model = get_peft_model(classifier, config)
        model.base_model.model.head.requires_grad_(True)
        model.base_model.model.visual_projection.requires_grad_(lora.train_projection)
        return model
    classifier.requires_grad_(False)
    if train.method == "last_block":
        vision = classifier.vision_model
        for module in (vision.encoder.layers[-1], vision.post_layernorm):
            module.requires_grad_(True)
        classifier.visual_projection.requires_grad_(True)
    if train.method in ("linear_probe", "last_block"):
        classifier.head.requires_grad_(True)
    return classifier


def unwrap_classifier(model: nn.Module) -> CLIPClassifier:
    """The classifier with LoRA merged into its weights (a copy if merging was needed)."""
    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model


def merged_clip(model: nn.Module, base_clip: CLIPModel) -> CLIPModel:
    """A plain CLIPModel with the fine-tuned vision tower and projection (LoRA merged) and the
    original text tower of ``base_clip``. ``base_clip`` is not modified."""
    classifier = unwrap_classifier(model)
    clip = copy.deepcopy(base_clip)
    clip.vision_model.load_state_dict(classifier.vision_model.state_dict())
    clip.visual_projection.load_state_dict(classifier.visual_projection.state_dict())
    return clip.eval()


def zeroshot_clip(model: nn.Module, base_clip: CLIPModel, weights: str = "merged") -> CLIPModel:
    """The CLIP that zero-shot scores (``eval.zeroshot_weights``): ``merged`` is
    :func:`merged_clip`; ``vision_base`` is what the report's code scored, the vision tower's
    base weights (LoRA adapters dropped, not merged) in a copy of ``base_clip`` whose visual
    projection stays pre-trained. ``model`` and ``base_clip`` are not modified."""
    if weights == "merged":
        return merged_clip(model, base_clip)
    if weights != "vision_base":
        raise ValueError(f"zero-shot weights must be merged or vision_base, got {weights!r}")
    classifier = copy.deepcopy(model).unload() if isinstance(model, PeftModel) else model
    clip = copy.deepcopy(base_clip)
    clip.vision_model.load_state_dict(classifier.vision_model.state_dict())
    return clip.eval()


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
