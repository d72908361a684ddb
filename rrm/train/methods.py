"""Training methods as small strategies over one trainer.

A method computes the loss of a batch and declares what it needs (a teacher, an attack, its default schedule).
Everything else (data, augmentation, optimiser, precision, BatchNorm handling, timing, checkpoints) is the
trainer's and identical for every method, so comparisons between them are fair. Adding a method is one class and
one entry in :data:`METHODS`.

BatchNorm: attacks used for training are crafted with the model in eval mode (Madry et al.'s SAT as the paper
ran it) and the update is taken in train mode; Free AT is the exception by construction, since its perturbation
comes from the same forward/backward pass as the update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from rrm.attacks import ascent_step, fgsm, n_fgsm, pgd, project, random_perturbation
from rrm.data import ImageData
from rrm.errors import RRMError, unknown
from rrm.models import Classifier
from rrm.train.config import TrainConfig
from rrm.train.losses import (
    FEATURE_LOSSES, gradient_alignment, input_gradient, input_gradient_alignment, kd_loss, l2_feature_loss,
)
from rrm.train.stages import parse_match_layers, stage_adapter



@dataclass(frozen=True)
class Knob:
    """A tunable training option: the TrainConfig field it sets and its default search range."""

    field: str
    low: float
    high: float
    log: bool
    integer: bool = False


# Knobs of the training loop, tunable for every method.
TRAINING_KNOBS = {
    "lr": Knob("lr", 1e-3, 0.5, log=True),
    "epochs": Knob("epochs", 1, 20, log=False, integer=True),
}
_TEMPERATURE = Knob("temperature", 1.0, 50.0, log=True)
_ALPHA = Knob("alpha", 0.0, 1.0, log=False)

# ``step(loss)`` back-propagates ``loss`` and takes one optimiser and scheduler step.
StepFn = Callable[[torch.Tensor], None]
# A batch's results: "loss" and "logits" plus named loss terms, all tensors (detached by the trainer).
Terms = dict[str, torch.Tensor]


class Method:
    """Natural training; the base of every strategy."""

    name: ClassVar[str] = "natural"
    # Trains on attacks crafted against itself: robust in its own right, so it may serve as a teacher.
    adversarial: ClassVar[bool] = False
    # The trainer loads a teacher and hands it to the method.
    needs_teacher: ClassVar[bool] = False
    # Its robustness comes from a teacher, directly or through data the teacher made (rdt).
    learns_from_teacher: ClassVar[bool] = False
    # One attack step per update: prone to catastrophic overfitting, so the trainer can watch for it.
    single_step: ClassVar[bool] = False
    # The TrainConfig fields only this method (and its subclasses) reads, beyond data, model, schedule and runtime.
    options: ClassVar[tuple[str, ...]] = ()
    # Method knobs that tuning may search (the training-loop knobs apply to every method); the first ones listed
    # in ``tuned_by_default`` are searched when the user names none.
    knobs: ClassVar[dict[str, Knob]] = {}
    tuned_by_default: ClassVar[tuple[str, ...]] = ()
    default_schedule: ClassVar[str] = "cosine"
    # Whether the method defaults to fp16 autocast on CUDA (the paper's Fast AT); fp32 everywhere else.
    mixed_precision_on_gpu: ClassVar[bool] = False
    # Paper epochs per pass over the data (Free AT replays each batch m times).
    epochs_per_pass: int = 1

    def __init__(self, cfg: TrainConfig, teacher: Classifier | None = None):
        self.cfg = cfg
        self.teacher = teacher

    def check(self, data: ImageData, model: Classifier) -> None:
        """Reject data or a student this method cannot use, before any training."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the method trains beside the model's (adapters), dropped from the saved model."""
        return []

    def state_dict(self) -> dict:
        """The method's own state, kept in checkpoints so a resumed run continues exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def loss(self, model: Classifier, x: torch.Tensor, y: torch.Tensor) -> Terms:
        logits = model(x)
        return {"loss": F.cross_entropy(logits.float(), y), "logits": logits}

    def train_batch(self, model: Classifier, x: torch.Tensor, y: torch.Tensor, step: StepFn) -> Terms:
        terms = self.loss(model, x, y)
        step(terms["loss"])
        return terms

    @property
    def step_size(self) -> float:
        """The attack step; by default Madry et al.'s 2.5 * eps / steps, which reaches the boundary from any start."""
        cfg = self.cfg
        return cfg.step_size if cfg.step_size is not None else 2.5 * cfg.eps / cfg.attack_steps


