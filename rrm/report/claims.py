"""What the report checks: the paper's claims for RRM on single runs (:func:`claims`), and the variants study's
target on students averaged over seeds (:func:`target`)."""

from __future__ import annotations

from rrm.report.costs import tflops
from rrm.report.rows import Claim, RunRow, SeedsRow, sat_reference

# The paper's claim for RRM, as checkable targets: robustness close to a SAT student of the same architecture,
# far above the students that get no robustness signal, at a fraction of SAT's training time.
CLAIM_OF_SAT_PCT = 80.0
CLAIM_MARGIN_POINTS = 20.0
CLAIM_BASELINES = ("natural", "kd", "rdt")
CLAIM_TIME_FRACTION = 0.25
# The target for a cheap variant: a student that uses the teacher, at least 80% of the SAT student's mean
# AutoPGD accuracy in at most a third of SAT's mean student training time, its evaluations passing the checks.
TARGET_OF_SAT_PCT = 80.0
TARGET_TIME_FRACTION = 1 / 3


def target(students: list[SeedsRow]) -> dict:
    """The target on rows averaged over seeds: which students that use the teacher reach at least 80% of the
    SAT student's (:func:`~rrm.report.rows.sat_reference`) mean AutoPGD accuracy in at most a third of its mean
    student training time, with every evaluation passing the gradient-masking checks. Each candidate comes with
    what was measured, and so does every student that needs no teacher (``without_teacher``; SAT itself excepted),
    checked against the same bar: where the teacher's students fail, those are what to use instead."""
    sat = sat_reference(students)
    counted = bool(students) and all(r.cost_basis == "flops" for r in students)
    rule = (
        f"a student using the teacher with mean adversarial accuracy >= {TARGET_OF_SAT_PCT:.0f}% of sat's and "
        f"mean student training {'cost (counted FLOPs)' if counted else 'time'} <= 1/{1 / TARGET_TIME_FRACTION:.0f} "
        f"of sat's, every evaluation passing the gradient-masking checks"
    )
    if sat is None or sat.adversarial_pct is None:
        return {"rule": rule, "sat": None, "candidates": {}, "met_by": [], "met": False}
    need_pct = TARGET_OF_SAT_PCT / 100 * sat.adversarial_pct
    max_minutes = TARGET_TIME_FRACTION * sat.total_minutes
    max_flops = TARGET_TIME_FRACTION * sat.total_flops if counted else None
    candidates, others = {}, {}
    for r in students:
        if r is sat or r.adversarial_pct is None:
            continue
        group = candidates if r.uses_teacher else others
        group[r.name] = {
            "adversarial_pct": r.adversarial_pct,
            "adversarial_of_sat_pct": r.adversarial_of_sat_pct,
            "total_minutes": r.total_minutes,
            "time_of_sat": r.time_of_sat,
            "sanity_passed": r.sanity_passed,
            "total_flops": r.total_flops,
            "cost_of_sat": r.cost_of_sat,
            "worst_seed_of_sat_pct": r.worst_seed_of_sat_pct,
            "met": r.adversarial_pct >= need_pct
            and (r.total_flops <= max_flops if counted else r.total_minutes <= max_minutes)
            and r.sanity_passed,
        }
    met_by = [name for name, c in candidates.items() if c["met"]]
    # Where a naturally trained student already clears the accuracy bar (MNIST at small eps), meeting the target
    # says nothing about transfer: the report says so and gives each candidate's margin over natural training.
    natural = next((r for r in students if r.name == "natural" and r.adversarial_pct is not None), None)
    for c in candidates.values():
        c["over_natural_points"] = c["adversarial_pct"] - natural.adversarial_pct if natural else None
    # What the user can do instead: the students that need no teacher and clear the same bar (Fast AT at eps 0.1).
    return {
        "rule": rule,
        "candidates": candidates,
        "met_by": met_by,
        "met": bool(met_by),
        "without_teacher": others,
        "met_without_teacher": [name for name, c in others.items() if c["met"]],
        "sat": {
            "name": sat.name,
            "adversarial_pct": sat.adversarial_pct,
            "total_minutes": sat.total_minutes,
            "sanity_passed": sat.sanity_passed,
            **({"total_flops": sat.total_flops} if counted else {}),
        },
        "thresholds": {
            "adversarial_pct": need_pct,
            "total_minutes": max_minutes,
            **({"total_flops": max_flops} if counted else {}),
        },
        "cost_basis": "flops" if counted else "seconds",
        "natural_adversarial_pct": natural.adversarial_pct if natural else None,
        "discriminating": natural is None or natural.adversarial_pct < need_pct,
    }


def claims(students: list[RunRow], method: str = "rrm") -> list[Claim]:
    """The paper's claim for ``method`` checked against these rows: one entry per target, with what was measured.

    Targets: adversarial accuracy at least 80% of the SAT student's; at least 20 points above the natural, KD and
    RDT students; student training cost (counted FLOPs, else time) at most a quarter of SAT's. Targets whose rows are
    missing are left out.
    """
    rows = {r.name: r for r in students}
    subject, sat = rows.get(method), sat_reference(students)
    if subject is None or subject.adversarial_pct is None:
        return []
    out: list[Claim] = []
    if sat and sat.adversarial_pct:
        share = subject.costs.adversarial_of_sat_pct
        out.append(
            Claim(
                claim=f"{method} adversarial >= {CLAIM_OF_SAT_PCT:.0f}% of sat's",
                measured=share,
                text=f"{share:.1f}% ({subject.adversarial_pct:.1f} vs {sat.adversarial_pct:.1f})",
                met=share >= CLAIM_OF_SAT_PCT,
            )
        )
    for name in CLAIM_BASELINES:
        base = rows.get(name)
        if base is None or base.adversarial_pct is None:
            continue
        margin = subject.adversarial_pct - base.adversarial_pct
        out.append(
            Claim(
                claim=f"{method} adversarial >= {name}'s + {CLAIM_MARGIN_POINTS:.0f} points",
                measured=margin,
                text=f"{margin:+.1f} points",
                met=margin >= CLAIM_MARGIN_POINTS,
            )
        )
    if sat and subject.cost_basis == "flops":
        fraction, seconds = subject.total_flops / sat.total_flops, subject.total_seconds / sat.total_seconds
        out.append(
            Claim(
                claim=f"{method} training cost <= {CLAIM_TIME_FRACTION:g} x sat's (counted FLOPs)",
                measured=fraction,
                text=f"{fraction:.2f} x ({tflops(subject.total_flops)} vs {tflops(sat.total_flops)} "
                f"TFLOPs; measured time {seconds:.2f} x)",
                met=fraction <= CLAIM_TIME_FRACTION,
            )
        )
    elif sat:
        fraction = subject.total_seconds / sat.total_seconds
        out.append(
            Claim(
                claim=f"{method} training time <= {CLAIM_TIME_FRACTION:g} x sat's",
                measured=fraction,
                text=f"{fraction:.2f} x ({subject.total_minutes:.2f} vs {sat.total_minutes:.2f} min)",
                met=fraction <= CLAIM_TIME_FRACTION,
            )
        )
    return out
