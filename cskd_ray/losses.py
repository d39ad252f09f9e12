"""Losses for CSKD: feature alignment to CLIP, NIMA's EMD on score distributions, and teacher distillation.

Three families, all plain functions on ``torch.Tensor`` that return a scalar (0-dim) tensor:

- **Feature alignment** (student → frozen CLIP): :func:`cosine_alignment`, :func:`mse_alignment` (CLIP-KD)
  and :func:`smooth_l1_tokens` (Feature Distillation, arXiv 2205.14141), chosen by name through
  :data:`ALIGNMENT_LOSSES` / :func:`alignment_loss`. The CLIP side is the target: it is detached, so
  gradients reach the student only.
- **Aesthetic heads**: :func:`emd_loss` (NIMA) for score distributions, :func:`score_mse` for scalar heads,
  and :func:`mean_score` to turn a distribution into a scalar score.
- **Distillation** (teacher → student on unlabelled images): :func:`distillation_loss`, and
  :func:`feature_mse` for a teacher's hidden features (Hou et al., arXiv 2206.00809).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ALIGNMENT_LOSSES",
    "alignment_loss",
    "cosine_alignment",
    "distillation_loss",
    "emd_loss",
    "feature_mse",
    "mean_score",
    "mse_alignment",
    "score_mse",
    "smooth_l1_tokens",
]

EMD_EPS = 1e-12
"""Floor of the mean inside EMD's root, so the gradient stays finite where both CDFs agree."""


def _check_same_shape(name: str, a: Tensor, b: Tensor, ndim: int | None = None) -> None:
    """Raise ValueError unless ``a`` and ``b`` have the same shape (and ``ndim`` dimensions when given)."""
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim}-D inputs, got shape {tuple(a.shape)}")


def cosine_alignment(student: Tensor, target: Tensor) -> Tensor:
    """Cosine alignment of student features to (detached) target features.

    ``L = (1/N) Σ_i (1 − cos(s_i, t_i))`` with ``cos(s, t) = s·t / (‖s‖ ‖t‖)``; 0 for identical
    directions, 1 for orthogonal ones and 2 for opposite ones.

    Args:
        student: Student features, shape (N, D).
        target: Target (CLIP) features, shape (N, D); detached inside.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If the shapes differ or are not 2-D.
    """
    _check_same_shape("cosine_alignment", student, target, ndim=2)
    return (1.0 - F.cosine_similarity(student, target.detach(), dim=-1)).mean()


def mse_alignment(student: Tensor, target: Tensor) -> Tensor:
    """Squared distance between L2-normalised features (CLIP-KD's feature distillation).

    ``L = (1/N) Σ_i ‖s_i/‖s_i‖ − t_i/‖t_i‖‖²`` (sum over D, mean over N); equals ``2·cosine_alignment``.

    Args:
        student: Student features, shape (N, D).
        target: Target (CLIP) features, shape (N, D); detached inside.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If the shapes differ or are not 2-D.
    """
    _check_same_shape("mse_alignment", student, target, ndim=2)
    diff = F.normalize(student, dim=-1) - F.normalize(target.detach(), dim=-1)
    return diff.pow(2).sum(dim=-1).mean()


def smooth_l1_tokens(student_tokens: Tensor, clip_tokens: Tensor, beta: float = 2.0) -> Tensor:
    """Smooth-L1 between the student token map and whitened CLIP tokens (Feature Distillation, arXiv 2205.14141).

    The target is ``t̂ = LayerNorm(t)`` over the channel dimension C without affine parameters,
    ``t̂ = (t − mean_C(t)) / sqrt(var_C(t) + 1e-5)``. With ``x = s − t̂`` elementwise,
    ``SmoothL1_β(x) = 0.5 x² / β`` if ``|x| < β`` else ``|x| − 0.5 β``, and
    ``L = mean over all N·T·C elements of SmoothL1_β(x)``.

    Args:
        student_tokens: Student tokens already projected to CLIP's width by the caller, shape (N, T, C).
        clip_tokens: CLIP tokens, shape (N, T, C); detached inside.
        beta: Transition point β > 0 between the quadratic and linear regimes.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If the token maps differ in shape (the message gives both) or are not 3-D, or β ≤ 0.
    """
    _check_same_shape("smooth_l1_tokens", student_tokens, clip_tokens, ndim=3)
    if beta <= 0:
        raise ValueError(f"smooth_l1_tokens: beta must be > 0, got {beta}")
    target = F.layer_norm(clip_tokens.detach(), clip_tokens.shape[-1:])
    return F.smooth_l1_loss(student_tokens, target, beta=beta, reduction="mean")


def feature_mse(student: Tensor, target: Tensor) -> Tensor:
    """Plain mean squared error between student and (detached) target features, not normalised.

    ``L = (1/(N·D)) Σ_i Σ_d (s_id − t_id)²``: the feature mimicry of Hou et al. (arXiv 2206.00809) on the
    combined teacher's hidden layer, where the feature's scale carries information.

    Args:
        student: Student features (projected to the target's width), shape (N, D).
        target: Target features, shape (N, D); detached inside.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If the shapes differ or are not 2-D.
    """
    _check_same_shape("feature_mse", student, target, ndim=2)
    return F.mse_loss(student, target.detach())


