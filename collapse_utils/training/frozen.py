"""Frozen work done once: what the frozen part of a linear-probe or last-block model gives for
every training image, so a step runs only the part that trains.

The frozen tower is deterministic (CLIP's vision tower has no dropout), so a cached output is
the value the step would recompute, up to the float rounding of a different batch shape;
``tests/test_train.py`` checks that cached and live runs give the same history. A random
horizontal flip is covered by caching both orientations, as APR's reference cache does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from collapse_utils.training.data import normalize
from collapse_utils.training.environment import autocast
from collapse_utils.training.evaluation import EVAL_BATCH

CACHED_METHODS = ("linear_probe", "last_block")


@dataclass(frozen=True)
class FrozenInputs:
    """``cached`` (orientations, N, ...): per training image, upright (0) and flipped (1),
    the projected image features (linear probe: (…, projection_dim)) or the hidden states that
    enter the last vision layer (last block: (…, tokens, hidden))."""

    method: str
    cached: Tensor

    @classmethod
    def prepare(
        cls, model: nn.Module, method: str, images: Tensor, flip: bool, dtype=None
    ) -> FrozenInputs | None:
        """Run the frozen tower once over uint8 ``images`` (N, 3, S, S), both orientations with
        ``flip``; None for a method whose frozen part is not a prefix of the model."""
        if method not in CACHED_METHODS:
            return None
        orientations = (images, images.flip(-1)) if flip else (images,)
        cached = torch.stack([_frozen_outputs(model, method, x, dtype) for x in orientations])
        return cls(method, cached)

    def logits(self, model: nn.Module, index: Tensor, flips: Tensor | None) -> Tensor:
        """Logits (B, classes) of training rows ``index`` (B,) as flipped by ``flips`` (B,) bool;
        only the trainable part of ``model`` runs (call under the step's autocast)."""
        rows = self.cached[0, index] if flips is None else self.cached[flips.long(), index]
        if self.method == "linear_probe":
            return model.head(rows)
        vision = model.vision_model
        hidden = vision.encoder.layers[-1](rows, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        pooled = vision.post_layernorm(hidden[:, 0])
        return model.head(model.visual_projection(pooled))


@torch.no_grad()
def _frozen_outputs(model: nn.Module, method: str, images: Tensor, dtype) -> Tensor:
    """The frozen part's output for ``images`` (N, 3, S, S), in batches, under the step's
    autocast so the cache holds what a live step computes."""
    last_layer = model.vision_model.encoder.layers[-1]
    inputs: list[Tensor] = []

    def keep_input(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])

    outputs = []
    handle = last_layer.register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        for start in range(0, len(images), EVAL_BATCH):
            pixels = normalize(images[start : start + EVAL_BATCH])
            with autocast(images.device, dtype):
                outputs.append(model.features(pixels))
    finally:
        handle.remove()
    return torch.cat(outputs if method == "linear_probe" else inputs)
