"""How far a fine-tuned vision tower has moved from the pre-trained one, beyond attention.

Three signals, each against the pre-trained model on the same (metric-subset) images:

- **linear CKA** (Kornblith et al. 2019) of the [CLS] features after each layer, with centred
  features ``Xc``, ``Yc`` (n, d): ``CKA = ‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F)``; 1 for
  features equal up to rotation and isotropic scale, smaller as they part;
- **embedding drift**: ``1 − mean_i cos(a_i, b_i)`` of the image embeddings (0 when equal, up
  to 2);
- **relative weight drift**: ``‖θ − θ₀‖ / ‖θ₀‖`` over all parameters (Frobenius norms summed
  over tensors).

All are computed in float64 and returned as Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of features ``x`` (n, d1) and ``y`` (n, d2) of the same n inputs, in [0, 1].
    NaN when either has no variance (e.g. n = 1)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).square().sum()
    return float(cross / (torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)))


def layer_cka(initial: Tensor, current: Tensor) -> list[float]:
    """:func:`linear_cka` per layer of features ``initial``, ``current`` (layers, n, d)."""
    return [linear_cka(a, b) for a, b in zip(initial, current, strict=True)]


def embedding_drift(initial: Tensor, current: Tensor) -> float:
    """``1 − mean cos`` of embeddings ``initial``, ``current`` (n, p), row by row."""
    cosine = torch.nn.functional.cosine_similarity(initial.double(), current.double(), dim=-1)
    return float(1.0 - cosine.mean())


@torch.no_grad()
def weight_drift(current: Mapping[str, Tensor], initial: Mapping[str, Tensor]) -> float:
    """``‖θ − θ₀‖ / ‖θ₀‖`` over every tensor of ``initial``; ``current`` has the same names
    and shapes (a missing name raises ``KeyError``)."""
    moved = sum((current[n].double() - t.double()).square().sum() for n, t in initial.items())
    size = sum(t.double().square().sum() for t in initial.values())
    return math.sqrt(float(moved) / float(size))
