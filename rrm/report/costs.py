"""Training cost in the report: the speedups over the SAT student, counted in FLOPs where every run counted them,
and each student's cost with its teacher's share."""

from __future__ import annotations

from rrm.report.rows import LEARNS_FROM_TEACHER_DATA, RunRow, Speedups, sat_reference


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def tflops(value: float | None) -> str:
    """A FLOP count as TFLOPs, to 3 significant digits; "-" where there is none."""
    return "-" if value is None else f"{value / 1e12:.3g}"


def _with_teacher(row: RunRow, teacher: RunRow | None, flops: bool) -> float | None:
    """The row's training FLOPs (``flops``) or seconds plus the teacher's for a run that uses it, plus making the
    teacher's data (FLOPs only)."""
    own = row.total_flops if flops else row.total_seconds
    if not row.uses_teacher or own is None:
        return own
    teachers = None if teacher is None else teacher.total_flops if flops else teacher.total_seconds
    if teachers is None:
        return None
    if flops and row.method in LEARNS_FROM_TEACHER_DATA:
        return None if row.data_flops is None else own + teachers + row.data_flops
    return own + teachers


def add_speedups(students: list[RunRow], teacher: RunRow | None) -> None:
    """Speedups over the SAT student from counted FLOPs where every run counted them (``cost_basis``), else from
    seconds; the measured-time speedups beside them either way."""
    sat = sat_reference(students)
    runs = students + ([teacher] if teacher else [])
    flops = all(r.total_flops is not None for r in runs)
    for row in runs:
        row.cost_basis = "flops" if flops else "seconds"

    def cost(row: RunRow) -> float | None:
        return row.total_flops if flops else row.total_seconds

    for row in students:
        seconds_with_teacher = _with_teacher(row, teacher, flops=False)
        row.speedups = Speedups(
            total_minutes_with_teacher=None if seconds_with_teacher is None else seconds_with_teacher / 60,
            total_flops_with_teacher=_with_teacher(row, teacher, flops=True),
            speedup_vs_sat=ratio(sat and cost(sat), cost(row)),
            speedup_vs_sat_with_teacher=ratio(sat and cost(sat), _with_teacher(row, teacher, flops)),
            speedup_vs_sat_measured=ratio(sat and sat.total_seconds, row.total_seconds),
            speedup_vs_sat_with_teacher_measured=ratio(sat and sat.total_seconds, seconds_with_teacher),
            adversarial_of_sat_pct=(
                100 * row.adversarial_pct / sat.adversarial_pct
                if sat and sat.adversarial_pct and row.adversarial_pct is not None
                else None
            ),
        )
