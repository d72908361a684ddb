"""The methods that learn from a frozen teacher: RRM (with its matching variants), KD, KDIGA and RDT."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from rrm.attacks import fgsm, pgd, random_perturbation
from rrm.data import ImageData
from rrm.errors import RRMError
from rrm.models import Classifier
from rrm.train.losses import FEATURE_LOSSES, input_gradient, input_gradient_alignment, kd_loss, l2_feature_loss
from rrm.train.stages import parse_match_layers, stage_adapter
from rrm.train.strategy import Knob, Method, Terms

if TYPE_CHECKING:  # the configuration validates itself against the methods
    from rrm.train.config import TrainConfig

_TEMPERATURE = Knob("temperature", 1.0, 50.0, log=True)
_ALPHA = Knob("alpha", 0.0, 1.0, log=False)


class TeacherMethod(Method):
    """A method that learns from a frozen teacher (eval mode, no gradients into it)."""

    needs_teacher = True
    learns_from_teacher = True

    def check(self, data: ImageData, model: Classifier) -> None:
        assert self.teacher is not None
        spec = self.teacher.spec
        shape = (spec.get("in_channels"), spec.get("image_size"), spec.get("image_size"))
        if shape != data.input_shape or spec.get("num_classes") != data.num_classes:
            raise RRMError(
                f"teacher expects {shape[0]}x{shape[1]}x{shape[2]} images in {spec.get('num_classes')} "
                f"classes but {data.name!r} has {'x'.join(map(str, data.input_shape))} in "
                f"{data.num_classes}; use a teacher trained on this dataset"
            )


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
    options = (
        "lam",
        "feature_loss",
        "match_inputs",
        "kd_weight",
        "iga_weight",
        "temperature",
        "step_size",
        "attack_steps",
        "random_start",
        "match_layers",
    )
    knobs: ClassVar[dict[str, Knob]] = {"lambda": Knob("lam", 1e-5, 1.0, log=True)}
    tuned_by_default = ("lambda",)

    def __init__(self, cfg: TrainConfig, teacher: Classifier | None = None):
        super().__init__(cfg, teacher)
        self.layers = parse_match_layers(cfg.match_layers)
        self.adapters = torch.nn.ModuleDict()  # student stage -> the teacher's shape, trained with the student

    def check(self, data: ImageData, model: Classifier) -> None:
        super().check(data, model)
        if "penultimate" in self.layers and model.feature_dim != self.teacher.feature_dim:
            raise RRMError(
                f"student {model.spec['name']!r} has {model.feature_dim}-d features but the teacher has "
                f"{self.teacher.feature_dim}-d; pass --feature-dim {self.teacher.feature_dim}"
            )
        for who, net in (("student", model), ("teacher", self.teacher)):
            missing = [name for name in self.layers if name not in net.stage_names]
            if missing:
                raise RRMError(
                    f"--match-layers names {', '.join(missing)}, which the {who} "
                    f"{net.spec.get('name')!r} lacks; its stages: {', '.join(net.stage_names)}"
                )
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
            perturbed = pgd(
                self.teacher,
                x,
                y,
                norm=c.norm,
                eps=c.eps,
                step_size=self.step_size,
                steps=c.attack_steps,
                random_start=c.random_start,
            )
        return torch.cat([x, perturbed.detach()])

    def loss(self, model, x, y):
        c = self.cfg
        inputs = self.matched_inputs(x, y)
        terms: Terms = {}
        if c.iga_weight:
            labels = y.repeat(len(inputs) // len(y))
            student, logits, student_grad = self._stages_and_input_gradient(model, inputs, labels, create_graph=True)
            target, teacher_logits, teacher_grad = self._stages_and_input_gradient(
                self.teacher, inputs, labels, create_graph=False
            )
            target, teacher_logits = {k: v.detach() for k, v in target.items()}, teacher_logits.detach()
            terms["alignment"] = input_gradient_alignment(student_grad, teacher_grad)
        else:
            student = self._stages(model, inputs)
            logits = model.head(student["penultimate"]) if "penultimate" in student else model(inputs)
            with torch.no_grad():
                target = self._stages(self.teacher, inputs)
                teacher_logits = None
                if c.kd_weight:
                    teacher_logits = (
                        self.teacher.head(target["penultimate"]) if "penultimate" in target else self.teacher(inputs)
                    )
        clean_logits = logits[: len(y)]
        ce = F.cross_entropy(clean_logits.float(), y)
        representation, layer_terms = self.matching(student, target)
        loss = c.lam * ce + representation
        if c.kd_weight:
            terms["kd"] = kd_loss(logits, teacher_logits, c.temperature)
            loss = loss + c.kd_weight * terms["kd"]
        if c.iga_weight:
            loss = loss + c.iga_weight * terms["alignment"]
        return {
            "loss": loss,
            "logits": clean_logits,
            "ce": ce,
            "representation": representation,
            **layer_terms,
            **terms,
        }

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
    knobs: ClassVar[dict[str, Knob]] = {"temperature": _TEMPERATURE, "alpha": _ALPHA}
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
    knobs: ClassVar[dict[str, Knob]] = {
        "gamma": Knob("gamma", 0.5, 100.0, log=True),
        "temperature": _TEMPERATURE,
        "alpha": _ALPHA,
    }
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
            raise RRMError(
                f"method 'rdt' trains on robustified data but {data.name!r} is not; "
                "run `rrm robustify` and pass its output file as the dataset"
            )
