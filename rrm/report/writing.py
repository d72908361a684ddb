"""Writing the report: the tables as Markdown and CSV, ``report.json`` (the rows, every column), its headline file
(a few numbers a row: what a tracked report logs as metrics) and the figure, each file replaced whole."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from rrm.report.reading import read_report
from rrm.report.tables import (
    SEEDS_COLUMNS,
    TABLE1_COLUMNS,
    TABLE2_COLUMNS,
    csv_text,
    seeds_table,
    table1,
    table2,
    transfer_rows,
)
from rrm.report.terminal import show

# A row's numbers in report.headline.json (rrm.io.headline_path), logged as metrics by a tracked report
HEADLINE = ("natural_pct", "adversarial_pct", "attack_examples", "total_flops", "sanity_passed")


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_report(root: str | os.PathLike, out_dir: str | os.PathLike, **layout: str | os.PathLike) -> dict:
    """Read the metrics under ``root`` (``layout``: :func:`~rrm.report.reading.read_report`'s directories) and write
    the tables, ``report.json`` and the plot to ``out_dir``; returns :func:`~rrm.report.reading.collect`'s data with
    ``"files"`` (what was written), ``"table"`` (the main table), ``"text"`` (:func:`~rrm.report.terminal.show`)
    and ``"headline"`` (what report.headline.json holds)."""
    from rrm.plots import FRONTIER_FLOP_PANELS, FRONTIER_PANELS, plot_students  # matplotlib only for a report

    report = read_report(root, **layout)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_name = {r.name: {k: v for k, v in r.to_dict().items() if k != "name"} for r in report.runs}
    rows = {name: {k: row[k] for k in HEADLINE if row.get(k) is not None} for name, row in by_name.items()}
    if report.seeds is not None:
        goal = report.target
        files = {
            "table.md": seeds_table(report),
            "table.csv": csv_text(SEEDS_COLUMNS, report.students),
            "report.json": _json({**by_name, "seeds": report.seeds, "target": goal}),
        }
        headline = {**rows, "target_met": bool(goal.get("met"))}
        figure = "frontier.png"
        students, panels, cost, scale = [r.to_dict() for r in report.students], FRONTIER_PANELS, "total_minutes", 1
        if goal.get("cost_basis") == "flops":  # the target is checked on counted FLOPs: so is the plot drawn
            students, panels = [r.in_tflops() for r in report.students], FRONTIER_FLOP_PANELS
            cost, scale = "total_flops", 1e12
        box = goal["sat"] and (goal["thresholds"][cost] / scale, goal["thresholds"]["adversarial_pct"])
        draw = functools.partial(plot_students, students, panels=panels, target_box=box, frontier=True)
    else:
        files = {
            "table1.md": table1(report),
            "table2.md": table2(report),
            "table1.csv": csv_text(TABLE1_COLUMNS, report.runs),
            "table2.csv": csv_text(TABLE2_COLUMNS, transfer_rows(report)),
            "report.json": _json(
                {**by_name, "claims": {c.claim: {"measured": c.measured, "met": c.met} for c in report.claims}}
            ),
        }
        headline = {**rows, "claims_met": {c.claim: c.met for c in report.claims}}
        figure = "accuracy_vs_time.png"
        draw = functools.partial(plot_students, [r.to_dict() for r in report.students])
    files["report.headline.json"] = _json(headline)
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    draw(out / figure)
    return {
        **report.to_dict(),
        "files": sorted([*files, figure]),
        "table": next(iter(files)),
        "text": show(report),
        "headline": headline,
    }