class AdversarialMethod(Method):
    """Train on attacks crafted against the model itself, with BatchNorm in eval mode while crafting."""

    adversarial = True
    options = ("step_size", "attack_steps", "random_start")

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
        return pgd(model, x, y, norm=c.norm, eps=c.eps, step_size=self.step_size, steps=c.attack_steps,
                   random_start=c.random_start)


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
    options = ("step_size", "grad_align_weight")

    @property
    def step_size(self) -> float:
        return self.cfg.step_size if self.cfg.step_size is not None else 1.25 * self.cfg.eps

    def craft(self, model, x, y):
        return fgsm(model, x, y, norm=self.cfg.norm, eps=self.cfg.eps, step_size=self.step_size, random_start=True)

    def loss(self, model, x, y):
        terms = super().loss(model, x, y)
        if self.cfg.grad_align_weight:
            c = self.cfg
            clean_grad, _ = input_gradient(model, x, y, create_graph=False)
            noisy = x + random_perturbation(x, c.norm, c.eps)
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
    options = ("step_size", "noise_magnitude", "project_to_eps")

    @property
    def step_size(self) -> float:
        return self.cfg.step_size if self.cfg.step_size is not None else self.cfg.eps

    @property
    def noise_magnitude(self) -> float:
        return self.cfg.noise_magnitude if self.cfg.noise_magnitude is not None else 2 * self.cfg.eps

    def craft(self, model, x, y):
        c = self.cfg
        return n_fgsm(model, x, y, norm=c.norm, eps=c.eps, noise_magnitude=self.noise_magnitude,
                      step_size=self.step_size, project_to_eps=c.project_to_eps)


class Free(Method):
    """Shafahi et al. (2019) Free AT: each batch replayed m times; one gradient serves the update and the attack.

    The perturbation is carried across replays and batches. ``epochs`` counts as the paper counts it: passes over
    the data times m (12 passes x 8 replays = "96 epochs").
    """

    name = "free"
    default_schedule = "cyclic"
    adversarial = True
    single_step = True
    options = ("step_size", "replays")

    def __init__(self, cfg: TrainConfig, teacher: Classifier | None = None):
        super().__init__(cfg, teacher)
        self.epochs_per_pass = cfg.replays
        self.delta: torch.Tensor | None = None

    @property
    def step_size(self) -> float:
        return self.cfg.step_size if self.cfg.step_size is not None else self.cfg.eps

    def train_batch(self, model, x, y, step):
        c = self.cfg
        if self.delta is None or self.delta.shape != x.shape:
            self.delta = torch.zeros_like(x)
        for _ in range(c.replays):
            delta = self.delta.requires_grad_(True)
            logits = model((x + delta).clamp(0, 1))
            loss = F.cross_entropy(logits.float(), y)
            step(loss)
            new = project(delta.detach() + ascent_step(delta.grad, c.norm, self.step_size), c.norm, c.eps)
            self.delta = (x + new).clamp(0, 1) - x
        return {"loss": loss, "logits": logits}


class TeacherMethod(Method):
    """A method that learns from a frozen teacher (eval mode, no gradients into it)."""

    needs_teacher = True
    learns_from_teacher = True

    def check(self, data: ImageData, model: Classifier) -> None:
        assert self.teacher is not None
        spec = self.teacher.spec
        shape = (spec.get("in_channels"), spec.get("image_size"), spec.get("image_size"))
        if shape != data.input_shape or spec.get("num_classes") != data.num_classes:
            raise RRMError(f"teacher expects {shape[0]}x{shape[1]}x{shape[2]} images in {spec.get('num_classes')} "
                           f"classes but {data.name!r} has {'x'.join(map(str, data.input_shape))} in "
                           f"{data.num_classes}; use a teacher trained on this dataset")


