"""The report's tables as Markdown and CSV: the paper's Tables 1 and 2, and the table over seeds with its target;
and the cost ratios they show (:func:`add_speedups`), counted in FLOPs where every run counted them."""

from __future__ import annotations

import csv
import io

from rrm.train.methods import METHODS

TRANSFER_METHODS = tuple(name for name, m in METHODS.items() if m.learns_from_teacher)
# Methods that learn from data the teacher made (rdt): their cost with the teacher adds making it.
LEARNS_FROM_TEACHER_DATA = frozenset(n for n, m in METHODS.items() if m.learns_from_teacher and not m.needs_teacher)
# A per-epoch time whose 95% CI half-width exceeds this share of its mean was measured on a busy machine.
NOISY_TIMING_CI = 0.25
# The quantities averaged over seeds, each with its 95% CI.
SEED_MEANS = (
    "natural_pct",
    "adversarial_pct",
    "transfer_pct",
    "total_minutes",
    "total_minutes_with_teacher",
    "total_flops",
    "total_flops_with_teacher",
)
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
    *(f"{k}{s}" for k in SEED_MEANS for s in ("", "_ci95")),
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


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _with_teacher(row: dict, teacher: dict | None, key: str) -> float | None:
    """``row[key]`` plus the teacher's for a method that uses it, plus making the teacher's data (FLOPs only)."""
    own = row[key]
    if not row["uses_teacher"] or own is None:
        return own
    if teacher is None or teacher[key] is None:
        return None
    if key == "total_flops" and row["method"] in LEARNS_FROM_TEACHER_DATA:
        return None if row["data_flops"] is None else own + teacher[key] + row["data_flops"]
    return own + teacher[key]


def add_speedups(students: list[dict], teacher: dict | None) -> None:
    """Speedups over the SAT student from counted FLOPs where every run counted them (``cost_basis``), else from
    seconds; the measured-time speedups beside them either way."""
    sat = next((r for r in students if r["name"] == "sat"), None)
    runs = students + ([teacher] if teacher else [])
    basis = "flops" if all(r["total_flops"] is not None for r in runs) else "seconds"
    cost = "total_flops" if basis == "flops" else "total_seconds"
    for row in runs:
        row["cost_basis"] = basis
    for row in students:
        seconds_with_teacher = _with_teacher(row, teacher, "total_seconds")
        row["total_minutes_with_teacher"] = None if seconds_with_teacher is None else seconds_with_teacher / 60
        row["total_flops_with_teacher"] = _with_teacher(row, teacher, "total_flops")
        row["speedup_vs_sat"] = _ratio(sat and sat[cost], row[cost])
        row["speedup_vs_sat_with_teacher"] = _ratio(sat and sat[cost], _with_teacher(row, teacher, cost))
        row["speedup_vs_sat_measured"] = _ratio(sat and sat["total_seconds"], row["total_seconds"])
        row["speedup_vs_sat_with_teacher_measured"] = _ratio(sat and sat["total_seconds"], seconds_with_teacher)
        row["adversarial_of_sat_pct"] = (
            100 * row["adversarial_pct"] / sat["adversarial_pct"]
            if sat and sat["adversarial_pct"] and row["adversarial_pct"] is not None
            else None
        )


def _tflops(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e12:.3g}"


def _epoch_time(r: dict) -> str:
    return f"{r['epoch_seconds_mean']:.2f} ± {r['epoch_seconds_ci95']:.2f}" + (" (noisy)" if r["timing_noisy"] else "")


def _cost_notes(rows: list[dict]) -> list[str]:
    """What the adversarial column and the speedups are, and which timings were measured on a busy machine."""
    notes = [
        "adversarial %: AutoAttack (`autoattack`) where evaluated, else ART AutoPGD (`art-apgd`), else native "
        "APGD-CE (`apgd`); the attack column says which, and `attack_examples` on how many test images. "
        "APGD %: the native APGD-CE, the monitor of training and tuning."
    ]
    if rows and all(r.get("cost_basis") == "flops" for r in rows):
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
    noisy = [r["name"] for r in rows if r.get("timing_noisy")]
    if noisy:
        notes.append(
            f"**Noisy timing** (per-epoch 95% CI wider than {NOISY_TIMING_CI:.0%} of the mean: a busy machine): "
            f"{', '.join(noisy)}. Their seconds and measured speedups are unreliable; the FLOP counts are not."
        )
    return [note + "\n" for note in notes]


