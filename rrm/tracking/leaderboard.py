"""The leaderboard: an experiment's finished training runs as a narrow table, read from MLflow alone.

One row per run, or per recipe over its seeds (mean ± 95% CI): runs that share their name, method, model, dataset,
eps, teacher and headline attack. It reads what training and ``rrm evaluate`` record on the training run (params,
``natural/…``, ``robust/…`` and ``checks/…`` metrics, tags), so it works on a team's server as on the project's
SQLite file.

The robust number of a run is its evaluation's headline: the lowest accuracy among the attacks run on the most images,
shown with that attack and image count. AutoAttack run on fewer images has a column of its own; no minimum is taken
over attacks that saw different images.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence

import tabulate
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from rrm.errors import RRMError, unknown
from rrm.evaluation import headline_attack
from rrm.stats import mean_ci
from rrm.tracking.connection import has_error_code, mlflow_errors, one_line, store_client
from rrm.tracking.evaluations import CHECKS, EPS, HEADLINE, IMAGES_SUFFIX, NATURAL, ROBUST
from rrm.tracking.runs import DEFAULT_EXPERIMENT
from rrm.tracking.uri import tracking_label
from rrm.tracking.views import ui_address, view_url

__all__ = ["COLUMNS", "FORMATS", "Entry", "Leaderboard", "leaderboard", "render"]

# The columns, in order; ``--columns`` picks among them and ``--sort`` sorts by one.
COLUMNS = (
    "run",
    "method",
    "model",
    "dataset",
    "eps",
    "seeds",
    "natural",
    "robust",
    "attack",
    "autoattack",
    "tflops",
    "checks",
    "teacher",
)
_PERCENT = ("natural", "robust", "autoattack")
_NUMERIC = {"eps", "tflops", *_PERCENT}
_AA = "autoattack"


@dataclasses.dataclass(frozen=True)
class Entry:
    """A row: one run, or one recipe over its seeds. Accuracies in percent as (mean, 95% CI half-width)."""

    run: str
    method: str | None
    model: str | None
    dataset: str | None
    eps: float | None
    seeds: tuple[int, ...]
    natural: tuple[float, float] | None
    robust: tuple[float, float] | None
    attack: str | None  # the headline attack and its images: "apgd/500"
    autoattack: tuple[float, float] | None
    autoattack_images: int | None
    tflops: float | None
    checks: str  # passed, FAILED, not run, or mixed over seeds
    teacher: str | None
    run_ids: tuple[str, ...]

    def value(self, column: str):
        """The column's value for sorting: a number (means) or text."""
        value = getattr(self, column)
        if column == "seeds":
            return len(value)
        return value[0] if isinstance(value, tuple) and column != "run_ids" else value

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Leaderboard:
    experiment: str
    store: str
    entries: list[Entry]
    over_seeds: bool
    view: str = ""  # the experiment's Robustness view in mlflow ui (:mod:`rrm.tracking.views`)


def leaderboard(
    experiment: str = DEFAULT_EXPERIMENT, *, where: str | None = None, over_seeds: bool = True, sort: str = "robust"
) -> Leaderboard:
    """The finished training runs of ``experiment`` that match MLflow filter ``where`` (``params.method = 'fast'``),
    best first by ``sort``; ``over_seeds``: one row per recipe, averaged over its seeds."""
    if sort not in COLUMNS:
        raise unknown("sort column", sort, COLUMNS)
    with mlflow_errors("reading the runs table from MLflow"):
        client = store_client()
        found = client.get_experiment_by_name(experiment)
        if found is None or found.lifecycle_stage == "deleted":
            names = sorted(e.name for e in client.search_experiments())
            raise RRMError(
                f"no experiment {experiment!r} in {tracking_label()}; pick one of {', '.join(names) or 'none'} "
                "with --experiment, or point MLFLOW_TRACKING_URI at the store that holds it"
            )
        runs = _training_runs(client, found.experiment_id, where)
    rows = [_run_row(run) for run in runs]
    entries = _over_seeds(rows) if over_seeds else rows
    numeric = sort in _NUMERIC or sort == "seeds"
    present = [e for e in entries if e.value(sort) is not None]
    missing = [e for e in entries if e.value(sort) is None]
    present.sort(key=lambda e: e.value(sort), reverse=numeric)
    view = view_url(ui_address(), found.experiment_id)
    return Leaderboard(experiment, tracking_label(), present + missing, over_seeds, view)


