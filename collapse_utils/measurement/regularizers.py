"""Attention regularizers on the captured [CLS] row, both differentiable.

Both act on the same [CLS]→patch distributions the metrics measure (CLS→CLS dropped, row
renormalised; see ``metrics.cls_to_patch``), so they constrain exactly what the study reports.

The defaults are this study's definitions; keyword options select the original study's:

=================  ==================================  =======================================
                   default (this study)                original study
=================  ==================================  =======================================
APR                KL(initial ‖ current)               KL(current ‖ initial):
                                                       ``direction="current_to_initial"``
entropy floor      floor = 1.0 × pre-trained mean      floor = 0.7 × pre-trained mean,
                   entropy, mean over layers           summed over layers: ``ratio=0.7,
                                                       layer_reduction="sum"``
=================  ==================================  =======================================
"""

from __future__ import annotations

import torch
from torch import Tensor

from collapse_utils.measurement.metrics import cls_to_patch, entropy

# KL argument order, named "<first argument>_to_<second argument>" of KL(first ‖ second).
KL_DIRECTIONS = ("initial_to_current", "current_to_initial")
LAYER_REDUCTIONS = ("mean", "sum")


def attention_kl(
    current: Tensor, initial: Tensor, reduce_dims=None, direction: str = "initial_to_current"
) -> Tensor:
    """KL divergence in nats per image, layer and head between the [CLS]→patch distributions,
    averaged over ``reduce_dims`` (all by default). current, initial: (images, layers, heads,
    tokens). ``direction="initial_to_current"`` (default) is KL(initial ‖ current), this study's;
    ``"current_to_initial"`` is KL(current ‖ initial), the original study's."""
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    p0 = cls_to_patch(initial.float())
    p = cls_to_patch(current.float())
    tiny = torch.finfo(p.dtype).tiny
    if direction == "initial_to_current":
        kl = (torch.special.xlogy(p0, p0) - p0 * p.clamp_min(tiny).log()).sum(dim=-1)
    else:
        # The current distribution is the weight here, so its log is clamped rather than taken
        # through xlogy: a patch weight of exactly 0 then has a finite gradient (log tiny + 1).
        kl = (p * (p.clamp_min(tiny).log() - p0.clamp_min(tiny).log())).sum(dim=-1)
    return kl.mean() if reduce_dims is None else kl.mean(dim=reduce_dims)


def apr_penalty(
    current: Tensor, initial: Tensor, lam: float, direction: str = "initial_to_current"
) -> Tensor:
    """Attention Preservation Regularization: λ · KL, computed per image, layer and head, then
    averaged over all three (equal to the mean over layers of the per-layer mean over images and
    heads). current, initial: (images, layers, heads, tokens). ``direction`` as in
    :func:`attention_kl`: KL(initial ‖ current) by default, KL(current ‖ initial) for the
    original study."""
    return lam * attention_kl(current, initial, direction=direction)


def entropy_floor_penalty(
    current: Tensor,
    baseline_entropy: Tensor,
    lam: float,
    ratio: float = 1.0,
    layer_reduction: str = "mean",
) -> Tensor:
    """λ · reduce over layers of mean over (image, head) of relu(ratio · H_baseline − H).

    current: (images, layers, heads, tokens); baseline_entropy: (layers,) in nats — the
    pre-trained model's *mean* entropy per layer on the metric subset. H is the entropy in nats
    per image, layer and head. ``layer_reduction="mean"`` (default) averages the per-layer terms
    over layers, ``"sum"`` adds them (the original study, with ``ratio=0.7``). With the defaults
    (ratio 1.0, mean) images and heads that sit below the pre-trained mean already before training
    are penalised from the first step (this study's definition)."""
    if layer_reduction not in LAYER_REDUCTIONS:
        raise ValueError(
            f"layer_reduction must be one of {LAYER_REDUCTIONS}, got {layer_reduction!r}"
        )
    h = entropy(cls_to_patch(current.float()))
    floor = baseline_entropy.to(h) * ratio
    shortfall = torch.relu(floor[None, :, None] - h)  # (images, layers, heads)
    if layer_reduction == "mean":
        return lam * shortfall.mean()
    return lam * shortfall.mean(dim=(0, 2)).sum()
