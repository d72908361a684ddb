"""The report's tables as Markdown and CSV: the paper's Tables 1 and 2, and the table over seeds with its target."""

from __future__ import annotations

import csv
import io

from rrm.report.costs import tflops
from rrm.report.rows import NOISY_TIMING_CI, Report, RunRow, SeedsRow

COST_COLUMNS = (
    "total_flops",
    "total_flops_with_teacher",
    "cost_basis",
    "speedup_vs_sat_measured",
    "speedup_vs_sat_with_teacher_measured",
    "timing_noisy",
)
# What every single-run table's CSV ends with: cost, the attack's image count, APGD and catastrophic overfitting.
RUN_COLUMNS = (*COST_COLUMNS, "attack_examples", "apgd_pct", "co_epoch", "early_stopped_at_epoch")

TABLE1_COLUMNS = (
    "name",
    "method",
    "model",
    "epochs",
    "epoch_seconds_mean",
    "epoch_seconds_ci95",
    "total_minutes",
    "natural_pct",
    "adversarial_pct",
    "attack",
    "speedup_vs_sat",
    "speedup_vs_sat_with_teacher",
    *RUN_COLUMNS,
)
TABLE2_COLUMNS = (
    "name",
    "method",
    "model",
    "natural_pct",
    "adversarial_pct",
    "attack",
    "adversarial_of_sat_pct",
    "total_minutes",
    "total_minutes_with_teacher",
    "speedup_vs_sat",
    "speedup_vs_sat_with_teacher",
    *RUN_COLUMNS,
)
SEEDS_COLUMNS = (
    "name",
    "method",
    "model",
    "seeds",
    "natural_pct",
    "natural_pct_ci95",
    "adversarial_pct",
    "adversarial_pct_ci95",
    "transfer_pct",
    "transfer_pct_ci95",
    "total_minutes",
    "total_minutes_ci95",
    "total_minutes_with_teacher",
    "total_minutes_with_teacher_ci95",
    "total_flops",
    "total_flops_ci95",
    "total_flops_with_teacher",
    "total_flops_with_teacher_ci95",
    "attack",
    "adversarial_of_sat_pct",
    "time_of_sat",
    "sanity_passed",
    "cost_of_sat",
    "cost_basis",
    "timing_noisy",
    "adversarial_min_pct",
    "worst_seed_of_sat_pct",
    "co_seeds",
)


def _epoch_time(r: RunRow) -> str:
    return f"{r.epoch_seconds_mean:.2f} ± {r.epoch_seconds_ci95:.2f}" + (" (noisy)" if r.timing_noisy else "")


def _cost_notes(rows: list[RunRow]) -> list[str]:
    """What the adversarial column and the speedups are, and which timings were measured on a busy machine."""
    notes = [
        "adversarial %: AutoAttack (`autoattack`) where evaluated, else ART AutoPGD (`art-apgd`), else native "
        "APGD-CE (`apgd`); the attack column says which, and `attack_examples` on how many test images. "
        "APGD %: the native APGD-CE, the monitor of training and tuning."
    ]
    if rows and all(r.cost_basis == "flops" for r in rows):
        notes.append(
            "Speedups are ratios of counted training FLOPs (`total_flops`; a loaded machine does not change them); "
            "incl. teacher adds the teacher's training FLOPs to every student of the teacher (rdt, kd, kdiga, rrm and "
            "a stem transplant), and to rdt also the FLOPs of robustifying its data. The measured-time speedup "
            "stands beside them."
        )
    else:
        notes.append(
            "Speedups are ratios of measured training time (a run without FLOP counts: rerun `rrm train` to count "
            "them); incl. teacher adds the teacher's training time to every student of the teacher "
            "(robustification time not included)."
        )
    noisy = [r.name for r in rows if r.timing_noisy]
    if noisy:
        notes.append(
            f"**Noisy timing** (per-epoch 95% CI wider than {NOISY_TIMING_CI:.0%} of the mean: a busy machine): "
            f"{', '.join(noisy)}. Their seconds and measured speedups are unreliable; the FLOP counts are not."
        )
    return [note + "\n" for note in notes]


def _unbound_note(rows: list[RunRow | SeedsRow]) -> list[str]:
    names = [r.name for r in rows if not r.evaluation_bound]
    if not names:
        return []
    return [
        f"Not checked against their model file (the evaluation names none, as files written by hand or by rrm "
        f"before evaluations recorded the model's sha256 do, or the model.pt is absent): {', '.join(names)}; "
        "evaluate them again (dvc repro) to check them."
    ]


