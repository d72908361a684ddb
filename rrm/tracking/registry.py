"""Reusable teachers in MLflow's model registry: register, promote, show, list, pull and load them, and the card.

:func:`register_teacher` makes a model version with a model card (description) and tags, refusing an unevaluated
or non-adversarially-trained model unless forced (who may teach is :func:`rrm.train.may_teach`), and never leaving a
half-made version behind; aliases (``champion``, ``candidate``) replace MLflow's deprecated stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModel
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from rrm.errors import RRMError
from rrm.io import atomic_path, sha256_file
from rrm.models import MODEL_FORMAT, Classifier, load_model
from rrm.tracking.evaluations import _evaluation_of_run, _read_evaluation, _summarize_evaluation, log_evaluation
from rrm.tracking.store import (
    DEFAULT_EXPERIMENT, LOGGED_MODEL_NAME, _client, _context_tags, _experiment_id, _is, _log_model, _mlflow_errors,
    _model_run, _numbers, _one_line, _params, tracking_uri,
)
from rrm.train import may_teach, teacher_methods

DEFAULT_TEACHER_NAME = "rrm-teacher"
TEACHER_TAG = "rrm.teacher"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


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
    def of(cls, version: ModelVersion) -> "TeacherVersion":
        return cls(name=version.name, version=str(version.version), aliases=list(version.aliases or []),
                   tags=dict(version.tags or {}), description=version.description or "", run_id=version.run_id,
                   created=int(version.creation_timestamp or 0))


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None)."""
    body = uri[len("models:/"):].strip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        if name and alias and "/" not in alias:
            return name, None, alias
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise RRMError(f"{uri!r} names no version; use models:/NAME@ALIAS (e.g. models:/{DEFAULT_TEACHER_NAME}@champion) "
                   f"or models:/NAME/VERSION")


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


def _run_model(client: MlflowClient, uri: str) -> LoggedModel:
    """The logged model behind ``runs:/RUN_ID/NAME``."""
    parts = uri[len("runs:/"):].strip("/").split("/", 1)
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
    raise RRMError(f"run {run_id} logged no model named {name!r}; train with tracking on (no --no-track)")


def _download(logged: LoggedModel, relative: str, dst: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{logged.artifact_location}/{relative}",
                                                    dst_path=dst, tracking_uri=tracking_uri()))


def _fetch_rrm_file(logged: LoggedModel, dst: str, what: str) -> Path:
    """Download the rrm model file inside a logged model, refusing models that are not rrm models."""
    mlmodel = yaml.safe_load(_download(logged, "MLmodel", dst).read_text()) or {}
    info = mlmodel.get("metadata") or {}
    if info.get("rrm_format") != MODEL_FORMAT or not info.get("rrm_file"):
        raise RRMError(f"{what} is not an rrm model (its MLmodel has no {MODEL_FORMAT} file); register models "
                       "trained by `rrm train`")
    return _download(logged, info["rrm_file"], dst)


def _teacher_file(client: MlflowClient, uri: str, dst: str) -> tuple[Path, ModelVersion | None]:
    """The rrm model file of a registered teacher (``models:/``) or of a run's model (``runs:/``)."""
    if uri.startswith("runs:/"):
        return _fetch_rrm_file(_run_model(client, uri), dst, uri), None
    if not uri.startswith("models:/"):
        raise RRMError(f"{uri!r} is not a registry URI; use models:/NAME@ALIAS, models:/NAME/VERSION or "
                       "runs:/RUN_ID/model")
    version = _resolve_version(client, uri)
    model_id = _version_model_id(version)
    if (version.tags or {}).get(TEACHER_TAG) != "true" or not model_id:
        raise RRMError(f"{uri} (version {version.version} of {version.name!r}) is not an rrm teacher: it was not "
                       "registered with `rrm teacher register`")
    return _fetch_rrm_file(client.get_logged_model(model_id), dst, uri), version


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
    out = Path(out)
    with _mlflow_errors(f"pulling {uri}"), tempfile.TemporaryDirectory() as tmp:
        path, _ = _teacher_file(_client(), uri, tmp)
        _, meta = load_model(path)  # refuse to write a file that would not load
        with atomic_path(out) as target:
            target.write_bytes(path.read_bytes())
    return out, meta


