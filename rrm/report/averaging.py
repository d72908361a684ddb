"""Students averaged over seeds: one :class:`~rrm.report.rows.SeedsRow` per student name, each number a mean with
its 95% CI half-width (Student's t), and ratios of the means to the SAT student's."""

from __future__ import annotations

from collections.abc import Sequence

from rrm.report.costs import ratio
from rrm.report.rows import RunRow, SeedsRow, sat_reference
from rrm.stats import mean_ci


def _mean_ci(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and 95% CI half-width; both None where a seed lacks the number."""
    return mean_ci(list(values)) if None not in values else (None, None)


def _averaged(runs: list[RunRow]) -> SeedsRow:
    first = runs[0]
    natural, natural_ci = _mean_ci([r.natural_pct for r in runs])
    adversarial, adversarial_ci = _mean_ci([r.adversarial_pct for r in runs])
    transfer, transfer_ci = _mean_ci([r.transfer_pct for r in runs])
    minutes, minutes_ci = _mean_ci([r.total_minutes for r in runs])
    minutes_teacher, minutes_teacher_ci = _mean_ci([r.costs.total_minutes_with_teacher for r in runs])
    flops, flops_ci = _mean_ci([r.total_flops for r in runs])
    flops_teacher, flops_teacher_ci = _mean_ci([r.costs.total_flops_with_teacher for r in runs])
    worst = [r.adversarial_pct for r in runs]
    return SeedsRow(
        name=first.name,
        method=first.method,
        model=first.model,
        transplant=first.transplant,
        uses_teacher=first.uses_teacher,
        seeds=len(runs),
        attack=",".join(sorted({r.attack for r in runs})),
        dataset=first.dataset,
        norm=first.norm,
        eps=first.eps,
        sanity_passed=all(r.sanity_passed is True for r in runs),
        evaluation_bound=all(r.evaluation_bound for r in runs),
        cost_basis="flops" if all(r.cost_basis == "flops" for r in runs) else "seconds",
        timing_noisy=any(r.timing_noisy for r in runs),
        co_seeds=sum(r.co_epoch is not None for r in runs),
        adversarial_min_pct=None if None in worst else min(worst),
        natural_pct=natural,
        natural_pct_ci95=natural_ci,
        adversarial_pct=adversarial,
        adversarial_pct_ci95=adversarial_ci,
        transfer_pct=transfer,
        transfer_pct_ci95=transfer_ci,
        total_minutes=minutes,
        total_minutes_ci95=minutes_ci,
        total_minutes_with_teacher=minutes_teacher,
        total_minutes_with_teacher_ci95=minutes_teacher_ci,
        total_flops=flops,
        total_flops_ci95=flops_ci,
        total_flops_with_teacher=flops_teacher,
        total_flops_with_teacher_ci95=flops_teacher_ci,
    )


def over_seeds(per_seed: list[list[RunRow]]) -> list[SeedsRow]:
    """One row per student name, in the order the first seed lists them: the mean and 95% CI half-width of each
    averaged number over the seeds.

    A number missing from any seed (no transfer attack, no teacher's time) is None. ``sanity_passed`` holds only
    when every seed's evaluation passed; the ratios to SAT are ratios of the means.
    """
    by_name: dict[str, list[RunRow]] = {}
    for rows in per_seed:
        for row in rows:
            by_name.setdefault(row.name, []).append(row)
    out = [_averaged(runs) for runs in by_name.values()]
    sat = sat_reference(out)
    for row in out:
        row.adversarial_of_sat_pct = (
            100 * row.adversarial_pct / sat.adversarial_pct
            if sat and sat.adversarial_pct and row.adversarial_pct is not None
            else None
        )
        row.time_of_sat = ratio(row.total_minutes, sat and sat.total_minutes)
        row.cost_of_sat = ratio(row.total_flops, sat and sat.total_flops)
        row.worst_seed_of_sat_pct = ratio(row.adversarial_min_pct, sat and sat.adversarial_pct / 100)
    return out
