"""Reading a pipeline's metrics into the report's rows: one :class:`~rrm.report.rows.RunRow` per training run and
its evaluation, each evaluation checked against the model beside the run, and the students' speedups over SAT."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rrm.errors import RRMError
from rrm.evaluation import EvalResult
from rrm.io import sha256_file
from rrm.report.averaging import over_seeds
from rrm.report.claims import claims, target
from rrm.report.costs import add_speedups
from rrm.report.rows import LEARNS_FROM_TEACHER_DATA, METHOD_ORDER, NOISY_TIMING_CI, USES_TEACHER, Report, RunRow

ATTACK_PREFERENCE = ("autoattack", "art-apgd", "apgd")


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
            return float(evaluation.adversarial_accuracy[name]), name, evaluation.examples(name)
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


def read_run(
    name: str, train_path: Path, eval_path: Path, root: Path | None = None, attack: str | None = None
) -> RunRow:
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
    return RunRow(
        name=name,
        method=method,
        transplant=transplant,
        uses_teacher=method in USES_TEACHER or transplant is not None,
        model=train.get("model", "?"),
        epochs=_number(train, "epochs", train_path),
        epoch_seconds_mean=_number(train, "epoch_seconds_mean", train_path),
        epoch_seconds_ci95=_number(train, "epoch_seconds_ci95", train_path),
        total_seconds=_number(train, "total_seconds", train_path),
        total_minutes=_number(train, "total_seconds", train_path) / 60,
        natural_pct=100 * float(evaluation.natural_accuracy),
        adversarial_pct=_pct(adversarial),
        attack=attack,
        attack_examples=examples,
        dataset=evaluation.dataset,
        norm=evaluation.norm,
        eps=evaluation.eps,
        apgd_pct=_pct(evaluation.adversarial_accuracy.get("apgd")),
        transfer_pct=_pct(evaluation.adversarial_accuracy.get("transfer")),
        sanity_passed=evaluation.sanity_passed,
        evaluation_bound=bound,
        total_flops=_optional_number(train, "total_flops"),
        data_flops=_data_flops(config, root) if learns_from_data else None,
        timing_noisy=_number(train, "epoch_seconds_ci95", train_path) > NOISY_TIMING_CI * seconds_mean,
        co_epoch=train.get("catastrophic_overfitting_epoch"),
        early_stopped_at_epoch=train.get("early_stopped_at_epoch"),
    )


def read_students(
    students_dir: Path, evaluations_dir: Path, teacher: RunRow | None, root: Path, attack: str | None = None
) -> list[RunRow]:
    """The rows of every ``<name>/train_metrics.json`` under ``students_dir``, in the paper's order of methods."""
    found = sorted(p.parent.name for p in students_dir.glob("*/train_metrics.json"))
    rows = [
        read_run(n, students_dir / n / "train_metrics.json", evaluations_dir / f"{n}.json", root, attack) for n in found
    ]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    rows.sort(key=lambda r: (order.get(r.method, len(order)), r.name != r.method, r.name))
    add_speedups(rows, teacher)
    return rows


def seed_dirs(students_dir: Path) -> list[tuple[int, str]]:
    return sorted(
        (int(p.name[4:]), p.name)
        for p in students_dir.glob("seed*")
        if p.name[4:].isdigit() and any(p.glob("*/train_metrics.json"))
    )


def read_report(
    root: str | os.PathLike,
    students_dir: str | os.PathLike = "runs/students",
    evaluations_dir: str | os.PathLike = "metrics/students",
    teacher_dir: str | os.PathLike = "runs/teacher",
    teacher_evaluation: str | os.PathLike = "metrics/teacher.json",
    attack: str | None = None,
) -> Report:
    """Read the layout under ``root``: the teacher's row (or None) and the students' in the paper's order of methods.

    With ``seed<N>`` directories under ``students_dir`` the rows are means over the seeds
    (:func:`~rrm.report.averaging.over_seeds`), ``seeds`` lists them and ``target`` holds the target check;
    otherwise ``claims`` holds the paper's.
    """
    root = Path(root)
    students_dir, evaluations_dir, teacher_dir = root / students_dir, root / evaluations_dir, root / teacher_dir
    teacher = None
    if (teacher_dir / "train_metrics.json").is_file():
        teacher = read_run("teacher", teacher_dir / "train_metrics.json", root / teacher_evaluation, attack=attack)
    seeds = seed_dirs(students_dir) if students_dir.is_dir() else []
    if seeds:
        per_seed = [read_students(students_dir / d, evaluations_dir / d, teacher, root, attack) for _, d in seeds]
        averaged = over_seeds(per_seed)
        return Report(teacher, averaged, seeds=[s for s, _ in seeds], target=target(averaged))
    students = read_students(students_dir, evaluations_dir, teacher, root, attack) if students_dir.is_dir() else []
    if not students:
        raise RRMError(
            f"no student runs under {str(students_dir)!r} (expected <name>/train_metrics.json or "
            f"seed<N>/<name>/train_metrics.json); train the students first (dvc repro)"
        )
    return Report(teacher, students, claims=claims(students))


def collect(root: str | os.PathLike, **layout) -> dict:
    """:func:`read_report` as plain data: ``{"teacher": row or None, "students": [rows], ...}`` with ``"seeds"`` and
    ``"target"`` over seeds, else ``"claims"``; ``layout`` names its directories."""
    return read_report(root, **layout).to_dict()
