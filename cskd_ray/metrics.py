"""Evaluation metrics for aesthetics assessment and ViT attention diagnostics.

Score metrics (:func:`srcc`, :func:`plcc`, :func:`accuracy`, :func:`emd`, :func:`evaluate_scores`) accept
numpy arrays, lists or torch tensors and return Python floats. Attention diagnostics
(:func:`attention_distance`, :func:`attention_entropy`) take torch tensors and return one value per head.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

__all__ = [
    "accuracy",
    "attention_distance",
    "attention_entropy",
    "emd",
    "evaluate_scores",
    "plcc",
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
) -> dict[str, float | int | None]:
    """All score metrics at once.

    Args:
        pred_scores: Predicted scores, shape (N,).
        target_scores: Ground-truth scores, shape (N,).
        threshold: Accuracy threshold (see :func:`accuracy`).
        pred_dist: Predicted distributions (N, K), optional.
        target_dist: Ground-truth distributions (N, K), optional.

    Returns:
        ``{"srcc", "plcc", "accuracy", "emd", "n"}``: floats, ``emd`` (r = 1) is None unless both
        distributions are given, and ``n`` is the number of samples.
    """
    p, t = _paired_1d("evaluate_scores", pred_scores, target_scores)
    has_dist = pred_dist is not None and target_dist is not None
    return {
        "srcc": srcc(p, t),
        "plcc": plcc(p, t),
        "accuracy": accuracy(p, t, threshold),
        "emd": emd(pred_dist, target_dist, r=1.0) if has_dist else None,
        "n": int(p.size),
    }


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
