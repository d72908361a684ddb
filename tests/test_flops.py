"""Counted training cost: one step of each method against the hand computation on a linear model, and the counts the
trainer records."""

import pytest
import torch
from torch import nn

from rrm.models import Classifier
from rrm.train import TrainConfig, train
from rrm.train.flops import FlopCounter
from rrm.train.methods import get_method

D, H, C, B = 16, 8, 3, 4  # input pixels, features, classes, batch


def _linear() -> Classifier:
    torch.manual_seed(0)
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(D, H)), H, C, mean=(0.0,), std=(1.0,))


def _step_flops(method: str, teacher: Classifier | None = None, **kw) -> int:
    cfg = TrainConfig(method=method, eps=0.1, **kw)
    strategy = get_method(method)(cfg, teacher)
    model = _linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(loss):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    x, y = torch.rand(B, 1, 4, 4), torch.randint(0, C, (B,))
    with FlopCounter() as counter:
        strategy.train_batch(model, x, y, step)
    return counter.get_total_flops()


# By hand: a matrix product (n x k) @ (k x m) is 2nkm FLOPs.
FORWARD = 2 * B * D * H + 2 * B * H * C  # the two linear layers
INPUT_GRAD = 2 * B * H * C + 2 * B * D * H  # back through both layers to the input
WEIGHT_GRAD = 2 * B * D * H + 2 * B * H * C  # the weights' gradients
TRAIN_BACKWARD = WEIGHT_GRAD + 2 * B * H * C  # the input of the first layer needs no gradient


def test_natural_training_counts_a_forward_and_a_backward_pass():
    assert _step_flops("natural") == FORWARD + TRAIN_BACKWARD


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_sat_adds_k_attack_passes(steps):
    attack = steps * (FORWARD + INPUT_GRAD)  # each PGD step: a forward pass and the input gradient
    assert _step_flops("sat", attack_steps=steps) == attack + FORWARD + TRAIN_BACKWARD


def test_rrm_adds_one_teacher_forward():
    teacher = _linear()
    teacher_features = 2 * B * D * H  # the teacher's features only, no head and no backward pass
    assert _step_flops("rrm", teacher=teacher) == FORWARD + TRAIN_BACKWARD + teacher_features


def test_the_trainer_records_flops_per_epoch_and_in_total(tmp_path, digits):
    cfg = TrainConfig(
        dataset="digits",
        model="cnn",
        method="natural",
        epochs=2,
        lr=0.05,
        monitor_examples=0,
        progress=False,
        out_dir=str(tmp_path),
    )
    natural = train(cfg, data=digits)
    sat = train(cfg.replace(method="sat", attack_steps=3, eps=0.1, out_dir=str(tmp_path / "sat")), data=digits)
    assert natural.summary["total_flops"] == pytest.approx(2 * natural.history[0]["epoch_flops"])
    assert natural.summary["flops_per_epoch"] == natural.history[0]["epoch_flops"] > 0
    # A training step is a forward pass F plus the weights' and inputs' gradients (about 2F); an attack step is F plus
    # the input gradient (about 2F), so PGD-3 costs about 1 + 3 * 2/3 = 3 natural steps.
    assert sat.summary["flops_per_epoch"] / natural.summary["flops_per_epoch"] == pytest.approx(3.0, rel=0.1)


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_a_grouped_convolutions_backward_pass_costs_twice_its_forward(groups):
    """By hand: a 3x3 convolution of 16 -> 16 channels in ``groups`` groups over 8x8 maps is 2 * 16 * (16 / groups) * 9
    FLOPs per pixel forward; its backward pass (input and weight gradients) twice that. torch 2.14's formula counts a
    grouped convolution's weight gradient as if ungrouped (16x too much for a depthwise one): rrm's counter does not."""
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=groups, bias=False)
    x = torch.rand(2, 16, 8, 8, requires_grad=True)
    with FlopCounter() as counter:
        conv(x).sum().backward()
    forward = 2 * 2 * 16 * (16 // groups) * 9 * 64
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts == {"aten.convolution": forward, "aten.convolution_backward": 2 * forward}
