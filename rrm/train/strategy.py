"""The strategy every training method is: the loss of a batch and what it needs (a teacher, an attack, its default
schedule), plus the facts that tracking, tuning, reports and the command line read from it.

Everything else (data, augmentation, optimiser, precision, BatchNorm handling, timing, checkpoints) is the trainer's
and identical for every method, so comparisons between them are fair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from rrm.data import ImageData
from rrm.models import Classifier

if TYPE_CHECKING:  # the configuration validates itself against the methods
    from rrm.train.config import TrainConfig


@dataclass(frozen=True)
class Knob:
    """A tunable training option: the TrainConfig field it sets and its default search range."""

    field: str
    low: float
    high: float
    log: bool
    integer: bool = False


# Knobs of the training loop, tunable for every method.
TRAINING_KNOBS = {"lr": Knob("lr", 1e-3, 0.5, log=True), "epochs": Knob("epochs", 1, 20, log=False, integer=True)}

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
        self.eps = cfg.eps  # the radius of this epoch's training attacks (see start_epoch)

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch (0-based; passes for free): ramps the training attacks' eps linearly to
        ``cfg.eps`` over the first ``eps_warmup_epochs``, the usual cure for a model that stays at chance under a
        large eps from the first step."""
        warmup = self.cfg.eps_warmup_epochs
        self.eps = self.cfg.eps * min(1.0, (epoch + 1) / warmup) if warmup else self.cfg.eps

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
        return cfg.step_size if cfg.step_size is not None else 2.5 * self.eps / cfg.attack_steps


def resolved_precision(precision: str | None, method: type[Method] | Method, device: torch.device | str) -> str:
    """The autocast precision a run uses: ``precision``, or None for the method's default on ``device``."""
    if precision is not None:
        return precision
    return "fp16" if method.mixed_precision_on_gpu and torch.device(device).type == "cuda" else "fp32"


def resolved_schedule(schedule: str | None, method: type[Method] | Method) -> str:
    """The learning-rate schedule a run uses: ``schedule``, or None for the method's default."""
    return schedule or method.default_schedule
