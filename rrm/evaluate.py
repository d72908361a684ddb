"""Robustness numbers users can trust: natural and adversarial accuracy, plus automatic checks for gradient masking.

:func:`evaluate` attacks the first ``n_examples`` test images with every attack in :class:`EvalConfig` and, by
default, runs Carlini et al.'s (2019) sanity checks on a subset with the native APGD, because a robustness number is
worth nothing if the model merely hides its gradients (defensive distillation and high-temperature KD did exactly
that). The result is an :class:`~rrm.results.EvalResult`, stored as JSON for ``dvc metrics show``.

Checks, their thresholds and why (``tol`` is ``EvalConfig.sanity_tolerance``, 2 points by default: on a 200-image
subset one or two borderline images flip between attack runs that differ only in their random starts):

- ``eps_growth``: accuracy at eps x 0.5, 1, 2, 4, 8 (Linf capped at 1, where any image is reachable; radii past the
  cap are one attack) falls to at most ``sanity_zero_accuracy`` (5%, half of chance on 10 classes: a model guessing
  under its strongest perturbation has not been attacked) and never rises by more than ``tol`` as eps grows.
- ``reachable`` (Linf, when the largest radius holds every image): APGD started from the nearest image of another
  class that the model classifies as that class must end at most ``sanity_zero_accuracy``. Where it does and
  ``eps_growth`` fails, the attack failed from random starts, not the model (a warning says so).
- ``more_steps`` / ``more_restarts``: 4x the iterations or 4 restarts (other seeds) never raise accuracy by more
  than ``tol``; where they *lower* it by more than ``tol``, the result carries a warning that the attack was weak.
- ``noise``: uniform noise in the eps ball hurts no more than the attack (noise accuracy >= attack accuracy - ``tol``).
- ``transfer`` (with ``transfer_from``): white-box accuracy <= transfer accuracy + ``tol``; a student that copies a
  teacher must not resist the teacher's adversarial examples better than its own.
- ``square``: the black-box Square attack (``sanity_square_queries`` queries per image, 100 by default against
  AutoAttack's 5,000, to keep the test suite and ``dvc repro`` affordable on CPU) leaves accuracy no more than ``tol``
  below the white-box APGD accuracy. Square uses only the model's outputs, so a model that hides or zeroes its
  gradients falls to it while APGD stalls. 100 queries catch gross masking (a saturated softmax: 10 points below APGD
  on the digits teacher); a weaker masking needs more queries, or AutoAttack, whose Square has 5,000.
- ``constraint``: every adversarial example of every attack lies within its eps (computed in float64; slack 1e-6 per
  pixel for Linf and 1e-6 * sqrt(pixels) for L2, the fp32 rounding of ``x + delta``) and inside [0, 1].
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from rrm.attacks import apgd, art_apgd, fgsm, frozen, pgd, random_perturbation, seeded
from rrm.attacks.autoattack import AutoAttack, settings_summary, square
from rrm.attacks.config import (  # noqa: F401  (re-exported: the evaluation's settings)
    ATTACKS,
    EPS_MULTIPLES,
    MORE_RESTARTS,
    MORE_STEPS_FACTOR,
    TRANSFER_ATTACKS,
    EvalConfig,
)
from rrm.data import ImageData, as_tensor, to_float
from rrm.errors import RRMError
from rrm.metrics import Attack, accuracy, device_of
from rrm.models import Classifier, load_model
from rrm.results import EvalResult, spec_record


def check_compatible(model: nn.Module, data: ImageData, role: str = "model") -> None:
    """Raise :class:`RRMError` unless ``data``'s image shape and classes are what ``model`` was built for."""
    spec = getattr(model, "spec", None)
    if not spec or not {"in_channels", "image_size", "num_classes"} <= set(spec):
        raise RRMError(
            f"the {role} has no architecture spec; evaluate models from rrm.models.build_model or "
            "load_model (a wrapper must copy the inner model's `spec`)"
        )
    want = (spec["in_channels"], spec["image_size"], spec["image_size"])
    if data.input_shape != want:
        raise RRMError(
            f"dataset {data.name!r} has {'x'.join(map(str, data.input_shape))} images but the {role} "
            f"expects {'x'.join(map(str, want))}; evaluate on the dataset the model was trained on"
        )
    if data.num_classes != spec["num_classes"]:
        raise RRMError(
            f"dataset {data.name!r} has {data.num_classes} classes but the {role} predicts "
            f"{spec['num_classes']}; evaluate on the dataset the model was trained on"
        )


