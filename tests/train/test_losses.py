"""Losses: torch.nn.functional's with (..., C) logits; distillation against its formula."""

import pytest
import torch
import torch.nn.functional as F

from fastdl.train import losses


def test_cross_entropy_takes_sequence_logits():
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    expected = F.cross_entropy(logits.transpose(1, 2), targets)
    torch.testing.assert_close(losses.cross_entropy(logits, targets), expected)
    with pytest.raises(ValueError, match="need targets of shape"):
        losses.cross_entropy(logits, targets[:, :4])


def test_elementwise_losses_are_torch_functional():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(losses.mse(a, b), F.mse_loss(a, b))
    torch.testing.assert_close(losses.l1(a, b), F.l1_loss(a, b))
    torch.testing.assert_close(losses.huber(a, b, delta=0.5), F.huber_loss(a, b, delta=0.5))
    p = torch.rand(4, 3)
    torch.testing.assert_close(losses.bce_with_logits(a, p), F.binary_cross_entropy_with_logits(a, p))


def test_kl_divergence_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(6, 5)
    assert losses.kl_divergence(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.kl_divergence(a, torch.randn(6, 5)).item() > 0


def test_distillation_loss_matches_its_formula():
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    targets = torch.randint(0, 5, (8,))
    alpha, T = 0.3, 4.0
    p_teacher = F.softmax(teacher / T, dim=-1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / T, dim=-1))).sum(-1).mean()
    expected = alpha * F.cross_entropy(student, targets) + (1 - alpha) * T**2 * kl
    torch.testing.assert_close(losses.distillation_loss(student, teacher, targets, alpha, T), expected)


def test_distillation_gradient_reaches_the_student_only():
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    losses.distillation_loss(student, teacher, torch.tensor([0, 1, 2, 0])).backward()
    assert student.grad is not None and teacher.grad is None


def test_get_loss_names_the_choices():
    assert losses.get_loss("huber") is losses.huber
    with pytest.raises(ValueError, match="cross_entropy"):
        losses.get_loss("hinge")
