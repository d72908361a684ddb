"""Training methods as small strategies over one trainer, and the registry of them all.

A method is a :class:`~rrm.train.strategy.Method`: the loss of a batch and what it needs. This module holds the
methods that train on attacks against the model itself and :data:`METHODS`; the transfer methods are in
:mod:`rrm.train.transfer`. Adding a method is one class and one entry in :data:`METHODS`.

BatchNorm: attacks used for training are crafted with the model in eval mode (Madry et al.'s SAT as the paper
ran it) and the update is taken in train mode; Free AT is the exception by construction, since its perturbation
comes from the same forward/backward pass as the update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from rrm.attacks import ascent_step, fgsm, n_fgsm, pgd, project, random_perturbation
from rrm.errors import RRMError, unknown
from rrm.models import Classifier
from rrm.train.losses import gradient_alignment, input_gradient
from rrm.train.strategy import TRAINING_KNOBS, Knob, Method, StepFn, Terms
from rrm.train.transfer import KD, KDIGA, RDT, RRM, TeacherMethod

if TYPE_CHECKING:  # the configuration validates itself against these methods (refuse_unread_options)
    from rrm.train.config import TrainConfig

__all__ = [
    "KD",
    "KDIGA",
    "METHODS",
    "RDT",
    "RRM",
    "SWITCHED_OFF",
    "TRAINING_KNOBS",
    "Knob",
    "Method",
    "StepFn",
    "TeacherMethod",
    "Terms",
    "get_method",
    "knobs_of",
    "may_teach",
    "refuse_unread_options",
    "teacher_methods",
    "tunable_methods",
]


class AdversarialMethod(Method):
    """Train on attacks crafted against the model itself, with BatchNorm in eval mode while crafting."""

    adversarial = True
    options = ("step_size", "attack_steps", "random_start", "eps_warmup_epochs")

    def craft(self, model: Classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: Classifier, x: torch.Tensor, y: torch.Tensor) -> Terms:
        model.eval()
        x_adv = self.craft(model, x, y)
        model.train()
        return super().loss(model, x_adv, y)


class SAT(AdversarialMethod):
    """Madry et al.'s PGD-k adversarial training (Linf or L2, random start)."""

    name = "sat"
    default_schedule = "step"

    def craft(self, model, x, y):
        c = self.cfg
        return pgd(
            model,
            x,
            y,
            norm=c.norm,
            eps=self.eps,
            step_size=self.step_size,
            steps=c.attack_steps,
            random_start=c.random_start,
        )


class PGDFast(SAT):
    """What the RRM paper calls "Fast AT": PGD-k with a cyclic learning rate (and mixed precision on GPUs)."""

    name = "pgd-fast"
    default_schedule = "cyclic"
    mixed_precision_on_gpu = True


class Fast(AdversarialMethod):
    """Wong et al. (2020) "Fast is better than free": FGSM from a random start, step 1.25 * eps, cyclic rate.

    ``grad_align_weight`` > 0 adds Andriushchenko & Flammarion's (2020) GradAlign regulariser, which keeps the input
    gradients at the clean point and at a random point of the eps-ball aligned (about 3x the cost: double backprop).
    """

    name = "fast"
    default_schedule = "cyclic"
    single_step = True
    options = ("step_size", "grad_align_weight", "eps_warmup_epochs")

    @property
    def step_size(self) -> float:
        return self.cfg.step_size if self.cfg.step_size is not None else 1.25 * self.eps

    def craft(self, model, x, y):
        return fgsm(model, x, y, norm=self.cfg.norm, eps=self.eps, step_size=self.step_size, random_start=True)

    def loss(self, model, x, y):
        terms = super().loss(model, x, y)
        if self.cfg.grad_align_weight:
            c = self.cfg
            clean_grad, _ = input_gradient(model, x, y, create_graph=False)
            noisy = x + random_perturbation(x, c.norm, self.eps)
            noisy_grad, _ = input_gradient(model, noisy, y, create_graph=True)
            terms["grad_align"] = gradient_alignment(clean_grad, noisy_grad)
            terms["loss"] = terms["loss"] + c.grad_align_weight * terms["grad_align"]
        return terms


class NFGSM(AdversarialMethod):
    """de Jorge et al. (2022) N-FGSM: noise from twice the eps-ball, one signed step of eps, no projection back to
    the eps-ball; the cost of ``fast`` without its catastrophic overfitting at large eps."""

    name = "n-fgsm"
    default_schedule = "cyclic"
    single_step = True
    options = ("step_size", "noise_magnitude", "project_to_eps", "eps_warmup_epochs")

    @property
    def step_size(self) -> float:
        return self.cfg.step_size if self.cfg.step_size is not None else self.eps

    @property
    def noise_magnitude(self) -> float:
        return self.cfg.noise_magnitude if self.cfg.noise_magnitude is not None else 2 * self.eps

    def craft(self, model, x, y):
        c = self.cfg
        return n_fgsm(
            model,
            x,
            y,
            norm=c.norm,
            eps=self.eps,
            noise_magnitude=self.noise_magnitude,
            step_size=self.step_size,
            project_to_eps=c.project_to_eps,
        )


