"""Reusable teachers in MLflow's model registry: register, promote, show, list, pull and load them, and the card.

:func:`register_teacher` makes a model version with a model card (description) and tags. Unless forced, it refuses a
model that was not adversarially trained (who may teach is :func:`rrm.train.may_teach`) or whose evaluation does not
back the card: none, one of another model file, architecture or dataset, one for another threat model than the
model was trained for, or one whose gradient-masking checks failed or did not run. A forced registration says on
the card and in the ``forced`` tag what it overrode. A registration never leaves a half-made version behind, and
after one killed at any point the next ``register`` or ``list`` leaves no empty registered model nor RUNNING run.

A pulled or loaded teacher is checked against the sha256 recorded when it was registered (the version's
``model_sha256`` tag; a run's ``rrm.model_sha256``): a replaced or damaged artifact is refused. Aliases
(``champion``, ``candidate``) replace MLflow's deprecated stages; ``register_teacher(alias=...)`` points one at the
new version in the same step, so a pipeline never leaves a version without the alias it was registered for.

Registering marks the source training run as a teacher's (tag ``rrm.role``, its name prefixed with "teacher"), and
logs its MLflow (pt2) model there if the run has none: training runs keep only rrm's model file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from rrm.errors import RRMError
from rrm.evaluation import EvalResult
from rrm.io import atomic_path, sha256_file
from rrm.models import MODEL_FORMAT, Classifier, load_model
from rrm.tracking.card import _card, _refusals
from rrm.tracking.cleanup import (  # noqa: F401  (the creation tag and description are part of the registry's API)
    _ABANDONED_AFTER_S,
    _CREATING_TAG,
    _DESCRIPTION,
    _registered_models,
    _remove_abandoned_models,
)
from rrm.tracking.evaluations import _evaluation_of_run, log_evaluation
from rrm.tracking.store import (
    DEFAULT_EXPERIMENT,
    LOGGED_MODEL_NAME,
    RRM_FILE_ARTIFACT,
    _client,
    _context_tags,
    _experiment_id,
    _is,
    _log_model,
    _mlflow_errors,
    _model_run,
    _numbers,
    _one_line,
    _params,
    _process_tags,
    check_store,
    tracking_uri,
)

DEFAULT_TEACHER_NAME = "rrm-teacher"
TEACHER_TAG = "rrm.teacher"
TEACHER_RUN_PREFIX = "teacher · "  # a registered teacher's training run, named so beside its students
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# MLflow's rule for aliases, checked before anything is written: letters, digits, "_" and "-"; not "latest" nor "v3".
_ALIAS = re.compile(r"^[\w\-]{1,255}$")
_RESERVED_ALIAS = re.compile(r"^(latest|[vV]\d+)$", re.IGNORECASE)


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


def _resolve_version(client: MlflowClient, uri: str) -> ModelVersion:
    name, version, alias = _parse_models_uri(uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:  # stores answer an unknown alias with INVALID_PARAMETER_VALUE
        if not (_is(exc, "RESOURCE_DOES_NOT_EXIST") or _is(exc, "INVALID_PARAMETER_VALUE")):
            raise
    if not client.search_registered_models(f"name = '{name}'"):
        raise RRMError(f"no registered model {name!r}; register a teacher with `rrm teacher register`")
    what = f"alias {alias!r}" if alias is not None else f"version {version}"
    raise RRMError(f"registered model {name!r} has no {what}; see `rrm teacher list --name {name}`")


def _version_model_id(version: ModelVersion) -> str | None:
    """The logged model behind a version (MLflow 3 stores it as the source ``models:/m-...``)."""
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)", version.source or "")
    return version.model_id or (match.group(1) if match else None)


def check_alias(alias: str) -> str:
    """``alias`` if MLflow accepts it as an alias, else a one-line error naming the rule."""
    if not _ALIAS.match(alias) or _RESERVED_ALIAS.match(alias):
        raise RRMError(
            f"invalid alias {alias!r}: use letters, digits, '_' and '-' (not 'latest' nor 'v' and a number), "
            "e.g. champion"
        )
    return alias


def _run_model(client: MlflowClient, uri: str, required: bool = True) -> LoggedModel | None:
    """The logged model behind ``runs:/RUN_ID/NAME``; None (unless ``required``) for a run that logged none."""
    parts = uri[len("runs:/") :].strip("/").split("/", 1)
    run_id, name = parts[0], parts[1] if len(parts) > 1 else LOGGED_MODEL_NAME
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if not _is(exc, "RESOURCE_DOES_NOT_EXIST"):
            raise
        raise RRMError(f"no MLflow run {run_id!r}; copy the run id from `mlflow ui`") from None
    for output in run.outputs.model_outputs if run.outputs else []:
        logged = client.get_logged_model(output.model_id)
        if logged.name == name:
            return logged
    if not required:
        return None
    raise RRMError(f"run {run_id} logged no model named {name!r}; train with tracking on (no --no-track)")


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


def _run_file(client: MlflowClient, uri: str, dst: str) -> tuple[Path, Run]:
    """The rrm model file of run ``runs:/RUN_ID/model`` and the run: inside its logged (pt2) model, or else the
    ``model.pt`` artifact every tracked training keeps. Checked against the sha256 the run recorded for it; a run
    without a logged model must have recorded one."""
    run_id = uri[len("runs:/") :].strip("/").split("/", 1)[0]
    logged = _run_model(client, uri, required=False)
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
        return _run_file(client, uri, dst)[0], None
    if not uri.startswith("models:/"):
        raise RRMError(
            f"{uri!r} is not a registry URI; use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model"
        )
    version = _resolve_version(client, uri)
    model_id = _version_model_id(version)
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
    with _mlflow_errors(f"loading {uri}"), tempfile.TemporaryDirectory() as tmp:
        path, _ = _teacher_file(_client(), uri, tmp)
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
    with _mlflow_errors(f"pulling {uri}"), tempfile.TemporaryDirectory() as tmp:
        path, version = _teacher_file(_client(), uri, tmp)
        _, meta = load_model(path)  # refuse to write a file that would not load
        with atomic_path(out) as target:
            target.write_bytes(path.read_bytes())
    return out, meta, version


def register_teacher(
    source: str | os.PathLike,
    name: str = DEFAULT_TEACHER_NAME,
    *,
    evaluation: str | os.PathLike | Mapping | EvalResult | None = None,
    force: bool = False,
    experiment: str = DEFAULT_EXPERIMENT,
    alias: str | None = None,
) -> TeacherVersion:
    """Register an adversarially trained, evaluated model as a new version of ``name``; ``alias`` then points at it.

    ``source`` is a training run id (or ``runs:/ID/model``) or a model file written by ``rrm train``; a file whose
    training run is in the store (found by content) registers that run's model, otherwise the file is logged in an
    import run first. The evaluation is ``evaluation`` (a metrics JSON from ``rrm evaluate``, a dict or an
    :class:`~rrm.results.EvalResult`) or the newest evaluation run linked to the training run.

    Without ``force``, a model is refused before anything is written when it was not trained adversarially
    (:func:`rrm.train.may_teach`) or its evaluation does not back the card: missing; not of this model file, its
    architecture and its training data's test split; of another norm or eps than it was trained for; or with
    gradient-masking checks that failed or did not run. With ``force`` every such reason is written to the card and
    the ``forced`` tag. What a killed registration left is cleaned first: its RUNNING runs are marked FAILED
    (:func:`rrm.tracking.store.check_store`) and its empty registered model is removed. An evaluation that is
    already logged (by ``rrm evaluate``) is linked, not logged a second time.
    """
    action = f"registering {str(source)!r} as {name!r}"
    if alias is not None:
        check_alias(alias)
    with _mlflow_errors(action), tempfile.TemporaryDirectory() as tmp:
        client = check_store(action)
        _remove_abandoned_models(client)
        path = Path(source)
        run = None
        if path.is_file():
            local = path
            run = _model_run(client, sha256_file(path))
        elif isinstance(source, str) and (_RUN_ID.match(source) or source.startswith("runs:/")):
            uri = source if source.startswith("runs:/") else f"runs:/{source}/{LOGGED_MODEL_NAME}"
            local, run = _run_file(client, uri, tmp)
        else:
            raise RRMError(
                f"{str(source)!r} is neither a model file nor an MLflow run id; pass the model.pt that "
                "`rrm train` wrote or the run id shown in `mlflow ui`"
            )
        model, meta = load_model(local)
        sha256 = sha256_file(local)
        evaluation_run = None
        if isinstance(evaluation, EvalResult):
            result = evaluation
        elif isinstance(evaluation, Mapping):
            result = EvalResult.from_json(evaluation, source="the evaluation")
        elif evaluation is not None:
            result = EvalResult.read(evaluation)
        elif run is not None:
            result, evaluation_run = _evaluation_of_run(client, run.info.run_id)
        else:
            result = None
        problems = _refusals(meta, model.spec, sha256, result)
        if problems and not force:
            raise RRMError(
                f"refusing to register {str(source)!r} as a teacher: {'; '.join(problems)}. Fix that, or "
                "pass --force to register it anyway (the card then says what was overridden)"
            )
        evaluated = result is not None and result.worst_attack is not None

        if run is None:
            run_id, model_id = _import_run(client, local, meta, experiment)
        else:
            run_id = run.info.run_id
            logged = _run_model(client, f"runs:/{run_id}/{LOGGED_MODEL_NAME}", required=False)
            model_id = logged.model_id if logged else _log_model(local, run_id=run_id)
        # Keep the evidence next to the training run; an evaluation of another file is no evidence about this one.
        if evaluation is not None and evaluated and result.model_sha256 in (None, sha256):
            evaluation_run = log_evaluation(
                result,
                model_path=local,
                train_run_id=run_id,
                metrics_path=None if isinstance(evaluation, (Mapping, EvalResult)) else evaluation,
            )

        tags = {
            TEACHER_TAG: "true",
            "architecture": str(model.spec.get("name")),
            "feature_dim": str(model.feature_dim),
            "norm": str(meta.get("norm")),
            "eps": str(meta.get("eps")),
            "method": str(meta.get("method")),
            "dataset": str(meta.get("dataset")),
            "dataset_digest": str(meta.get("dataset_digest")),
            "natural_accuracy": str(
                result.natural_accuracy if evaluated else (meta.get("summary") or {}).get("test_accuracy")
            ),
            "adversarial_accuracy": str(result.worst_accuracy) if evaluated else "not evaluated",
            "evaluated": str(evaluated).lower(),
            "attack": str(result.worst_attack) if evaluated else "none",
            "source_run": run_id,
            "model_sha256": sha256,
        }
        if evaluated and evaluation_run:
            tags["evaluation_run"] = evaluation_run
        if problems:
            tags["forced"] = _one_line("; ".join(problems), 4000)
        card = _card(meta, model.spec, model.feature_dim, result if evaluated else None, run_id, sha256, problems)
        return _create_version(client, name, model_id, run_id, tags, card, alias)


def _import_run(client: MlflowClient, path: Path, meta: dict, experiment: str) -> tuple[str, str]:
    """Log a model file that no tracked run produced, so the registry can point at it; returns (run id, model id)."""
    experiment_id = _experiment_id(client, experiment)
    tags = {
        **_context_tags(),
        "rrm.kind": "import",
        "rrm.model_sha256": sha256_file(path),
        "rrm.imported_from": str(path.resolve()),
    }
    if meta.get("dataset_digest"):
        tags.update({"rrm.dataset": str(meta.get("dataset")), "rrm.dataset_digest": str(meta["dataset_digest"])})
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"import {path.name}", tags=tags, nested=mlflow.active_run() is not None
    ) as run:
        if meta.get("config"):
            mlflow.log_params(_params(meta["config"]))
        mlflow.log_metrics(_numbers(meta.get("summary") or {}))
        model_id = _log_model(path)
    return run.info.run_id, model_id


def _create_version(
    client: MlflowClient, name: str, model_id: str, run_id: str, tags: dict, description: str, alias: str | None = None
) -> TeacherVersion:
    """Create the version with its tags and card in one call, and the registered model with its first version; point
    ``alias`` at it and mark the source run as a teacher's.

    On any failure whatever was made is deleted. A process killed in between cannot delete: the registered model it
    created carries ``rrm.creating`` (its process) until its first version exists, and the next register or list
    removes it (:func:`_remove_abandoned_models`).
    """
    token = uuid.uuid4().hex
    created_model = False
    try:
        try:
            client.create_registered_model(
                name, tags={_CREATING_TAG: json.dumps(_process_tags())}, description=_DESCRIPTION
            )
            created_model = True
        except MlflowException as exc:
            if not _is(exc, "RESOURCE_ALREADY_EXISTS"):
                raise
        version = client.create_model_version(
            name,
            source=f"models:/{model_id}",
            run_id=run_id,
            tags={**tags, "rrm.registration": token},
            description=description,
            model_id=model_id,
        )
        if created_model:  # the model has a version now; a cleanup may have dropped the tag already
            with contextlib.suppress(MlflowException):
                client.delete_registered_model_tag(name, _CREATING_TAG)
        if alias is not None:
            client.set_registered_model_alias(name, alias, str(version.version))
        _mark_teacher_run(client, run_id, f"models:/{name}/{version.version}")
        return TeacherVersion.of(client.get_model_version(name, version.version))
    except BaseException:
        with contextlib.suppress(Exception):
            for half in client.search_model_versions(f"name = '{name}'"):
                if (half.tags or {}).get("rrm.registration") == token:
                    client.delete_model_version(name, half.version)
            if created_model and not client.search_model_versions(f"name = '{name}'"):
                client.delete_registered_model(name)
        raise


def _mark_teacher_run(client: MlflowClient, run_id: str, uri: str) -> None:
    """Tag the source run as a registered teacher's and name it so, beside students of the same method."""
    run = client.get_run(run_id)
    client.set_tag(run_id, "rrm.role", "teacher")
    client.set_tag(run_id, "rrm.registered_as", uri)
    current = run.info.run_name or ""
    if not current.startswith(TEACHER_RUN_PREFIX):
        client.update_run(run_id, name=f"{TEACHER_RUN_PREFIX}{current}")