def _training_runs(client: MlflowClient, experiment_id: str, where: str | None) -> list[Run]:
    base = "tags.`rrm.kind` = 'train' and attributes.status = 'FINISHED'"
    query = f"{base} and {where}" if where and where.strip() else base
    runs: list[Run] = []
    token = None
    while True:
        try:
            page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        except MlflowException as exc:
            if has_error_code(exc, "INVALID_PARAMETER_VALUE"):
                raise RRMError(
                    f"bad --filter {where!r}: {one_line(exc.message, 200)}; write MLflow's search syntax, "
                    "conditions joined by 'and', e.g. \"params.method = 'fast' and metrics.`robust/apgd` > 0.5\""
                ) from None
            raise
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


_RENAMED = {  # the headline's names before they sorted together (runs recorded until December 2026)
    "eval_natural_accuracy": NATURAL,
    "eval_headline_accuracy": HEADLINE,
    "eval_eps": EPS,
    "sanity_passed": CHECKS,
}


def _current(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's metrics under today's names: an older run's ``eval_<attack>_accuracy`` reads as ``robust/<attack>``."""
    current = {}
    for key, value in metrics.items():
        if key in _RENAMED:
            key = _RENAMED[key]
        elif key.startswith("eval_") and key.endswith(("_accuracy", "_examples")) and key != "eval_worst_accuracy":
            attack, _, kind = key[len("eval_") :].rpartition("_")
            key = ROBUST + attack + ("" if kind == "accuracy" else IMAGES_SUFFIX)
        current.setdefault(key, value)
    return current


def _headline(metrics: Mapping[str, float]) -> tuple[str | None, float | None, int | None]:
    """The attack, accuracy and test images of a run's headline (:func:`rrm.evaluation.headline_attack`)."""
    accuracy = {
        key[len(ROBUST) :]: value
        for key, value in metrics.items()
        if key.startswith(ROBUST) and key not in (HEADLINE, EPS) and not key.endswith(IMAGES_SUFFIX)
    }
    examples = {a: int(metrics[ROBUST + a + IMAGES_SUFFIX]) for a in accuracy if ROBUST + a + IMAGES_SUFFIX in metrics}
    attack = headline_attack(accuracy, examples)
    return attack, accuracy.get(attack), examples.get(attack)


def _percent(value: float | None) -> tuple[float, float] | None:
    return None if value is None else (100 * value, 0.0)


def _teacher(tags: Mapping[str, str]) -> str | None:
    if "rrm.teacher_name" in tags:
        return f"{tags['rrm.teacher_name']} v{tags.get('rrm.teacher_version', '?')}"
    if "rrm.teacher_sha256" in tags:
        return f"file {tags['rrm.teacher_sha256'][:12]}"
    return tags.get("rrm.teacher_uri")


def _run_row(run: Run) -> Entry:
    params, metrics, tags = run.data.params, _current(run.data.metrics), run.data.tags
    attack, robust, images = _headline(metrics)
    natural = metrics.get(NATURAL, metrics.get("test_accuracy"))
    aa, aa_images = metrics.get(ROBUST + _AA), metrics.get(ROBUST + _AA + IMAGES_SUFFIX)
    seed = _number(params.get("seed"))
    eps = _number(metrics.get(EPS, params.get("eps")))
    flops = _number(metrics.get("total_flops"))
    return Entry(
        run=run.info.run_name or run.info.run_id,
        method=params.get("method"),
        model=params.get("model"),
        dataset=tags.get("rrm.dataset"),
        eps=eps,
        seeds=() if seed is None else (int(seed),),
        natural=_percent(_number(natural)),
        robust=_percent(robust),
        attack=None if attack is None else f"{attack}/{images if images is not None else '?'}",
        autoattack=None if attack == _AA else _percent(_number(aa)),
        autoattack_images=None if aa_images is None or attack == _AA else int(aa_images),
        tflops=None if flops is None else flops / 1e12,
        checks=tags.get("rrm.sanity_checks", "not run"),
        teacher=_teacher(tags),
        run_ids=(run.info.run_id,),
    )


def _mean(values: Sequence[tuple[float, float] | None]) -> tuple[float, float] | None:
    """Mean ± 95% CI of the runs' values; None unless every run has one (a mean of some seeds would mislead)."""
    if not values or any(v is None for v in values):
        return None
    return mean_ci([v[0] for v in values])  # type: ignore[index]


def _over_seeds(rows: list[Entry]) -> list[Entry]:
    groups: dict[tuple, list[Entry]] = {}
    for row in rows:
        key = (row.run, row.method, row.model, row.dataset, row.eps, row.teacher, row.attack, row.autoattack_images)
        groups.setdefault(key, []).append(row)
    entries = []
    for group in groups.values():
        group.sort(key=lambda r: r.seeds)
        checks = {r.checks for r in group}
        flops = [r.tflops for r in group]
        entries.append(
            dataclasses.replace(
                group[0],
                seeds=tuple(s for r in group for s in r.seeds),
                natural=_mean([r.natural for r in group]),
                robust=_mean([r.robust for r in group]),
                autoattack=_mean([r.autoattack for r in group]),
                tflops=None if None in flops else sum(flops) / len(flops),  # type: ignore[arg-type]
                checks=checks.pop() if len(checks) == 1 else "mixed",
                run_ids=tuple(i for r in group for i in r.run_ids),
            )
        )
    return entries


FORMATS = ("text", "md", "csv", "json")


def _cell(entry: Entry, column: str) -> str:
    value = getattr(entry, column)
    if value is None:
        return "-"
    if column in ("natural", "robust", "autoattack"):
        mean, ci = value
        text = f"{mean:.1f} ± {ci:.1f}" if len(entry.seeds) > 1 else f"{mean:.1f}"
        return f"{text} ({entry.autoattack_images})" if column == "autoattack" and entry.autoattack_images else text
    if column == "seeds":
        return ",".join(map(str, value)) or "-"
    if column == "tflops":
        return f"{value:.3g}"
    if column == "eps":
        return f"{value:g}"
    return str(value)


def render(board: Leaderboard, columns: Sequence[str] | None = None, fmt: str = "text") -> str:
    """The board as ``fmt``: text (for a terminal), md, csv (numbers unrounded, CI half-widths as ``*_ci``) or
    json (every field, run ids included). ``columns``: those, in that order; by default every column that has a
    value in some row (text and md) or every column (csv)."""
    for column in columns or ():
        if column not in COLUMNS:
            raise unknown("column", column, COLUMNS)
    if fmt not in FORMATS:
        raise unknown("format", fmt, FORMATS)
    if columns is None:
        columns = COLUMNS if fmt == "csv" else [c for c in COLUMNS if any(_cell(e, c) != "-" for e in board.entries)]
    if fmt == "json":
        return json.dumps([e.to_json() for e in board.entries], indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        header = [c for column in columns for c in ((column, f"{column}_ci") if column in _PERCENT else (column,))]
        writer.writerow(header)
        for entry in board.entries:
            row = []
            for column in columns:
                value = getattr(entry, column)
                if column in _PERCENT:
                    row += ["", ""] if value is None else [f"{value[0]:.4g}", f"{value[1]:.4g}"]
                elif column == "seeds":
                    row.append(" ".join(map(str, value)))
                else:
                    row.append("" if value is None else value)
            writer.writerow(row)
        return out.getvalue()
    table = [[_cell(e, c) for c in columns] for e in board.entries]
    style = "github" if fmt == "md" else "simple"
    return tabulate.tabulate(table, headers=list(columns), tablefmt=style, disable_numparse=True) + "\n"
