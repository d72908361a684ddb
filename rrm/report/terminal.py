"""The report as narrow text for a terminal: what `rrm report` prints (and `rrm report --show` without writing
anything). A few columns a table, each robust accuracy beside its attack and image count; every column is in the
Markdown and CSV files."""

from __future__ import annotations

import textwrap

import tabulate

from rrm.report.costs import tflops
from rrm.report.rows import Report, RunRow, SeedsRow
from rrm.report.tables import fmt, fmt_ci, transfer_rows

WIDTH = 100  # the notes under a table wrap here; the tables' own columns stay under it


def _wrap(text: str) -> str:
    return textwrap.fill(text, WIDTH, subsequent_indent="  ")


def _checks(passed: bool | None) -> str:
    return {True: "passed", False: "FAILED"}.get(passed, "not run")


def _attack(row: RunRow) -> str:
    return row.attack if row.attack_examples is None else f"{row.attack} ({row.attack_examples})"


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    return f"{title}\n" + tabulate.tabulate(rows, headers=header, tablefmt="simple", disable_numparse=True)


def _speedup_header(rows: list[RunRow]) -> str:
    """What the speedups divide: counted FLOPs where every row counted them (rrm.report.costs), else time."""
    return "x faster (FLOPs)" if any(r.cost_basis == "flops" for r in rows) else "x faster (time)"


def _table1(report: Report) -> str:
    runs = report.runs
    rows = [
        [
            r.label,
            fmt(r.natural_pct, 1),
            fmt(r.adversarial_pct, 1),
            _attack(r),
            tflops(r.total_flops),
            fmt(r.costs.speedup_vs_sat, 2),
            _checks(r.sanity_passed),
        ]
        for r in runs
    ]
    header = ["method", "natural %", "robust %", "attack (images)", "TFLOPs", _speedup_header(runs), "checks"]
    return _table("Table 1: cost and robustness per method (x faster: than SAT)", header, rows)


def _table2(report: Report) -> str:
    chosen = transfer_rows(report)
    rows = [
        [
            r.label,
            fmt(r.adversarial_pct, 1),
            fmt(r.costs.adversarial_of_sat_pct, 1),
            fmt(r.costs.speedup_vs_sat, 2),
            fmt(r.costs.speedup_vs_sat_with_teacher, 2),
        ]
        for r in chosen
    ]
    header = ["method", "robust %", "% of SAT's", _speedup_header(chosen), "incl. teacher"]
    text = _table("Table 2: the students of the teacher against SAT", header, rows)
    claims = [_wrap(f"{'met' if c.met else 'NOT MET'}: {c.claim} (measured {c.text})") for c in report.claims]
    return "\n".join([text, *([""] + claims if claims else [])])


def _seeds(report: Report) -> str:
    students: list[SeedsRow] = report.students
    rows = [
        [
            r.label,
            str(r.seeds),
            fmt_ci(r.natural_pct, r.natural_pct_ci95),
            fmt_ci(r.adversarial_pct, r.adversarial_pct_ci95),
            fmt(r.adversarial_min_pct, 1),
            r.attack,
            fmt(r.cost_of_sat if r.cost_basis == "flops" else r.time_of_sat, 2),
            _checks(r.sanity_passed),
        ]
        for r in students
    ]
    basis = "x SAT's FLOPs" if any(r.cost_basis == "flops" for r in students) else "x SAT's time"
    header = ["student", "seeds", "natural %", "robust %", "worst %", "attack", basis, "checks"]
    text = _table("Students over seeds: mean ± 95% CI", header, rows)
    goal = report.target or {}
    if goal.get("sat") is None:
        verdict = "Target not checked: no SAT student with a robust accuracy."
    else:
        verdict = f"Target met by: {', '.join(goal['met_by'])}." if goal["met"] else "Target met by no student."
    return f"{text}\n\n{_wrap('Target: ' + goal.get('rule', '-') + '.')}\n{verdict}"


def show(report: Report) -> str:
    """Tables 1 and 2 (or the table over seeds with its target) as plain text a terminal shows without wrapping."""
    if report.seeds is not None:
        return _seeds(report)
    return f"{_table1(report)}\n\n{_table2(report)}"
