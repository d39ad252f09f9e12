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
    fit_logistic,
    krcc,
    logistic_4,
    logistic_5,
    plcc,
    plcc_logistic,
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


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_krcc_matches_scipy_on_random_and_tied_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 37 + 50 * seed  # odd and even sizes: the merge levels end in partial blocks
    target = rng.normal(5.0, 1.0, n)
    pred = (0.5 if seed % 2 else -0.5) * target + rng.normal(0.0, 1.0, n)
    assert krcc(pred, target) == pytest.approx(scipy.stats.kendalltau(pred, target)[0], abs=1e-12)
    pred_t, target_t = np.round(pred), np.round(target * 2) / 2  # heavy ties on both sides, and joint ties
    assert krcc(pred_t, target_t) == pytest.approx(scipy.stats.kendalltau(pred_t, target_t)[0], abs=1e-12)
    votes = rng.integers(1, 11, 2000)  # 10 distinct values in 2000 samples
    noisy = votes + rng.integers(-2, 3, 2000)
    assert krcc(noisy, votes) == pytest.approx(scipy.stats.kendalltau(noisy, votes)[0], abs=1e-12)
    assert krcc(torch.tensor(pred), target.tolist()) == pytest.approx(krcc(pred, target), abs=1e-15)


def test_krcc_by_hand_and_edge_cases() -> None:
    # x = [1, 2, 3, 4], y = [1, 3, 2, 4]: one discordant pair (2, 3) of 6 → (5 − 1)/6
    assert krcc([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert krcc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0) and krcc([1, 2], [5, 9]) == pytest.approx(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for pred, target in (([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]), ([1.0], [2.0]), ([1.0, np.nan], [1.0, 2.0])):
            assert math.isnan(krcc(pred, target))
    with pytest.raises(ValueError, match="lengths differ"):
        krcc([1, 2, 3], [1, 2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plcc_logistic_fits_a_logistic_relation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(5.0, 1.5, 400)
    y = logistic_5(x, 6.0, 2.0, 5.0, 0.1, 5.0) + rng.normal(0.0, 0.2, 400)  # saturating at both ends
    fit = fit_logistic(x, y)
    assert fit.fitted and len(fit.params) == 5 and fit.reason == ""
    # the reported value is scipy's PLCC of the fitted mapping, and the fit beats the straight line
    assert fit.plcc == pytest.approx(scipy.stats.pearsonr(logistic_5(x, *fit.params), y)[0], abs=1e-12)
    assert plcc_logistic(x, y) == fit.plcc > plcc(x, y) + 0.01
    # the family is closed under affine changes of x and the start values follow the data's scale
    assert plcc_logistic(10 * x - 3, y) == pytest.approx(fit.plcc, abs=1e-6)
    assert plcc_logistic(-x, y) == pytest.approx(fit.plcc, abs=1e-6)  # decreasing relation
    four = fit_logistic(x, y, params=4)
    assert four.fitted and len(four.params) == 4 and four.plcc > plcc(x, y)
    assert four.plcc == pytest.approx(scipy.stats.pearsonr(logistic_4(x, *four.params), y)[0], abs=1e-12)
    exact = logistic_5(x, 6.0, 2.0, 5.0, 0.1, 5.0)
    assert plcc_logistic(x, exact) > 1 - 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_plcc_logistic_on_random_and_tied_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    target = rng.normal(5.0, 1.0, 200)
    pred = 0.5 * target + rng.normal(0.0, 1.0, 200)
    for p, t in ((pred, target), (np.round(pred), np.round(target * 2) / 2)):
        fit = fit_logistic(p, t)
        assert fit.fitted and -1.0 <= fit.plcc <= 1.0
        assert fit.plcc >= scipy.stats.pearsonr(p, t)[0] - 1e-9  # the line b1 = 0 is in the family


def test_plcc_logistic_falls_back_to_plain_plcc() -> None:
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    with pytest.warns(RuntimeWarning, match="4 samples cannot fit 5 parameters; reporting the plain PLCC"):
        assert plcc_logistic(x, y) == pytest.approx(plcc(x, y))
    fit = fit_logistic(x, y)
    assert not fit.fitted and fit.params == () and fit.plcc == pytest.approx(plcc(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(plcc_logistic([2.0] * 8, list(range(8))))  # undefined either way: no warning
    with pytest.raises(ValueError, match="params must be 4 or 5"):
        fit_logistic(x, y, params=3)


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


def test_evaluate_scores_extended_adds_krcc_and_fitted_plcc() -> None:
    rng = np.random.default_rng(3)
    pred, target = rng.normal(5, 1, 60), rng.normal(5, 1, 60)
    core = evaluate_scores(pred, target, 5.0)
    result = evaluate_scores(pred, target, 5.0, extended=True)
    assert set(result) == set(core) | {"krcc", "plcc_logistic", "plcc_logistic_fitted"}
    assert {k: result[k] for k in core} == core
    assert result["krcc"] == pytest.approx(scipy.stats.kendalltau(pred, target)[0], abs=1e-12)
    assert result["plcc_logistic"] == fit_logistic(pred, target).plcc and result["plcc_logistic_fitted"] is True
    small = evaluate_scores([1.0, 2.0, 6.0], [1.5, 2.5, 7.0], threshold=5.0, extended=True)
    assert small["plcc_logistic_fitted"] is False and small["plcc_logistic"] == pytest.approx(small["plcc"])


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


def test_evaluate_table_shows_krcc_and_fitted_plcc() -> None:
    from cskd_ray.stages.evaluate import format_table

    report = {"images": 9, "scored": 8, "errors": 1, "threshold": 5.0, "emd": None,
              **evaluate_scores([1.0, 2.0, 6.0], [1.5, 2.5, 7.0], threshold=5.0, extended=True)}
    lines = format_table(report).splitlines()
    assert [line.split("  ")[0] for line in lines[2:]] == [
        "images", "scored", "errors", "SRCC", "KRCC", "PLCC", "PLCC (logistic fit failed)", "accuracy (> 5)",
        "EMD (r=1)"]