ALIGNMENT_LOSSES: dict[str, Callable[..., Tensor]] = {
    "cosine": cosine_alignment,
    "mse": mse_alignment,
    "smooth_l1_tokens": smooth_l1_tokens,
}
"""Alignment losses by config name; each takes ``(student, target)`` and returns a scalar tensor."""


def alignment_loss(name: str, student: Tensor, target: Tensor, **kwargs: Any) -> Tensor:
    """Compute the alignment loss registered under ``name`` in :data:`ALIGNMENT_LOSSES`.

    Args:
        name: One of ``"cosine"``, ``"mse"``, ``"smooth_l1_tokens"``.
        student: Student features (N, D) or tokens (N, T, C).
        target: CLIP features or tokens of the same shape; detached inside.
        **kwargs: Extra keyword arguments for the loss (e.g. ``beta`` for ``smooth_l1_tokens``).

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If ``name`` is unknown (the message lists the valid names).
    """
    try:
        fn = ALIGNMENT_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown alignment loss {name!r}; valid choices: {sorted(ALIGNMENT_LOSSES)}") from None
    return fn(student, target, **kwargs)


def emd_loss(pred: Tensor, target: Tensor, r: float = 2.0) -> Tensor:
    """Earth mover's distance between score distributions on ordered bins (NIMA).

    With ``CDF_p(k) = Σ_{j≤k} p_j``, per sample
    ``EMD_r(p, q) = ((1/K) Σ_k |CDF_p(k) − CDF_q(k)|^r)^(1/r)``, then ``L = (1/N) Σ_i EMD_r(p_i, q_i)``.
    The mean inside the root is floored at ``EMD_EPS`` (1e-12) so the gradient is finite (zero) where
    ``p = q``; the computation runs in at least float32.

    Args:
        pred: Predicted probabilities, shape (N, K), rows summing to 1 (apply softmax before).
        target: Target probabilities, shape (N, K); not detached (see :func:`distillation_loss`).
        r: Norm order r ≥ 1 (NIMA trains with r = 2).

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If the shapes differ or are not 2-D, or r < 1.
    """
    _check_same_shape("emd_loss", pred, target, ndim=2)
    if r < 1:
        raise ValueError(f"emd_loss: r must be >= 1, got {r}")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    cdf_diff = torch.cumsum(pred.to(dtype), dim=-1) - torch.cumsum(target.to(dtype), dim=-1)
    per_sample = cdf_diff.abs().pow(r).mean(dim=-1).clamp_min(EMD_EPS).pow(1.0 / r)
    return per_sample.mean()


def mean_score(probs: Tensor, scores: Tensor | None = None) -> Tensor:
    """Expected score of each distribution: ``μ_i = Σ_k s_k p_ik``.

    Args:
        probs: Probabilities over K ordered bins, shape (N, K).
        scores: Score of each bin, shape (K,); default ``s_k = k`` for k = 1..K (AVA's 1..10).

    Returns:
        Mean scores, shape (N,).

    Raises:
        ValueError: If ``scores`` does not have shape (K,).
    """
    k = probs.shape[-1]
    if scores is None:
        scores = torch.arange(1, k + 1, dtype=probs.dtype, device=probs.device)
    elif scores.shape != (k,):
        raise ValueError(f"mean_score: scores must have shape ({k},), got {tuple(scores.shape)}")
    return (probs * scores.to(probs)).sum(dim=-1)


def score_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error for scalar score heads: ``L = (1/N) Σ_i (ŷ_i − y_i)²``.

    Args:
        pred: Predicted scores, any shape.
        target: Target scores, the same shape (no broadcasting).

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If the shapes differ.
    """
    _check_same_shape("score_mse", pred, target)
    return F.mse_loss(pred, target)


def distillation_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    kind: Literal["distribution", "scalar"],
    r: float = 2.0,
) -> Tensor:
    """Distillation of the teacher's predictions into the student: ``L = D(student, stopgrad(teacher))``.

    ``D = EMD_r`` (see :func:`emd_loss`) when ``kind == "distribution"``; both outputs must then be
    **probabilities** of shape (N, K) (apply softmax to logits before calling). ``D = MSE`` (see
    :func:`score_mse`) when ``kind == "scalar"``. The teacher output is detached inside.

    Args:
        student_out: Student probabilities (N, K) or scores.
        teacher_out: Teacher probabilities (N, K) or scores, same shape.
        kind: ``"distribution"`` or ``"scalar"``.
        r: EMD norm order for distributions.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If ``kind`` is unknown or the shapes do not fit the loss.
    """
    teacher = teacher_out.detach()
    if kind == "distribution":
        return emd_loss(student_out, teacher, r=r)
    if kind == "scalar":
        return score_mse(student_out, teacher)
    raise ValueError(f"unknown distillation kind {kind!r}; valid choices: ['distribution', 'scalar']")
