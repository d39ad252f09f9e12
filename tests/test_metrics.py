"""Metrics against scipy and hand-computed values; attention diagnostics on tiny grids."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch

from cskd_ray.metrics import (
    accuracy,
    attention_distance,
    attention_entropy,
    emd,
    evaluate_scores,
    plcc,
    srcc,
)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_correlations_match_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 50 + 10 * seed
    target = rng.normal(5.0, 1.0, n)
    pred = 0.5 * target + rng.normal(0.0, 1.0, n)
    assert srcc(pred, target) == pytest.approx(scipy.stats.spearmanr(pred, target)[0], abs=1e-12)
    assert plcc(pred, target) == pytest.approx(scipy.stats.pearsonr(pred, target)[0], abs=1e-12)
    # heavy ties: rounded scores (average ranks)
    pred_t, target_t = np.round(pred), np.round(target * 2) / 2
    assert srcc(pred_t, target_t) == pytest.approx(scipy.stats.spearmanr(pred_t, target_t)[0], abs=1e-12)
    assert plcc(pred_t, target_t) == pytest.approx(scipy.stats.pearsonr(pred_t, target_t)[0], abs=1e-12)


def test_correlations_perfect_and_inverse() -> None:
    x = [1.0, 2.0, 3.0, 4.0]
    assert srcc(x, [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert plcc(x, [2, 4, 6, 8]) == pytest.approx(1.0)
    assert srcc(x, [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_constant_input_gives_nan_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (srcc, plcc):
            assert math.isnan(fn([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]))
            assert math.isnan(fn([1.0, 2.0, 3.0], np.full(3, 7.0)))
            assert math.isnan(fn(torch.ones(4), torch.ones(4)))
            assert math.isnan(fn([1.0], [2.0]))
        result = evaluate_scores([5.0, 5.0], [4.0, 6.0], threshold=5.0)
        assert math.isnan(result["srcc"]) and math.isnan(result["plcc"])


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="lengths differ"):
        srcc([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="lengths differ"):
        accuracy([1, 2, 3], [1, 2], threshold=5)


def test_accuracy_by_hand() -> None:
    pred = [6.0, 4.0, 5.0, 5.5]
    target = [7.0, 6.0, 4.0, 5.0]
    # good (> 5): pred [T, F, F, T], target [T, T, F, F] → agree on 0 and 2 → 2/4
    assert accuracy(pred, target, threshold=5.0) == pytest.approx(0.5)
    assert accuracy(pred, target, threshold=3.0) == pytest.approx(1.0)
    assert isinstance(accuracy(pred, target, 5.0), float)


def test_emd_by_hand() -> None:
    # p = [1,0,0], q = [0,0,1]: |CDF diff| = [1,1,0] → r=1: 2/3 ; r=2: sqrt(2/3)
    p, q = [[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]
    assert emd(p, q) == pytest.approx(2 / 3)
    assert emd(p, q, r=2.0) == pytest.approx(math.sqrt(2 / 3))
    # second sample: p = [0.5, 0.5, 0], q = [0, 0.5, 0.5]: CDFs [0.5, 1, 1] vs [0, 0.5, 1] → (0.5+0.5+0)/3
    p2, q2 = p + [[0.5, 0.5, 0.0]], q + [[0.0, 0.5, 0.5]]
    assert emd(p2, q2) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert emd([1.0, 0.0, 0.0], [0.0, 0.0, 1.0]) == pytest.approx(2 / 3)  # one 1-D sample
    with pytest.raises(ValueError, match="same shape"):
        emd(np.zeros((2, 3)), np.zeros((2, 4)))


def test_torch_and_numpy_inputs_agree() -> None:
    rng = np.random.default_rng(7)
    pred, target = rng.normal(5, 1, 40), rng.normal(5, 1, 40)
    pd, td = rng.dirichlet(np.ones(10), 40), rng.dirichlet(np.ones(10), 40)
    from_numpy = evaluate_scores(pred, target, 5.0, pd, td)
    from_torch = evaluate_scores(torch.tensor(pred, dtype=torch.float64), torch.tensor(target), 5.0,
                                 torch.tensor(pd), torch.tensor(td))
    from_lists = evaluate_scores(pred.tolist(), target.tolist(), 5.0, pd.tolist(), td.tolist())
    assert from_numpy == pytest.approx(from_torch) and from_numpy == pytest.approx(from_lists)
    assert set(from_numpy) == {"srcc", "plcc", "accuracy", "emd", "n"}
    assert from_numpy["n"] == 40 and all(isinstance(from_numpy[k], float) for k in ("srcc", "plcc", "emd"))
    assert srcc(torch.tensor(pred, requires_grad=True), target) == pytest.approx(srcc(pred, target))


def test_evaluate_scores_without_distributions() -> None:
    result = evaluate_scores([1.0, 2.0, 6.0], [1.5, 2.5, 7.0], threshold=5.0)
    assert result["emd"] is None and result["n"] == 3
    assert result["srcc"] == pytest.approx(1.0) and result["accuracy"] == pytest.approx(1.0)


def test_attention_distance_self_attention_is_zero() -> None:
    attn = torch.eye(4).expand(2, 3, 4, 4)
    assert torch.allclose(attention_distance(attn, (2, 2), 16), torch.zeros(3))


def test_attention_distance_uniform_2x2() -> None:
    attn = torch.full((2, 3, 4, 4), 0.25)
    # every query sees itself (0), two neighbours (16 px) and the diagonal (16√2 px)
    expected = (0 + 16 + 16 + 16 * math.sqrt(2)) / 4
    assert torch.allclose(attention_distance(attn, (2, 2), 16), torch.full((3,), expected))
    # unnormalised rows (e.g. CLS column dropped) are renormalised first
    assert torch.allclose(attention_distance(attn * 0.8, (2, 2), 16), torch.full((3,), expected))


def test_attention_distance_per_head_and_grid_check() -> None:
    # head 0 attends to self, head 1 to the right neighbour on a 1x2 grid (patch 8 → 8 px)
    attn = torch.stack([torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])]).unsqueeze(0)
    assert torch.allclose(attention_distance(attn, (1, 2), 8), torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match="do not match grid"):
        attention_distance(torch.full((1, 1, 5, 5), 0.2), (2, 2), 16)
    with pytest.raises(ValueError, match=r"\(B, H, T, T\)"):
        attention_distance(torch.full((1, 4, 4), 0.25), (2, 2), 16)


def test_attention_entropy_uniform_and_one_hot() -> None:
    t = 6
    assert torch.allclose(attention_entropy(torch.full((2, 3, t, t), 1 / t)), torch.full((3,), math.log(t)))
    one_hot = torch.eye(t).expand(2, 3, t, t)
    entropy = attention_entropy(one_hot)
    assert torch.isfinite(entropy).all() and torch.allclose(entropy, torch.zeros(3))
    mixed = torch.stack([torch.eye(t), torch.full((t, t), 1 / t)]).unsqueeze(0)
    assert torch.allclose(attention_entropy(mixed), torch.tensor([0.0, math.log(t)]))
