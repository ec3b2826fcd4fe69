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

__all__ = [
    "DIVERSITY_MODES",
    "METRICS",
    "cls_to_patch",
    "entropy",
    "erf",
    "gini",
    "head_diversity",
    "layer_metrics",
    "mean_map_head_diversity",
]

# How head diversity is formed from a group of images (see :func:`layer_metrics`).
DIVERSITY_MODES = ("per_image", "batch_mean")


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


def mean_map_head_diversity(p: Tensor) -> Tensor:
    """Head diversity of the image-averaged maps: each head's [CLS]→patch distribution is first
    averaged over the images (dim 0), then 1 − mean pairwise cosine between heads is taken.
    p: (images, ..., heads, patches) → (...). This is the original study's definition, applied
    there to each evaluation batch; it is not the mean of per-image diversities."""
    return head_diversity(p.mean(dim=0))


def _batches(n: int, size: int | None) -> list[slice]:
    """Consecutive slices of ``size`` images (the last one may be shorter); one slice when None."""
    if size is None:
        return [slice(0, n)]
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def layer_metrics(
    cls_attn: Tensor, *, diversity: str = "per_image", metric_batch: int | None = None
) -> dict[str, Tensor]:
    """Per-layer metrics of captured [CLS] attention rows.

    cls_attn: (images, layers, heads, tokens) with token 0 the CLS token (the CLS→CLS weight is
    dropped and each row renormalised, :func:`cls_to_patch`). Returns ``{metric: (layers,)}``
    float32: entropy in nats, ERF@0.95 as a fraction of the patches, Gini and head diversity
    (both unitless, in [0, 1]).

    Entropy, ERF and Gini are computed per image and head. Head diversity depends on
    ``diversity``:

    - ``"per_image"`` (default): 1 − mean pairwise head cosine of each image's maps.
    - ``"batch_mean"``: the maps of a batch of images are averaged per head first, then
      1 − mean pairwise cosine of those averaged maps (:func:`mean_map_head_diversity`), the
      original study's definition.

    ``metric_batch`` sets how images are pooled. None (default): every value is a plain mean
    over all images (and heads); with ``"batch_mean"`` all images form one batch. An integer B:
    the images are cut, in the order given, into consecutive batches of B (the last one may be
    shorter), each metric is averaged within a batch, and the layer value is the unweighted mean
    of the batch means, so a short last batch weighs as much as a full one. The original
    protocol is ``diversity="batch_mean", metric_batch=32`` on its 200-image subset in its fixed
    order (six batches of 32 and one of 8).
    """
    if cls_attn.dim() != 4:
        raise ValueError(f"expected (images, layers, heads, tokens), got shape {cls_attn.shape}")
    if diversity not in DIVERSITY_MODES:
        raise ValueError(f"diversity must be one of {DIVERSITY_MODES}, got {diversity!r}")
    if metric_batch is not None and metric_batch < 1:
        raise ValueError(f"metric_batch must be a positive integer or None, got {metric_batch}")
    p = cls_to_patch(cls_attn.detach().double())
    if metric_batch is None and diversity == "per_image":
        # This study's protocol (the default): the expressions it has always used.
        return {
            "entropy": entropy(p).mean(dim=(0, 2)).float(),
            "erf": erf(p).mean(dim=(0, 2)).float(),
            "gini": gini(p).mean(dim=(0, 2)).float(),
            "head_diversity": head_diversity(p).mean(dim=0).float(),
        }
    # Per image and layer (mean over heads): (images, layers).
    per_image = {
        "entropy": entropy(p).mean(dim=2),
        "erf": erf(p).mean(dim=2),
        "gini": gini(p).mean(dim=2),
    }
    if diversity == "per_image":
        per_image["head_diversity"] = head_diversity(p)
    batches = _batches(p.shape[0], metric_batch)
    result = {
        name: torch.stack([values[b].mean(dim=0) for b in batches]).mean(dim=0).float()
        for name, values in per_image.items()
    }
    if diversity == "batch_mean":
        result["head_diversity"] = (
            torch.stack([mean_map_head_diversity(p[b]) for b in batches]).mean(dim=0).float()
        )
    return {name: result[name] for name in METRICS}
