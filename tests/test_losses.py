"""Each loss term against a hand computation on small tensors."""

import math

import pytest
import torch
from torch import nn

from rrm.train.losses import cosine_feature_loss, input_gradient, input_gradient_alignment, kd_loss, l2_feature_loss


def test_cosine_feature_loss_is_mean_of_one_minus_cosine():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    # example 1: orthogonal -> 1 - 0 = 1; example 2: parallel -> 1 - 1 = 0
    assert cosine_feature_loss(s, t).item() == pytest.approx(0.5)
    s2 = torch.tensor([[1.0, 0.0]])
    t2 = torch.tensor([[1.0, 1.0]])
    assert cosine_feature_loss(s2, t2).item() == pytest.approx(1 - 1 / math.sqrt(2))


def test_l2_feature_loss_is_relative_not_squared():
    s = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0001], [0.0, 2.0]])
    t[0] = torch.tensor([0.0, 1.0])
    # ||(3,3)|| / 1 = sqrt(18); ||(0,-2)|| / 2 = 1
    assert l2_feature_loss(s, t).item() == pytest.approx((math.sqrt(18) + 1.0) / 2)


def test_kd_applies_temperature_once():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 4.0
    expected = 0.0
    for i in range(2):
        p = torch.softmax(t[i] / T, 0)
        q = torch.softmax(s[i] / T, 0)
        expected += float((p * (p.log() - q.log())).sum())
    expected = T * T * expected / 2
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    # Applying T twice (the authors' bug) would give a different number.
    assert kd_loss(s / T, t / T, T).item() != pytest.approx(expected, rel=1e-3)


def test_kd_is_zero_for_identical_logits():
    logits = torch.randn(5, 10)
    # T^2 = 900 scales float32 rounding of the KL, hence the absolute tolerance
    assert kd_loss(logits, logits.clone(), 30.0).item() == pytest.approx(0.0, abs=1e-4)


def test_input_gradient_of_linear_model_matches_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 1, 0])
    grad, logits = input_gradient(model, x, y, create_graph=False)
    p = torch.softmax(x @ model.weight.T, 1)
    onehot = torch.nn.functional.one_hot(y, 2).float()
    expected = (p - onehot) @ model.weight  # d CE_i / d x_i for each example
    assert torch.allclose(grad, expected.detach(), atol=1e-6)
    assert torch.allclose(logits, x @ model.weight.T)


def test_alignment_is_mean_per_example_l2_and_teacher_is_constant():
    gs = torch.tensor([[3.0, 4.0], [1.0, 1.0]], requires_grad=True)
    gt = torch.tensor([[0.0, 0.0], [1.0, 2.0]], requires_grad=True)
    value = input_gradient_alignment(gs, gt)
    assert value.item() == pytest.approx((5.0 + 1.0) / 2)
    value.backward()
    assert gs.grad is not None and gt.grad is None


def test_kdiga_student_gradient_reaches_parameters_by_double_backprop():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    gs, _ = input_gradient(student, x, y, create_graph=True)
    gt, _ = input_gradient(teacher, x, y, create_graph=False)
    input_gradient_alignment(gs, gt).backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None