class Free(Method):
    """Shafahi et al. (2019) Free AT: each batch replayed m times; one gradient serves the update and the attack.

    The perturbation is carried across replays and batches. ``epochs`` counts as the paper counts it: passes over
    the data times m (12 passes x 8 replays = "96 epochs").
    """

    name = "free"
    default_schedule = "cyclic"
    adversarial = True
    single_step = True
    options = ("step_size", "replays", "eps_warmup_epochs")

    def __init__(self, cfg: TrainConfig, teacher: Classifier | None = None):
        super().__init__(cfg, teacher)
        self.epochs_per_pass = cfg.replays
        self.delta: torch.Tensor | None = None

    @property
    def step_size(self) -> float:
        return self.cfg.step_size if self.cfg.step_size is not None else self.eps

    def train_batch(self, model, x, y, step):
        c = self.cfg
        if self.delta is None or self.delta.shape != x.shape:
            self.delta = torch.zeros_like(x)
        for _ in range(c.replays):
            delta = self.delta.requires_grad_(True)
            logits = model((x + delta).clamp(0, 1))
            loss = F.cross_entropy(logits.float(), y)
            step(loss)
            new = project(delta.detach() + ascent_step(delta.grad, c.norm, self.step_size), c.norm, self.eps)
            self.delta = (x + new).clamp(0, 1) - x
        return {"loss": loss, "logits": logits}


# In the order the reports list them: no teacher first, then those that learn from one.
METHODS: dict[str, type[Method]] = {m.name: m for m in (Method, SAT, PGDFast, Fast, NFGSM, Free, RDT, KD, KDIGA, RRM)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise unknown("method", name, METHODS)
    return METHODS[name]


def may_teach(method: str) -> bool:
    """Whether a model trained with ``method`` may be registered as a teacher: only adversarially trained ones."""
    return method in METHODS and METHODS[method].adversarial


def teacher_methods() -> tuple[str, ...]:
    """The methods whose models may teach (see :func:`may_teach`)."""
    return tuple(name for name in METHODS if may_teach(name))


def tunable_methods() -> tuple[str, ...]:
    """The methods with knobs of their own to tune."""
    return tuple(name for name, m in METHODS.items() if m.knobs)


def knobs_of(method: str) -> dict[str, Knob]:
    """Every knob tuning may search for ``method``: its own, then the training loop's."""
    return {**get_method(method).knobs, **TRAINING_KNOBS}


# Options that only some methods read (Method.options), with the value that leaves them off: setting one for
# another method is refused rather than silently ignored (refuse_unread_options).
SWITCHED_OFF = {
    "match_inputs": "clean",
    "match_layers": ("penultimate",),
    "kd_weight": 0.0,
    "iga_weight": 0.0,
    "noise_magnitude": None,
    "project_to_eps": False,
    "grad_align_weight": 0.0,
    "eps_warmup_epochs": 0,
}


def refuse_unread_options(cfg: TrainConfig, names: Iterable[str]) -> None:
    """Refuse any of the options ``names`` that ``cfg`` sets away from its default (its "off" value in
    :data:`SWITCHED_OFF`) for a method that does not read it: another method's option would be silently ignored.

    ``TrainConfig.validate`` checks the options that switch something on; the command line checks every option the
    user named (a flag, or ``-o`` of ``rrm tune``). A params-file section may share a method option among methods
    through a YAML anchor (``attack_steps`` of every student), so other params-file keys are not refused.
    """
    if cfg.method not in METHODS:
        return  # the trainer names the unknown method
    method = get_method(cfg.method)
    owned = {name for cls in METHODS.values() for name in cls.options}
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    changed = [
        name
        for name in dict.fromkeys(names)
        if name in owned
        and name not in method.options
        and _as_tuple(getattr(cfg, name)) != SWITCHED_OFF.get(name, defaults[name])
    ]
    if "early_stop_on_co" in names and cfg.early_stop_on_co and not method.single_step:
        changed.append("early_stop_on_co")
    if not changed:
        return
    owners = sorted(
        {
            m
            for name in changed
            for m, cls in METHODS.items()
            if name in cls.options or (name == "early_stop_on_co" and cls.single_step)
        },
        key=list(METHODS).index,
    )
    one = len(changed) == 1
    raise RRMError(
        f"{', '.join(cfg.spelled(c) for c in changed)} {'is an option' if one else 'are options'} "
        "of method "
        f"{' or '.join(repr(m) for m in owners)}, not {cfg.method!r}; use --method {owners[0]}, or "
        f"leave {'it' if one else 'them'} at the default"
    )


def _as_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value
