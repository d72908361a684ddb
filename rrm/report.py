"""The paper's Tables 1 and 2 and its accuracy-against-training-time figure, recomputed from a pipeline's metrics.

Layout read (what ``dvc.yaml`` writes; every path is relative to ``root``, and each directory can be moved)::

    runs/teacher/train_metrics.json            # the teacher's training (optional: times with its share)
    metrics/teacher.json                       # its evaluation (optional)
    runs/students/<name>/train_metrics.json    # one directory per student; its method is read from this file
    metrics/students/<name>.json               # `rrm evaluate` of that student

Written to ``out_dir``: ``table1.md``/``table1.csv`` (every student), ``table2.md``/``table2.csv`` (the transfer
methods rdt, kd, kdiga and rrm, and stem transplants, against sat), ``report.json`` (the rows, for ``dvc metrics``) and
``accuracy_vs_time.png``.

With seed directories (``runs/students/seed<N>/<name>/``, ``metrics/students/seed<N>/<name>.json``: what
the variants pipeline writes) every number is a mean +- 95% CI over the seeds instead, written as
``table.md``/``table.csv``, ``report.json`` (with the target check) and ``frontier.png`` (AutoPGD accuracy
against training time).

The adversarial column is AutoAttack (``autoattack``) where the evaluation ran it, else IBM ART's AutoPGD
(``art-apgd``, the paper's reference), else the native APGD-CE (``apgd``); ``attack`` and ``attack_examples`` say
which and on how many test images.

Cost is counted: every speedup and cost target is a ratio of the FLOPs the runs counted (``total_flops`` in
train_metrics.json), which a loaded machine cannot change; rdt's cost with the teacher adds the ``robustify_flops``
of the robustified dataset its model file names. Measured seconds stay beside them, and a per-epoch time whose 95% CI
exceeds 25% of its mean is flagged (``timing_noisy``). Runs without FLOP counts (older files) put every ratio back
on seconds; ``cost_basis`` says which.

Each evaluation must be of the model beside its training metrics (``model.pt``): one whose ``model_sha256`` differs
from that file's is refused with a one-line error. An evaluation that records no ``model_sha256`` (written by hand,
or by rrm before evaluations were bound to their model) is read, with ``evaluation_bound`` false in its row and a
note under the table naming it; so is any evaluation whose model file is absent (not pulled from DVC).
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

from rrm.errors import RRMError
from rrm.evaluation import EvalResult
from rrm.io import sha256_file
from rrm.stats import mean_ci
from rrm.tables import (
    LEARNS_FROM_TEACHER_DATA,
    NOISY_TIMING_CI,
    SEED_MEANS,
    SEEDS_COLUMNS,
    TABLE1_COLUMNS,
    TABLE2_COLUMNS,
    TRANSFER_METHODS,
    _csv,
    _ratio,
    _tflops,
    add_speedups,
    seeds_table,
    table1,
    table2,
)
from rrm.train.methods import METHODS

# Methods that need the teacher: their cost "with the teacher" adds the teacher's training time.
USES_TEACHER = frozenset(TRANSFER_METHODS)
ATTACK_PREFERENCE = ("autoattack", "art-apgd", "apgd")
METHOD_ORDER = tuple(METHODS)
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
# Numbers averaged over seeds, each reported as mean and 95% CI half-width (``<key>_ci95``).


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise RRMError(f"{what} {str(path)!r} does not exist; run the stage that writes it (dvc repro)")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RRMError(
            f"{what} {str(path)!r} is not valid JSON ({exc.__class__.__name__}); rerun the stage that writes it"
        ) from None
    if not isinstance(value, dict):
        raise RRMError(f"{what} {str(path)!r} must hold a JSON object")
    return value


def _number(data: dict, key: str, path: Path) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RRMError(f"{str(path)!r} has no finite number {key!r}; is it a train_metrics.json from `rrm train`?")
    return float(value)


def _adversarial(evaluation: EvalResult, path: Path, attack: str | None = None) -> tuple[float | None, str, int | None]:
    """The headline attack's accuracy, name and test images: ``attack``, else the strongest the evaluation ran."""
    if attack is not None and attack not in evaluation.adversarial_accuracy:
        raise RRMError(
            f"evaluation {str(path)!r} has no {attack!r} accuracy; rerun `rrm evaluate --attacks {attack}` on its "
            "model, or report another --attack"
        )
    for name in (attack,) if attack else ATTACK_PREFERENCE:
        if name in evaluation.adversarial_accuracy:
            examples = (evaluation.autoattack or {}).get("n_examples") if name == "autoattack" else None
            return float(evaluation.adversarial_accuracy[name]), name, examples or evaluation.n_examples
    return None, "-", None