def _unbound_note(rows: list[dict]) -> list[str]:
    names = [r["name"] for r in rows if not r["evaluation_bound"]]
    if not names:
        return []
    return [
        f"Not checked against their model file (the evaluation names none, as files written by hand or by rrm "
        f"before evaluations recorded the model's sha256 do, or the model.pt is absent): {', '.join(names)}; "
        "evaluate them again (dvc repro) to check them."
    ]


def _fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _name(r: dict) -> str:
    """The row's name, marked where the monitor saw catastrophic overfitting (one run, or some of the seeds)."""
    if r.get("co_seeds"):
        return f"{r['name']} (CO in {r['co_seeds']} of {r['seeds']} seeds)"
    if r.get("co_epoch") is None:
        return r["name"]
    stopped = r.get("early_stopped_at_epoch")
    return f"{r['name']} (CO at epoch {r['co_epoch']}" + ("" if stopped is None else f", kept epoch {stopped}") + ")"


def _markdown(title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + [""] + notes) + "\n"


def _csv(columns: tuple[str, ...], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return buffer.getvalue()


def table1(report: dict) -> str:
    """Markdown Table 1 analogue: every method's training cost, accuracy and speedup over SAT."""
    runs = ([report["teacher"]] if report["teacher"] else []) + report["students"]
    rows = []
    for r in runs:
        rows.append(
            [
                _name(r),
                r["model"],
                _fmt(r["epochs"], 0),
                _epoch_time(r),
                _fmt(r["total_minutes"]),
                _fmt(r["natural_pct"], 1),
                _fmt(r["adversarial_pct"], 1),
                r["attack"],
                _fmt(r.get("speedup_vs_sat")),
                _fmt(r.get("speedup_vs_sat_with_teacher")),
                _tflops(r["total_flops"]),
                _tflops(r.get("total_flops_with_teacher")),
                _fmt(r.get("speedup_vs_sat_measured")),
                _fmt(r["apgd_pct"], 1),
                _fmt(r["attack_examples"]),
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


def table2(report: dict) -> str:
    """Markdown Table 2 analogue: the transfer methods against SAT."""
    chosen = [r for r in report["students"] if r["method"] == "sat" or r["uses_teacher"]]
    rows = [
        [
            _name(r),
            r["model"],
            _fmt(r["natural_pct"], 1),
            _fmt(r["adversarial_pct"], 1),
            r["attack"],
            _fmt(r["adversarial_of_sat_pct"], 1),
            _fmt(r["total_minutes"]),
            _fmt(r["total_minutes_with_teacher"]),
            _fmt(r["speedup_vs_sat"]),
            _fmt(r["speedup_vs_sat_with_teacher"]),
            _tflops(r["total_flops"]),
            _tflops(r["total_flops_with_teacher"]),
            _fmt(r["speedup_vs_sat_measured"]),
            _fmt(r["speedup_vs_sat_with_teacher_measured"]),
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
    notes = [
        f"- {'met' if c['met'] else '**not met**'}: {c['claim']} — measured {c['text']}"
        for c in report.get("claims", [])
    ]
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


def seeds_table(report: dict) -> str:
    """Markdown: every student's means +- 95% CI over the seeds, against SAT, and the variants study's target check."""

    def ci(r: dict, key: str, digits: int) -> str:
        return "-" if r[key] is None else f"{r[key]:.{digits}f} ± {r[key + '_ci95']:.{digits}f}"

    rows = [
        [
            _name(r),
            r["method"],
            r["model"],
            str(r["seeds"]),
            ci(r, "natural_pct", 1),
            ci(r, "adversarial_pct", 1),
            _fmt(r["adversarial_min_pct"], 1),
            r["attack"],
            ci(r, "transfer_pct", 1),
            ci(r, "total_minutes", 2),
            ci(r, "total_minutes_with_teacher", 2),
            _fmt(r["adversarial_of_sat_pct"], 1),
            _fmt(r["time_of_sat"]),
            "passed" if r["sanity_passed"] else "**FAILED**",
            _fmt(r["cost_of_sat"]),
            "-" if r["total_flops"] is None else f"{_tflops(r['total_flops'])} ± {_tflops(r['total_flops_ci95'])}",
        ]
        for r in report["students"]
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
    t = report["teacher"]
    notes = [
        f"Mean ± 95% CI (Student's t) over seeds {', '.join(map(str, report['seeds']))}. adversarial %: "
        "AutoAttack (`autoattack`) where evaluated, else ART AutoPGD (`art-apgd`), else native APGD-CE (`apgd`); "
        "worst seed %: the lowest seed's adversarial accuracy; (CO in k of n seeds): catastrophic overfitting seen by "
        "the per-epoch monitor. transfer %: APGD crafted on the teacher. incl. teacher adds the teacher's whole "
        "training time to every student that uses it. FLOPs / SAT's: the counted training cost, on which the target "
        "is checked where every run counted it.",
        "",
        f"Teacher: {t['method']} {t['model']}, natural {t['natural_pct']:.1f}%, adversarial "
        f"{_fmt(t['adversarial_pct'], 1)}% ({t['attack']}), {t['total_minutes']:.2f} min, checks "
        f"{'passed' if t['sanity_passed'] else '**FAILED**'}."
        if t
        else "No teacher run found.",
        "",
    ]
    unbound = _unbound_note(([t] if t else []) + report["students"])
    notes += [*unbound, ""] if unbound else []
    goal = report["target"]
    notes += [f"Target: {goal['rule']}.", ""]
    if goal["sat"] is None:
        notes.append("Not checked: no sat student with an adversarial accuracy.")
        return _markdown("Students: accuracy and training cost over seeds", header, rows, notes)
    need, counted = goal["thresholds"], goal["cost_basis"] == "flops"
    if counted:
        notes += [
            f"sat: {goal['sat']['adversarial_pct']:.1f}% for {_tflops(goal['sat']['total_flops'])} TFLOPs "
            f"({goal['sat']['total_minutes']:.2f} min), so the target is >= {need['adversarial_pct']:.1f}% for "
            f"<= {_tflops(need['total_flops'])} TFLOPs.",
            "",
        ]
    else:
        notes += [
            f"sat: {goal['sat']['adversarial_pct']:.1f}% in {goal['sat']['total_minutes']:.2f} min, so the target "
            f"is >= {need['adversarial_pct']:.1f}% in <= {need['total_minutes']:.2f} min.",
            "",
        ]

    def cost(c: dict) -> str:
        if counted:
            return (
                f" at {_fmt(c['cost_of_sat'])} x sat's FLOPs ({c['total_minutes']:.2f} min, "
                f"{_fmt(c['time_of_sat'])} x its time)"
            )
        return f" in {c['total_minutes']:.2f} min ({_fmt(c['time_of_sat'])} x sat's)"

    notes += [
        f"- {'met' if c['met'] else '**not met**'}: {name} — {c['adversarial_pct']:.1f}% "
        f"({_fmt(c['adversarial_of_sat_pct'], 1)}% of sat's"
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
            f"{_fmt(others[name]['cost_of_sat'])} x sat's FLOPs)"
            if counted
            else f"{_fmt(others[name]['time_of_sat'])} x sat's)"
        )
        for name in goal["met_without_teacher"]
    ]
    notes.append(
        f"Without the teacher, the same bar is cleared by: {', '.join(alternatives)}."
        if alternatives
        else "No student without the teacher clears the same bar either."
    )
    noisy = [r["name"] for r in report["students"] if r["timing_noisy"]]
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