def _card(meta: dict, spec: dict, feature_dim: int, evaluation: dict | None, run_id: str, sha256: str) -> str:
    summary = meta.get("summary") or {}
    config = meta.get("config") or {}

    def pct(value: object) -> str:
        return f"{100 * float(value):.2f}%" if isinstance(value, (int, float)) else "not evaluated"

    attack = "not evaluated (registered with --force)"
    if evaluation is not None:
        details = [f"worst attack {evaluation['attack']}"]
        details += [f"{evaluation['norm']} eps {evaluation['eps']}"] if evaluation.get("norm") else []
        details += [f"{evaluation['n_examples']} examples"] if evaluation.get("n_examples") else []
        checked = evaluation.get("sanity_passed")
        details.append("sanity checks " + ("not run" if checked is None else "passed" if checked else "FAILED"))
        attack = f"{pct(evaluation['adversarial_accuracy'])} ({', '.join(details)})"
    natural = evaluation["natural_accuracy"] if evaluation else summary.get("test_accuracy")
    rows = [
        ("architecture", f"{spec.get('name')} (width {spec.get('width', 1.0)})"),
        ("feature size", str(feature_dim)),
        ("input", f"{spec.get('in_channels')}x{spec.get('image_size')}x{spec.get('image_size')} in [0, 1], "
                  f"{spec.get('num_classes')} classes"),
        ("threat model (training)", f"{meta.get('norm', '?')}, eps {meta.get('eps', '?')}"),
        ("training method", f"{meta.get('method', '?')}, {summary.get('epochs', config.get('epochs', '?'))} epochs"),
        ("dataset", f"{meta.get('dataset', '?')} (digest {meta.get('dataset_digest', '?')})"),
        ("natural accuracy", pct(natural)),
        ("adversarial accuracy", attack),
        ("source run", run_id),
        ("model file sha256", sha256),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    title = f"{spec.get('name')} trained with {meta.get('method', '?')} on {meta.get('dataset', '?')}"
    return (f"# rrm teacher: {title}\n\n"
            f"| field | value |\n|---|---|\n{table}\n\n"
            f"Load it with `rrm teacher pull` or `rrm train --method rrm --teacher models:/NAME@ALIAS`.\n")


def register_teacher(
    source: str | os.PathLike,
    name: str = DEFAULT_TEACHER_NAME,
    *,
    evaluation: str | os.PathLike | Mapping | None = None,
    force: bool = False,
    experiment: str = DEFAULT_EXPERIMENT,
) -> TeacherVersion:
    """Register an adversarially trained, evaluated model as a new version of ``name``.

    ``source`` is a training run id (or ``runs:/ID/model``) or a model file written by ``rrm train``; a file whose
    training run is in the store (found by content) registers that run's model, otherwise the file is logged in an
    import run first. The evaluation is ``evaluation`` (a metrics JSON from ``rrm evaluate``, or a dict) or the
    newest evaluation run linked to the training run. Without ``force``, a model with no evaluation or not trained
    adversarially (:func:`rrm.train.may_teach`) is refused before anything is written.
    """
    with _mlflow_errors(f"registering {str(source)!r} as {name!r}"), tempfile.TemporaryDirectory() as tmp:
        client = _client()
        path = Path(source)
        run = None
        if path.is_file():
            local = path
            run = _model_run(client, sha256_file(path))
        elif isinstance(source, str) and (_RUN_ID.match(source) or source.startswith("runs:/")):
            uri = source if source.startswith("runs:/") else f"runs:/{source}/{LOGGED_MODEL_NAME}"
            logged = _run_model(client, uri)
            local = _fetch_rrm_file(logged, tmp, uri)
            run = client.get_run(logged.source_run_id)
        else:
            raise RRMError(f"{str(source)!r} is neither a model file nor an MLflow run id; pass the model.pt that "
                           "`rrm train` wrote or the run id shown in `mlflow ui`")
        model, meta = load_model(local)
        sha256 = sha256_file(local)
        method = meta.get("method")
        if not may_teach(method) and not force:
            what = f"trained with {method!r}" if method else "without training metadata (a checkpoint?)"
            raise RRMError(f"{str(source)!r} was {what}; a teacher must be adversarially trained "
                           f"({', '.join(sorted(teacher_methods()))}); pass the model.pt of such a run, or --force")
        metrics = _read_evaluation(evaluation) if evaluation is not None else None
        if metrics is not None:
            found = _summarize_evaluation(metrics)
            if found is None:
                raise RRMError(f"evaluation {str(evaluation)!r} has no natural_accuracy and adversarial_accuracy; "
                               "pass the metrics file `rrm evaluate` writes")
        else:
            found = _evaluation_of_run(client, run.info.run_id) if run is not None else None
        if found is None and not force:
            raise RRMError(f"{str(source)!r} has no evaluation; run `rrm evaluate` on it (and pass --evaluation "
                           "with its metrics file if it was not tracked), or --force to register it unevaluated")
        if found is not None and found["sanity_passed"] is False and not force:
            raise RRMError(f"the evaluation of {str(source)!r} failed its gradient-masking sanity checks, so its "
                           "adversarial accuracy is not trustworthy; see `sanity` in its metrics, or --force")

        if run is None:
            run_id, model_id = _import_run(client, local, meta, experiment)
        else:
            run_id = run.info.run_id
            model_id = _run_model(client, f"runs:/{run_id}/{LOGGED_MODEL_NAME}").model_id
        if metrics is not None:  # keep the evidence next to the training run
            found["evaluation_run"] = log_evaluation(
                metrics, model_path=local, train_run_id=run_id,
                metrics_path=None if isinstance(evaluation, Mapping) else evaluation)

        tags = {
            TEACHER_TAG: "true",
            "architecture": str(model.spec.get("name")),
            "feature_dim": str(model.feature_dim),
            "norm": str(meta.get("norm")),
            "eps": str(meta.get("eps")),
            "method": str(method),
            "dataset": str(meta.get("dataset")),
            "dataset_digest": str(meta.get("dataset_digest")),
            "natural_accuracy": str(found["natural_accuracy"] if found else (meta.get("summary") or {}).get(
                "test_accuracy")),
            "adversarial_accuracy": str(found["adversarial_accuracy"]) if found else "not evaluated",
            "evaluated": str(found is not None).lower(),
            "attack": str(found["attack"]) if found else "none",
            "source_run": run_id,
            "model_sha256": sha256,
        }
        if found and found.get("evaluation_run"):
            tags["evaluation_run"] = str(found["evaluation_run"])
        return _create_version(client, name, model_id, run_id, tags,
                               _card(meta, model.spec, model.feature_dim, found, run_id, sha256))


def _import_run(client: MlflowClient, path: Path, meta: dict, experiment: str) -> tuple[str, str]:
    """Log a model file that no tracked run produced, so the registry can point at it; returns (run id, model id)."""
    experiment_id = _experiment_id(client, experiment)
    tags = {**_context_tags(), "rrm.kind": "import", "rrm.model_sha256": sha256_file(path),
            "rrm.imported_from": str(path.resolve())}
    if meta.get("dataset_digest"):
        tags.update({"rrm.dataset": str(meta.get("dataset")), "rrm.dataset_digest": str(meta["dataset_digest"])})
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"import {path.name}", tags=tags,
                          nested=mlflow.active_run() is not None) as run:
        if meta.get("config"):
            mlflow.log_params(_params(meta["config"]))
        mlflow.log_metrics(_numbers(meta.get("summary") or {}))
        model_id = _log_model(path)
    return run.info.run_id, model_id