def _optional_number(data: dict, key: str) -> float | None:
    value = data.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _model_config(train_dir: Path) -> dict:
    """The training config stored in a run's ``model.pt``; empty where the file is absent or foreign."""
    import torch

    try:
        meta = torch.load(train_dir / "model.pt", map_location="cpu", weights_only=True).get("meta", {})
    except Exception:  # absent or foreign files: what they would say is unknown, and the report says "-"
        return {}
    return meta.get("config") or {}


def _data_flops(config: dict, root: Path) -> float | None:
    """What making a run's training data cost: the ``robustify_flops`` of the dataset its ``config`` names (relative
    to ``root``, where the pipeline runs); None where the dataset or the count is missing."""
    from safetensors import safe_open

    try:
        path = root / str(config["dataset"])  # an absolute path stays itself
        with safe_open(str(path), framework="pt") as fh:
            return _optional_number(json.loads((fh.metadata() or {}).get("source", "{}")), "robustify_flops")
    except Exception:  # absent or foreign files: the cost is unknown and the report says "-", not an error
        return None


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * float(value)


def _bound(evaluation: EvalResult, eval_path: Path, model_path: Path) -> bool:
    """Whether the evaluation was checked to measure ``model_path``: False when it names no model file or that file
    is absent; an :class:`RRMError` when it names another file."""
    if evaluation.model_sha256 is None or not model_path.is_file():
        return False
    problems = evaluation.binding_problems(model_sha256=sha256_file(model_path))
    if problems:
        raise RRMError(
            f"evaluation metrics {str(eval_path)!r} are not of {str(model_path)!r}: {problems[0]}; "
            f"evaluate that model again (dvc repro, or `rrm evaluate {model_path} --out {eval_path}`)"
        )
    return True


