"""Native torch attacks used in training and for quick looks: PGD-k and FGSM (PGD with one step), Linf and L2.

They run on the model's device with no numpy round trips, leave the model's mode and parameter gradients alone
(the caller decides train or eval mode, e.g. SAT crafts with BatchNorm in eval mode), and always return images
within ``eps`` of ``x`` and inside [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rrm.errors import RRMError, unknown

NORMS = ("linf", "l2")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_threat(norm: str, eps: float) -> None:
    if norm not in NORMS:
        raise unknown("norm", norm, NORMS)
    if not eps >= 0:
        raise RRMError(f"eps must be >= 0, got {eps}")
    if norm == "linf" and eps > 1:
        raise RRMError(f"Linf eps {eps} exceeds the [0, 1] pixel range; images are in [0, 1], e.g. 8/255 = 0.0314")


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.ndim - 1)))


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project a perturbation onto the ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _flat_norm(delta)).clamp(max=1.0)


def random_perturbation(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """A uniform random point of the ``norm`` ball, clipped so that ``x + delta`` stays in [0, 1]."""
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        direction = torch.randn_like(x)
        direction = direction / _flat_norm(direction)
        dims = x[0].numel()
        radius = eps * torch.rand(len(x), device=x.device, dtype=x.dtype).pow(1.0 / dims)
        delta = direction * radius.view(-1, *([1] * (x.ndim - 1)))
    return (x + delta).clamp(0, 1) - x


def ascent_step(grad: torch.Tensor, norm: str, step_size: float) -> torch.Tensor:
    """The steepest-ascent step of size ``step_size`` under ``norm``."""
    if norm == "linf":
        return step_size * grad.sign()
    return step_size * grad / _flat_norm(grad)


def _cross_entropy_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Summed so that each example's input gradient does not shrink with the batch size.
    return F.cross_entropy(logits.float(), y, reduction="sum")


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    loss_fn: LossFn = _cross_entropy_sum,
) -> torch.Tensor:
    """Madry et al.'s projected gradient ascent on ``loss_fn``; returns the adversarial images (detached)."""
    check_threat(norm, eps)
    if steps < 1:
        raise RRMError(f"attack steps must be >= 1, got {steps}")
    x = x.detach()
    if eps == 0:
        return x.clone()
    delta = random_perturbation(x, norm, eps) if random_start else torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = project(delta.detach() + ascent_step(grad, norm, step_size), norm, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    step_size: float | None = None,
    random_start: bool = False,
    loss_fn: LossFn = _cross_entropy_sum,
) -> torch.Tensor:
    """Fast gradient sign method (one PGD step); Wong et al.'s variant uses ``random_start`` and step 1.25 * eps."""
    return pgd(
        model,
        x,
        y,
        norm=norm,
        eps=eps,
        step_size=eps if step_size is None else step_size,
        steps=1,
        random_start=random_start,
        loss_fn=loss_fn,
    )


def n_fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    noise_magnitude: float,
    step_size: float,
    project_to_eps: bool = False,
    loss_fn: LossFn = _cross_entropy_sum,
) -> torch.Tensor:
    """de Jorge et al.'s (2022) N-FGSM: noise from the ``noise_magnitude`` ball (2 * eps in the paper), then one
    ascent step of ``step_size`` (eps), *not* projected back to the eps-ball unless ``project_to_eps``; pixels are
    kept in [0, 1] after the noise and after the step."""
    check_threat(norm, eps)
    x = x.detach()
    noisy = (x + random_perturbation(x, norm, noise_magnitude)).requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(model(noisy), y), noisy)
    delta = noisy.detach() + ascent_step(grad, norm, step_size) - x
    if project_to_eps:
        delta = project(delta, norm, eps)
    return (x + delta).clamp(0, 1).detach()
