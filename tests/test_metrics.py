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
    mean_map_head_diversity,
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


# --- the original study's batched protocol ------------------------------------------------------


def _rows(*patch_maps: list[float], cls_weight: float = 0.5) -> torch.Tensor:
    """[CLS] rows (heads, 1 + patches) whose patch part renormalises to the given maps."""
    return torch.tensor(
        [[cls_weight] + [(1 - cls_weight) * w for w in m] for m in patch_maps], dtype=torch.float64
    )


def _diversity_case() -> torch.Tensor:
    """(3 images, 1 layer, 2 heads, 3 tokens). Image 0: heads [1,0] and [0,1]; image 1: the
    same swapped (the batch means of images 0-1 are identical: diversity 0, while each image
    alone has orthogonal heads: diversity 1); image 2: [1,0] and [.5,.5], cosine 1/√2."""
    images = [
        _rows([1.0, 0.0], [0.0, 1.0]),
        _rows([0.0, 1.0], [1.0, 0.0]),
        _rows([1.0, 0.0], [0.5, 0.5]),
    ]
    return torch.stack(images)[:, None]


def test_batch_mean_diversity_of_two_batches_is_the_mean_of_each_batchs_averaged_map_diversity():
    result = layer_metrics(_diversity_case(), diversity="batch_mean", metric_batch=2)
    # batch [0, 1]: averaged heads both [.5, .5] → 0; batch [2]: 1 − 1/√2; unweighted mean.
    assert result["head_diversity"].item() == pytest.approx((0 + 1 - 1 / math.sqrt(2)) / 2)


def test_per_image_diversity_with_batches_averages_per_image_values_per_batch():
    result = layer_metrics(_diversity_case(), diversity="per_image", metric_batch=2)
    # batch [0, 1]: (1 + 1) / 2; batch [2]: 1 − 1/√2; unweighted mean of the two batch means.
    assert result["head_diversity"].item() == pytest.approx((1 + 1 - 1 / math.sqrt(2)) / 2)


def test_batch_mean_diversity_without_batch_size_averages_the_maps_of_all_images():
    result = layer_metrics(_diversity_case(), diversity="batch_mean")
    # head A mean [2/3, 1/3], head B mean [1/2, 1/2]: cosine (1/2) / (√5/3 · 1/√2) = 3/√10.
    assert result["head_diversity"].item() == pytest.approx(1 - 3 / math.sqrt(10))
    plain = layer_metrics(_diversity_case())
    assert plain["head_diversity"].item() == pytest.approx((3 - 1 / math.sqrt(2)) / 3)


def test_mean_map_head_diversity_averages_over_images_before_the_cosine():
    p = cls_to_patch(_diversity_case())  # (3, 1, 2, 2)
    assert mean_map_head_diversity(p[:2]).item() == pytest.approx(0.0, abs=1e-12)
    assert mean_map_head_diversity(p[2:]).item() == pytest.approx(1 - 1 / math.sqrt(2))


def _per_image_case() -> torch.Tensor:
    """(3 images, 1 layer, 2 heads, 3 tokens): images 0 and 1 uniform over the two patches
    (H = ln 2, ERF = 1, Gini = 0), image 2 one-hot (H = 0, ERF = 1/2, Gini = 1/2)."""
    uniform = _rows([0.5, 0.5], [0.5, 0.5])
    one_hot = _rows([1.0, 0.0], [0.0, 1.0])
    return torch.stack([uniform, uniform, one_hot])[:, None]


def test_metric_batch_gives_the_short_last_batch_the_weight_of_a_full_one():
    batched = layer_metrics(_per_image_case(), metric_batch=2)
    # batch [0, 1] then batch [2], each batch mean weighted 1/2.
    assert batched["entropy"].item() == pytest.approx((math.log(2) + 0) / 2, rel=1e-6)
    assert batched["erf"].item() == pytest.approx((1 + 0.5) / 2)
    assert batched["gini"].item() == pytest.approx((0 + 0.5) / 2)
    plain = layer_metrics(_per_image_case())
    assert plain["entropy"].item() == pytest.approx(2 * math.log(2) / 3, rel=1e-6)
    assert plain["erf"].item() == pytest.approx((1 + 1 + 0.5) / 3)
    assert plain["gini"].item() == pytest.approx(0.5 / 3)


def test_explicit_defaults_and_whole_or_single_image_batches_reproduce_todays_metrics():
    attn = torch.rand(5, 3, 4, N + 1).softmax(-1)
    today = layer_metrics(attn)
    explicit = layer_metrics(attn, diversity="per_image", metric_batch=None)
    one_batch = layer_metrics(attn, diversity="per_image", metric_batch=5)
    singles = layer_metrics(attn, diversity="per_image", metric_batch=1)
    for name in today:
        assert torch.equal(today[name], explicit[name])
        torch.testing.assert_close(one_batch[name], today[name])
        torch.testing.assert_close(singles[name], today[name])


def test_original_protocol_on_200_images_matches_a_loop_over_batches_of_32():
    attn = torch.rand(200, 2, 3, N + 1, dtype=torch.float64).softmax(-1)
    result = layer_metrics(attn, diversity="batch_mean", metric_batch=32)
    p = cls_to_patch(attn)
    starts = range(0, 200, 32)
    assert [min(s + 32, 200) - s for s in starts] == [32] * 6 + [8]
    entropies, diversities = [], []
    for s in starts:
        batch = p[s : s + 32]
        entropies.append(entropy(batch).mean(dim=(0, 2)))
        diversities.append(head_diversity(batch.mean(dim=0)))
    torch.testing.assert_close(result["entropy"], torch.stack(entropies).mean(0).float())
    torch.testing.assert_close(result["head_diversity"], torch.stack(diversities).mean(0).float())


def test_layer_metrics_rejects_unknown_diversity_and_non_positive_batch():
    attn = torch.rand(2, 1, 2, 5).softmax(-1)
    with pytest.raises(ValueError, match="diversity"):
        layer_metrics(attn, diversity="per_head")
    with pytest.raises(ValueError, match="metric_batch"):
        layer_metrics(attn, metric_batch=0)
