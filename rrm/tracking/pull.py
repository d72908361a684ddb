"""Teachers out of the registry: the rrm model file of a ``models:/`` or ``runs:/`` URI, checked against the sha256
recorded for it (the version's ``model_sha256`` tag; a run's ``rrm.model_sha256``), so a replaced or damaged artifact
is refused; pulled to a file or loaded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, Run
from mlflow.entities.model_registry import ModelVersion

from rrm.errors import RRMError
from rrm.io import atomic_path, sha256_file
from rrm.models import MODEL_FORMAT, Classifier, load_model
from rrm.tracking.connection import mlflow_errors, store_client
from rrm.tracking.logged_models import RRM_FILE_ARTIFACT
from rrm.tracking.uri import tracking_uri
from rrm.tracking.versions import TEACHER_TAG, resolve_version, run_model, version_model_id

__all__ = ["load_registered_model", "pull_teacher", "pull_teacher_version", "run_file"]


def _download(logged: LoggedModel, relative: str, dst: str) -> Path:
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{logged.artifact_location}/{relative}", dst_path=dst, tracking_uri=tracking_uri()
        )
    )


def _fetch_rrm_file(logged: LoggedModel, dst: str, what: str) -> Path:
    """Download the rrm model file inside a logged model, refusing models that are not rrm models."""
    mlmodel = yaml.safe_load(_download(logged, "MLmodel", dst).read_text()) or {}
    info = mlmodel.get("metadata") or {}
    if info.get("rrm_format") != MODEL_FORMAT or not info.get("rrm_file"):
        raise RRMError(
            f"{what} is not an rrm model (its MLmodel has no {MODEL_FORMAT} file); register models "
            "trained by `rrm train`"
        )
    return _download(logged, info["rrm_file"], dst)


def run_file(client: MlflowClient, uri: str, dst: str) -> tuple[Path, Run]:
    """The rrm model file of run ``runs:/RUN_ID/model`` and the run: inside its logged (pt2) model, or else the
    ``model.pt`` artifact every tracked training keeps. Checked against the sha256 the run recorded for it; a run
    without a logged model must have recorded one."""
    run_id = uri[len("runs:/") :].strip("/").split("/", 1)[0]
    logged = run_model(client, uri, required=False)
    run = client.get_run(logged.source_run_id if logged else run_id)
    recorded = run.data.tags.get("rrm.model_sha256")
    if logged is not None:
        path = _fetch_rrm_file(logged, dst, uri)
    elif recorded and RRM_FILE_ARTIFACT in {a.path for a in client.list_artifacts(run_id)}:
        path = Path(client.download_artifacts(run_id, RRM_FILE_ARTIFACT, dst))
    else:
        raise RRMError(
            f"run {run_id} logged no model (no MLflow model, no {RRM_FILE_ARTIFACT} with its sha256); train with "
            "tracking on (no --no-track), or pass the model file"
        )
    if recorded and sha256_file(path) != recorded:
        raise RRMError(
            f"{uri}: the downloaded model file has sha256 {sha256_file(path)[:12]}, not the "
            f"{recorded[:12]} run {run.info.run_id} recorded: its artifact was replaced or damaged; "
            "use the model.pt that run wrote (or train it again)"
        )
    return path, run


def _teacher_file(client: MlflowClient, uri: str, dst: str) -> tuple[Path, ModelVersion | None]:
    """The rrm model file of a registered teacher (``models:/``) or of a run's model (``runs:/``), checked against
    the sha256 recorded for it."""
    if uri.startswith("runs:/"):
        return run_file(client, uri, dst)[0], None
    if not uri.startswith("models:/"):
        raise RRMError(
            f"{uri!r} is not a registry URI; use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model"
        )
    version = resolve_version(client, uri)
    model_id = version_model_id(version)
    what = f"{uri} (version {version.version} of {version.name!r})"
    if (version.tags or {}).get(TEACHER_TAG) != "true" or not model_id:
        raise RRMError(f"{what} is not an rrm teacher: it was not registered with `rrm teacher register`")
    path = _fetch_rrm_file(client.get_logged_model(model_id), dst, uri)
    recorded, found = (version.tags or {}).get("model_sha256"), sha256_file(path)
    if found != recorded:
        raise RRMError(
            f"{what}: the downloaded model file has sha256 {found[:12]}, not the "
            f"{(recorded or 'none recorded')[:12]} recorded at registration: the registry's artifact was "
            f"replaced or damaged; register the teacher again from its model.pt (`rrm teacher register`) "
            f"and point the alias at the new version (`rrm teacher promote`)"
        )
    return path, version


def load_registered_model(uri: str) -> Classifier:
    """A teacher from the registry (``models:/name@alias``, ``models:/name/3``) or a run (``runs:/id/model``).

    Returns an :class:`rrm.models.Classifier` in eval mode with its feature protocol (``features``, ``head``).
    """
    with mlflow_errors(f"loading {uri}"), tempfile.TemporaryDirectory() as tmp:
        path, _ = _teacher_file(store_client(), uri, tmp)
        model, _ = load_model(path)
    return model.eval()


def pull_teacher(uri: str, out: str | os.PathLike) -> tuple[Path, dict]:
    """Write the teacher at ``uri`` to the model file ``out`` (loadable by :func:`rrm.models.load_model`).

    Returns the path and the model's meta (method, dataset, threat model, training summary).
    """
    out, meta, _ = pull_teacher_version(uri, out)
    return out, meta


def pull_teacher_version(uri: str, out: str | os.PathLike) -> tuple[Path, dict, ModelVersion | None]:
    """:func:`pull_teacher`, with the registry version the file came from (None for a ``runs:/`` URI): what a
    student's run records, resolved once so an alias that moves meanwhile cannot make it name another version."""
    out = Path(out)
    with mlflow_errors(f"pulling {uri}"), tempfile.TemporaryDirectory() as tmp:
        path, version = _teacher_file(store_client(), uri, tmp)
        _, meta = load_model(path)  # refuse to write a file that would not load
        with atomic_path(out) as target:
            target.write_bytes(path.read_bytes())
    return out, meta, version
