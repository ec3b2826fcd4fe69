"""Attention regularizers on the captured [CLS] row, both differentiable.

Both act on the same [CLS]→patch distributions the metrics measure (CLS→CLS dropped, row
renormalised; see ``metrics.cls_to_patch``), so they constrain exactly what the study reports.
"""

from __future__ import annotations

import torch
from torch import Tensor

from collapse_utils.measurement.metrics import cls_to_patch, entropy


def attention_kl(current: Tensor, initial: Tensor, reduce_dims=None) -> Tensor:
    """KL(initial ‖ current) in nats per image, layer and head, averaged over ``reduce_dims``
    (all by default). current, initial: (images, layers, heads, tokens)."""
    p0 = cls_to_patch(initial.float())
    p = cls_to_patch(current.float())
    tiny = torch.finfo(p.dtype).tiny
    kl = (torch.special.xlogy(p0, p0) - p0 * p.clamp_min(tiny).log()).sum(dim=-1)
    return kl.mean() if reduce_dims is None else kl.mean(dim=reduce_dims)


def apr_penalty(current: Tensor, initial: Tensor, lam: float) -> Tensor:
    """Attention Preservation Regularization: λ · KL(initial ‖ current), computed per image,
    layer and head, then averaged. current, initial: (images, layers, heads, tokens)."""
    return lam * attention_kl(current, initial)


def entropy_floor_penalty(current: Tensor, floor: Tensor, lam: float) -> Tensor:
    """λ · mean(relu(H_floor − H)) with H per image, layer and head.
    current: (images, layers, heads, tokens); floor: (layers,) in nats — the pre-trained model's
    *mean* entropy per layer on the metric subset. Images and heads that sit below that mean
    already before training are penalised from the first step (the report's definition)."""
    h = entropy(cls_to_patch(current.float()))
    return lam * torch.relu(floor.to(h)[None, :, None] - h).mean()