def load_for_evaluation(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """Load a model file or training checkpoint in eval mode and fp32 (ART's wrapper needs both); ``(model, meta)``."""
    model, meta = load_model(path, map_location=map_location)
    return model.float().eval(), meta


class _Constraint:
    """Largest amount by which any adversarial example leaves its eps ball, and its pixel range."""

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


def _checked(craft: Attack, constraint: _Constraint, eps: float) -> Attack:
    """``craft``, with every image it makes measured against the eps ball by ``constraint``."""

    def attack(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        x_adv = craft(x, y, seed)
        constraint.update(x, x_adv, eps)
        return x_adv

    return attack


def _native_apgd(model: nn.Module, norm: str, eps: float, steps: int, restarts: int) -> Attack:
    return lambda x, y, seed: apgd(model, x, y, norm=norm, eps=eps, steps=steps, restarts=restarts, seed=seed)


def apgd_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    steps: int,
    restarts: int = 1,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """Native APGD-CE accuracy of ``model`` on ``(x, y)`` (batch ``i`` seeded ``seed + i``), as :func:`evaluate`
    measures it; the model's mode and gradients are left as they were."""
    with frozen(model):
        return accuracy(
            model, x, y, attack=_native_apgd(model, norm, eps, steps, restarts), seed=seed, batch_size=batch_size
        )


def _crafted_on(source: nn.Module, craft: Attack) -> Attack:
    """Transfer: craft on ``source``'s device, hand the images back on the caller's."""
    device = device_of(source)
    return lambda x, y, seed: craft(x.to(device), y.to(device), seed).to(x.device)


def _noise(norm: str, eps: float) -> Attack:
    def craft(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        with seeded(seed):
            return x + random_perturbation(x, norm, eps)

    return craft


def _crafts(model: nn.Module, config: EvalConfig, num_classes: int, transfer_from: nn.Module | None) -> dict:
    """The full-evaluation attacks by name: ``(craft, settings recorded with the result)``."""
    norm, eps = config.norm, config.eps

    def seeded_pgd(source: nn.Module) -> Attack:
        def craft(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
            with seeded(seed):
                return pgd(source, x, y, norm=norm, eps=eps, step_size=config.pgd_step, steps=config.pgd_steps)

        return craft

    def art(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        return art_apgd(
            model,
            x,
            y,
            norm=norm,
            eps=eps,
            num_classes=num_classes,
            steps=config.steps,
            restarts=config.restarts,
            batch_size=config.batch_size,
            seed=seed,
        )

    apgd_settings = {
        "steps": config.steps,
        "restarts": config.restarts,
        "eps_step_initial": 2 * eps,
        "loss": "cross_entropy",
    }
    pgd_settings = {"steps": config.pgd_steps, "step_size": config.pgd_step, "random_start": True}
    table = {
        "apgd": (_native_apgd(model, norm, eps, config.steps, config.restarts), apgd_settings),
        "art-apgd": (
            art,
            {
                "max_iter": config.steps,
                "nb_random_init": config.restarts,
                "eps_step": 2 * eps,
                "batch_size": config.batch_size,
                "loss": "cross_entropy",
                "clip_values": "(0, 1)",
            },
        ),
        "pgd": (seeded_pgd(model), pgd_settings),
        "fgsm": (lambda x, y, seed: fgsm(model, x, y, norm=norm, eps=eps), {"step_size": eps, "random_start": False}),
    }
    if "autoattack" in config.attacks:
        autoattack = AutoAttack(
            model,
            norm=norm,
            eps=eps,
            num_classes=num_classes,
            version=config.autoattack_version,
            components=config.autoattack_components,
            seed=config.seed,
            batch_size=config.batch_size,
        )
        table["autoattack"] = (autoattack, autoattack.settings)
    if transfer_from is not None:
        if config.transfer_attack == "apgd":
            source, settings = _native_apgd(transfer_from, norm, eps, config.steps, config.restarts), apgd_settings
        else:
            source, settings = seeded_pgd(transfer_from), pgd_settings
        table["transfer"] = (
            _crafted_on(transfer_from, source),
            {"attack": config.transfer_attack, **settings, "source_model": transfer_from.spec.get("name", "?")},
        )
    return table


def sanity_checks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: EvalConfig,
    *,
    constraint: _Constraint,
    transfer_from: nn.Module | None = None,
    progress: bool | None = None,
) -> dict:
    """The gradient-masking checks of the module docstring on ``(x, y)``, each with its measured numbers."""
    norm, eps, tol, steps, seed = config.norm, config.eps, config.sanity_tolerance, config.sanity_steps, config.seed

    def attacked(craft: Attack, radius: float, desc: str, run_seed: int = seed) -> float:
        return accuracy(
            model,
            x,
            y,
            attack=_checked(craft, constraint, radius),
            seed=run_seed,
            batch_size=config.batch_size,
            progress=progress,
            desc=f"sanity: {desc}",
        )

    radii = eps_growth_radii(norm, eps)
    growth = {name: attacked(_native_apgd(model, norm, r, steps, 1), r, f"eps {name}") for name, r in radii.items()}
    curve = list(growth.values())
    base, largest = growth["x1"], max(radii.values())
    checks = {
        "eps_growth": {
            "passed": curve[-1] <= config.sanity_zero_accuracy
            and all(b <= a + tol for a, b in itertools.pairwise(curve)),
            "accuracy": growth,
            "largest_eps": largest,
            "threshold": config.sanity_zero_accuracy,
        }
    }
    if norm == "linf" and largest >= 1:  # the ball holds every image: another class's is a start that must succeed

        def from_another_class(xb: torch.Tensor, yb: torch.Tensor, s: int) -> torch.Tensor:
            start = other_class_starts(model, xb, yb)
            return apgd(model, xb, yb, norm=norm, eps=largest, steps=steps, restarts=1, seed=s, start=start)

        reached = attacked(from_another_class, largest, "from another class")
        checks["reachable"] = {
            "passed": reached <= config.sanity_zero_accuracy,
            "accuracy": reached,
            "apgd_accuracy": curve[-1],
            "eps": largest,
            "threshold": config.sanity_zero_accuracy,
        }
    more_steps = attacked(_native_apgd(model, norm, eps, MORE_STEPS_FACTOR * steps, 1), eps, "more steps", seed + 1)
    checks["more_steps"] = {
        "passed": more_steps <= base + tol,
        "accuracy": base,
        "accuracy_more": more_steps,
        "steps": steps,
        "steps_more": MORE_STEPS_FACTOR * steps,
        "lowered": more_steps < base - tol,
    }
    more_restarts = attacked(_native_apgd(model, norm, eps, steps, MORE_RESTARTS), eps, "more restarts", seed + 2)
    checks["more_restarts"] = {
        "passed": more_restarts <= base + tol,
        "accuracy": base,
        "accuracy_more": more_restarts,
        "restarts_more": MORE_RESTARTS,
        "lowered": more_restarts < base - tol,
    }
    noise = attacked(_noise(norm, eps), eps, "noise")
    checks["noise"] = {"passed": noise >= base - tol, "noise_accuracy": noise, "attack_accuracy": base}
    queries = config.sanity_square_queries
    black_box = attacked(
        lambda xb, yb, s: square(model, xb, yb, norm=norm, eps=eps, queries=queries, seed=s), eps, "square"
    )
    checks["square"] = {
        "passed": black_box >= base - tol,
        "square_accuracy": black_box,
        "whitebox_accuracy": base,
        "queries": queries,
    }
    if transfer_from is not None:
        transfer = attacked(
            _crafted_on(transfer_from, _native_apgd(transfer_from, norm, eps, steps, 1)), eps, "transfer"
        )
        checks["transfer"] = {
            "passed": base <= transfer + tol,
            "whitebox_accuracy": base,
            "transfer_accuracy": transfer,
        }
    for check in checks.values():
        check["passed"] = bool(check["passed"])
    for name, warning in sanity_warnings(checks, tol).items():
        checks[name]["warning"] = warning
    return {"examples": len(y), "steps": steps, "tolerance": tol, **checks}


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


def _autoattack(
    attack: AutoAttack,
    x: torch.Tensor,
    y: torch.Tensor,
    config: EvalConfig,
    constraint: _Constraint,
    state: str | os.PathLike | None,
    progress: bool | None,
) -> tuple[float, dict]:
    """AutoAttack on the first ``autoattack_examples`` images: its accuracy and what the metrics keep of it."""
    k = len(y) if config.autoattack_examples is None else min(config.autoattack_examples, len(y))
    run = attack.run(to_float(as_tensor(x[:k])), y[:k], state_path=state, progress=progress)
    if k:
        constraint.record(
            run.max_distance - config.eps, run.min_pixel, run.max_pixel, run.finite, math.prod(x.shape[1:])
        )
    if state is not None:
        Path(state).unlink(missing_ok=True)
    return run.accuracy, settings_summary(run, attack)


def evaluate(
    model: nn.Module,
    data: ImageData,
    config: EvalConfig,
    *,
    transfer_from: nn.Module | None = None,
    progress: bool | None = None,
    model_sha256: str | None = None,
    autoattack_state: str | os.PathLike | None = None,
) -> EvalResult:
    """Natural accuracy, adversarial accuracy per attack and the sanity checks.

    AutoAttack runs on the first ``autoattack_examples`` of the attacked images. With ``autoattack_state`` (a file
    path) it saves its progress there after every batch and resumes from it; the file is removed once it finished.

    The models are evaluated in eval mode with frozen parameters; their mode, ``requires_grad`` and ``.grad`` are
    restored afterwards. ``progress=None`` shows bars only on a terminal. ``sanity.enabled`` says whether the
    gradient-masking checks ran (they need eps > 0), while the constraint check covers every attack that ran either
    way. ``sanity_passed`` is True when the masking checks ran and every check passed, False when any check that ran
    failed, and None (not run) when the masking checks did not run: a result never reads as passed for checks it
    skipped.

    The result is bound to what it measured: ``model_sha256`` (the sha256 of the file ``model`` was loaded from,
    :func:`rrm.io.sha256_file`; the caller knows the file), the model's architecture spec, and the data's digest and
    split. Registration and the report check them (:meth:`rrm.results.EvalResult.binding_problems`).
    """
    config.validate()
    check_compatible(model, data)
    if transfer_from is not None:
        check_compatible(transfer_from, data, "transfer model")
    if "transfer" in config.attacks and transfer_from is None:
        raise RRMError("attack 'transfer' needs the model to craft on: pass transfer_from (e.g. the teacher)")
    n_test = len(data.test_y)
    n = n_test if config.n_examples is None else config.n_examples
    if n > n_test:
        raise RRMError(f"n_examples={n} exceeds the {n_test} test images of {data.name!r}; pass at most {n_test}")
    x, y = data.test_x[:n], data.test_y[:n]
    constraint = _Constraint(config.norm)
    seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        for m in (model, transfer_from):
            if m is not None:
                stack.enter_context(frozen(m))
                m.eval()
        start = time.perf_counter()
        natural = accuracy(model, data.test_x, data.test_y, batch_size=config.batch_size)
        natural_attacked = accuracy(model, x, y, batch_size=config.batch_size)
        seconds["natural"] = time.perf_counter() - start
        crafts = _crafts(model, config, data.num_classes, transfer_from)
        adversarial, settings = {}, {}
        autoattack = None
        for name in config.attacks:
            craft, settings[name] = crafts[name]
            start = time.perf_counter()
            if isinstance(craft, AutoAttack):
                adversarial[name], autoattack = _autoattack(craft, x, y, config, constraint, autoattack_state, progress)
            else:
                adversarial[name] = accuracy(
                    model,
                    x,
                    y,
                    attack=_checked(craft, constraint, config.eps),
                    seed=config.seed,
                    batch_size=config.batch_size,
                    progress=progress,
                    desc=name,
                )
            seconds[name] = time.perf_counter() - start
        sanity: dict = {"enabled": config.sanity and config.eps > 0}
        if sanity["enabled"]:
            start = time.perf_counter()
            k = min(config.sanity_examples, n)
            sanity.update(
                sanity_checks(
                    model, x[:k], y[:k], config, constraint=constraint, transfer_from=transfer_from, progress=progress
                )
            )
            seconds["sanity"] = time.perf_counter() - start
    if math.isfinite(constraint.excess):
        sanity["constraint"] = constraint.result()
    passed = all(c["passed"] for c in sanity.values() if isinstance(c, dict))
    return EvalResult(
        dataset=data.name,
        dataset_digest=data.digest,
        split="validation" if "validation_of" in data.source else "test",
        model_sha256=model_sha256,
        model_spec=spec_record(model.spec),
        norm=config.norm,
        eps=config.eps,
        n_examples=n,
        n_test=n_test,
        natural_accuracy=natural,
        natural_accuracy_attacked=natural_attacked,
        adversarial_accuracy=adversarial,
        attack_settings=settings,
        seconds=seconds,
        sanity_passed=passed if sanity["enabled"] or not passed else None,
        sanity=sanity,
        autoattack=autoattack,
        seed=config.seed,
        art_version=importlib.metadata.version("adversarial-robustness-toolbox"),
        torch_version=torch.__version__,
    )
