"""Registry records: a registered teacher's version (:class:`TeacherVersion`), the version a ``models:/`` URI names,
and the logged model behind a version or a run."""

from __future__ import annotations

import dataclasses
import re

from mlflow import MlflowClient
from mlflow.entities import LoggedModel
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from rrm.errors import RRMError
from rrm.tracking.connection import has_error_code
from rrm.tracking.logged_models import LOGGED_MODEL_NAME

__all__ = ["DEFAULT_TEACHER_NAME", "TEACHER_TAG", "TeacherVersion", "resolve_version", "run_model", "version_model_id"]

DEFAULT_TEACHER_NAME = "rrm-teacher"
TEACHER_TAG = "rrm.teacher"


@dataclasses.dataclass
class TeacherVersion:
    """One registered teacher: a model version, its aliases, tags and model card."""

    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    description: str
    run_id: str | None
    created: int  # ms since the epoch

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @classmethod
    def of(cls, version: ModelVersion) -> TeacherVersion:
        return cls(
            name=version.name,
            version=str(version.version),
            aliases=list(version.aliases or []),
            tags=dict(version.tags or {}),
            description=version.description or "",
            run_id=version.run_id,
            created=int(version.creation_timestamp or 0),
        )


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None)."""
    body = uri[len("models:/") :].strip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        if name and alias and "/" not in alias:
            return name, None, alias
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise RRMError(
        f"{uri!r} names no version; use models:/NAME@ALIAS (e.g. models:/{DEFAULT_TEACHER_NAME}@champion) "
        f"or models:/NAME/VERSION"
    )


def resolve_version(client: MlflowClient, uri: str) -> ModelVersion:
    """The model version ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names now; one line when there is none."""
    name, version, alias = _parse_models_uri(uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:  # stores answer an unknown alias with INVALID_PARAMETER_VALUE
        if not (has_error_code(exc, "RESOURCE_DOES_NOT_EXIST") or has_error_code(exc, "INVALID_PARAMETER_VALUE")):
            raise
    if not client.search_registered_models(f"name = '{name}'"):
        raise RRMError(f"no registered model {name!r}; register a teacher with `rrm teacher register`")
    what = f"alias {alias!r}" if alias is not None else f"version {version}"
    raise RRMError(f"registered model {name!r} has no {what}; see `rrm teacher list --name {name}`")


def version_model_id(version: ModelVersion) -> str | None:
    """The logged model behind a version (MLflow 3 stores it as the source ``models:/m-...``)."""
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)", version.source or "")
    return version.model_id or (match.group(1) if match else None)


def run_model(client: MlflowClient, uri: str, required: bool = True) -> LoggedModel | None:
    """The logged model behind ``runs:/RUN_ID/NAME``; None (unless ``required``) for a run that logged none."""
    parts = uri[len("runs:/") :].strip("/").split("/", 1)
    run_id, name = parts[0], parts[1] if len(parts) > 1 else LOGGED_MODEL_NAME
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if not has_error_code(exc, "RESOURCE_DOES_NOT_EXIST"):
            raise
        raise RRMError(f"no MLflow run {run_id!r}; copy the run id from `mlflow ui`") from None
    for output in run.outputs.model_outputs if run.outputs else []:
        logged = client.get_logged_model(output.model_id)
        if logged.name == name:
            return logged
    if not required:
        return None
    raise RRMError(f"run {run_id} logged no model named {name!r}; train with tracking on (no --no-track)")