def _row(name: str, train_path: Path, eval_path: Path, root: Path | None = None, attack: str | None = None) -> dict:
    """One run: ``name`` is its directory (``rrm-teacher-pgd``), ``method`` what it trained with (``rrm``)."""
    train = _read_json(train_path, "training metrics")
    evaluation = EvalResult.read(eval_path)
    bound = _bound(evaluation, eval_path, train_path.with_name("model.pt"))
    adversarial, attack, examples = _adversarial(evaluation, eval_path, attack)
    method = train.get("method", name)
    seconds_mean = _number(train, "epoch_seconds_mean", train_path)
    learns_from_data = method in LEARNS_FROM_TEACHER_DATA and root is not None
    # the model file's config, read once, where the metrics lack what it holds (runs from before they recorded it)
    config = _model_config(train_path.parent) if learns_from_data or "transplant" not in train else {}
    transplant = train["transplant"] if "transplant" in train else config.get("transplant")
    return {
        "name": name,
        "method": method,
        "transplant": transplant,
        "uses_teacher": method in USES_TEACHER or transplant is not None,
        "model": train.get("model", "?"),
        "epochs": _number(train, "epochs", train_path),
        "epoch_seconds_mean": _number(train, "epoch_seconds_mean", train_path),
        "epoch_seconds_ci95": _number(train, "epoch_seconds_ci95", train_path),
        "total_seconds": _number(train, "total_seconds", train_path),
        "total_minutes": _number(train, "total_seconds", train_path) / 60,
        "natural_pct": 100 * float(evaluation.natural_accuracy),
        "adversarial_pct": _pct(adversarial),
        "attack": attack,
        "attack_examples": examples,
        # the threat model the numbers are for (None in an evaluation file older than these fields)
        "dataset": evaluation.dataset,
        "norm": evaluation.norm,
        "eps": evaluation.eps,
        "apgd_pct": _pct(evaluation.adversarial_accuracy.get("apgd")),
        "transfer_pct": _pct(evaluation.adversarial_accuracy.get("transfer")),
        "sanity_passed": evaluation.sanity_passed,
        "evaluation_bound": bound,
        "total_flops": _optional_number(train, "total_flops"),
        "data_flops": _data_flops(config, root) if learns_from_data else None,
        "timing_noisy": _number(train, "epoch_seconds_ci95", train_path) > NOISY_TIMING_CI * seconds_mean,
        # catastrophic overfitting seen by the single-step methods' monitor, and where --early-stop-on-co stopped
        "co_epoch": train.get("catastrophic_overfitting_epoch"),
        "early_stopped_at_epoch": train.get("early_stopped_at_epoch"),
    }


def _students(
    students_dir: Path, evaluations_dir: Path, teacher: dict | None, root: Path, attack: str | None = None
) -> list[dict]:
    """The rows of every ``<name>/train_metrics.json`` under ``students_dir``, in the paper's order of methods."""
    found = sorted(p.parent.name for p in students_dir.glob("*/train_metrics.json"))
    rows = [
        _row(n, students_dir / n / "train_metrics.json", evaluations_dir / f"{n}.json", root, attack) for n in found
    ]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    rows.sort(key=lambda r: (order.get(r["method"], len(order)), r["name"] != r["method"], r["name"]))
    add_speedups(rows, teacher)
    return rows


def _seed_dirs(students_dir: Path) -> list[tuple[int, str]]:
    return sorted(
        (int(p.name[4:]), p.name)
        for p in students_dir.glob("seed*")
        if p.name[4:].isdigit() and any(p.glob("*/train_metrics.json"))
    )


def collect(
    root: str | os.PathLike,
    students_dir: str | os.PathLike = "runs/students",
    evaluations_dir: str | os.PathLike = "metrics/students",
    teacher_dir: str | os.PathLike = "runs/teacher",
    teacher_evaluation: str | os.PathLike = "metrics/teacher.json",
    attack: str | None = None,
) -> dict:
    """Read the layout under ``root``: ``{"teacher": row or None, "students": [rows in the paper's order]}``.

    With ``seed<N>`` directories under ``students_dir`` the rows are means over the seeds (:func:`over_seeds`),
    ``"seeds"`` lists them and ``"target"`` holds the target check; otherwise ``"claims"`` holds the paper's.
    """
    root = Path(root)
    students_dir, evaluations_dir, teacher_dir = root / students_dir, root / evaluations_dir, root / teacher_dir
    teacher = None
    if (teacher_dir / "train_metrics.json").is_file():
        teacher = _row("teacher", teacher_dir / "train_metrics.json", root / teacher_evaluation, attack=attack)
    seeds = _seed_dirs(students_dir) if students_dir.is_dir() else []
    if seeds:
        per_seed = [_students(students_dir / d, evaluations_dir / d, teacher, root, attack) for _, d in seeds]
        students = over_seeds(per_seed)
        return {"teacher": teacher, "students": students, "seeds": [s for s, _ in seeds], "target": target(students)}
    students = _students(students_dir, evaluations_dir, teacher, root, attack) if students_dir.is_dir() else []
    if not students:
        raise RRMError(
            f"no student runs under {str(students_dir)!r} (expected <name>/train_metrics.json or "
            f"seed<N>/<name>/train_metrics.json); train the students first (dvc repro)"
        )
    return {"teacher": teacher, "students": students, "claims": claims(students)}