class RRM(TeacherMethod):
    """Robust Representation Matching: ``lambda * CE(S(x), y) + L_R(g_S(x), g_T(x))`` on clean inputs.

    The matching variants (none attacks the student) change only what the loss sees:

    - ``match_inputs``: ``clean`` (the paper); ``noise`` adds one uniform random point of the eps-ball; ``teacher-fgsm``
      (random start, step 1.25 * eps) and ``teacher-pgd`` (``attack_steps`` of PGD) add an attack crafted on the
      frozen teacher with the true labels. Clean and perturbed images go through each model as one batch;
      ``L_R`` (and the KD term) average over both halves, the cross-entropy and the returned logits are the clean
      half's, so ``lambda`` keeps its meaning.
    - ``feature_loss``: ``cosine``, ``l2`` or ``direction-norm``.
    - ``kd_weight * KD(S, T)`` on the teacher's logits at ``temperature``, and ``iga_weight`` times KDIGA's
      input-gradient alignment (the student's gradient by double backpropagation, the teacher's a constant).
    """

    name = "rrm"
    options = ("lam", "feature_loss", "match_inputs", "kd_weight", "iga_weight", "temperature", "step_size",
               "attack_steps", "random_start", "match_layers")
    knobs = {"lambda": Knob("lam", 1e-5, 1.0, log=True)}
    tuned_by_default = ("lambda",)

    def __init__(self, cfg: TrainConfig, teacher: Classifier | None = None):
        super().__init__(cfg, teacher)
        self.layers = parse_match_layers(cfg.match_layers)
        self.adapters = torch.nn.ModuleDict()  # student stage -> the teacher's shape, trained with the student

    def check(self, data: ImageData, model: Classifier) -> None:
        super().check(data, model)
        if "penultimate" in self.layers and model.feature_dim != self.teacher.feature_dim:
            raise RRMError(f"student {model.spec['name']!r} has {model.feature_dim}-d features but the teacher has "
                           f"{self.teacher.feature_dim}-d; pass --feature-dim {self.teacher.feature_dim}")
        for who, net in (("student", model), ("teacher", self.teacher)):
            missing = [name for name in self.layers if name not in net.stage_names]
            if missing:
                raise RRMError(f"--match-layers names {', '.join(missing)}, which the {who} "
                               f"{net.spec.get('name')!r} lacks; its stages: {', '.join(net.stage_names)}")
        inner = [name for name in self.layers if name != "penultimate"]
        if inner:
            probe = torch.zeros(1, *data.input_shape, device=next(model.parameters()).device)
            with torch.no_grad():
                student, teacher = model.stages(probe, inner), self.teacher.stages(probe, inner)
            for name in inner:
                adapter = stage_adapter(student[name].shape[1:], teacher[name].shape[1:])
                if adapter is not None:
                    self.adapters[name] = adapter.to(probe.device)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.adapters.parameters())

    def state_dict(self) -> dict:
        return self.adapters.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.adapters.load_state_dict(state)

    def _stages(self, net: Classifier, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if list(self.layers) == ["penultimate"]:  # the paper's RRM: features alone (and a compiled features works)
            return {"penultimate": net.features(inputs)}
        return net.stages(inputs, list(self.layers))

    def matching(self, student: dict, teacher: dict) -> tuple[torch.Tensor, Terms]:
        """``sum_l w_l * L_l``: the feature loss at ``penultimate``; elsewhere the relative l2 distance of the
        flattened maps, the student's through its adapter where shapes differ. Returns the sum and each term."""
        total, terms = 0.0, {}
        for name, weight in self.layers.items():
            if name == "penultimate":
                term = FEATURE_LOSSES[self.cfg.feature_loss](student[name], teacher[name])
            else:
                mapped = self.adapters[name](student[name]) if name in self.adapters else student[name]
                term = l2_feature_loss(mapped.flatten(1), teacher[name].flatten(1))
            terms[f"match_{name}"] = term
            total = total + weight * term
        return total, terms if len(self.layers) > 1 else {}

    @property
    def step_size(self) -> float:
        c = self.cfg
        if c.step_size is None and c.match_inputs == "teacher-fgsm":
            return 1.25 * c.eps  # Wong et al.'s FGSM step, as in `fast`
        return super().step_size

    def matched_inputs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The images whose features are matched: ``x`` alone, or ``x`` followed by its perturbed copy."""
        c = self.cfg
        if c.match_inputs == "clean":
            return x
        if c.match_inputs == "noise":
            perturbed = x + random_perturbation(x, c.norm, c.eps)
        elif c.match_inputs == "teacher-fgsm":  # attacks differentiate the input only: no gradient reaches the teacher
            perturbed = fgsm(self.teacher, x, y, norm=c.norm, eps=c.eps, step_size=self.step_size, random_start=True)
        else:
            perturbed = pgd(self.teacher, x, y, norm=c.norm, eps=c.eps, step_size=self.step_size,
                            steps=c.attack_steps, random_start=c.random_start)
        return torch.cat([x, perturbed.detach()])

    def loss(self, model, x, y):
        c = self.cfg
        inputs = self.matched_inputs(x, y)
        terms: Terms = {}
        if c.iga_weight:
            labels = y.repeat(len(inputs) // len(y))
            student, logits, student_grad = self._stages_and_input_gradient(model, inputs, labels, create_graph=True)
            target, teacher_logits, teacher_grad = self._stages_and_input_gradient(self.teacher, inputs, labels,
                                                                                 create_graph=False)
            target, teacher_logits = {k: v.detach() for k, v in target.items()}, teacher_logits.detach()
            terms["alignment"] = input_gradient_alignment(student_grad, teacher_grad)
        else:
            student = self._stages(model, inputs)
            logits = model.head(student["penultimate"]) if "penultimate" in student else model(inputs)
            with torch.no_grad():
                target = self._stages(self.teacher, inputs)
                teacher_logits = None
                if c.kd_weight:
                    teacher_logits = (self.teacher.head(target["penultimate"]) if "penultimate" in target
                                      else self.teacher(inputs))
        clean_logits = logits[: len(y)]
        ce = F.cross_entropy(clean_logits.float(), y)
        representation, layer_terms = self.matching(student, target)
        loss = c.lam * ce + representation
        if c.kd_weight:
            terms["kd"] = kd_loss(logits, teacher_logits, c.temperature)
            loss = loss + c.kd_weight * terms["kd"]
        if c.iga_weight:
            loss = loss + c.iga_weight * terms["alignment"]
        return {"loss": loss, "logits": clean_logits, "ce": ce, "representation": representation, **layer_terms,
                **terms}

    def _stages_and_input_gradient(
        self, net: Classifier, x: torch.Tensor, y: torch.Tensor, create_graph: bool
    ) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """The matched stages, logits and per-example ``grad_x CE`` from one forward pass (see ``input_gradient``)."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            stages = net.stages(x, list(dict.fromkeys([*self.layers, "penultimate"])))
            logits = net.head(stages["penultimate"])
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x, create_graph=create_graph)
        return {k: stages[k] for k in self.layers}, logits, grad