def promote(name: str, version: str | int, alias: str) -> TeacherVersion:
    """Point ``alias`` (``champion``, ``candidate``, ...) of registered model ``name`` at ``version``."""
    if not str(version).isdigit():
        raise RRMError(f"version must be a number such as 3, got {version!r}; see `rrm teacher list --name {name}`")
    check_alias(alias)
    with _mlflow_errors(f"setting alias {alias!r} on {name!r}"):
        client = _client()
        current = _resolve_version(client, f"models:/{name}/{version}")
        if (current.tags or {}).get(TEACHER_TAG) != "true":
            raise RRMError(
                f"version {version} of {name!r} is not an rrm teacher; register one with `rrm teacher register`"
            )
        try:
            client.set_registered_model_alias(name, alias, str(version))
        except MlflowException as exc:
            if not _is(exc, "INVALID_PARAMETER_VALUE"):
                raise
            raise RRMError(f"invalid alias {alias!r}: {_one_line(exc.message)}; use a name such as champion") from None
        return TeacherVersion.of(client.get_model_version(name, str(version)))


def show_teacher(uri: str) -> TeacherVersion:
    """The registered version behind ``models:/name@alias`` or ``models:/name/version``."""
    with _mlflow_errors(f"looking up {uri}"):
        if not uri.startswith("models:/"):
            raise RRMError(f"{uri!r} is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION")
        return TeacherVersion.of(_resolve_version(_client(), uri))


def list_teachers(name: str | None = None) -> list[TeacherVersion]:
    """Registered teachers (all, or the versions of ``name``), newest first. What a killed registration left is
    cleaned first, as in :func:`register_teacher`."""
    with _mlflow_errors("listing teachers"):
        client = check_store("listing teachers")
        _remove_abandoned_models(client)
        found = client.search_model_versions(f"name = '{name}'" if name else f"tags.`{TEACHER_TAG}` = 'true'")
        teachers = [TeacherVersion.of(v) for v in found if (v.tags or {}).get(TEACHER_TAG) == "true"]
        # Searches do not return aliases; the registered model holds them.
        aliases = {n: client.get_registered_model(n).aliases for n in {t.name for t in teachers}}
    for teacher in teachers:
        teacher.aliases = sorted(a for a, v in aliases[teacher.name].items() if str(v) == teacher.version)
    return sorted(teachers, key=lambda t: (t.name, -int(t.version)))
