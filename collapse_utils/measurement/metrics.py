"""The four attention-structure metrics of the report (§1.4), vectorised in torch.

All metrics take [CLS]→patch distributions: the CLS→CLS entry is dropped and the row is
renormalised to sum to 1 (:func:`cls_to_patch`). Why: the CLS self-weight is not a spatial
location, and how much mass the query keeps on itself varies by layer; renormalising turns the
49 patch weights into a probability distribution so that entropy, ERF and Gini describe *where
in the image* attention goes and are comparable across layers and runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from collapse_utils.config import METRICS

__all__ = ["METRICS", "cls_to_patch", "entropy", "erf", "gini", "head_diversity", "layer_metrics"]


def cls_to_patch(cls_attn: Tensor) -> Tensor:
    """Drop the CLS→CLS weight and renormalise. cls_attn: (..., tokens) → (..., tokens - 1)."""
    patches = cls_attn[..., 1:]
    return patches / patches.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(patches.dtype).tiny)


def entropy(p: Tensor) -> Tensor:
    """Shannon entropy in nats over the last dim, with 0·ln 0 = 0. p: (..., patches) → (...)."""
    return -torch.special.xlogy(p, p).sum(dim=-1)


def erf(p: Tensor, mass: float = 0.95) -> Tensor:
    """Effective receptive field: the smallest fraction of patches whose largest weights reach
    ``mass`` of the total. p: (..., patches), rows sum to 1 → (...) in (0, 1]."""
    n = p.shape[-1]
    cumulative = p.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    # Count entries strictly below the target; the next one reaches it. A tiny tolerance keeps
    # float rounding (0.9499999 for an exact 0.95) from adding a patch.
    below = (cumulative < mass - 1e-6).sum(dim=-1)
    return (below + 1).clamp_max(n).to(p.dtype) / n


def gini(p: Tensor) -> Tensor:
    """Gini coefficient over the last dim: 0 for uniform, (N-1)/N for one-hot.
    G = 2·Σ i·x_(i) / (N·Σ x) − (N+1)/N with x sorted ascending, i = 1..N. p: (..., N) → (...)."""
    n = p.shape[-1]
    x = p.sort(dim=-1).values
    i = torch.arange(1, n + 1, dtype=p.dtype, device=p.device)
    return 2 * (i * x).sum(dim=-1) / (n * x.sum(dim=-1)) - (n + 1) / n


def head_diversity(p: Tensor) -> Tensor:
    """1 − mean pairwise cosine similarity between heads (pairs i<j).
    p: (..., heads, patches) → (...). Needs at least two heads."""
    heads = p.shape[-2]
    if heads < 2:
        raise ValueError(f"head_diversity needs at least 2 heads, got {heads}")
    unit = torch.nn.functional.normalize(p, dim=-1)
    cosine = unit @ unit.transpose(-1, -2)
    i, j = torch.triu_indices(heads, heads, offset=1, device=p.device)
    return 1 - cosine[..., i, j].mean(dim=-1)


def layer_metrics(cls_attn: Tensor) -> dict[str, Tensor]:
    """Per-layer metrics of captured [CLS] attention rows.

    cls_attn: (images, layers, heads, tokens) with token 0 the CLS token.
    Returns ``{metric: (layers,)}``: entropy, ERF@0.95 and Gini per image and head, then
    averaged over both; head diversity per image, then averaged over images.
    """
    if cls_attn.dim() != 4:
        raise ValueError(f"expected (images, layers, heads, tokens), got shape {cls_attn.shape}")
    p = cls_to_patch(cls_attn.detach().double())
    return {
        "entropy": entropy(p).mean(dim=(0, 2)).float(),
        "erf": erf(p).mean(dim=(0, 2)).float(),
        "gini": gini(p).mean(dim=(0, 2)).float(),
        "head_diversity": head_diversity(p).mean(dim=0).float(),
    }
