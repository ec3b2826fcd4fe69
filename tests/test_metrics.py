from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from collapse_utils.measurement.metrics import (
    cls_to_patch,
    entropy,
    erf,
    gini,
    head_diversity,
    layer_metrics,
)

N = 49


def numpy_gini(x: np.ndarray) -> float:
    """Independent definition: mean absolute difference over twice the mean."""
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean()))


def test_uniform_attention_has_maximal_entropy_and_zero_gini():
    p = torch.full((N,), 1 / N, dtype=torch.float64)
    assert entropy(p).item() == pytest.approx(math.log(N))
    assert gini(p).item() == pytest.approx(0.0, abs=1e-12)
    assert erf(p).item() == pytest.approx(math.ceil(0.95 * N) / N)


def test_one_hot_attention_is_fully_concentrated():
    p = torch.zeros(N, dtype=torch.float64)
    p[7] = 1
    assert entropy(p).item() == 0.0
    assert erf(p).item() == pytest.approx(1 / N)
    assert gini(p).item() == pytest.approx((N - 1) / N)


def test_two_point_attention():
    p = torch.zeros(N, dtype=torch.float64)
    p[[3, 40]] = 0.5
    assert entropy(p).item() == pytest.approx(math.log(2))
    assert erf(p).item() == pytest.approx(2 / N)
    assert gini(p).item() == pytest.approx((N - 2) / N)


def test_erf_counts_the_patch_that_crosses_the_mass():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    assert erf(p, mass=0.95).item() == pytest.approx(3 / 4)  # 0.5+0.3+0.15 reaches 0.95 exactly
    assert erf(p, mass=0.96).item() == pytest.approx(4 / 4)
    assert erf(p, mass=0.5).item() == pytest.approx(1 / 4)


def test_entropy_matches_scipy_on_random_distributions():
    rng = np.random.default_rng(0)
    x = rng.dirichlet(np.ones(N) * 0.3, size=20)
    ours = entropy(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, scipy.stats.entropy(x, axis=1), rtol=1e-10)


def test_gini_matches_an_independent_numpy_definition():
    rng = np.random.default_rng(1)
    x = rng.dirichlet(np.ones(N) * 0.5, size=10)
    ours = gini(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, [numpy_gini(row) for row in x], rtol=1e-10)


def test_erf_matches_a_sorted_loop():
    rng = np.random.default_rng(2)
    x = rng.dirichlet(np.ones(N), size=10)
    expected = []
    for row in x:
        cumulative = np.cumsum(np.sort(row)[::-1])
        expected.append((np.argmax(cumulative >= 0.95 - 1e-6) + 1) / N)
    np.testing.assert_allclose(erf(torch.from_numpy(x)).numpy(), expected)


def test_identical_heads_have_zero_diversity_and_orthogonal_heads_one():
    same = torch.rand(1, N, dtype=torch.float64).softmax(-1).expand(4, N)
    assert head_diversity(same).item() == pytest.approx(0.0, abs=1e-12)
    orthogonal = torch.eye(4, N, dtype=torch.float64)
    assert head_diversity(orthogonal).item() == pytest.approx(1.0)


def test_head_diversity_matches_pairwise_loop():
    p = torch.rand(5, N, dtype=torch.float64)
    cosines = [
        torch.nn.functional.cosine_similarity(p[i], p[j], dim=0)
        for i in range(5)
        for j in range(i + 1, 5)
    ]
    assert head_diversity(p).item() == pytest.approx(1 - torch.stack(cosines).mean().item())


def test_head_diversity_needs_two_heads():
    with pytest.raises(ValueError, match="at least 2 heads"):
        head_diversity(torch.rand(1, N))


def test_cls_to_patch_drops_cls_and_renormalises():
    row = torch.tensor([0.5, 0.25, 0.25])
    assert torch.allclose(cls_to_patch(row), torch.tensor([0.5, 0.5]))


def test_layer_metrics_shapes_and_averaging():
    images, layers, heads, tokens = 3, 4, 2, N + 1
    attn = torch.rand(images, layers, heads, tokens).softmax(-1)
    result = layer_metrics(attn)
    assert set(result) == {"entropy", "erf", "gini", "head_diversity"}
    for values in result.values():
        assert values.shape == (layers,)
        assert torch.isfinite(values).all()
    p = cls_to_patch(attn.double())
    expected = torch.stack(
        [torch.stack([entropy(p[i, 1, h]) for h in range(heads)]).mean() for i in range(images)]
    ).mean()
    assert result["entropy"][1].item() == pytest.approx(expected.item(), rel=1e-6)
    expected_div = torch.stack([head_diversity(p[i, 2]) for i in range(images)]).mean()
    assert result["head_diversity"][2].item() == pytest.approx(expected_div.item(), rel=1e-6)


def test_layer_metrics_rejects_wrong_rank():
    with pytest.raises(ValueError, match="images, layers, heads, tokens"):
        layer_metrics(torch.rand(2, 3, 50))
