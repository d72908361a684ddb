"""The paper's Tables 1 and 2 and its accuracy-against-training-time figure, recomputed from a pipeline's metrics.

Layout read (what ``dvc.yaml`` writes; every path is relative to ``root``)::

    runs/teacher/train_metrics.json           # the teacher's training (optional: speedups with its time)
    metrics/teacher.json                      # its evaluation (optional)
    runs/students/<method>/train_metrics.json # one directory per student method
    metrics/students/<method>.json            # `rrm evaluate` of that student

Written to ``out_dir``: ``table1.md``/``table1.csv`` (every method), ``table2.md``/``table2.csv`` (the transfer
methods rdt, kd, kdiga and rrm against sat), ``report.json`` (the rows, for ``dvc metrics``) and
``accuracy_vs_time.png``.

The adversarial column is IBM ART's AutoPGD (``art-apgd``, the paper's reference) where the evaluation ran it,
else the native APGD-CE (``apgd``); the ``attack`` column says which.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from rrm.errors import RRMError

TRANSFER_METHODS = ("rdt", "kd", "kdiga", "rrm")
# Methods that need the teacher: their cost "with the teacher" adds the teacher's training time.
USES_TEACHER = frozenset(TRANSFER_METHODS)
ATTACK_PREFERENCE = ("art-apgd", "apgd")
METHOD_ORDER = ("natural", "sat", "pgd-fast", "fast", "free", "rdt", "kd", "kdiga", "rrm")
# The paper's claim for RRM, as checkable targets: robustness close to a SAT student of the same architecture,
# far above the students that get no robustness signal, at a fraction of SAT's training time.
CLAIM_OF_SAT_PCT = 80.0
CLAIM_MARGIN_POINTS = 20.0
CLAIM_BASELINES = ("natural", "kd", "rdt")
CLAIM_TIME_FRACTION = 0.25

TABLE1_COLUMNS = ("method", "model", "epochs", "epoch_seconds_mean", "epoch_seconds_ci95", "total_minutes",
                  "natural_pct", "adversarial_pct", "attack", "speedup_vs_sat", "speedup_vs_sat_with_teacher")
TABLE2_COLUMNS = ("method", "model", "natural_pct", "adversarial_pct", "attack", "adversarial_of_sat_pct",
                  "total_minutes", "total_minutes_with_teacher", "speedup_vs_sat", "speedup_vs_sat_with_teacher")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise RRMError(f"{what} {str(path)!r} does not exist; run the stage that writes it (dvc repro)")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RRMError(f"{what} {str(path)!r} is not valid JSON ({exc.__class__.__name__}); rerun the stage "
                       f"that writes it") from None
    if not isinstance(value, dict):
        raise RRMError(f"{what} {str(path)!r} must hold a JSON object")
    return value


def _number(data: dict, key: str, path: Path) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RRMError(f"{str(path)!r} has no finite number {key!r}; is it a train_metrics.json from `rrm train`?")
    return float(value)


def _adversarial(evaluation: dict, path: Path) -> tuple[float | None, str]:
    attacks = evaluation.get("adversarial_accuracy")
    if not isinstance(attacks, dict) or not isinstance(evaluation.get("natural_accuracy"), (int, float)):
        raise RRMError(f"{str(path)!r} has no natural_accuracy / adversarial_accuracy; is it from `rrm evaluate`?")
    for name in ATTACK_PREFERENCE:
        if isinstance(attacks.get(name), (int, float)):
            return float(attacks[name]), name
    return None, "-"


def _row(method: str, train_path: Path, eval_path: Path) -> dict:
    train = _read_json(train_path, "training metrics")
    evaluation = _read_json(eval_path, "evaluation metrics")
    adversarial, attack = _adversarial(evaluation, eval_path)
    return {
        "method": method,
        "model": train.get("model", "?"),
        "epochs": _number(train, "epochs", train_path),
        "epoch_seconds_mean": _number(train, "epoch_seconds_mean", train_path),
        "epoch_seconds_ci95": _number(train, "epoch_seconds_ci95", train_path),
        "total_seconds": _number(train, "total_seconds", train_path),
        "total_minutes": _number(train, "total_seconds", train_path) / 60,
        "natural_pct": 100 * float(evaluation["natural_accuracy"]),
        "adversarial_pct": None if adversarial is None else 100 * adversarial,
        "attack": attack,
    }


def collect(root: str | os.PathLike) -> dict:
    """Read the layout under ``root``: ``{"teacher": row or None, "students": [rows in the paper's order]}``."""
    root = Path(root)
    students_dir = root / "runs" / "students"
    found = sorted(p.parent.name for p in students_dir.glob("*/train_metrics.json")) if students_dir.is_dir() else []
    if not found:
        raise RRMError(f"no student runs under {str(students_dir)!r} (expected <method>/train_metrics.json); "
                       f"train the students first (dvc repro)")
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    found.sort(key=lambda m: (order.get(m, len(order)), m))
    students = [_row(m, students_dir / m / "train_metrics.json", root / "metrics" / "students" / f"{m}.json")
                for m in found]
    teacher = None
    if (root / "runs" / "teacher" / "train_metrics.json").is_file():
        teacher = _row("teacher", root / "runs" / "teacher" / "train_metrics.json", root / "metrics" / "teacher.json")
    _add_speedups(students, teacher)
    return {"teacher": teacher, "students": students, "claims": claims(students)}


def claims(students: list[dict], method: str = "rrm") -> list[dict]:
    """The paper's claim for ``method`` checked against these rows: one entry per target, with what was measured.

    Targets: adversarial accuracy at least 80% of the SAT student's; at least 20 points above the natural, KD and
    RDT students; student training time at most a quarter of SAT's. Targets whose rows are missing are left out.
    """
    rows = {r["method"]: r for r in students}
    subject, sat = rows.get(method), rows.get("sat")
    if subject is None or subject["adversarial_pct"] is None:
        return []
    out = []
    if sat and sat["adversarial_pct"]:
        share = subject["adversarial_of_sat_pct"]
        out.append({"claim": f"{method} adversarial >= {CLAIM_OF_SAT_PCT:.0f}% of sat's", "measured": share,
                    "text": f"{share:.1f}% ({subject['adversarial_pct']:.1f} vs {sat['adversarial_pct']:.1f})",
                    "met": share >= CLAIM_OF_SAT_PCT})
    for name in CLAIM_BASELINES:
        base = rows.get(name)
        if base is None or base["adversarial_pct"] is None:
            continue
        margin = subject["adversarial_pct"] - base["adversarial_pct"]
        out.append({"claim": f"{method} adversarial >= {name}'s + {CLAIM_MARGIN_POINTS:.0f} points",
                    "measured": margin, "text": f"{margin:+.1f} points", "met": margin >= CLAIM_MARGIN_POINTS})
    if sat:
        fraction = subject["total_seconds"] / sat["total_seconds"]
        out.append({"claim": f"{method} training time <= {CLAIM_TIME_FRACTION:g} x sat's", "measured": fraction,
                    "text": f"{fraction:.2f} x ({subject['total_minutes']:.2f} vs {sat['total_minutes']:.2f} min)",
                    "met": fraction <= CLAIM_TIME_FRACTION})
    return out


def _add_speedups(students: list[dict], teacher: dict | None) -> None:
    sat = next((r for r in students if r["method"] == "sat"), None)
    teacher_seconds = teacher["total_seconds"] if teacher else None
    for row in students:
        with_teacher = row["total_seconds"]
        if row["method"] in USES_TEACHER:
            with_teacher = None if teacher_seconds is None else with_teacher + teacher_seconds
        row["total_minutes_with_teacher"] = None if with_teacher is None else with_teacher / 60
        row["speedup_vs_sat"] = _ratio(sat and sat["total_seconds"], row["total_seconds"])
        row["speedup_vs_sat_with_teacher"] = _ratio(sat and sat["total_seconds"], with_teacher)
        row["adversarial_of_sat_pct"] = (
            100 * row["adversarial_pct"] / sat["adversarial_pct"]
            if sat and sat["adversarial_pct"] and row["adversarial_pct"] is not None else None)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


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
        rows.append([r["method"], r["model"], _fmt(r["epochs"], 0),
                     f"{r['epoch_seconds_mean']:.2f} ± {r['epoch_seconds_ci95']:.2f}", _fmt(r["total_minutes"]),
                     _fmt(r["natural_pct"], 1), _fmt(r["adversarial_pct"], 1), r["attack"],
                     _fmt(r.get("speedup_vs_sat")), _fmt(r.get("speedup_vs_sat_with_teacher"))])
    header = ["method", "model", "epochs", "epoch time (s, mean ± 95% CI)", "total (min)", "natural %",
              "adversarial %", "attack", "speedup vs SAT", "speedup vs SAT incl. teacher"]
    notes = ["adversarial %: ART AutoPGD (`art-apgd`) where evaluated, else native APGD-CE (`apgd`); the attack "
             "column says which.", "speedup incl. teacher adds the teacher's training time to rdt, kd, kdiga and "
             "rrm (robustification time not included)."]
    return _markdown("Table 1: training cost and robustness per method", header, rows, notes)


def table2(report: dict) -> str:
    """Markdown Table 2 analogue: the transfer methods against SAT."""
    chosen = [r for r in report["students"] if r["method"] in ("sat", *TRANSFER_METHODS)]
    rows = [[r["method"], r["model"], _fmt(r["natural_pct"], 1), _fmt(r["adversarial_pct"], 1), r["attack"],
             _fmt(r["adversarial_of_sat_pct"], 1), _fmt(r["total_minutes"]), _fmt(r["total_minutes_with_teacher"]),
             _fmt(r["speedup_vs_sat"]), _fmt(r["speedup_vs_sat_with_teacher"])] for r in chosen]
    header = ["method", "model", "natural %", "adversarial %", "attack", "adversarial / SAT's %", "total (min)",
              "total incl. teacher (min)", "speedup vs SAT", "speedup vs SAT incl. teacher"]
    notes = [f"- {'met' if c['met'] else '**not met**'}: {c['claim']} — measured {c['text']}"
             for c in report.get("claims", [])]
    if notes:
        notes.insert(0, "The paper's claim for RRM on this data:\n")
    return _markdown("Table 2: robustness transfer (rdt, kd, kdiga, rrm) against SAT", header, rows, notes)


def plot(report: dict, path: Path) -> None:
    """Natural and adversarial accuracy against total training time, one point per method (Figures 2 and 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, key, title in ((axes[0], "adversarial_pct", "adversarial accuracy"),
                           (axes[1], "natural_pct", "natural accuracy")):
        for r in report["students"]:
            if r[key] is None:
                continue
            ax.scatter(r["total_minutes"], r[key], s=40)
            ax.annotate(r["method"], (r["total_minutes"], r[key]), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("training time (min)")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(root: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Collect the metrics under ``root`` and write the tables, ``report.json`` and the plot to ``out_dir``."""
    report = collect(root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = ([report["teacher"]] if report["teacher"] else []) + report["students"]
    files = {
        "table1.md": table1(report),
        "table2.md": table2(report),
        "table1.csv": _csv(TABLE1_COLUMNS, rows),
        "table2.csv": _csv(TABLE2_COLUMNS, [r for r in report["students"]
                                            if r["method"] in ("sat", *TRANSFER_METHODS)]),
        "report.json": json.dumps({**{r["method"]: {k: v for k, v in r.items() if k != "method"} for r in rows},
                                   "claims": {c["claim"]: {"measured": c["measured"], "met": c["met"]}
                                              for c in report["claims"]}},
                                  indent=2, sort_keys=True) + "\n",
    }
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    plot(report, out / "accuracy_vs_time.png")
    report["files"] = sorted([*files, "accuracy_vs_time.png"])
    return report