def _create_version(client: MlflowClient, name: str, model_id: str, run_id: str, tags: dict,
                    description: str) -> TeacherVersion:
    """Create the version with its tags and card in one call; on any failure delete whatever was made."""
    token = uuid.uuid4().hex
    created_model = False
    try:
        try:
            client.create_registered_model(name, description="Adversarially trained teachers registered by rrm.")
            created_model = True
        except MlflowException as exc:
            if not _is(exc, "RESOURCE_ALREADY_EXISTS"):
                raise
        version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id,
                                              tags={**tags, "rrm.registration": token}, description=description,
                                              model_id=model_id)
        return TeacherVersion.of(client.get_model_version(name, version.version))
    except BaseException:
        with contextlib.suppress(Exception):
            for half in client.search_model_versions(f"name = '{name}'"):
                if (half.tags or {}).get("rrm.registration") == token:
                    client.delete_model_version(name, half.version)
            if created_model and not client.search_model_versions(f"name = '{name}'"):
                client.delete_registered_model(name)
        raise


def promote(name: str, version: str | int, alias: str) -> TeacherVersion:
    """Point ``alias`` (``champion``, ``candidate``, ...) of registered model ``name`` at ``version``."""
    if not str(version).isdigit():
        raise RRMError(f"version must be a number such as 3, got {version!r}; see `rrm teacher list --name {name}`")
    with _mlflow_errors(f"setting alias {alias!r} on {name!r}"):
        client = _client()
        current = _resolve_version(client, f"models:/{name}/{version}")
        if (current.tags or {}).get(TEACHER_TAG) != "true":
            raise RRMError(f"version {version} of {name!r} is not an rrm teacher; register one with "
                           "`rrm teacher register`")
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
    """Registered teachers (all, or the versions of ``name``), newest first."""
    with _mlflow_errors("listing teachers"):
        client = _client()
        found = client.search_model_versions(f"name = '{name}'" if name else f"tags.`{TEACHER_TAG}` = 'true'")
        teachers = [TeacherVersion.of(v) for v in found if (v.tags or {}).get(TEACHER_TAG) == "true"]
        # Searches do not return aliases; the registered model holds them.
        aliases = {n: client.get_registered_model(n).aliases for n in {t.name for t in teachers}}
    for teacher in teachers:
        teacher.aliases = sorted(a for a, v in aliases[teacher.name].items() if str(v) == teacher.version)
    return sorted(teachers, key=lambda t: (t.name, -int(t.version)))
