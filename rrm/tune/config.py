"""A tuning study's configuration: what to tune, how to score trials and where to keep the study.

Knob facts (ranges, log scale, which field of :class:`~rrm.train.TrainConfig` a knob sets) come from the method
classes through :func:`rrm.train.knobs_of`; nothing here imports optuna.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from rrm.config import Config
from rrm.errors import RRMError, require, unknown
from rrm.train import TrainConfig, knobs_of, tunable_methods
from rrm.train.config import RUNTIME_OPTIONS
from rrm.train.methods import get_method

MODES = ("pareto", "constrained")
PRUNERS = ("median", "hyperband", "threshold", "none")
DEFAULT_STORAGE = "sqlite:///optuna.db"


@dataclass
class TuneConfig(Config):
    """One study: what to tune, how to score and where to keep it. ``train`` holds every fixed training option."""

    method: str = "rrm"
    mode: str = "pareto"  # pareto | constrained
    n_trials: int = 20  # the study's target number of finished trials (see the module docstring)
    knobs: tuple[str, ...] = ()  # knobs to tune; empty: the method's (Method.tuned_by_default)
    ranges: dict = field(default_factory=dict)  # knob -> (low, high); missing knobs use the knob's default range
    min_natural_accuracy: float = 0.0  # validation natural-accuracy floor (a constraint; 0 turns it off)
    pruner: str | None = None  # median | hyperband | threshold | none; None: median (constrained), none (pareto)
    prune_below: float = 0.0  # threshold pruner: stop a trial whose APGD accuracy falls below this
    storage: str = DEFAULT_STORAGE  # sqlite:///FILE, journal:FILE (or FILE.log), postgresql://USER:PW@HOST/DB
    study_name: str | None = None  # None: METHOD-MODEL-DATASET
    seed: int = 0  # sampler seed and every trial's training seed
    validation_size: float = 0.2  # fraction of the training split held out to score trials
    attack_examples: int = 256  # validation images attacked by APGD after each epoch
    attack_steps: int = 20  # APGD iterations (1 restart) of the per-epoch score
    best_trials: int = 3  # best trials evaluated on the test split
    test_examples: int | None = None  # test images attacked in that evaluation; None: the whole test split
    test_steps: int = 50
    test_restarts: int = 1
    out_dir: str | None = None  # None: runs/tune/STUDY
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def tuned(self) -> tuple[str, ...]:
        """The tuned knobs: ``knobs`` (or the method's) plus any knob given a range, in a stable order."""
        named = self.knobs or get_method(self.method).tuned_by_default
        return tuple(dict.fromkeys([*named, *self.ranges]))

    def range_of(self, name: str) -> tuple[float, float]:
        knob = knobs_of(self.method)[name]
        return tuple(self.ranges.get(name, (knob.low, knob.high)))

    @property
    def name(self) -> str:
        return self.study_name or f"{self.method}-{self.train.model}-{Path(self.train.dataset).stem}"

    @property
    def directory(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("runs") / "tune" / self.name

    @property
    def pruner_name(self) -> str:
        return self.pruner or ("median" if self.mode == "constrained" else "none")

    def trial_config(self, params: dict, number: int) -> TrainConfig:
        knobs = knobs_of(self.method)
        values = {knobs[name].field: value for name, value in params.items()}
        out_dir = self.directory / "trials" / f"{number:04d}"
        return self.train.replace(
            method=self.method, **values, out_dir=str(out_dir), resume=False, progress=False, monitor_examples=0
        )

    def settings(self) -> dict:
        """What a study's trials depend on; a restart must match them (n_trials and the test budget may change)."""
        base = {
            k: v
            for k, v in self.train.to_dict().items()
            if k not in (*RUNTIME_OPTIONS, "out_dir", "monitor_examples", "monitor_steps")
        }
        return json.loads(
            json.dumps(
                {
                    "method": self.method,
                    "mode": self.mode,
                    "ranges": {k: list(self.range_of(k)) for k in self.tuned},
                    "min_natural_accuracy": self.min_natural_accuracy,
                    "pruner": self.pruner_name,
                    "prune_below": self.prune_below,
                    "seed": self.seed,
                    "validation_size": self.validation_size,
                    "attack_examples": self.attack_examples,
                    "attack_steps": self.attack_steps,
                    "train": base,
                }
            )
        )

    def validate(self) -> TuneConfig:
        """Raise :class:`RRMError` naming the bad value and the fix; returns self for chaining."""
        self.check_types()
        if self.method not in tunable_methods():
            raise unknown("tuning method", self.method, tunable_methods())
        self.train.replace(method=self.method).validate()  # before the ranges, which validate it with each bound
        if self.mode not in MODES:
            raise unknown("tuning mode", self.mode, MODES)
        if self.pruner is not None and self.pruner not in PRUNERS:
            raise unknown("pruner", self.pruner, PRUNERS)
        require(self.n_trials >= 1, f"n_trials must be >= 1, got {self.n_trials}")
        for name in (*self.knobs, *self.ranges):
            if name not in knobs_of(self.method):
                raise unknown(f"parameter to tune for {self.method!r}", name, knobs_of(self.method))
        for name in self.tuned:
            self._check_range(name)
        defaults = TrainConfig()
        for name in self.tuned:  # each trial sets a tuned knob's field: a fixed value of it would be ignored
            knob_field = knobs_of(self.method)[name].field
            fixed = getattr(self.train, knob_field)
            require(
                fixed == getattr(defaults, knob_field),
                f"{name} is tuned in {list(self.range_of(name))}, so its fixed value {fixed} would be ignored; "
                f"drop the fixed {name}, or stop tuning it",
            )
        require(
            0 <= self.min_natural_accuracy < 1,
            f"min_natural_accuracy must be in [0, 1), got {self.min_natural_accuracy}",
        )
        require(
            self.mode == "constrained" or self.pruner_name == "none",
            f"pruner {self.pruner_name!r} needs --mode constrained (Optuna cannot prune multi-objective "
            "studies); pass --pruner none or --mode constrained",
        )
        require(
            self.pruner_name != "threshold" or 0 < self.prune_below <= 1,
            f"the threshold pruner needs prune_below in (0, 1], got {self.prune_below}",
        )
        require(0 < self.validation_size < 1, f"validation_size must be in (0, 1), got {self.validation_size}")
        for name in ("attack_examples", "attack_steps", "best_trials", "test_steps", "test_restarts"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(
            self.test_examples is None or self.test_examples >= 1,
            f"test_examples must be >= 1 (or unset for the whole test split), got {self.test_examples}",
        )
        require(
            bool(re.fullmatch(r"[\w.@+-]{1,200}", self.name)),
            f"study name {self.name!r} may hold only letters, digits and . _ - + @; pass another --study-name",
        )
        require(
            bool(self.train.teacher),
            f"method {self.method!r} needs a teacher; pass --teacher <model file or models:/ URI>",
        )
        self.check_finite()
        return self

    def _check_range(self, name: str) -> None:
        knob = knobs_of(self.method)[name]
        bounds = self.range_of(name)
        try:
            low, high = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise RRMError(f"range of {name} must be two numbers LOW,HIGH, got {bounds!r}") from None
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            what = "empty" if low == high else "inverted" if low > high else "not finite"
            raise RRMError(
                f"range of {name} [{low:g}, {high:g}] is {what}; pass LOW < HIGH, e.g. --range "
                f"{name}={knob.low:g},{knob.high:g}"
            )
        if knob.log and low <= 0:
            raise RRMError(
                f"range of {name} [{low:g}, {high:g}] is searched on a log scale and must be > 0; "
                f"e.g. --range {name}={knob.low:g},{high:g}"
            )
        if knob.integer and (low != int(low) or high != int(high)):
            raise RRMError(f"range of {name} [{low:g}, {high:g}] must be whole numbers")
        for bound in (low, high):  # the training config's own rules (alpha <= 1, epochs >= 1, ...)
            value = int(bound) if knob.integer else bound
            try:
                self.train.replace(method=self.method, **{knob.field: value}).validate()
            except RRMError as exc:
                raise RRMError(f"range of {name} [{low:g}, {high:g}]: {exc}") from None


def parse_range(text: object) -> tuple[float, float]:
    """``"1e-5,1"`` or ``[1e-5, 1]`` -> ``(1e-05, 1.0)``."""
    parts = text if isinstance(text, (list, tuple)) else str(text).strip("[]() ").split(",")
    try:
        low, high = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise RRMError(f"a range is LOW,HIGH (two numbers), got {text!r}") from None
    return low, high
