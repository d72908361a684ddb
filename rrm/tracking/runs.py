"""What every rrm run carries and how it ends: its experiment (created as a model-training experiment), the tags that
say where it came from, and its end as FINISHED, FAILED or KILLED.

Experiments rrm creates are tagged as model-training experiments (``mlflow.experimentKind``), so MLflow 3's UI opens
them in its training view rather than its GenAI view.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import warnings
from importlib import metadata

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import rrm
from rrm.errors import RRMError
from rrm.tracking.connection import has_error_code, one_line
from rrm.tracking.stale import process_tags
from rrm.tracking.views import view_tag

__all__ = ["DEFAULT_EXPERIMENT", "EXPERIMENT_KIND", "context_tags", "end_active_run", "ensure_experiment", "run_status"]

DEFAULT_EXPERIMENT = "rrm"
# The experiment tag MLflow 3's UI reads to pick its view; without it an experiment opens in the GenAI view.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
_VERSIONED_PACKAGES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "art": "adversarial-robustness-toolbox",
    "mlflow": "mlflow",
}


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created as a model-training experiment with rrm's saved view
    (:mod:`rrm.tracking.views`) if it does not exist. An existing one without a kind or the view (made before rrm set
    them) gets them too; a kind someone chose, or their edits to the view, are left as they are."""
    key, kind = EXPERIMENT_KIND
    view_key, view = view_tag()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={key: kind, view_key: view})
        except MlflowException as exc:  # another process created it first
            if not has_error_code(exc, "RESOURCE_ALREADY_EXISTS"):
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise RRMError(
            f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) or "
            "choose another --experiment"
        )
    for tag, value in ((key, kind), (view_key, view)):
        if tag not in (experiment.tags or {}):
            client.set_experiment_tag(experiment.experiment_id, tag, value)
    return experiment.experiment_id


def _versions() -> dict[str, str]:
    found = {"rrm": rrm.__version__}
    for key, dist in _VERSIONED_PACKAGES.items():
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[key] = metadata.version(dist)
    return found


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def context_tags() -> dict[str, str]:
    """Where a run came from: package versions, the project's git commit, the DVC stage that ran it, the process
    that owns it (:func:`rrm.tracking.stale.process_tags`)."""
    tags = {f"rrm.version.{key}": value for key, value in _versions().items()}
    # The project is the working directory (where dvc.yaml and params.yaml live), not rrm's install location.
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["rrm.git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    if os.environ.get("DVC_STAGE"):
        tags["dvc.stage"] = os.environ["DVC_STAGE"]
    return {**tags, **process_tags()}


def run_status(exc_type: type[BaseException] | None) -> str:
    """The status a run ends with: FINISHED, KILLED (Ctrl-C) or FAILED (any other exception)."""
    if exc_type is None:
        return "FINISHED"
    return "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"


def end_active_run(exc: BaseException | None) -> None:
    """End the active fluent run as FINISHED, FAILED (an exception) or KILLED (Ctrl-C)."""
    if exc is None:
        mlflow.end_run("FINISHED")
        return
    # Already failing: a store that fails too must not hide the original error.
    with contextlib.suppress(Exception):
        mlflow.set_tag("rrm.error", one_line(f"{type(exc).__name__}: {exc}"))
    try:
        mlflow.end_run(run_status(type(exc)))  # pops the run from the active stack before writing its status
    except Exception as end_exc:
        warnings.warn(f"could not mark MLflow run as {run_status(type(exc))}: {one_line(end_exc)}", stacklevel=2)