def over_seeds(per_seed: list[list[dict]]) -> list[dict]:
    """One row per student name: mean and 95% CI half-width (``<key>_ci95``) of :data:`SEED_MEANS` over the seeds.

    A number missing from any seed (no transfer attack, no teacher's time) is None. ``sanity_passed`` holds only
    when every seed's evaluation passed; the ratios to SAT are ratios of the means.
    """
    by_name: dict[str, list[dict]] = {}
    for rows in per_seed:
        for row in rows:
            by_name.setdefault(row["name"], []).append(row)
    out = []
    for runs in by_name.values():
        first = runs[0]
        row = {
            "name": first["name"],
            "method": first["method"],
            "model": first["model"],
            "transplant": first["transplant"],
            "uses_teacher": first["uses_teacher"],
            "seeds": len(runs),
            "attack": ",".join(sorted({r["attack"] for r in runs})),
            "dataset": first["dataset"],  # the same config on every seed
            "norm": first["norm"],
            "eps": first["eps"],
            "sanity_passed": all(r["sanity_passed"] is True for r in runs),
            "evaluation_bound": all(r["evaluation_bound"] for r in runs),
            "cost_basis": "flops" if all(r["cost_basis"] == "flops" for r in runs) else "seconds",
            "timing_noisy": any(r["timing_noisy"] for r in runs),
            "co_seeds": sum(r["co_epoch"] is not None for r in runs),
            "adversarial_min_pct": None if None in (a := [r["adversarial_pct"] for r in runs]) else min(a),
        }
        for key in SEED_MEANS:
            values = [r[key] for r in runs]
            mean, ci = mean_ci(values) if None not in values else (None, None)
            row[key], row[f"{key}_ci95"] = mean, ci
        out.append(row)
    sat = next((r for r in out if r["name"] == "sat"), None)
    for row in out:
        row["adversarial_of_sat_pct"] = (
            100 * row["adversarial_pct"] / sat["adversarial_pct"]
            if sat and sat["adversarial_pct"] and row["adversarial_pct"] is not None
            else None
        )
        row["time_of_sat"] = _ratio(row["total_minutes"], sat and sat["total_minutes"])
        row["cost_of_sat"] = _ratio(row["total_flops"], sat and sat["total_flops"])
        row["worst_seed_of_sat_pct"] = _ratio(row["adversarial_min_pct"], sat and sat["adversarial_pct"] / 100)
    return out


