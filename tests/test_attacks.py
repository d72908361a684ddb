"""Training-time attacks stay inside the threat model and are stronger than noise."""

import pytest
import torch
import torch.nn.functional as F

from rrm.attacks import fgsm, pgd, random_perturbation
from rrm.errors import RRMError
from rrm.models import build_model
from rrm.train import TrainConfig
from rrm.train.methods import Free


def _within(x, x_adv, norm, eps):
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = (x_adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-5).all(), size.max()


@pytest.fixture(scope="module")
def model_and_batch(digits_natural):
    data = digits_natural.data
    x = data.test_x[:128].float()
    return digits_natural.model, x, data.test_y[:128]


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_pgd_and_fgsm_stay_within_eps_and_pixel_range(model_and_batch, norm, eps):
    model, x, y = model_and_batch
    _within(x, pgd(model, x, y, norm=norm, eps=eps, step_size=eps / 3, steps=7), norm, eps)
    _within(x, fgsm(model, x, y, norm=norm, eps=eps, step_size=1.25 * eps, random_start=True), norm, eps)
    _within(x, x + random_perturbation(x, norm, eps), norm, eps)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_pgd_raises_the_loss_more_than_noise_of_the_same_size(model_and_batch, norm, eps):
    model, x, y = model_and_batch
    torch.manual_seed(0)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y).item()
        noisy = F.cross_entropy(model(x + random_perturbation(x, norm, eps)), y).item()
    x_adv = pgd(model, x, y, norm=norm, eps=eps, step_size=2.5 * eps / 10, steps=10)
    with torch.no_grad():
        attacked = F.cross_entropy(model(x_adv), y).item()
    assert attacked > noisy + 0.5 and attacked > clean + 0.5


def test_attack_leaves_parameter_gradients_and_mode_alone(model_and_batch):
    model, x, y = model_and_batch
    model.eval()
    model.zero_grad(set_to_none=True)
    pgd(model, x, y, norm="linf", eps=0.1, step_size=0.03, steps=2)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_eps_zero_returns_the_input(model_and_batch):
    model, x, y = model_and_batch
    assert torch.equal(pgd(model, x, y, norm="linf", eps=0.0, step_size=0.1, steps=3), x)


@pytest.mark.parametrize("kwargs", [dict(norm="l3", eps=0.1), dict(norm="linf", eps=-0.1), dict(norm="linf", eps=2.0)])
def test_bad_threat_model_is_rejected(model_and_batch, kwargs):
    model, x, y = model_and_batch
    with pytest.raises(RRMError):
        pgd(model, x, y, step_size=0.1, steps=1, **kwargs)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_free_at_perturbation_stays_within_eps(model_and_batch, norm, eps):
    _, x, y = model_and_batch
    student = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)

    def step(loss):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    method = Free(TrainConfig(method="free", norm=norm, eps=eps, replays=4))
    for _ in range(3):
        method.train_batch(student, x, y, step)
        _within(x, x + method.delta, norm, eps)
    assert method.delta.abs().sum() > 0