def fmt(value: object, digits: int = 2) -> str:
    """A table cell: a float to ``digits`` decimals, "-" for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_ci(mean: float | None, half_width: float | None, digits: int = 1) -> str:
    """A mean over seeds with its 95% CI half-width: ``85.9 ± 5.0``; "-" for None."""
    return "-" if mean is None else f"{mean:.{digits}f} ± {half_width:.{digits}f}"


def _markdown(title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + [""] + notes) + "\n"


def csv_text(columns: tuple[str, ...], rows: list[RunRow] | list[SeedsRow]) -> str:
    """``columns`` of ``rows`` as CSV; an empty cell where a row has no value."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = row.to_dict()
        writer.writerow({c: "" if values.get(c) is None else values[c] for c in columns})
    return buffer.getvalue()


def transfer_rows(report: Report) -> list[RunRow]:
    """Table 2's rows: the SAT student and every student of the teacher."""
    return [r for r in report.students if r.method == "sat" or r.uses_teacher]


def table1(report: Report) -> str:
    """Markdown Table 1 analogue: every method's training cost, accuracy and speedup over SAT."""
    runs = report.runs
    rows = []
    for r in runs:
        rows.append(
            [
                r.label,
                r.model,
                fmt(r.epochs, 0),
                _epoch_time(r),
                fmt(r.total_minutes),
                fmt(r.natural_pct, 1),
                fmt(r.adversarial_pct, 1),
                r.attack,
                fmt(r.costs.speedup_vs_sat),
                fmt(r.costs.speedup_vs_sat_with_teacher),
                tflops(r.total_flops),
                tflops(r.costs.total_flops_with_teacher),
                fmt(r.costs.speedup_vs_sat_measured),
                fmt(r.apgd_pct, 1),
                fmt(r.attack_examples),
            ]
        )
    header = [
        "method",
        "model",
        "epochs",
        "epoch time (s, mean ± 95% CI)",
        "total (min)",
        "natural %",
        "adversarial %",
        "attack",
        "speedup vs SAT",
        "speedup vs SAT incl. teacher",
        "TFLOPs",
        "TFLOPs incl. teacher",
        "speedup vs SAT (measured time)",
        "APGD %",
        "images",
    ]
    notes = _cost_notes(runs) + _unbound_note(runs)
    return _markdown("Table 1: training cost and robustness per method", header, rows, notes)


def table2(report: Report) -> str:
    """Markdown Table 2 analogue: the transfer methods against SAT."""
    chosen = transfer_rows(report)
    rows = [
        [
            r.label,
            r.model,
            fmt(r.natural_pct, 1),
            fmt(r.adversarial_pct, 1),
            r.attack,
            fmt(r.costs.adversarial_of_sat_pct, 1),
            fmt(r.total_minutes),
            fmt(r.costs.total_minutes_with_teacher),
            fmt(r.costs.speedup_vs_sat),
            fmt(r.costs.speedup_vs_sat_with_teacher),
            tflops(r.total_flops),
            tflops(r.costs.total_flops_with_teacher),
            fmt(r.costs.speedup_vs_sat_measured),
            fmt(r.costs.speedup_vs_sat_with_teacher_measured),
        ]
        for r in chosen
    ]
    header = [
        "method",
        "model",
        "natural %",
        "adversarial %",
        "attack",
        "adversarial / SAT's %",
        "total (min)",
        "total incl. teacher (min)",
        "speedup vs SAT",
        "speedup vs SAT incl. teacher",
        "TFLOPs",
        "TFLOPs incl. teacher",
        "speedup vs SAT (measured time)",
        "incl. teacher (measured time)",
    ]
    notes = [f"- {'met' if c.met else '**not met**'}: {c.claim} — measured {c.text}" for c in report.claims]
    if notes:
        notes.insert(0, "The paper's claim for RRM on this data:\n")
        notes.append("")
    notes += _cost_notes(chosen)
    return _markdown(
        "Table 2: robustness transfer (the students of the teacher: rdt, kd, kdiga, rrm, stem transplants) against SAT",
        header,
        rows,
        notes,
    )


