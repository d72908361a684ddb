"""The report's rows, typed: one run read from its metrics files (:class:`RunRow`, with its :class:`Speedups` over
the SAT student), one student averaged over seeds (:class:`SeedsRow`), one claim checked (:class:`Claim`), and the
:class:`Report` they make. ``to_dict`` gives each the keys that report.json, the CSV tables and the plots read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rrm.train.methods import METHODS

TRANSFER_METHODS = tuple(name for name, m in METHODS.items() if m.learns_from_teacher)
# Methods that need the teacher: their cost "with the teacher" adds the teacher's training time.
USES_TEACHER = frozenset(TRANSFER_METHODS)
# Methods that learn from data the teacher made (rdt): their cost with the teacher adds making it.
LEARNS_FROM_TEACHER_DATA = frozenset(n for n, m in METHODS.items() if m.learns_from_teacher and not m.needs_teacher)
METHOD_ORDER = tuple(METHODS)
# A per-epoch time whose 95% CI half-width exceeds this share of its mean was measured on a busy machine.
NOISY_TIMING_CI = 0.25


def _fields(row: object) -> dict:
    """The row's own fields, shallow (``dataclasses.asdict`` would copy every value)."""
    return {f.name: getattr(row, f.name) for f in dataclasses.fields(row)}


@dataclass
class Speedups:
    """A student's cost with its teacher's and against the SAT student's (:func:`rrm.report.costs.add_speedups`)."""

    total_minutes_with_teacher: float | None = None
    total_flops_with_teacher: float | None = None
    speedup_vs_sat: float | None = None
    speedup_vs_sat_with_teacher: float | None = None
    speedup_vs_sat_measured: float | None = None
    speedup_vs_sat_with_teacher_measured: float | None = None
    adversarial_of_sat_pct: float | None = None


@dataclass
class RunRow:
    """One run: ``name`` is its directory (``rrm-teacher-pgd``), ``method`` what it trained with (``rrm``)."""

    name: str
    method: str
    transplant: str | None
    uses_teacher: bool
    model: str
    epochs: float
    epoch_seconds_mean: float
    epoch_seconds_ci95: float
    total_seconds: float
    total_minutes: float
    natural_pct: float
    adversarial_pct: float | None
    attack: str
    attack_examples: int | None
    # the threat model the numbers are for (None in an evaluation file older than these fields)
    dataset: str | None
    norm: str | None
    eps: float | None
    apgd_pct: float | None
    transfer_pct: float | None
    sanity_passed: bool | None
    evaluation_bound: bool
    total_flops: float | None
    data_flops: float | None
    timing_noisy: bool
    # catastrophic overfitting seen by the single-step methods' monitor, and where --early-stop-on-co stopped
    co_epoch: int | None
    early_stopped_at_epoch: int | None
    cost_basis: str | None = None  # "flops" or "seconds": what every ratio among these runs divides
    speedups: Speedups | None = None  # a student's; the teacher has none

    @property
    def label(self) -> str:
        """The name, marked where the monitor saw catastrophic overfitting."""
        if self.co_epoch is None:
            return self.name
        kept = "" if self.early_stopped_at_epoch is None else f", kept epoch {self.early_stopped_at_epoch}"
        return f"{self.name} (CO at epoch {self.co_epoch}{kept})"

    @property
    def costs(self) -> Speedups:
        """The speedups, all None for the teacher."""
        return self.speedups or Speedups()

    def to_dict(self) -> dict:
        own = _fields(self)
        speedups = own.pop("speedups")
        return {**own, **(_fields(speedups) if speedups else {})}


@dataclass
class SeedsRow:
    """One student over its seeds: the mean and 95% CI half-width (``*_ci95``) of each averaged number (None where
    a seed lacks it), and ratios of the means to the SAT student's."""

    name: str
    method: str
    model: str
    transplant: str | None
    uses_teacher: bool
    seeds: int
    attack: str  # every attack the seeds' columns came from, comma-separated
    dataset: str | None  # the same config on every seed
    norm: str | None
    eps: float | None
    sanity_passed: bool  # every seed's evaluation passed
    evaluation_bound: bool
    cost_basis: str
    timing_noisy: bool  # in any seed
    co_seeds: int  # seeds that overfitted catastrophically
    adversarial_min_pct: float | None  # the worst seed's
    natural_pct: float | None
    natural_pct_ci95: float | None
    adversarial_pct: float | None
    adversarial_pct_ci95: float | None
    transfer_pct: float | None
    transfer_pct_ci95: float | None
    total_minutes: float | None
    total_minutes_ci95: float | None
    total_minutes_with_teacher: float | None
    total_minutes_with_teacher_ci95: float | None
    total_flops: float | None
    total_flops_ci95: float | None
    total_flops_with_teacher: float | None
    total_flops_with_teacher_ci95: float | None
    adversarial_of_sat_pct: float | None = None
    time_of_sat: float | None = None
    cost_of_sat: float | None = None
    worst_seed_of_sat_pct: float | None = None

    @property
    def label(self) -> str:
        """The name, marked where the monitor saw catastrophic overfitting in some of the seeds."""
        return f"{self.name} (CO in {self.co_seeds} of {self.seeds} seeds)" if self.co_seeds else self.name

    def to_dict(self) -> dict:
        return _fields(self)

    def in_tflops(self) -> dict:
        """:meth:`to_dict` with the FLOP counts (and their CIs) in TFLOPs beside them: what the FLOP panels plot."""

        def tera(value: float | None) -> float | None:
            return None if value is None else value / 1e12

        return {
            **self.to_dict(),
            "total_tflops": tera(self.total_flops),
            "total_tflops_ci95": tera(self.total_flops_ci95),
            "total_tflops_with_teacher": tera(self.total_flops_with_teacher),
            "total_tflops_with_teacher_ci95": tera(self.total_flops_with_teacher_ci95),
        }


def sat_reference(rows: list) -> RunRow | SeedsRow | None:
    """The SAT student every ratio divides by: the row named ``sat``, else the only row trained with method sat (a
    study's ``sat-warmup``, say); None where there is neither, or several SAT rows and none named ``sat``."""
    named = [r for r in rows if r.name == "sat"]
    if named:
        return named[0]
    trained = [r for r in rows if r.method == "sat"]
    return trained[0] if len(trained) == 1 else None


@dataclass
class Claim:
    """One of the paper's claims checked against the rows: what was measured, as a number and as text."""

    claim: str
    measured: float
    text: str
    met: bool

    def to_dict(self) -> dict:
        return _fields(self)


@dataclass
class Report:
    """What the report read: the teacher's row and the students' (one run each, or averaged over ``seeds``), with
    the paper's ``claims`` for single runs or the variants study's ``target`` over seeds."""

    teacher: RunRow | None
    students: list[RunRow] | list[SeedsRow]
    seeds: list[int] | None = None
    target: dict | None = None
    claims: list[Claim] = field(default_factory=list)

    @property
    def runs(self) -> list[RunRow | SeedsRow]:
        """The teacher (where there is one), then the students."""
        return ([self.teacher] if self.teacher else []) + list(self.students)

    def to_dict(self) -> dict:
        out = {
            "teacher": self.teacher.to_dict() if self.teacher else None,
            "students": [r.to_dict() for r in self.students],
        }
        if self.seeds is not None:
            return {**out, "seeds": self.seeds, "target": self.target}
        return {**out, "claims": [c.to_dict() for c in self.claims]}
