"""Losses against hand-computed values on tiny tensors, plus gradient checks."""

from __future__ import annotations

import math

import pytest
import torch

from cskd_ray import losses
from cskd_ray.losses import (
    ALIGNMENT_LOSSES,
    alignment_loss,
    cosine_alignment,
    distillation_loss,
    emd_loss,
    mean_score,
    mse_alignment,
    score_mse,
    smooth_l1_tokens,
)


def test_cosine_alignment_known_angles() -> None:
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([[0.0, 1.0], [2.0, 0.0], [-3.0, 0.0]])  # orthogonal → 1, identical → 0, opposite → 2
    assert cosine_alignment(student, target).item() == pytest.approx((1 + 0 + 2) / 3)
    assert cosine_alignment(student[:1], target[:1]).item() == pytest.approx(1.0)
    assert cosine_alignment(student[1:2], target[1:2]).item() == pytest.approx(0.0, abs=1e-7)
    assert cosine_alignment(student[2:], target[2:]).item() == pytest.approx(2.0)


def test_cosine_alignment_gradient_reaches_student_only() -> None:
    student = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    frozen = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    cosine_alignment(student, frozen).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert not frozen.requires_grad and frozen.grad is None

    student.grad = None
    target = frozen.clone().requires_grad_(True)  # even a trainable target gets no gradient
    cosine_alignment(student, target).backward()
    assert target.grad is None and student.grad is not None


def test_mse_alignment_known_vectors() -> None:
    # [3,4]/5 = [0.6,0.8] vs [1,0]: (0.4² + 0.8²) = 0.8 ; [0,2] vs [0,5]: same direction → 0
    student = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    assert mse_alignment(student, target).item() == pytest.approx((0.8 + 0.0) / 2)
    assert mse_alignment(student, target).item() == pytest.approx(2 * cosine_alignment(student, target).item())


def test_smooth_l1_tokens_by_hand() -> None:
    # CLIP token [0, 2] → LayerNorm (no affine, eps 1e-5) ≈ [-1, 1]; student [-1.5, 4] → diffs [-0.5, 3]
    # β = 2: |−0.5| < β → 0.5·0.25/2 = 0.0625 ; |3| ≥ β → 3 − 1 = 2 ; mean = 1.03125
    clip = torch.tensor([[[0.0, 2.0]]])
    student = torch.tensor([[[-1.5, 4.0]]])
    assert smooth_l1_tokens(student, clip, beta=2.0).item() == pytest.approx(1.03125, abs=1e-4)
    # β = 1: 0.5·0.25/1 = 0.125 ; 3 − 0.5 = 2.5 ; mean = 1.3125
    assert smooth_l1_tokens(student, clip, beta=1.0).item() == pytest.approx(1.3125, abs=1e-4)


def test_smooth_l1_tokens_layer_norm_target_and_shape_error() -> None:
    clip = torch.randn(2, 4, 8) * 5 + 3
    target = (clip - clip.mean(-1, keepdim=True)) / torch.sqrt(clip.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert smooth_l1_tokens(target, clip).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(2, 4, 8\) vs \(2, 9, 8\)"):
        smooth_l1_tokens(torch.zeros(2, 4, 8), torch.zeros(2, 9, 8))


def test_alignment_loss_registry() -> None:
    assert set(ALIGNMENT_LOSSES) == {"cosine", "mse", "smooth_l1_tokens"}
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.equal(alignment_loss("cosine", s, t), cosine_alignment(s, t))
    assert torch.equal(alignment_loss("mse", s, t), mse_alignment(s, t))
    tok_s, tok_t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(alignment_loss("smooth_l1_tokens", tok_s, tok_t, beta=1.0),
                       smooth_l1_tokens(tok_s, tok_t, beta=1.0))
    with pytest.raises(ValueError, match="valid choices.*cosine.*mse.*smooth_l1_tokens"):
        alignment_loss("l2", s, t)


def test_emd_loss_by_hand() -> None:
    # p = [1,0,0], q = [0,0,1]: CDFs [1,1,1] vs [0,0,1] → |diff| = [1,1,0]
    p = torch.tensor([[1.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 0.0, 1.0]])
    assert emd_loss(p, q, r=2.0).item() == pytest.approx(math.sqrt((1 + 1 + 0) / 3))
    assert emd_loss(p, q, r=1.0).item() == pytest.approx((1 + 1 + 0) / 3)
    # batch mean: second sample identical → EMD ≈ 0 (floored at sqrt(1e-12) = 1e-6)
    batch_p, batch_q = torch.cat([p, q]), torch.cat([q, q])
    assert emd_loss(batch_p, batch_q).item() == pytest.approx(math.sqrt(2 / 3) / 2, abs=1e-6)


def test_emd_loss_gradient_finite_when_equal() -> None:
    logits = torch.randn(4, 10, requires_grad=True)
    pred = logits.softmax(dim=-1)
    for r in (1.0, 2.0, 3.0):
        logits.grad = None
        emd_loss(pred, pred.detach().clone(), r=r).backward(retain_graph=True)
        assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert emd_loss(pred, pred.detach()).item() == pytest.approx(0.0, abs=2e-6)


def test_emd_loss_half_precision_and_errors() -> None:
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float16, requires_grad=True)
    out = emd_loss(p, p.detach())
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(p.grad).all()
    with pytest.raises(ValueError, match="shapes differ"):
        emd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="r must be"):
        emd_loss(torch.zeros(2, 3), torch.zeros(2, 3), r=0.5)


def test_mean_score() -> None:
    probs = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    # default s = [1, 2, 3]: 3 ; 1.5 ; 0.2 + 0.6 + 1.5 = 2.3
    assert torch.allclose(mean_score(probs), torch.tensor([3.0, 1.5, 2.3]))
    assert torch.allclose(mean_score(probs, torch.tensor([0.0, 10.0, 20.0])), torch.tensor([20.0, 5.0, 13.0]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        mean_score(probs, torch.tensor([1.0, 2.0]))


def test_score_mse() -> None:
    # ((1-0)² + (2-4)²) / 2 = 2.5
    assert score_mse(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="shapes differ"):
        score_mse(torch.zeros(3), torch.zeros(3, 1))


def test_distillation_loss_kinds_and_teacher_detached() -> None:
    student = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0, 1.0]], requires_grad=True)
    loss = distillation_loss(student, teacher, "distribution", r=1.0)
    assert loss.item() == pytest.approx(2 / 3)
    loss.backward()
    assert teacher.grad is None and student.grad is not None

    s, t = torch.tensor([5.0, 6.0], requires_grad=True), torch.tensor([4.0, 6.0], requires_grad=True)
    loss = distillation_loss(s, t, "scalar")
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="distribution.*scalar"):
        distillation_loss(s, t, "logits")  # type: ignore[arg-type]


def test_public_api() -> None:
    for name in losses.__all__:
        assert hasattr(losses, name)
