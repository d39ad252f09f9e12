"""Evaluation metrics for aesthetics assessment and ViT attention diagnostics.

Score metrics (:func:`srcc`, :func:`krcc`, :func:`plcc`, :func:`plcc_logistic`, :func:`accuracy`, :func:`emd`,
:func:`evaluate_scores`) accept numpy arrays, lists or torch tensors and return Python floats. Attention diagnostics
(:func:`attention_distance`, :func:`attention_entropy`) take torch tensors and return one value per head.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import curve_fit
from scipy.stats import kendalltau, rankdata
from torch import Tensor

__all__ = [
    "accuracy",
    "attention_distance",
    "attention_entropy",
    "emd",
    "evaluate_scores",
    "fit_logistic",
    "krcc",
    "LogisticFit",
    "plcc",
    "plcc_logistic",
    "srcc",
]


def _to_numpy(x: Any) -> np.ndarray:
    """Convert a tensor, array or sequence to a float64 numpy array (detached, on CPU)."""
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _paired_1d(name: str, pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flatten both inputs to 1-D float64 arrays and check that their lengths match."""
    p, t = _to_numpy(pred).reshape(-1), _to_numpy(target).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"{name}: lengths differ, {p.size} vs {t.size}")
    return p, t


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays; nan with fewer than 2 samples or a constant input."""
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    with np.errstate(all="ignore"):
        xc, yc = x - x.mean(), y - y.mean()
        xc, yc = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
        r = float(np.dot(xc, yc))
    return max(-1.0, min(1.0, r)) if math.isfinite(r) else float("nan")


def plcc(pred: Any, target: Any) -> float:
    """Pearson linear correlation coefficient (same value as ``scipy.stats.pearsonr``).

    ``PLCC = Σ_i (x_i − x̄)(y_i − ȳ) / sqrt(Σ_i (x_i − x̄)² · Σ_i (y_i − ȳ)²)``.

    Args:
        pred: Predicted scores, shape (N,) (flattened).
        target: Ground-truth scores, shape (N,).

    Returns:
        The correlation in [−1, 1]; ``nan`` (without warnings) when N < 2 or either input is constant.

    Raises:
        ValueError: If the lengths differ.
    """
    return _pearson(*_paired_1d("plcc", pred, target))


def srcc(pred: Any, target: Any) -> float:
    """Spearman rank correlation coefficient (same value as ``scipy.stats.spearmanr``).

    ``SRCC = PLCC(rank(x), rank(y))`` with ties given their average rank.

    Args:
        pred: Predicted scores, shape (N,) (flattened).
        target: Ground-truth scores, shape (N,).

    Returns:
        The correlation in [−1, 1]; ``nan`` (without warnings) when N < 2 or either input is constant.

    Raises:
        ValueError: If the lengths differ.
    """
    p, t = _paired_1d("srcc", pred, target)
    if np.isnan(p).any() or np.isnan(t).any():
        return float("nan")
    return _pearson(rankdata(p), rankdata(t))


def krcc(pred: Any, target: Any) -> float:
    """Kendall rank correlation coefficient, tau-b (same value as ``scipy.stats.kendalltau``).

    Over the ``n₀ = N(N − 1)/2`` pairs, with ``n_c`` concordant and ``n_d`` discordant pairs,
    ``n₁ = Σ_i t_i(t_i − 1)/2`` over groups of ties in x and ``n₂`` the same in y:
    ``KRCC = (n_c − n_d) / sqrt((n₀ − n₁)(n₀ − n₂))``, computed by ``scipy.stats.kendalltau`` (O(N log N)).

    Args:
        pred: Predicted scores, shape (N,) (flattened).
        target: Ground-truth scores, shape (N,).

    Returns:
        The correlation in [−1, 1]; ``nan`` (without warnings) when N < 2, either input is constant or
        holds a nan.

    Raises:
        ValueError: If the lengths differ.
    """
    x, y = _paired_1d("krcc", pred, target)
    if x.size < 2 or np.isnan(x).any() or np.isnan(y).any() or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return max(-1.0, min(1.0, float(kendalltau(x, y, variant="b").statistic)))


def logistic_5(x: np.ndarray, b1: float, b2: float, b3: float, b4: float, b5: float) -> np.ndarray:
    """VQEG 5-parameter logistic: ``f(x) = b1 (1/2 − 1/(1 + exp(b2 (x − b3)))) + b4 x + b5``."""
    with np.errstate(over="ignore"):
        return b1 * (0.5 - 1.0 / (1.0 + np.exp(b2 * (x - b3)))) + b4 * x + b5


def logistic_4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """VQEG 4-parameter logistic: ``f(x) = (b1 − b2) / (1 + exp(−(x − b3)/|b4|)) + b2``."""
    with np.errstate(over="ignore"):
        return (b1 - b2) / (1.0 + np.exp(-(x - b3) / max(abs(b4), 1e-12))) + b2


@dataclass(frozen=True)
class LogisticFit:
    """The result of :func:`fit_logistic`.

    Attributes:
        plcc: PLCC between the mapped predictions and the targets (plain PLCC when the fit failed).
        fitted: Whether the fit converged; False means ``plcc`` is the plain PLCC.
        params: The fitted (b1, …, b5) or (b1, …, b4), empty when the fit failed.
        reason: Why the fit failed, empty when it did not.
    """

    plcc: float
    fitted: bool
    params: tuple[float, ...] = ()
    reason: str = ""


def _start_and_bounds(x: np.ndarray, y: np.ndarray, params: int) -> tuple[list[float], tuple[list, list]]:
    """Start values and bounds from the data's own scale, so the fit does not depend on the score range.

    The bounds keep the fit from drifting along the family's degenerate direction (for 5 parameters:
    b1 → ∞, b2 → 0 is a straight line), where Levenberg–Marquardt often stops without converging.
    """
    sign = 1.0 if _pearson(x, y) >= 0 else -1.0
    spread, y_range, inf = float(np.std(x)), float(np.ptp(y)), np.inf
    x_lo, x_hi = float(np.min(x)), float(np.max(x))
    if params == 5:  # logistic part spans b1 over about ±2/b2 around b3; the linear part starts flat
        start = [sign * y_range, 1.0 / spread, float(np.mean(x)), 0.0, float(np.mean(y))]
        return start, ([-4 * y_range, 0.0, x_lo, -inf, -inf], [4 * y_range, 20.0 / spread, x_hi, inf, inf])
    y_lo, y_hi = float(np.min(y)), float(np.max(y))
    upper, lower = (y_hi, y_lo) if sign > 0 else (y_lo, y_hi)
    level = ([y_lo - 2 * y_range] * 2, [y_hi + 2 * y_range] * 2)
    return [upper, lower, float(np.mean(x)), spread / 4], ([*level[0], x_lo, spread / 20], [*level[1], x_hi, inf])


def fit_logistic(pred: Any, target: Any, params: int = 5) -> LogisticFit:
    """PLCC after the VQEG nonlinear mapping of predictions to targets (as pyiqa and VQEG reports do).

    ``β* = argmin_β Σ_i (f_β(x_i) − y_i)²`` by ``scipy.optimize.curve_fit``, with ``f`` the 5-parameter
    :func:`logistic_5` or 4-parameter :func:`logistic_4`; then ``PLCC_logistic = PLCC(f_β*(x), y)``.
    Start values come from the data (b3 = x̄, slope from std(x), amplitude from the range R of y), and
    loose bounds (trust-region reflective) keep the fit well posed: for 5 parameters ``|b1| ≤ 4R``,
    ``0 ≤ b2 ≤ 20/std(x)``, ``min x ≤ b3 ≤ max x``. When the fit fails (N ≤ number of parameters, no
    convergence, a non-finite or constant mapping) the result is the plain :func:`plcc` with
    ``fitted=False``.

    Args:
        pred: Predicted scores x, shape (N,).
        target: Ground-truth scores y, shape (N,).
        params: 5 (default) or 4.

    Returns:
        A :class:`LogisticFit`.

    Raises:
        ValueError: If the lengths differ or ``params`` is not 4 or 5.
    """
    if params not in (4, 5):
        raise ValueError(f"fit_logistic: params must be 4 or 5, got {params}")
    x, y = _paired_1d("plcc_logistic", pred, target)
    plain = _pearson(x, y)
    if not math.isfinite(plain):
        return LogisticFit(plain, False, reason="plain PLCC is undefined (N < 2, constant or nan input)")
    if x.size <= params:
        return LogisticFit(plain, False, reason=f"{x.size} samples cannot fit {params} parameters")
    func = logistic_5 if params == 5 else logistic_4
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # OptimizeWarning (covariance not estimated) does not matter here
            start, bounds = _start_and_bounds(x, y, params)
            beta, _ = curve_fit(func, x, y, p0=start, bounds=bounds, maxfev=10_000)
    except (RuntimeError, ValueError, TypeError) as exc:
        return LogisticFit(plain, False, reason=f"curve_fit failed: {exc}")
    mapped = func(x, *beta)
    fitted = _pearson(mapped, y)
    if not np.isfinite(mapped).all() or not math.isfinite(fitted):
        return LogisticFit(plain, False, reason="the fitted mapping is constant or not finite")
    return LogisticFit(fitted, True, tuple(float(b) for b in beta))


def plcc_logistic(pred: Any, target: Any, params: int = 5) -> float:
    """PLCC after the VQEG logistic mapping; see :func:`fit_logistic` for the formula.

    Args:
        pred: Predicted scores, shape (N,).
        target: Ground-truth scores, shape (N,).
        params: 5 (default) or 4 logistic parameters.

    Returns:
        The correlation in [−1, 1]. When the fit fails it is the plain PLCC, with a ``RuntimeWarning``
        (unless the plain PLCC is itself nan: N < 2 or a constant input).

    Raises:
        ValueError: If the lengths differ or ``params`` is not 4 or 5.
    """
    fit = fit_logistic(pred, target, params)
    if not fit.fitted and math.isfinite(fit.plcc):
        warnings.warn(f"plcc_logistic: {fit.reason}; reporting the plain PLCC", RuntimeWarning, stacklevel=2)
    return fit.plcc


def accuracy(pred: Any, target: Any, threshold: float) -> float:
    """Binary classification accuracy, "good" meaning score > threshold (AVA: threshold 5).

    ``ACC = (1/N) Σ_i 1[(ŷ_i > τ) = (y_i > τ)]``.

    Args:
        pred: Predicted scores, shape (N,).
        target: Ground-truth scores, shape (N,).
        threshold: Decision threshold τ, applied to both.

    Returns:
        Accuracy in [0, 1]; ``nan`` when N = 0.

    Raises:
        ValueError: If the lengths differ.
    """
    p, t = _paired_1d("accuracy", pred, target)
    if p.size == 0:
        return float("nan")
    return float(np.mean((p > threshold) == (t > threshold)))


def emd(pred_dist: Any, target_dist: Any, r: float = 1.0) -> float:
    """Earth mover's distance between score distributions, averaged over samples (reporting uses r = 1).

    ``EMD_r = (1/N) Σ_i ((1/K) Σ_k |CDF_p_i(k) − CDF_q_i(k)|^r)^(1/r)`` with ``CDF_p(k) = Σ_{j≤k} p_j``.
    Rows are used as given (pass probabilities, e.g. vote counts divided by their sum).

    Args:
        pred_dist: Predicted distributions, shape (N, K) or (K,) for one sample.
        target_dist: Ground-truth distributions, same shape.
        r: Norm order r > 0.

    Returns:
        Mean EMD over samples.

    Raises:
        ValueError: If the shapes differ or r ≤ 0.
    """
    p, q = np.atleast_2d(_to_numpy(pred_dist)), np.atleast_2d(_to_numpy(target_dist))
    if p.shape != q.shape or p.ndim != 2:
        raise ValueError(f"emd: expected two (N, K) arrays of the same shape, got {p.shape} vs {q.shape}")
    if r <= 0:
        raise ValueError(f"emd: r must be > 0, got {r}")
    diff = np.abs(np.cumsum(p, axis=1) - np.cumsum(q, axis=1))
    return float(np.mean(np.mean(diff**r, axis=1) ** (1.0 / r)))


def evaluate_scores(
    pred_scores: Any,
    target_scores: Any,
    threshold: float,
    pred_dist: Any | None = None,
    target_dist: Any | None = None,
    *,
    extended: bool = False,
) -> dict[str, float | int | bool | None]:
    """All score metrics at once.

    Validation during training (``val_*``) uses the core set; ``cskd-ray evaluate`` asks for the
    extended one, which adds the rank and fitted correlations of IQA papers.

    Args:
        pred_scores: Predicted scores, shape (N,).
        target_scores: Ground-truth scores, shape (N,).
        threshold: Accuracy threshold (see :func:`accuracy`).
        pred_dist: Predicted distributions (N, K), optional.
        target_dist: Ground-truth distributions (N, K), optional.
        extended: Also compute ``krcc`` (:func:`krcc`), ``plcc_logistic`` (5-parameter fit, see
            :func:`fit_logistic`) and ``plcc_logistic_fitted`` (False: the fit failed and
            ``plcc_logistic`` is the plain PLCC).

    Returns:
        ``{"srcc", "plcc", "accuracy", "emd", "n"}`` (plus the extended keys): floats, ``emd`` (r = 1) is
        None unless both distributions are given, and ``n`` is the number of samples.
    """
    p, t = _paired_1d("evaluate_scores", pred_scores, target_scores)
    has_dist = pred_dist is not None and target_dist is not None
    metrics: dict[str, float | int | bool | None] = {
        "srcc": srcc(p, t),
        "plcc": plcc(p, t),
        "accuracy": accuracy(p, t, threshold),
        "emd": emd(pred_dist, target_dist, r=1.0) if has_dist else None,
        "n": int(p.size),
    }
    if extended:
        fit = fit_logistic(p, t)
        metrics.update(krcc=krcc(p, t), plcc_logistic=fit.plcc, plcc_logistic_fitted=fit.fitted)
    return metrics


def _renormalized_attention(name: str, attn: Tensor) -> Tensor:
    """Check ``attn`` is (B, H, T, T) and rescale each row to sum to 1 (in at least float32)."""
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"{name}: expected attention of shape (B, H, T, T), got {tuple(attn.shape)}")
    a = attn.detach().to(torch.promote_types(attn.dtype, torch.float32))
    return a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


def attention_distance(attn: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """Mean attention distance per head, in pixels (as in the ViT paper's diagnostics).

    Rows are first renormalised over the patch tokens, ``A_ij ← A_ij / Σ_j' A_ij'``; patch i sits at
    ``p_i = patch_size · (row_i, col_i)`` on the row-major grid. Then
    ``d_h = (1/(B·T)) Σ_b Σ_i Σ_j A_bhij ‖p_i − p_j‖₂``.

    Args:
        attn: Attention probabilities over patch tokens only, shape (B, H, T, T) with T = gh·gw.
        grid: Patch grid (gh, gw), row-major like the ViT token order.
        patch_size: Patch side in pixels.

    Returns:
        Mean distance per head, shape (H,).

    Raises:
        ValueError: If the shape is not (B, H, T, T) or T ≠ gh·gw.
    """
    a = _renormalized_attention("attention_distance", attn)
    gh, gw = grid
    if a.shape[-1] != gh * gw:
        raise ValueError(f"attention_distance: {a.shape[-1]} tokens do not match grid {gh}x{gw}")
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1).to(a) * float(patch_size)
    dist = torch.cdist(pos, pos)
    return (a * dist).sum(dim=-1).mean(dim=(0, 2))


def attention_entropy(attn: Tensor) -> Tensor:
    """Mean attention entropy per head, in nats.

    After renormalising rows to sum to 1, ``e_h = (1/(B·T)) Σ_b Σ_i −Σ_j A_bhij log A_bhij`` with
    ``0 · log 0 = 0``; uniform rows over T tokens give ``log T``, one-hot rows give 0.

    Args:
        attn: Attention probabilities, shape (B, H, T, T).

    Returns:
        Mean entropy per head, shape (H,).

    Raises:
        ValueError: If the shape is not (B, H, T, T).
    """
    a = _renormalized_attention("attention_entropy", attn)
    return -torch.special.xlogy(a, a).sum(dim=-1).mean(dim=(0, 2))
