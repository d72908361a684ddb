"""Evaluations in MLflow: ``rrm evaluate``'s metrics as a run linked to the training run, and read back from one.

An evaluation run is named after what it measured ("apgd+autoattack linf eps=0.2 · rrm-cnn-bn-mnist5k"), and its
headline numbers are copied onto the training run under names that sort together by what they are:
``natural/accuracy`` with its test images in ``natural/images``; ``robust/<attack>`` per attack with its images in
``robust/<attack>_images``, ``robust/headline`` (the lowest accuracy among the attacks on the most images) and
``robust/eps``; ``checks/passed`` (1 or 0, absent when the checks did not run) and tag ``rrm.sanity_checks`` (passed,
FAILED or not run). So training runs can be sorted and compared by robustness in ``mlflow ui`` (whose charts group
them by prefix) and ``rrm runs table``. The same result is logged once: logging it again (registering a teacher with
the metrics file ``rrm evaluate`` wrote) returns the run already there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag

from rrm.errors import RRMError
from rrm.evaluation import EvalResult
from rrm.io import sha256_file
from rrm.tracking.connection import mlflow_errors, one_line, store_client
from rrm.tracking.flatten import is_number, leaves, numbers
from rrm.tracking.logged_models import LOGGED_MODEL_NAME, metric_dataset, model_run, search_runs
from rrm.tracking.notes import write_note
from rrm.tracking.runs import DEFAULT_EXPERIMENT, context_tags, ensure_experiment, run_status
from rrm.tracking.versions import run_model

__all__ = [
    "CHECKS",
    "EPS",
    "HEADLINE",
    "IMAGES_SUFFIX",
    "NATURAL",
    "NATURAL_IMAGES",
    "ROBUST",
    "evaluation_of_run",
    "headline_metrics",
    "log_evaluation",
]

# The headline's metric names on a training run
NATURAL, NATURAL_IMAGES = "natural/accuracy", "natural/images"
ROBUST = "robust/"  # robust/<attack>: the accuracy under that attack
IMAGES_SUFFIX = "_images"  # robust/<attack>_images: the test images it attacked
HEADLINE, EPS = "robust/headline", "robust/eps"
CHECKS = "checks/passed"


def log_evaluation(
    result: EvalResult,
    *,
    model_path: str | os.PathLike,
    train_run_id: str | None = None,
    experiment: str | None = None,
    metrics_path: str | os.PathLike | None = None,
    run_name: str | None = None,
) -> str:
    """Record an evaluation of ``model_path`` as its own run linked to the training run; returns the run id.

    The training run is ``train_run_id`` or, by default, the run that logged a model file with the same sha256. A
    result bound to another model file (its ``model_sha256``) is refused. Numbers in the result's JSON (nested ones as
    ``a/b``) become metrics, text, flags and None become params; the metrics JSON (``metrics_path``, else the
    result's) is an artifact. With no ``experiment`` the evaluation joins its training run's experiment and is nested
    under it in ``mlflow ui``. The headline numbers also go onto the training run. A result identical to one already
    logged for the same training run (tag ``rrm.evaluation_sha256``) is not logged again: its run id is returned.
    """
    sha256 = sha256_file(model_path)
    if result.model_sha256 is not None and result.model_sha256 != sha256:
        raise RRMError(
            f"the evaluation measured the model file with sha256 {result.model_sha256[:12]}, not "
            f"{str(model_path)!r} ({sha256[:12]}); record it with the model file it measured"
        )
    metrics = result.to_json()
    fingerprint = hashlib.sha256(json.dumps(metrics, sort_keys=True, default=str).encode()).hexdigest()
    with mlflow_errors("recording the evaluation in MLflow"):
        client = store_client()
        train_run = client.get_run(train_run_id) if train_run_id else model_run(client, sha256)
        if train_run is not None:
            logged = search_runs(
                client,
                f"tags.`rrm.evaluation_sha256` = '{fingerprint}' and tags.`rrm.train_run_id` = "
                f"'{train_run.info.run_id}' and attributes.status = 'FINISHED'",
            )
            if logged:
                return logged[0].info.run_id
        if experiment is not None or train_run is None:
            experiment_id = ensure_experiment(client, experiment or DEFAULT_EXPERIMENT)
        else:
            experiment_id = train_run.info.experiment_id
        tags = {
            **context_tags(),
            "rrm.kind": "evaluate",
            "rrm.evaluated_sha256": sha256,
            "rrm.evaluation_sha256": fingerprint,
            "rrm.model_path": str(model_path),
        }
        if train_run is not None:
            tags["rrm.train_run_id"] = train_run.info.run_id
            if train_run.info.experiment_id == experiment_id:
                tags["mlflow.parentRunId"] = train_run.info.run_id
        # the run spans the evaluation's measured seconds (natural, each attack, the checks), not the logging's
        took = sum(v for v in (result.seconds or {}).values() if isinstance(v, (int, float)) and v > 0)
        run = client.create_run(
            experiment_id,
            start_time=int((time.time() - took) * 1000),
            run_name=run_name or _run_name(result, model_path, train_run),
            tags=tags,
        )
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            params = [Param(k, one_line(v, 6000)) for k, v in _flat_text(metrics).items()]
            values = [Metric(k, v, now, 0) for k, v in numbers(metrics).items()]
            for i in range(0, max(len(params), 1), 100):
                client.log_batch(run_id, metrics=values if i == 0 else (), params=params[i : i + 100])
            if metrics_path is not None:
                client.log_artifact(run_id, str(metrics_path))
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "eval_metrics.json"
                    path.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n")
                    client.log_artifact(run_id, str(path))
        except BaseException as exc:
            with contextlib.suppress(Exception):
                client.set_tag(run_id, "rrm.error", one_line(f"{type(exc).__name__}: {exc}"))
                client.set_terminated(run_id, run_status(type(exc)))
            raise
        client.set_terminated(run_id, "FINISHED")
        if train_run is not None:
            _copy_headline(client, train_run.info.run_id, result, run_id)
    return run_id


def _run_name(result: EvalResult, model_path: str | os.PathLike, train_run: Run | None) -> str:
    """What was measured, on what: "apgd+autoattack linf eps=0.2 · rrm-cnn-bn-mnist5k" (the training run's name, else
    the model's directory)."""
    what = ["+".join(result.adversarial_accuracy) or "natural", result.norm]
    what.append(f"eps={result.eps:g}" if result.eps is not None else None)
    path = Path(model_path)
    model = (train_run.info.run_name if train_run is not None else None) or path.parent.name or path.name
    return f"{' '.join(w for w in what if w)} · {model}"


def headline_metrics(result: EvalResult) -> dict[str, float]:
    """The numbers of an evaluation a training run carries: natural and per-attack accuracy, and whether the
    gradient-masking checks passed (1 or 0; left out when they did not run, so "not run" never reads as passed)."""
    values = {NATURAL: result.natural_accuracy}
    if result.n_test:
        values[NATURAL_IMAGES] = float(result.n_test)
    for attack, accuracy in result.adversarial_accuracy.items():
        name = ROBUST + attack.replace("-", "_")
        values[name] = accuracy
        if result.examples(attack) is not None:
            values[name + IMAGES_SUFFIX] = float(result.examples(attack))
    if result.headline_accuracy is not None:
        values[HEADLINE] = result.headline_accuracy
    if result.eps is not None:
        values[EPS] = float(result.eps)
    status = result.sanity_status
    if status != "not run":
        values[CHECKS] = float(status == "passed")
    return values


def _copy_headline(client: MlflowClient, train_run_id: str, result: EvalResult, evaluation_run_id: str) -> None:
    """The headline numbers onto the training run, linked to its logged model and the dataset they were measured on
    (so MLflow's Models tab shows them)."""
    now = int(time.time() * 1000)
    logged = run_model(client, f"runs:/{train_run_id}/{LOGGED_MODEL_NAME}", required=False)
    link = {"run_id": train_run_id}
    if logged is not None:
        link["model_id"] = logged.model_id
        if result.dataset and result.dataset_digest:
            dataset = metric_dataset(result.dataset, result.dataset_digest)
            link.update(dataset_name=dataset.name, dataset_digest=dataset.digest)
    client.log_batch(
        train_run_id,
        metrics=[Metric(k, v, now, 0, **link) for k, v in headline_metrics(result).items()],
        tags=[RunTag("rrm.sanity_checks", result.sanity_status), RunTag("rrm.evaluation_run", evaluation_run_id)],
    )
    write_note(client, train_run_id, result)


def _flat_text(values: Mapping) -> dict[str, str]:
    """The non-numeric leaves (text, flags, lists) of a nested mapping."""
    return {
        k: json.dumps(v) if isinstance(v, (list, tuple, bool)) or v is None else str(v)
        for k, v in leaves(values)
        if not is_number(v)
    }


def _logged_evaluation(params: Mapping, metrics: Mapping) -> EvalResult | None:
    """The result an evaluation run logged, rebuilt from its params and metrics; None if it is not one."""
    values: dict = {}
    for key, value in [*params.items(), *metrics.items()]:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = json.loads(value)  # flags, None and lists were logged as JSON
        *parents, leaf = key.split("/")
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    try:
        return EvalResult.from_json(values)
    except RRMError:
        return None


def evaluation_of_run(client: MlflowClient, run_id: str) -> tuple[EvalResult | None, str | None]:
    """The newest finished evaluation linked to training run ``run_id`` that ran an attack, and its run id."""
    runs = search_runs(client, f"tags.`rrm.train_run_id` = '{run_id}' and attributes.status = 'FINISHED'")
    for run in runs:
        result = _logged_evaluation(run.data.params, run.data.metrics)
        if result is not None and result.worst_attack is not None:
            return result, run.info.run_id
    return None, None
