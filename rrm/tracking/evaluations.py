"""Evaluations in MLflow: ``rrm evaluate``'s metrics as a run linked to the training run, and read back from one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from rrm.errors import RRMError
from rrm.io import sha256_file
from rrm.tracking.store import (
    DEFAULT_EXPERIMENT, _client, _context_tags, _experiment_id, _is_number, _leaves, _mlflow_errors, _model_run,
    _numbers, _one_line, _search_runs, _status,
)


def log_evaluation(
    metrics: Mapping,
    *,
    model_path: str | os.PathLike,
    train_run_id: str | None = None,
    experiment: str | None = None,
    metrics_path: str | os.PathLike | None = None,
    run_name: str | None = None,
) -> str:
    """Record an evaluation of ``model_path`` as its own run linked to the training run; returns the run id.

    The training run is ``train_run_id`` or, by default, the run that logged a model file with the same sha256.
    Numbers in ``metrics`` (nested ones as ``a/b``) become metrics, text and flags become params; the metrics JSON
    (``metrics_path``, else ``metrics`` itself) is an artifact. With no ``experiment`` the evaluation joins its
    training run's experiment and is nested under it in ``mlflow ui``.
    """
    sha256 = sha256_file(model_path)
    with _mlflow_errors("recording the evaluation in MLflow"):
        client = _client()
        train_run = client.get_run(train_run_id) if train_run_id else _model_run(client, sha256)
        if experiment is not None or train_run is None:
            experiment_id = _experiment_id(client, experiment or DEFAULT_EXPERIMENT)
        else:
            experiment_id = train_run.info.experiment_id
        tags = {**_context_tags(), "rrm.kind": "evaluate", "rrm.evaluated_sha256": sha256,
                "rrm.model_path": str(model_path)}
        if train_run is not None:
            tags["rrm.train_run_id"] = train_run.info.run_id
            if train_run.info.experiment_id == experiment_id:
                tags["mlflow.parentRunId"] = train_run.info.run_id
        run = client.create_run(experiment_id, run_name=run_name or f"evaluate {Path(model_path).name}", tags=tags)
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            params = [Param(k, _one_line(v, 6000)) for k, v in _flat_text(metrics).items()]
            numbers = [Metric(k, v, now, 0) for k, v in _numbers(metrics).items()]
            for i in range(0, max(len(params), 1), 100):
                client.log_batch(run_id, metrics=numbers if i == 0 else (), params=params[i: i + 100])
            if metrics_path is not None:
                client.log_artifact(run_id, str(metrics_path))
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "eval_metrics.json"
                    path.write_text(json.dumps(dict(metrics), indent=2, sort_keys=True, default=str) + "\n")
                    client.log_artifact(run_id, str(path))
        except BaseException as exc:
            with contextlib.suppress(Exception):
                client.set_tag(run_id, "rrm.error", _one_line(f"{type(exc).__name__}: {exc}"))
                client.set_terminated(run_id, _status(type(exc)))
            raise
        client.set_terminated(run_id, "FINISHED")
    return run_id


def _flat_text(values: Mapping) -> dict[str, str]:
    """The non-numeric leaves (text, flags, lists) of a nested mapping."""
    return {k: json.dumps(v) if isinstance(v, (list, tuple, bool)) or v is None else str(v)
            for k, v in _leaves(values) if not _is_number(v)}


def _summarize_evaluation(values: Mapping) -> dict | None:
    """Natural accuracy and the worst adversarial accuracy over the attacks of an evaluation, or None if absent.

    Takes ``rrm evaluate``'s metrics (``adversarial_accuracy`` per attack), the same logged as run metrics
    (``adversarial_accuracy/apgd``) or a single number.
    """
    natural, adversarial = values.get("natural_accuracy"), values.get("adversarial_accuracy")
    if isinstance(adversarial, Mapping):
        per_attack = dict(adversarial)
    elif adversarial is not None:
        per_attack = {str(values.get("attack", "attack")): adversarial}
    else:
        per_attack = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("adversarial_accuracy/")}
    per_attack = {k: float(v) for k, v in per_attack.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not isinstance(natural, (int, float)) or not per_attack:
        return None
    attack = min(per_attack, key=per_attack.get)
    sanity = values.get("sanity_passed")  # a bool in the JSON, "true"/"false" once logged as a run param
    checks = values.get("sanity")
    enabled = checks.get("enabled") if isinstance(checks, Mapping) else values.get("sanity/enabled")
    if str(enabled).lower() == "false":  # `rrm evaluate --no-sanity` reports passed for checks it never ran
        sanity = None
    examples = values.get("n_examples")  # logged runs give every number back as a float
    return {
        "natural_accuracy": float(natural), "adversarial_accuracy": per_attack[attack], "attack": attack,
        "norm": values.get("norm"), "eps": values.get("eps"),
        "n_examples": int(examples) if isinstance(examples, (int, float)) else None,
        "sanity_passed": None if sanity is None else str(sanity).lower() == "true",
    }


def _evaluation_of_run(client: MlflowClient, run_id: str) -> dict | None:
    """The newest finished evaluation linked to training run ``run_id`` that measured both accuracies."""
    runs = _search_runs(client, f"tags.`rrm.train_run_id` = '{run_id}' and attributes.status = 'FINISHED'")
    for run in runs:
        found = _summarize_evaluation({**run.data.params, **run.data.metrics})
        if found is not None:
            return {**found, "evaluation_run": run.info.run_id}
    return None


def _read_evaluation(evaluation: str | os.PathLike | Mapping) -> dict:
    """The metrics of an evaluation given as a dict or as the JSON file ``rrm evaluate`` writes."""
    if isinstance(evaluation, Mapping):
        return dict(evaluation)
    path = Path(evaluation)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RRMError(f"evaluation file {str(path)!r} does not exist; write it with `rrm evaluate`") from None
    except (OSError, ValueError) as exc:
        raise RRMError(f"evaluation file {str(path)!r} is not JSON ({_one_line(exc)}); pass the metrics file "
                       "`rrm evaluate` writes") from None