def target(students: list[dict]) -> dict:
    """The target on rows averaged over seeds: which students that use the teacher reach at least 80% of the
    SAT student's (the row named sat) mean AutoPGD accuracy in at most a third of its mean student training time,
    with every evaluation passing the gradient-masking checks. Each candidate comes with what was measured, and so
    does every student that needs no teacher (``without_teacher``; SAT itself excepted), checked against the same bar:
    where the teacher's students fail, those are what to use instead."""
    sat = next((r for r in students if r["name"] == "sat"), None)
    counted = bool(students) and all(r["cost_basis"] == "flops" for r in students)
    rule = (
        f"a student using the teacher with mean adversarial accuracy >= {TARGET_OF_SAT_PCT:.0f}% of sat's and "
        f"mean student training {'cost (counted FLOPs)' if counted else 'time'} <= 1/{1 / TARGET_TIME_FRACTION:.0f} "
        f"of sat's, every evaluation passing the gradient-masking checks"
    )
    if sat is None or sat["adversarial_pct"] is None:
        return {"rule": rule, "sat": None, "candidates": {}, "met_by": [], "met": False}
    need_pct = TARGET_OF_SAT_PCT / 100 * sat["adversarial_pct"]
    max_minutes = TARGET_TIME_FRACTION * sat["total_minutes"]
    max_flops = TARGET_TIME_FRACTION * sat["total_flops"] if counted else None
    candidates, others = {}, {}
    for r in students:
        if r["name"] == "sat" or r["adversarial_pct"] is None:
            continue
        group = candidates if r["uses_teacher"] else others
        group[r["name"]] = {
            "adversarial_pct": r["adversarial_pct"],
            "adversarial_of_sat_pct": r["adversarial_of_sat_pct"],
            "total_minutes": r["total_minutes"],
            "time_of_sat": r["time_of_sat"],
            "sanity_passed": r["sanity_passed"],
            "total_flops": r["total_flops"],
            "cost_of_sat": r["cost_of_sat"],
            "worst_seed_of_sat_pct": r.get("worst_seed_of_sat_pct"),
            "met": r["adversarial_pct"] >= need_pct
            and (r["total_flops"] <= max_flops if counted else r["total_minutes"] <= max_minutes)
            and r["sanity_passed"],
        }
    met_by = [name for name, c in candidates.items() if c["met"]]
    # Where a naturally trained student already clears the accuracy bar (MNIST at small eps), meeting the target
    # says nothing about transfer: the report says so and gives each candidate's margin over natural training.
    natural = next((r for r in students if r["name"] == "natural" and r["adversarial_pct"] is not None), None)
    for c in candidates.values():
        c["over_natural_points"] = c["adversarial_pct"] - natural["adversarial_pct"] if natural else None
    # What the user can do instead: the students that need no teacher and clear the same bar (Fast AT at eps 0.1).
    return {
        "rule": rule,
        "candidates": candidates,
        "met_by": met_by,
        "met": bool(met_by),
        "without_teacher": others,
        "met_without_teacher": [name for name, c in others.items() if c["met"]],
        "sat": {
            "adversarial_pct": sat["adversarial_pct"],
            "total_minutes": sat["total_minutes"],
            "sanity_passed": sat["sanity_passed"],
            **({"total_flops": sat["total_flops"]} if counted else {}),
        },
        "thresholds": {
            "adversarial_pct": need_pct,
            "total_minutes": max_minutes,
            **({"total_flops": max_flops} if counted else {}),
        },
        "cost_basis": "flops" if counted else "seconds",
        "natural_adversarial_pct": natural["adversarial_pct"] if natural else None,
        "discriminating": natural is None or natural["adversarial_pct"] < need_pct,
    }


def claims(students: list[dict], method: str = "rrm") -> list[dict]:
    """The paper's claim for ``method`` checked against these rows: one entry per target, with what was measured.

    Targets: adversarial accuracy at least 80% of the SAT student's; at least 20 points above the natural, KD and
    RDT students; student training cost (counted FLOPs, else time) at most a quarter of SAT's. Targets whose rows are
    missing are left out.
    """
    rows = {r["name"]: r for r in students}
    subject, sat = rows.get(method), rows.get("sat")
    if subject is None or subject["adversarial_pct"] is None:
        return []
    out = []
    if sat and sat["adversarial_pct"]:
        share = subject["adversarial_of_sat_pct"]
        out.append(
            {
                "claim": f"{method} adversarial >= {CLAIM_OF_SAT_PCT:.0f}% of sat's",
                "measured": share,
                "text": f"{share:.1f}% ({subject['adversarial_pct']:.1f} vs {sat['adversarial_pct']:.1f})",
                "met": share >= CLAIM_OF_SAT_PCT,
            }
        )
    for name in CLAIM_BASELINES:
        base = rows.get(name)
        if base is None or base["adversarial_pct"] is None:
            continue
        margin = subject["adversarial_pct"] - base["adversarial_pct"]
        out.append(
            {
                "claim": f"{method} adversarial >= {name}'s + {CLAIM_MARGIN_POINTS:.0f} points",
                "measured": margin,
                "text": f"{margin:+.1f} points",
                "met": margin >= CLAIM_MARGIN_POINTS,
            }
        )
    if sat and subject["cost_basis"] == "flops":
        fraction, seconds = subject["total_flops"] / sat["total_flops"], subject["total_seconds"] / sat["total_seconds"]
        out.append(
            {
                "claim": f"{method} training cost <= {CLAIM_TIME_FRACTION:g} x sat's (counted FLOPs)",
                "measured": fraction,
                "text": f"{fraction:.2f} x ({_tflops(subject['total_flops'])} vs {_tflops(sat['total_flops'])} "
                f"TFLOPs; measured time {seconds:.2f} x)",
                "met": fraction <= CLAIM_TIME_FRACTION,
            }
        )
    elif sat:
        fraction = subject["total_seconds"] / sat["total_seconds"]
        out.append(
            {
                "claim": f"{method} training time <= {CLAIM_TIME_FRACTION:g} x sat's",
                "measured": fraction,
                "text": f"{fraction:.2f} x ({subject['total_minutes']:.2f} vs {sat['total_minutes']:.2f} min)",
                "met": fraction <= CLAIM_TIME_FRACTION,
            }
        )
    return out


