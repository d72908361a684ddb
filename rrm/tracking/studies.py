"""Tuning studies in MLflow: one parent run per study that its trial runs nest under, updated as trials end;
and a report's files as artifacts."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, Run

from rrm.secrets import mask_url
from rrm.tracking.connection import mlflow_errors, one_line, store_client
from rrm.tracking.flatten import numbers
from rrm.tracking.runs import DEFAULT_EXPERIMENT, context_tags, ensure_experiment
from rrm.tracking.stale import PROCESS_TAGS, check_store

__all__ = ["log_report", "open_study_run", "update_run"]


def open_study_run(
    study: str, storage: str, *, params: Mapping[str, object], experiment: str = DEFAULT_EXPERIMENT
) -> tuple[str, str]:
    """The parent run of tuning study ``study`` in ``storage`` (its password masked here too), set RUNNING: its id and
    the name of its experiment, where the trial runs belong (``mlflow ui`` nests runs within one experiment).

    A study keeps one parent run across restarts and workers: found by a tag, created when missing. Workers that
    start together may each create one; each then keeps the oldest and deletes its own if that is not it, so all
    trials end up under one parent. ``params`` are logged when the run is created. Under ``mlflow run`` the
    project's run is the parent, and ``MLFLOW_RUN_ID`` is removed so that trial runs do not resume it.
    """
    storage = mask_url(storage)
    key = hashlib.sha256(f"{storage}\n{study}".encode()).hexdigest()[:32]
    # Workers on many hosts share the parent run: no process of its own that the stale-run clean-up could check.
    tags = {
        **{k: v for k, v in context_tags().items() if k not in PROCESS_TAGS},
        "rrm.kind": "study",
        "rrm.study": study,
        "rrm.study_storage": storage,
        "rrm.study_key": key,
    }
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)
    with mlflow_errors("opening the study's MLflow run"):
        client = check_store("opening the study's MLflow run")
        if project_run:
            client.log_batch(project_run, params=[Param(k, one_line(v, 6000)) for k, v in params.items()])
            for name, value in tags.items():
                client.set_tag(project_run, name, value)
            return project_run, client.get_experiment(client.get_run(project_run).info.experiment_id).name
        experiment_id = ensure_experiment(client, experiment)

        def existing() -> list[Run]:
            runs = client.search_runs([experiment_id], f"tags.`rrm.study_key` = '{key}'", max_results=100)
            return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

        runs = existing()
        if not runs:
            mine = client.create_run(experiment_id, run_name=f"study {study}", tags=tags).info.run_id
            client.log_batch(mine, params=[Param(k, one_line(v, 6000)) for k, v in params.items()])
            runs = existing()
            if runs[0].info.run_id != mine:
                client.delete_run(mine)
        run_id = runs[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    return run_id, experiment


def update_run(
    run_id: str,
    *,
    tags: Mapping[str, object] | None = None,
    params: Mapping[str, object] | None = None,
    metrics: Mapping[str, float] | None = None,
    artifacts: tuple[Path, ...] | list[Path] = (),
    status: str | None = None,
) -> None:
    """Add tags, params (new keys), metrics and artifact files to a finished or running run; ``status`` (FINISHED,
    FAILED, KILLED) ends it. Used for a study's parent run and for the final state of its trial runs."""
    with mlflow_errors("updating an MLflow run"):
        client = store_client()
        now = int(time.time() * 1000)
        logged = client.get_run(run_id).data.params if params else {}
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
            # a param is written once: a second worker ending the same study leaves the first one's values
            params=[Param(k, one_line(v, 6000)) for k, v in (params or {}).items() if k not in logged],
        )
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, one_line(value, 5000))
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        if status is not None:
            client.set_terminated(run_id, status)


def log_report(files: list[Path], experiment: str = DEFAULT_EXPERIMENT, metrics: Mapping | None = None) -> None:
    """Log report files as artifacts, and the numbers of its headline (``student/adversarial_pct``, ...) as metrics;
    under `mlflow run` into the project's run, otherwise into a new "report" run."""
    inside_project_run = bool(os.environ.get("MLFLOW_RUN_ID"))
    with mlflow_errors("log the report"):
        if not inside_project_run:
            mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=None if inside_project_run else "report"):
            if metrics:
                mlflow.log_metrics(numbers(metrics))
            for path in files:
                mlflow.log_artifact(str(path))
