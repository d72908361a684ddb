"""The report's tables as Markdown and CSV: the paper's Tables 1 and 2, and the table over seeds with its target."""

from __future__ import annotations

import csv
import io

from rrm.train.methods import METHODS

TRANSFER_METHODS = tuple(name for name, m in METHODS.items() if m.learns_from_teacher)
# The quantities averaged over seeds, each with its 95% CI.
SEED_MEANS = ("natural_pct", "adversarial_pct", "transfer_pct", "total_minutes", "total_minutes_with_teacher")

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
)


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
    rows = []
    for r in ([report["teacher"]] if report["teacher"] else []) + report["students"]:
        rows.append(
            [
                r["name"],
                r["model"],
                _fmt(r["epochs"], 0),
                f"{r['epoch_seconds_mean']:.2f} ± {r['epoch_seconds_ci95']:.2f}",
                _fmt(r["total_minutes"]),
                _fmt(r["natural_pct"], 1),
                _fmt(r["adversarial_pct"], 1),
                r["attack"],
                _fmt(r.get("speedup_vs_sat")),
                _fmt(r.get("speedup_vs_sat_with_teacher")),
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
    ]
    notes = [
        "adversarial %: ART AutoPGD (`art-apgd`) where evaluated, else native APGD-CE (`apgd`); the attack "
        "column says which.",
        "speedup incl. teacher adds the teacher's training time to rdt, kd, kdiga and "
        "rrm (robustification time not included).",
    ]
    notes += _unbound_note(([report["teacher"]] if report["teacher"] else []) + report["students"])
    return _markdown("Table 1: training cost and robustness per method", header, rows, notes)


def table2(report: dict) -> str:
    """Markdown Table 2 analogue: the transfer methods against SAT."""
    chosen = [r for r in report["students"] if r["method"] in ("sat", *TRANSFER_METHODS)]
    rows = [
        [
            r["name"],
            r["model"],
            _fmt(r["natural_pct"], 1),
            _fmt(r["adversarial_pct"], 1),
            r["attack"],
            _fmt(r["adversarial_of_sat_pct"], 1),
            _fmt(r["total_minutes"]),
            _fmt(r["total_minutes_with_teacher"]),
            _fmt(r["speedup_vs_sat"]),
            _fmt(r["speedup_vs_sat_with_teacher"]),
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
    ]
    notes = [
        f"- {'met' if c['met'] else '**not met**'}: {c['claim']} — measured {c['text']}"
        for c in report.get("claims", [])
    ]
    if notes:
        notes.insert(0, "The paper's claim for RRM on this data:\n")
    return _markdown("Table 2: robustness transfer (rdt, kd, kdiga, rrm) against SAT", header, rows, notes)


def seeds_table(report: dict) -> str:
    """Markdown: every student's means +- 95% CI over the seeds, against SAT, and the variants study's target check."""

    def ci(r: dict, key: str, digits: int) -> str:
        return "-" if r[key] is None else f"{r[key]:.{digits}f} ± {r[key + '_ci95']:.{digits}f}"

    rows = [
        [
            r["name"],
            r["method"],
            r["model"],
            str(r["seeds"]),
            ci(r, "natural_pct", 1),
            ci(r, "adversarial_pct", 1),
            r["attack"],
            ci(r, "transfer_pct", 1),
            ci(r, "total_minutes", 2),
            ci(r, "total_minutes_with_teacher", 2),
            _fmt(r["adversarial_of_sat_pct"], 1),
            _fmt(r["time_of_sat"]),
            "passed" if r["sanity_passed"] else "**FAILED**",
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
        "attack",
        "transfer %",
        "student (min)",
        "incl. teacher (min)",
        "adversarial / SAT's %",
        "time / SAT's",
        "checks",
    ]
    t = report["teacher"]
    notes = [
        f"Mean ± 95% CI (Student's t) over seeds {', '.join(map(str, report['seeds']))}. adversarial %: ART "
        "AutoPGD (`art-apgd`) where evaluated, else native APGD-CE (`apgd`); transfer %: APGD crafted on the "
        "teacher. incl. teacher adds the teacher's whole training time to every student that uses it.",
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
    need = goal["thresholds"]
    notes += [
        f"sat: {goal['sat']['adversarial_pct']:.1f}% in {goal['sat']['total_minutes']:.2f} min, so the target "
        f"is >= {need['adversarial_pct']:.1f}% in <= {need['total_minutes']:.2f} min.",
        "",
    ]
    notes += [
        f"- {'met' if c['met'] else '**not met**'}: {name} — {c['adversarial_pct']:.1f}% "
        f"({_fmt(c['adversarial_of_sat_pct'], 1)}% of sat's"
        + ("" if c["over_natural_points"] is None else f", {c['over_natural_points']:+.1f} points over natural")
        + f") in {c['total_minutes']:.2f} min ({_fmt(c['time_of_sat'])} x sat's)"
        + ("" if c["sanity_passed"] else ", checks FAILED")
        for name, c in goal["candidates"].items()
    ]
    notes += ["", f"Met by: {', '.join(goal['met_by'])}." if goal["met"] else "Met by no student."]
    others = goal["without_teacher"]
    alternatives = [
        f"{name} ({others[name]['adversarial_pct']:.1f}% in {others[name]['total_minutes']:.2f} min, "
        f"{_fmt(others[name]['time_of_sat'])} x sat's)"
        for name in goal["met_without_teacher"]
    ]
    notes.append(
        f"Without the teacher, the same bar is cleared by: {', '.join(alternatives)}."
        if alternatives
        else "No student without the teacher clears the same bar either."
    )
    if not goal["discriminating"]:
        notes.append(
            f"**The target does not discriminate here**: the natural student, with no teacher and no "
            f"attack, reaches {goal['natural_adversarial_pct']:.1f}% >= {need['adversarial_pct']:.1f}%, so "
            f"meeting it shows no transfer of robustness; read the margins over natural instead."
        )
    return _markdown("Students: accuracy and training cost over seeds", header, rows, notes)
