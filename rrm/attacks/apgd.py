"""Auto-PGD with cross-entropy (Croce & Hein 2020), native torch, and IBM ART's AutoPGD as the reference.

:func:`apgd` is the fast attack for monitoring, tuning and quick numbers: it runs on the model's device with no numpy
round trips, does one forward/backward per iteration, and stops working on an image as soon as it is fooled.
:func:`art_apgd` runs ART's ``AutoProjectedGradientDescent`` the way the paper did; final reports quote it.

Both leave the model's mode and parameter gradients alone (put the model in eval mode first) and return images
within ``eps`` of ``x`` and inside [0, 1]. Images the model already misclassifies are returned unchanged, so
adversarial accuracy can never exceed natural accuracy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rrm.attacks.pgd import ascent_step, check_threat, project, random_perturbation
from rrm.errors import RRMError

# The paper's constants: momentum weight alpha and the oscillation threshold rho of condition 1.
MOMENTUM = 0.75
RHO = 0.75


def checkpoints(steps: int) -> list[int]:
    """The iterations ``w_j = ceil(p_j * steps)`` at which APGD decides per image whether to halve its step size.

    ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``: checks start sparse (explore with a
    large step) and get denser (exploit with small steps).
    """
    p = [0.0, 0.22]
    while (nxt := p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)) <= 1:
        p.append(nxt)
    return [math.ceil(q * steps) for q in p]


def _feasible(v: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project ``v`` onto the ``eps`` ball around ``x``, then into [0, 1] (clipping never leaves the ball)."""
    return (x + project(v - x, norm, eps)).clamp(0, 1)


def _loss_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-image cross-entropy, its input gradient and whether the image is misclassified, in one forward/backward.

    ``autograd.grad`` on the input only, so parameter ``.grad`` is never touched.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad, logits.detach().argmax(1) != y


@dataclass
class _Run:
    """One restart's state for the images that are not fooled yet (row i is image ``idx[i]`` of the batch)."""

    idx: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    x_k: torch.Tensor
    x_prev: torch.Tensor
    grad: torch.Tensor
    loss: torch.Tensor
    eta: torch.Tensor  # per-image step size, shape (n, 1, ..., 1)
    best_x: torch.Tensor
    best_grad: torch.Tensor
    best_loss: torch.Tensor
    increases: torch.Tensor  # steps since the last checkpoint at which the loss went up (condition 1)
    reduced_last: torch.Tensor  # step size halved at the last checkpoint (condition 2)
    best_at_check: torch.Tensor  # best loss at the last checkpoint (condition 2)

    def keep(self, rows: torch.Tensor) -> _Run:
        return _Run(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, *([1] * (a.ndim - 1))), a, b)