def seeds_table(report: Report) -> str:
    """Markdown: every student's means +- 95% CI over the seeds, against SAT, and the variants study's target check."""

    rows = [
        [
            r.label,
            r.method,
            r.model,
            str(r.seeds),
            fmt_ci(r.natural_pct, r.natural_pct_ci95, 1),
            fmt_ci(r.adversarial_pct, r.adversarial_pct_ci95, 1),
            fmt(r.adversarial_min_pct, 1),
            r.attack,
            fmt_ci(r.transfer_pct, r.transfer_pct_ci95, 1),
            fmt_ci(r.total_minutes, r.total_minutes_ci95, 2),
            fmt_ci(r.total_minutes_with_teacher, r.total_minutes_with_teacher_ci95, 2),
            fmt(r.adversarial_of_sat_pct, 1),
            fmt(r.time_of_sat),
            "passed" if r.sanity_passed else "**FAILED**",
            fmt(r.cost_of_sat),
            "-" if r.total_flops is None else f"{tflops(r.total_flops)} ± {tflops(r.total_flops_ci95)}",
        ]
        for r in report.students
    ]
    header = [
        "student",
        "method",
        "model",
        "seeds",
        "natural %",
        "adversarial %",
        "worst seed %",
        "attack",
        "transfer %",
        "student (min)",
        "incl. teacher (min)",
        "adversarial / SAT's %",
        "time / SAT's",
        "checks",
        "FLOPs / SAT's",
        "student TFLOPs",
    ]
    t = report.teacher
    notes = [
        f"Mean ± 95% CI (Student's t) over seeds {', '.join(map(str, report.seeds))}. adversarial %: "
        "AutoAttack (`autoattack`) where evaluated, else ART AutoPGD (`art-apgd`), else native APGD-CE (`apgd`); "
        "worst seed %: the lowest seed's adversarial accuracy; (CO in k of n seeds): catastrophic overfitting seen by "
        "the per-epoch monitor. transfer %: APGD crafted on the teacher. incl. teacher adds the teacher's whole "
        "training time to every student that uses it. FLOPs / SAT's: the counted training cost, on which the target "
        "is checked where every run counted it.",
        "",
        f"Teacher: {t.method} {t.model}, natural {t.natural_pct:.1f}%, adversarial "
        f"{fmt(t.adversarial_pct, 1)}% ({t.attack}), {t.total_minutes:.2f} min, checks "
        f"{'passed' if t.sanity_passed else '**FAILED**'}."
        if t
        else "No teacher run found.",
        "",
    ]
    unbound = _unbound_note(report.runs)
    notes += [*unbound, ""] if unbound else []
    goal = report.target
    notes += [f"Target: {goal['rule']}.", ""]
    if goal["sat"] is None:
        notes.append("Not checked: no sat student with an adversarial accuracy.")
        return _markdown("Students: accuracy and training cost over seeds", header, rows, notes)
    need, counted, sat = goal["thresholds"], goal["cost_basis"] == "flops", goal["sat"]
    if counted:
        notes += [
            f"{sat['name']}: {sat['adversarial_pct']:.1f}% for {tflops(sat['total_flops'])} TFLOPs "
            f"({sat['total_minutes']:.2f} min), so the target is >= {need['adversarial_pct']:.1f}% for "
            f"<= {tflops(need['total_flops'])} TFLOPs.",
            "",
        ]
    else:
        notes += [
            f"{sat['name']}: {sat['adversarial_pct']:.1f}% in {sat['total_minutes']:.2f} min, so the target "
            f"is >= {need['adversarial_pct']:.1f}% in <= {need['total_minutes']:.2f} min.",
            "",
        ]

    def cost(c: dict) -> str:
        if counted:
            return (
                f" at {fmt(c['cost_of_sat'])} x sat's FLOPs ({c['total_minutes']:.2f} min, "
                f"{fmt(c['time_of_sat'])} x its time)"
            )
        return f" in {c['total_minutes']:.2f} min ({fmt(c['time_of_sat'])} x sat's)"

    notes += [
        f"- {'met' if c['met'] else '**not met**'}: {name} — {c['adversarial_pct']:.1f}% "
        f"({fmt(c['adversarial_of_sat_pct'], 1)}% of sat's"
        + ("" if c["over_natural_points"] is None else f", {c['over_natural_points']:+.1f} points over natural")
        + ")"
        + cost(c)
        + ("" if c["sanity_passed"] else ", checks FAILED")
        for name, c in goal["candidates"].items()
    ]
    notes += ["", f"Met by: {', '.join(goal['met_by'])}." if goal["met"] else "Met by no student."]
    others = goal["without_teacher"]
    alternatives = [
        f"{name} ({others[name]['adversarial_pct']:.1f}% in {others[name]['total_minutes']:.2f} min, "
        + (
            f"{fmt(others[name]['cost_of_sat'])} x sat's FLOPs)"
            if counted
            else f"{fmt(others[name]['time_of_sat'])} x sat's)"
        )
        for name in goal["met_without_teacher"]
    ]
    notes.append(
        f"Without the teacher, the same bar is cleared by: {', '.join(alternatives)}."
        if alternatives
        else "No student without the teacher clears the same bar either."
    )
    noisy = [r.name for r in report.students if r.timing_noisy]
    if noisy:
        notes.append(
            f"**Noisy timing** in a run of: {', '.join(noisy)} (per-epoch 95% CI wider than {NOISY_TIMING_CI:.0%} "
            "of the mean: a busy machine); the FLOP counts are not affected."
        )
    if not goal["discriminating"]:
        notes.append(
            f"**The target does not discriminate here**: the natural student, with no teacher and no "
            f"attack, reaches {goal['natural_adversarial_pct']:.1f}% >= {need['adversarial_pct']:.1f}%, so "
            f"meeting it shows no transfer of robustness; read the margins over natural instead."
        )
    return _markdown("Students: accuracy and training cost over seeds", header, rows, notes)
