"""Gradient-masking checks (Carlini et al. 2019): one function per symptom, and :func:`sanity_checks`, which runs them.

A robustness number is worth nothing if the model merely hides its gradients (defensive distillation and
high-temperature KD did exactly that), so :func:`rrm.evaluation.evaluate` runs these checks, by default, on a subset
with the native APGD. Each ``check_*`` function attacks the subset as its symptom needs and returns the check's
measured numbers with ``passed``; its docstring names the section of ``docs/evaluation.md`` that explains it.

``tol`` is ``EvalConfig.sanity_tolerance``, 2 points by default: on a 200-image subset one or two borderline images
flip between attack runs that differ only in their random starts. Every image the checks make is measured against
its eps ball by the evaluation's :class:`Constraint`, whose result is the ``constraint`` check.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from rrm.attacks import apgd
from rrm.attacks.autoattack import square
from rrm.evaluation.config import EPS_MULTIPLES, MORE_RESTARTS, MORE_STEPS_FACTOR, EvalConfig
from rrm.evaluation.crafts import crafted_on, native_apgd, noise
from rrm.metrics import Attack, accuracy


class Constraint:
    """Every adversarial example of every attack lies within its eps and inside [0, 1] (the ``constraint`` check):
    the largest amount by which any leaves its eps ball, computed in float64, and its pixel range. The slack is 1e-6
    per pixel for Linf and 1e-6 * sqrt(pixels) for L2, the fp32 rounding of ``x + delta``.

    Docs: docs/evaluation.md, 'Gradient-masking checks'."""

    def __init__(self, norm: str):
        self.norm = norm
        self.excess = -math.inf
        self.min_pixel, self.max_pixel = math.inf, -math.inf
        self.finite = True
        self.slack = 0.0

    def update(self, x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> None:
        delta = (x_adv.double() - x.double()).flatten(1)
        dist = delta.abs().amax(1) if self.norm == "linf" else delta.norm(dim=1)
        self.record(
            dist.max().item() - eps,
            x_adv.min().item(),
            x_adv.max().item(),
            bool(torch.isfinite(x_adv).all()),
            delta.shape[1],
        )

    def record(self, excess: float, min_pixel: float, max_pixel: float, finite: bool, pixels: int) -> None:
        """Fold in a summary measured elsewhere (AutoAttack's, kept across a resumed run)."""
        self.slack = 1e-6 * (1.0 if self.norm == "linf" else math.sqrt(pixels))
        self.excess = max(self.excess, excess)
        self.min_pixel, self.max_pixel = min(self.min_pixel, min_pixel), max(self.max_pixel, max_pixel)
        self.finite = self.finite and finite

    def result(self) -> dict:
        passed = self.finite and self.excess <= self.slack and self.min_pixel >= 0 and self.max_pixel <= 1
        return {
            "passed": bool(passed),
            "max_excess_over_eps": self.excess,
            "slack": self.slack,
            "min_pixel": self.min_pixel,
            "max_pixel": self.max_pixel,
            "finite": self.finite,
        }


def checked(craft: Attack, constraint: Constraint, eps: float) -> Attack:
    """``craft``, with every image it makes measured against the eps ball by ``constraint``."""

    def attack(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        x_adv = craft(x, y, seed)
        constraint.update(x, x_adv, eps)
        return x_adv

    return attack


@dataclass
class CheckSubset:
    """The images the checks attack, the model and settings, and the constraint that measures what they make."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    config: EvalConfig
    constraint: Constraint
    progress: bool | None = None

    def attacked(self, craft: Attack, radius: float, desc: str, seed: int | None = None) -> float:
        """Accuracy under ``craft`` at ``radius`` (seeded ``config.seed`` unless ``seed`` is given)."""
        return accuracy(
            self.model,
            self.x,
            self.y,
            attack=checked(craft, self.constraint, radius),
            seed=self.config.seed if seed is None else seed,
            batch_size=self.config.batch_size,
            progress=self.progress,
            desc=f"sanity: {desc}",
        )


def eps_growth_radii(norm: str, eps: float) -> dict[str, float]:
    """The radii of the eps-growth curve by name (``x0.5``, ``x1``, ...): eps times each of ``EPS_MULTIPLES``, capped at
    1 for Linf, where the ball already holds every image; multiples past the cap are one attack, not several."""
    cap = 1.0 if norm == "linf" else math.inf
    radii: dict[str, float] = {}
    for m in EPS_MULTIPLES:
        radius = min(m * eps, cap)
        if radius not in radii.values():
            radii[f"x{m:g}"] = radius
    return radii


def check_eps_growth(subset: CheckSubset) -> dict:
    """Accuracy does not fall to zero as eps grows, or rises with it (``eps_growth``): APGD accuracy at eps x 0.5, 1,
    2, 4, 8 (:func:`eps_growth_radii`) must fall to at most ``sanity_zero_accuracy`` (5%, half of chance on 10
    classes: a model guessing under its strongest perturbation has not been attacked) and never rise by more than
    ``tol`` as eps grows. ``accuracy["x1"]`` is the white-box accuracy the other checks compare with.

    Docs: docs/evaluation.md, 'Gradient-masking checks' and 'When the eps-growth check fails'."""
    config = subset.config
    radii = eps_growth_radii(config.norm, config.eps)
    growth = {
        name: subset.attacked(native_apgd(subset.model, config.norm, r, config.sanity_steps, 1), r, f"eps {name}")
        for name, r in radii.items()
    }
    curve = list(growth.values())
    return {
        "passed": bool(
            curve[-1] <= config.sanity_zero_accuracy
            and all(b <= a + config.sanity_tolerance for a, b in itertools.pairwise(curve))
        ),
        "accuracy": growth,
        "largest_eps": max(radii.values()),
        "threshold": config.sanity_zero_accuracy,
    }


def other_class_starts(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """For each image, the nearest image (L2, in the batch) of another class that ``model`` classifies as its own
    label, where there is one, else the nearest of another class, else the image itself: a start from which an attack
    on a ball that holds every image succeeds at once unless the model is broken."""
    with torch.no_grad():
        own = model(x).argmax(1) == y
    flat = x.flatten(1).float()
    distance = torch.cdist(flat, flat)
    other = y.view(-1, 1) != y.view(1, -1)
    big = distance.max() + 1
    score = distance + big * (~other) + big * (~own).view(1, -1) * 0.5  # prefer well-classified donors
    donor = score.argmin(1)
    alone = ~other.any(1)
    donor[alone] = torch.arange(len(x), device=x.device)[alone]
    return x[donor]


def check_reachable(subset: CheckSubset, eps_growth: dict) -> dict | None:
    """An eps ball that holds every image leaves images standing (``reachable``; Linf, when the largest radius of
    ``eps_growth`` is 1): APGD started from the nearest image of another class that the model classifies as that
    class (:func:`other_class_starts`) must end at most ``sanity_zero_accuracy``. Where it does and ``eps_growth``
    fails, the attack failed from random starts, not the model (:func:`sanity_warnings` says so). None where the
    largest radius does not hold every image.

    Docs: docs/evaluation.md, 'When the eps-growth check fails'."""
    config, model = subset.config, subset.model
    largest = eps_growth["largest_eps"]
    if config.norm != "linf" or largest < 1:
        return None

    def from_another_class(xb: torch.Tensor, yb: torch.Tensor, s: int) -> torch.Tensor:
        start = other_class_starts(model, xb, yb)
        return apgd(
            model, xb, yb, norm=config.norm, eps=largest, steps=config.sanity_steps, restarts=1, seed=s, start=start
        )

    reached = subset.attacked(from_another_class, largest, "from another class")
    return {
        "passed": bool(reached <= config.sanity_zero_accuracy),
        "accuracy": reached,
        "apgd_accuracy": list(eps_growth["accuracy"].values())[-1],
        "eps": largest,
        "threshold": config.sanity_zero_accuracy,
    }


def check_more_steps(subset: CheckSubset, whitebox_accuracy: float) -> dict:
    """More iterations raise accuracy (``more_steps``): APGD with ``MORE_STEPS_FACTOR`` (4) times the iterations, on
    other seeds, must not raise it by more than ``tol``; where it *lowers* it by more than ``tol`` (``lowered``), the
    result carries a warning that the attack was weak (:func:`sanity_warnings`).

    Docs: docs/evaluation.md, 'Gradient-masking checks'."""
    config, tol, steps = subset.config, subset.config.sanity_tolerance, subset.config.sanity_steps
    more = subset.attacked(
        native_apgd(subset.model, config.norm, config.eps, MORE_STEPS_FACTOR * steps, 1),
        config.eps,
        "more steps",
        config.seed + 1,
    )
    return _more_attack(whitebox_accuracy, more, tol, steps=steps, steps_more=MORE_STEPS_FACTOR * steps)


def check_more_restarts(subset: CheckSubset, whitebox_accuracy: float) -> dict:
    """More restarts raise accuracy (``more_restarts``): APGD with ``MORE_RESTARTS`` (4) restarts, on other seeds, must
    not raise it by more than ``tol``; where it *lowers* it by more than ``tol`` (``lowered``), the result carries a
    warning that the attack was weak (:func:`sanity_warnings`).

    Docs: docs/evaluation.md, 'Gradient-masking checks'."""
    config, tol = subset.config, subset.config.sanity_tolerance
    more = subset.attacked(
        native_apgd(subset.model, config.norm, config.eps, config.sanity_steps, MORE_RESTARTS),
        config.eps,
        "more restarts",
        config.seed + 2,
    )
    return _more_attack(whitebox_accuracy, more, tol, restarts_more=MORE_RESTARTS)


def _more_attack(accuracy: float, more: float, tol: float, **budget: int) -> dict:
    """A stronger attack's verdict: it must not raise accuracy by more than ``tol``; ``lowered`` where it lowers it
    by more than ``tol``."""
    return {
        "passed": bool(more <= accuracy + tol),
        "accuracy": accuracy,
        "accuracy_more": more,
        **budget,
        "lowered": more < accuracy - tol,
    }


def check_noise(subset: CheckSubset, whitebox_accuracy: float) -> dict:
    """Noise beats the attack (``noise``): uniform noise in the eps ball must hurt no more than the attack (noise
    accuracy >= attack accuracy - ``tol``).

    Docs: docs/evaluation.md, 'Gradient-masking checks'."""
    config = subset.config
    noisy = subset.attacked(noise(config.norm, config.eps), config.eps, "noise")
    return {
        "passed": bool(noisy >= whitebox_accuracy - config.sanity_tolerance),
        "noise_accuracy": noisy,
        "attack_accuracy": whitebox_accuracy,
    }


def check_square(subset: CheckSubset, whitebox_accuracy: float) -> dict:
    """The black-box Square attack beats the gradient attack (``square``): with ``sanity_square_queries`` queries per
    image (100 by default against AutoAttack's 5,000, to keep the test suite and ``dvc repro`` affordable on CPU) it
    must leave accuracy no more than ``tol`` below the white-box APGD accuracy. Square uses only the model's outputs,
    so a model that hides or zeroes its gradients falls to it while APGD stalls. 100 queries catch gross masking (a
    saturated softmax: 10 points below APGD on the digits teacher); a weaker masking needs more queries, or
    AutoAttack, whose Square has 5,000.

    Docs: docs/evaluation.md, 'Gradient-masking checks'."""
    config, model = subset.config, subset.model
    queries = config.sanity_square_queries
    black_box = subset.attacked(
        lambda xb, yb, s: square(model, xb, yb, norm=config.norm, eps=config.eps, queries=queries, seed=s),
        config.eps,
        "square",
    )
    return {
        "passed": bool(black_box >= whitebox_accuracy - config.sanity_tolerance),
        "square_accuracy": black_box,
        "whitebox_accuracy": whitebox_accuracy,
        "queries": queries,
    }


def check_transfer(subset: CheckSubset, whitebox_accuracy: float, transfer_from: nn.Module) -> dict:
    """Transfer beats white-box (``transfer``): white-box accuracy must be at most the accuracy under APGD crafted on
    ``transfer_from`` + ``tol``; a student that copies a teacher must not resist the teacher's adversarial examples
    better than its own.

    Docs: docs/evaluation.md, 'Gradient-masking checks'."""
    config = subset.config
    transfer = subset.attacked(
        crafted_on(transfer_from, native_apgd(transfer_from, config.norm, config.eps, config.sanity_steps, 1)),
        config.eps,
        "transfer",
    )
    return {
        "passed": bool(whitebox_accuracy <= transfer + config.sanity_tolerance),
        "whitebox_accuracy": whitebox_accuracy,
        "transfer_accuracy": transfer,
    }


def sanity_warnings(checks: dict, tol: float) -> dict[str, str]:
    """One line per check, for what it saw that is not a failure but weakens a number: a larger budget that lowered
    accuracy by more than ``tol`` (the headline's attack was too weak), and an eps-growth curve that a start from
    another class shows to be the attack failing rather than the model. The result stores each as its check's
    ``warning``; ``rrm evaluate`` prints them."""
    notes = {}
    for name, what in (("more_steps", "more steps"), ("more_restarts", "more restarts")):
        check = checks.get(name, {})
        if check.get("lowered"):
            notes[name] = (
                f"{what} lowered accuracy from {check['accuracy']:.1%} to {check['accuracy_more']:.1%} (more than "
                f"{tol:.0%}): the attack was too weak; quote a stronger one (more steps or restarts, or AutoAttack)"
            )
    growth, reachable = checks.get("eps_growth", {}), checks.get("reachable")
    if reachable and not growth.get("passed") and reachable["passed"]:
        notes["reachable"] = (
            f"APGD left {reachable['apgd_accuracy']:.1%} at eps {reachable['eps']:g}, where a start from another "
            f"class reached {reachable['accuracy']:.1%}: the attack fails from random starts on this model "
            "(see docs/evaluation.md, 'When the eps-growth check fails')"
        )
    return notes


def sanity_checks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: EvalConfig,
    *,
    constraint: Constraint,
    transfer_from: nn.Module | None = None,
    progress: bool | None = None,
) -> dict:
    """The gradient-masking checks on ``(x, y)``, each with its measured numbers and its warning, if any, after the
    subset's size, the checks' APGD iterations and ``tol``."""
    subset = CheckSubset(model, x, y, config, constraint, progress)
    checks = {"eps_growth": check_eps_growth(subset)}
    reachable = check_reachable(subset, checks["eps_growth"])
    if reachable is not None:
        checks["reachable"] = reachable
    base = checks["eps_growth"]["accuracy"]["x1"]
    checks["more_steps"] = check_more_steps(subset, base)
    checks["more_restarts"] = check_more_restarts(subset, base)
    checks["noise"] = check_noise(subset, base)
    checks["square"] = check_square(subset, base)
    if transfer_from is not None:
        checks["transfer"] = check_transfer(subset, base, transfer_from)
    for name, warning in sanity_warnings(checks, config.sanity_tolerance).items():
        checks[name]["warning"] = warning
    return {"examples": len(y), "steps": config.sanity_steps, "tolerance": config.sanity_tolerance, **checks}