def _apgd_restart(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    eps: float,
    steps: int,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run from a random start (or from ``start``, projected to the ball); returns ``(x_adv, fooled, loss)``
    per image.

    ``x_adv`` is the first iterate that fools the model where one does, else the highest-loss iterate.
    """
    x_0 = x + random_perturbation(x, norm, eps) if start is None else _feasible(start, x, norm, eps)
    loss, grad, fooled = _loss_and_grad(model, x_0, y)
    out, out_loss, out_fooled = x_0.clone(), loss.clone(), fooled.clone()
    n = len(x)
    s = _Run(
        idx=torch.arange(n, device=x.device),
        x=x,
        y=y,
        x_k=x_0,
        x_prev=x_0,
        grad=grad,
        loss=loss,
        eta=torch.full((n,) + (1,) * (x.ndim - 1), 2 * eps, device=x.device, dtype=x.dtype),
        best_x=x_0,
        best_grad=grad,
        best_loss=loss,
        increases=torch.zeros(n, device=x.device),
        reduced_last=torch.zeros(n, dtype=torch.bool, device=x.device),
        best_at_check=loss,
    ).keep(~fooled)
    checks = set(checkpoints(steps)[1:])
    last_check = 0
    for k in range(1, steps + 1):
        if len(s.idx) == 0:
            break
        # The first step has no momentum (alpha = 1), as in the paper.
        a = 1.0 if k == 1 else MOMENTUM
        z = _feasible(s.x_k + ascent_step(s.grad, norm, s.eta), s.x, norm, eps)
        x_new = _feasible(s.x_k + a * (z - s.x_k) + (1 - a) * (s.x_k - s.x_prev), s.x, norm, eps)
        loss, grad, fooled = _loss_and_grad(model, x_new, s.y)
        better = loss > s.best_loss
        s.increases = s.increases + (loss > s.loss)
        s.x_prev, s.x_k, s.grad, s.loss = s.x_k, x_new, grad, loss
        s.best_x, s.best_grad = _where(better, x_new, s.best_x), _where(better, grad, s.best_grad)
        s.best_loss = torch.where(better, loss, s.best_loss)
        if fooled.any():
            done = s.idx[fooled]
            out[done], out_loss[done], out_fooled[done] = x_new[fooled], loss[fooled], True
            s = s.keep(~fooled)
        if k in checks and k < steps:
            # Halve the step and restart from the best point where the loss oscillated (condition 1) or neither the
            # step size nor the best loss changed since the last checkpoint (condition 2).
            reduce = (s.increases < RHO * (k - last_check)) | (~s.reduced_last & (s.best_loss <= s.best_at_check))
            s.eta = _where(reduce, s.eta / 2, s.eta)
            s.x_k = _where(reduce, s.best_x, s.x_k)
            s.x_prev = _where(reduce, s.best_x, s.x_prev)  # no momentum right after moving to the best point
            s.grad = _where(reduce, s.best_grad, s.grad)
            s.reduced_last, s.best_at_check, s.increases = reduce, s.best_loss, torch.zeros_like(s.increases)
            last_check = k
    out[s.idx], out_loss[s.idx] = s.best_x, s.best_loss
    return out, out_fooled, out_loss


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's generators inside the block and restore them afterwards (a no-op for ``seed=None``)."""
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def _check_budget(steps: int, restarts: int) -> None:
    if steps < 1:
        raise RRMError(f"attack steps must be >= 1, got {steps}")
    if restarts < 1:
        raise RRMError(f"attack restarts must be >= 1, got {restarts}")


def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    steps: int = 50,
    restarts: int = 10,
    seed: int | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """APGD-CE with ``restarts`` random restarts of ``steps`` iterations; returns the adversarial images (detached).

    Per-image step size starting at 2 * eps, halved at the checkpoints of :func:`checkpoints`; momentum 0.75.
    Each restart attacks only the images no earlier restart fooled, so more restarts never raise accuracy.
    ``start``: where the first restart begins (projected to the eps ball), in place of a random point.
    """
    check_threat(norm, eps)
    _check_budget(steps, restarts)
    x, y = x.detach(), y.detach()
    x_adv = x.clone()
    if eps == 0 or len(x) == 0:
        return x_adv
    with seeded(seed):
        with torch.no_grad():
            robust = model(x).argmax(1) == y
        best_loss = torch.full((len(x),), -math.inf, device=x.device)
        for _ in range(restarts):
            idx = robust.nonzero().flatten()
            if len(idx) == 0:
                break
            first = None if start is None else start.detach()[idx]
            adv, fooled, loss = _apgd_restart(model, x[idx], y[idx], norm, eps, steps, first)
            start = None  # later restarts start at random
            take = fooled | (loss > best_loss[idx])
            x_adv[idx[take]], best_loss[idx[take]] = adv[take], loss[take]
            robust[idx[fooled]] = False
    return x_adv


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters need no gradient inside the block; mode, ``requires_grad`` and ``.grad`` are restored after.

    ART switches the model to eval mode, calls ``zero_grad`` and back-propagates into the parameters; this keeps
    the caller's model exactly as it was (and skips the parameter gradients, which attacks never need).
    """
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    was_training = model.training
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        model.train(was_training)
        for p, (requires_grad, grad) in zip(params, saved):
            p.requires_grad_(requires_grad)
            p.grad = grad


def art_apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    num_classes: int,
    steps: int = 50,
    restarts: int = 10,
    batch_size: int = 50,
    seed: int | None = None,
) -> torch.Tensor:
    """ART's ``AutoProjectedGradientDescent`` as the paper ran it: ``PyTorchClassifier`` with cross-entropy and
    ``clip_values=(0, 1)``, eps_step = 2 * eps, fp32, the model in eval mode; returns a tensor on ``x``'s device.

    ART draws its random starts from numpy's global generator: with ``seed`` it is seeded and restored after.
    ART rejects eps = 0; the unperturbed images are the answer there.
    """
    check_threat(norm, eps)
    _check_budget(steps, restarts)
    if eps == 0 or len(x) == 0:
        return x.detach().clone()
    import numpy as np
    from art.attacks.evasion import AutoProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    device = next(model.parameters()).device
    classifier = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=num_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )
    attack = AutoProjectedGradientDescent(
        classifier,
        norm=np.inf if norm == "linf" else 2,
        eps=eps,
        eps_step=2 * eps,
        max_iter=steps,
        nb_random_init=restarts,
        batch_size=batch_size,
        verbose=False,
    )
    state = np.random.get_state()
    try:
        if seed is not None:
            np.random.seed(seed)
        with frozen(model):
            x_adv = attack.generate(x.detach().float().cpu().numpy(), y=y.cpu().numpy())
    finally:
        np.random.set_state(state)
    return torch.from_numpy(x_adv).to(x.device)