def _in_tflops(row: dict) -> dict:
    """A seeds row's FLOP counts (and their CIs) in TFLOPs, as ``total_tflops...`` keys (what the FLOP panels plot)."""
    keys = [k + suffix for k in ("total_flops", "total_flops_with_teacher") for suffix in ("", "_ci95")]
    return {k.replace("flops", "tflops"): None if row.get(k) is None else row[k] / 1e12 for k in keys}


def write_report(root: str | os.PathLike, out_dir: str | os.PathLike, **layout: str | os.PathLike) -> dict:
    """Collect the metrics under ``root`` (``layout``: :func:`collect`'s directories) and write the tables,
    ``report.json`` and the plot to ``out_dir``; ``report["table"]`` names the main table."""
    from rrm.plots import FRONTIER_FLOP_PANELS, FRONTIER_PANELS, plot_students  # matplotlib only for a report

    report = collect(root, **layout)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = ([report["teacher"]] if report["teacher"] else []) + report["students"]
    by_name = {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in rows}
    if "seeds" in report:
        goal = report["target"]
        files = {
            "table.md": seeds_table(report),
            "table.csv": _csv(SEEDS_COLUMNS, report["students"]),
            "report.json": json.dumps({**by_name, "seeds": report["seeds"], "target": goal}, indent=2, sort_keys=True)
            + "\n",
        }
        figure = "frontier.png"
        students, panels, cost, scale = report["students"], FRONTIER_PANELS, "total_minutes", 1
        if goal.get("cost_basis") == "flops":  # the target is checked on counted FLOPs: so is the plot drawn
            students, panels = [{**r, **_in_tflops(r)} for r in students], FRONTIER_FLOP_PANELS
            cost, scale = "total_flops", 1e12
        box = goal["sat"] and (goal["thresholds"][cost] / scale, goal["thresholds"]["adversarial_pct"])
        draw = functools.partial(plot_students, students, panels=panels, target_box=box, frontier=True)
    else:
        files = {
            "table1.md": table1(report),
            "table2.md": table2(report),
            "table1.csv": _csv(TABLE1_COLUMNS, rows),
            "table2.csv": _csv(
                TABLE2_COLUMNS, [r for r in report["students"] if r["method"] == "sat" or r["uses_teacher"]]
            ),
            "report.json": json.dumps(
                {
                    **by_name,
                    "claims": {c["claim"]: {"measured": c["measured"], "met": c["met"]} for c in report["claims"]},
                },
                indent=2,
                sort_keys=True,
            )
            + "\n",
        }
        figure = "accuracy_vs_time.png"
        draw = functools.partial(plot_students, report["students"])
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    draw(out / figure)
    report["files"] = sorted([*files, figure])
    report["table"] = next(iter(files))
    return report
