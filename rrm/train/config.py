"""The typed configuration of a training run, validated at the edge with errors that name the fix."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from rrm.attacks import check_threat
from rrm.config import Config
from rrm.errors import RRMError, unknown
from rrm.models.transplant import TRANSPLANTS
from rrm.train.methods import SWITCHED_OFF, refuse_unread_options
from rrm.train.stages import parse_match_layers

SCHEDULES = ("constant", "cosine", "step", "cyclic")
PRECISIONS = ("fp32", "bf16", "fp16")
FEATURE_LOSSES = ("cosine", "l2", "direction-norm")
MATCH_INPUTS = ("clean", "noise", "teacher-fgsm", "teacher-pgd")
# Options that change how a run executes, not what it computes: a resumed run or a tuning study may differ in them.
RUNTIME_OPTIONS = ("resume", "resume_or_start", "progress", "device", "compile", "data_on_device")


@dataclass
class TrainConfig(Config):
    """Everything one training run depends on. ``None`` means "the method's default" where noted."""

    KIND = "training"
    ALIASES: ClassVar[dict[str, str]] = {"lambda": "lam"}  # the paper's name
    SPELLED: ClassVar[dict[str, str]] = {"lam": "lambda"}
    LISTS = ("milestones", "match_layers")
    COMMA_LISTS = True

    # data and model
    dataset: str = "mnist5k"  # a registered name or a file written by `rrm data prepare` / `rrm robustify`
    model: str = "cnn"
    width: float = 1.0
    feature_dim: int | None = None  # adds Linear(penultimate, feature_dim) so teacher and student sizes match
    # method
    method: str = "natural"
    # optimisation: SGD with momentum
    epochs: int = 10  # for `free`, epochs as the paper counts them: passes x replays
    batch_size: int = 128
    lr: float = 0.1  # the peak rate for the cyclic schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str | None = None  # constant | cosine | step | cyclic; None: the method's default
    milestones: tuple[int, ...] = ()  # epochs at which the `step` schedule multiplies the rate by lr_gamma
    lr_gamma: float = 0.1
    # threat model of adversarial training and of the per-epoch monitor
    norm: str = "linf"
    eps: float = 0.3
    step_size: float | None = None  # None: sat/pgd-fast 2.5 * eps / steps, fast 1.25 * eps, free and n-fgsm eps
    attack_steps: int = 7
    random_start: bool = True
    replays: int = 8  # Free AT's minibatch replays m
    eps_warmup_epochs: int = 0  # adversarial methods: ramp the training eps linearly over these first epochs
    noise_magnitude: float | None = None  # n-fgsm: radius of the uniform noise; None: 2 * eps (de Jorge et al.)
    project_to_eps: bool = False  # n-fgsm: project the perturbation back to the eps-ball (the paper does not)
    grad_align_weight: float = 0.0  # fast: weight of GradAlign's gradient-alignment term (0: off)
    early_stop_on_co: bool = False  # single-step methods: stop at catastrophic overfitting, keep the weights before it
    # transfer methods
    teacher: str | None = None  # a model file, or a registry URI such as models:/rrm-teacher@champion
    lam: float = 5e-3  # RRM's lambda: weight of the cross-entropy term
    feature_loss: str = "cosine"  # cosine | l2 | direction-norm
    # RRM's matching variants: where features are matched (clean, noise: clean plus one random point of the eps-ball,
    # teacher-fgsm / teacher-pgd: clean plus an attack crafted on the teacher), and optional KD / KDIGA terms
    match_inputs: str = "clean"
    # rrm: the stages whose representations are matched, NAME or NAME:WEIGHT (stem, block1.., penultimate)
    match_layers: tuple[str, ...] = ("penultimate",)
    kd_weight: float = 0.0  # rrm: weight of the teacher-logit KD term (at `temperature`)
    iga_weight: float = 0.0  # rrm: weight of KDIGA's input-gradient alignment
    temperature: float = 30.0  # KD / KDIGA
    alpha: float = 1.0  # KD / KDIGA: weight of the distillation term
    gamma: float = 1.0  # KDIGA: weight of input-gradient alignment
    # stem transfer (any method): the teacher's robust first layer in the student (rrm.models.transplant)
    transplant: str | None = None  # auto | stem | stem-filters | stem-prefix | stem-adapter
    transplant_frozen: bool = True  # keep the transplanted stem as it is (False: fine-tune it with the rest)
    # runtime
    precision: str | None = None  # fp32 | bf16 | fp16 autocast; None: the method's default
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 0
    deterministic: bool = False
    channels_last: bool = True
    compile: bool = False  # torch.compile the model's features (and the teacher's); pays off on GPUs and big models
    data_on_device: bool = False  # move the training tensors to the device once (datasets that fit in its memory)
    sync_batchnorm: bool = False  # torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)
    monitor_examples: int = 256  # test examples attacked after each epoch (0 turns the monitor off)
    monitor_steps: int = 10  # PGD steps of the per-epoch monitor
    out_dir: str = "runs/train"
    resume: bool = False  # continue from the checkpoint in out_dir; an error when there is none
    resume_or_start: bool = False  # continue from the checkpoint in out_dir when there is one, else start afresh
    progress: bool | None = None  # None: progress bars only when stderr is a terminal

    def validate(self) -> TrainConfig:
        """Raise :class:`RRMError` for any value out of range; returns self for chaining."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise RRMError(message)

        self.check_types()
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise unknown("schedule", self.schedule, SCHEDULES)
        need(0 < self.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        need(all(m >= 1 for m in self.milestones), f"milestones are epochs >= 1, got {list(self.milestones)}")
        check_threat(self.norm, self.eps)
        need(self.step_size is None or self.step_size > 0, f"step_size must be > 0, got {self.step_size}")
        need(self.attack_steps >= 1, f"attack_steps must be >= 1, got {self.attack_steps}")
        need(self.replays >= 1, f"replays must be >= 1, got {self.replays}")
        need(self.eps_warmup_epochs >= 0, f"eps_warmup_epochs must be >= 0, got {self.eps_warmup_epochs}")
        need(
            self.lam > 0,
            f"lambda must be > 0 (got {self.lam}): with lambda <= 0 the last layer gets no gradient; "
            "the paper's plateau is 5e-5 to 1e-2",
        )
        if self.feature_loss not in FEATURE_LOSSES:
            raise unknown("feature loss", self.feature_loss, FEATURE_LOSSES)
        if self.match_inputs not in MATCH_INPUTS:
            raise unknown("match inputs", self.match_inputs, MATCH_INPUTS)
        for name in ("kd_weight", "iga_weight"):
            value = getattr(self, name)
            need(
                value >= 0 and math.isfinite(value), f"{name} must be a number >= 0 (0 turns the term off), got {value}"
            )
        refuse_unread_options(self, [*SWITCHED_OFF, "early_stop_on_co"])  # options that switch something on
        parse_match_layers(self.match_layers)
        if self.transplant is not None and self.transplant not in TRANSPLANTS:
            raise unknown("transplant", self.transplant, TRANSPLANTS)
        need(
            self.noise_magnitude is None or (self.noise_magnitude >= 0 and math.isfinite(self.noise_magnitude)),
            f"noise_magnitude must be a number >= 0 (or unset for 2 * eps), got {self.noise_magnitude}",
        )
        need(
            self.grad_align_weight >= 0 and math.isfinite(self.grad_align_weight),
            f"grad_align_weight must be a number >= 0 (0 turns GradAlign off), got {self.grad_align_weight}",
        )
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha}")
        need(self.gamma >= 0, f"gamma must be >= 0, got {self.gamma}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise unknown("precision", self.precision, PRECISIONS)
        need(self.monitor_examples >= 0, f"monitor_examples must be >= 0, got {self.monitor_examples}")
        need(self.monitor_steps >= 1, f"monitor_steps must be >= 1, got {self.monitor_steps}")
        need(self.feature_dim is None or self.feature_dim >= 1, f"feature_dim must be >= 1, got {self.feature_dim}")
        need(
            not self.early_stop_on_co or self.monitor_examples > 0,
            "early_stop_on_co watches the per-epoch PGD monitor; set monitor_examples > 0",
        )
        self.check_finite()
        return self

    def check_read(self, names: Iterable[str]) -> None:
        """Refuse any of the options ``names`` set for a method that does not read it (see
        :func:`rrm.train.methods.refuse_unread_options`); the command line checks every option the user named."""
        refuse_unread_options(self, names)