class KD(TeacherMethod):
    """Hinton distillation as Goldblum et al. ran it: ``alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE``."""

    name = "kd"
    default_schedule = "step"
    options = ("temperature", "alpha")
    knobs = {"temperature": _TEMPERATURE, "alpha": _ALPHA}
    tuned_by_default = ("temperature", "alpha")

    def loss(self, model, x, y):
        logits = model(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return self._combine(logits, teacher_logits, y)

    def _combine(self, logits, teacher_logits, y) -> Terms:
        c = self.cfg
        ce = F.cross_entropy(logits.float(), y)
        distill = kd_loss(logits, teacher_logits, c.temperature)
        return {"loss": c.alpha * distill + (1 - c.alpha) * ce, "logits": logits, "ce": ce, "kd": distill}


class KDIGA(KD):
    """KD plus input-gradient alignment (Shao et al. 2021): ``+ gamma * ||grad_x CE_S - grad_x CE_T||_2``.

    The student's gradient is differentiated again (double backpropagation); the teacher's is a constant.
    """

    name = "kdiga"
    options = ("temperature", "alpha", "gamma")
    knobs = {"gamma": Knob("gamma", 0.5, 100.0, log=True), "temperature": _TEMPERATURE, "alpha": _ALPHA}
    tuned_by_default = ("gamma", "temperature")

    def loss(self, model, x, y):
        student_grad, logits = input_gradient(model, x, y, create_graph=True)
        teacher_grad, teacher_logits = input_gradient(self.teacher, x, y, create_graph=False)
        terms = self._combine(logits, teacher_logits.detach(), y)
        alignment = input_gradient_alignment(student_grad, teacher_grad)
        terms["loss"] = terms["loss"] + self.cfg.gamma * alignment
        terms["alignment"] = alignment
        return terms


class RDT(Method):
    """Ilyas et al.'s robust data training: natural training on a dataset written by `rrm robustify`."""

    name = "rdt"
    default_schedule = "step"
    learns_from_teacher = True

    def check(self, data: ImageData, model: Classifier) -> None:
        if data.source.get("kind") != "robustified":
            raise RRMError(f"method 'rdt' trains on robustified data but {data.name!r} is not; "
                           "run `rrm robustify` and pass its output file as the dataset")


# In the order the reports list them: no teacher first, then those that learn from one.
METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Method, SAT, PGDFast, Fast, NFGSM, Free, RDT, KD, KDIGA, RRM)
}


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
