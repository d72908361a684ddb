"""Reusable teachers in MLflow's model registry: register, promote, show and list them.

:func:`register_teacher` makes a model version with a model card (description) and tags. Unless forced, it refuses a
model that was not adversarially trained (who may teach is :func:`rrm.train.may_teach`) or whose evaluation does not
back the card: none, one of another model file, architecture or dataset, one for another threat model than the
model was trained for, or one whose gradient-masking checks failed or did not run. A forced registration says on
the card and in the ``forced`` tag what it overrode. A registration never leaves a half-made version behind, and
after one killed at any point the next ``register`` or ``list`` leaves no empty registered model nor RUNNING run.

Aliases (``champion``, ``candidate``) replace MLflow's deprecated stages; ``register_teacher(alias=...)`` points one
at the new version in the same step, so a pipeline never leaves a version without the alias it was registered for.
Pulling and loading a teacher: :mod:`rrm.tracking.pull`.

Registering marks the source training run as a teacher's (tag ``rrm.role``, its name prefixed with "teacher"), and
the version points at the run's logged model, to which it adds the MLflow (pt2) export that serving needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from rrm.errors import RRMError
from rrm.evaluation import EvalResult
from rrm.io import sha256_file
from rrm.models import Classifier, load_model
from rrm.tracking.aliases import check_alias
from rrm.tracking.card import MIN_EXAMPLES, model_card, refusals
from rrm.tracking.cleanup import CREATING_TAG, REGISTRY_DESCRIPTION, remove_abandoned_models
from rrm.tracking.connection import has_error_code, mlflow_errors, one_line, store_client
from rrm.tracking.evaluations import evaluation_of_run, log_evaluation
from rrm.tracking.flatten import as_params, numbers
from rrm.tracking.logged_models import LOGGED_MODEL_NAME, add_pt2, has_pt2, log_model, model_run
from rrm.tracking.pull import run_file
from rrm.tracking.runs import DEFAULT_EXPERIMENT, context_tags, ensure_experiment
from rrm.tracking.stale import check_store, process_tags
from rrm.tracking.versions import DEFAULT_TEACHER_NAME, TEACHER_TAG, TeacherVersion, resolve_version, run_model

__all__ = ["TEACHER_RUN_PREFIX", "list_teachers", "promote", "register_teacher", "show_teacher"]

TEACHER_RUN_PREFIX = "teacher · "  # a registered teacher's training run, named so beside its students
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
EvaluationInput = str | os.PathLike | Mapping | EvalResult | None


def register_teacher(
    source: str | os.PathLike,
    name: str = DEFAULT_TEACHER_NAME,
    *,
    evaluation: EvaluationInput = None,
    force: bool = False,
    experiment: str = DEFAULT_EXPERIMENT,
    alias: str | None = None,
    min_examples: int = MIN_EXAMPLES,
) -> TeacherVersion:
    """Register an adversarially trained, evaluated model as a new version of ``name``; ``alias`` then points at it.

    ``source`` is a training run id (or ``runs:/ID/model``) or a model file written by ``rrm train``; a file whose
    training run is in the store (found by content) registers that run's model, otherwise the file is logged in an
    import run first. The evaluation is ``evaluation`` (a metrics JSON from ``rrm evaluate``, a dict or an
    :class:`~rrm.evaluation.EvalResult`) or the newest evaluation run linked to the training run.

    Without ``force``, a model is refused before anything is written when it was not trained adversarially
    (:func:`rrm.train.may_teach`) or its evaluation does not back the card: missing; not of this model file, its
    architecture and its training data's test split; of another norm or eps than it was trained for; with
    gradient-masking checks that failed or did not run; or whose headline accuracy is on fewer than ``min_examples``
    test images. With ``force`` every such reason is written to the card and
    the ``forced`` tag. What a killed registration left is cleaned first: its RUNNING runs are marked FAILED
    (:func:`rrm.tracking.stale.check_store`) and its empty registered model is removed. An evaluation that is
    already logged (by ``rrm evaluate``) is linked, not logged a second time.
    """
    action = f"registering {str(source)!r} as {name!r}"
    if alias is not None:
        check_alias(alias)
    with mlflow_errors(action), tempfile.TemporaryDirectory() as tmp:
        client = check_store(action)
        remove_abandoned_models(client)
        local, run = _source_file(client, source, tmp)
        model, meta = load_model(local)
        sha256 = sha256_file(local)
        result, evaluation_run = _evaluation(client, evaluation, run)
        problems = refusals(meta, model.spec, sha256, result, min_examples)
        if problems and not force:
            raise RRMError(
                f"refusing to register {str(source)!r} as a teacher: {'; '.join(problems)}. Fix that, or "
                "pass --force to register it anyway (the card then says what was overridden)"
            )
        evaluated = result if result is not None and result.headline_attack is not None else None
        run_id, model_id = _logged_model(client, local, meta, run, experiment)
        # Keep the evidence next to the training run; an evaluation of another file is no evidence about this one.
        if evaluation is not None and evaluated is not None and evaluated.model_sha256 in (None, sha256):
            evaluation_run = log_evaluation(
                evaluated,
                model_path=local,
                train_run_id=run_id,
                metrics_path=None if isinstance(evaluation, (Mapping, EvalResult)) else evaluation,
            )
        tags = _version_tags(model, meta, evaluated, run_id, sha256, evaluation_run, problems)
        card = model_card(meta, model.spec, model.feature_dim, evaluated, run_id, sha256, problems)
        return _create_version(client, name, model_id, run_id, tags, card, alias)


def _source_file(client: MlflowClient, source: str | os.PathLike, tmp: str) -> tuple[Path, Run | None]:
    """The model file to register and the training run that produced it (None for a file no tracked run made)."""
    path = Path(source)
    if path.is_file():
        return path, model_run(client, sha256_file(path))
    if isinstance(source, str) and (_RUN_ID.match(source) or source.startswith("runs:/")):
        uri = source if source.startswith("runs:/") else f"runs:/{source}/{LOGGED_MODEL_NAME}"
        return run_file(client, uri, tmp)
    raise RRMError(
        f"{str(source)!r} is neither a model file nor an MLflow run id; pass the model.pt that "
        "`rrm train` wrote or the run id shown in `mlflow ui`"
    )


def _evaluation(
    client: MlflowClient, evaluation: EvaluationInput, run: Run | None
) -> tuple[EvalResult | None, str | None]:
    """The evaluation that backs the card (given, or the newest linked to the training run) and its run, if logged."""
    if isinstance(evaluation, EvalResult):
        return evaluation, None
    if isinstance(evaluation, Mapping):
        return EvalResult.from_json(evaluation, source="the evaluation"), None
    if evaluation is not None:
        return EvalResult.read(evaluation), None
    if run is not None:
        return evaluation_of_run(client, run.info.run_id)
    return None, None


def _logged_model(client: MlflowClient, local: Path, meta: dict, run: Run | None, experiment: str) -> tuple[str, str]:
    """The run and logged model the version points at: the training run's, with its pt2 export added (logged whole
    for a run from before training runs logged their model), or an import run's for a file no tracked run produced."""
    if run is None:
        return _import_run(client, local, meta, experiment)
    run_id = run.info.run_id
    logged = run_model(client, f"runs:/{run_id}/{LOGGED_MODEL_NAME}", required=False)
    if logged is None:  # a run from before training runs logged their model
        return run_id, log_model(local, run_id=run_id)
    if not has_pt2(client, logged):
        add_pt2(client, logged, local)
    return run_id, logged.model_id


def _version_tags(
    model: Classifier,
    meta: dict,
    evaluated: EvalResult | None,
    run_id: str,
    sha256: str,
    evaluation_run: str | None,
    problems: list[str],
) -> dict[str, str]:
    """The version's tags: what the model is, what its evaluation (an attack ran) measured, what was forced."""
    tags = {
        TEACHER_TAG: "true",
        "architecture": str(model.spec.get("name")),
        "feature_dim": str(model.feature_dim),
        "norm": str(meta.get("norm")),
        "eps": str(meta.get("eps")),
        "method": str(meta.get("method")),
        "dataset": str(meta.get("dataset")),
        "dataset_digest": str(meta.get("dataset_digest")),
        "natural_accuracy": _rounded(
            evaluated.natural_accuracy if evaluated is not None else (meta.get("summary") or {}).get("test_accuracy")
        ),
        "adversarial_accuracy": _rounded(evaluated.headline_accuracy) if evaluated is not None else "not evaluated",
        "evaluated": str(evaluated is not None).lower(),
        "attack": str(evaluated.headline_attack) if evaluated is not None else "none",
        "source_run": run_id,
        "model_sha256": sha256,
    }
    if evaluated is not None:  # every accuracy beside its attack and image count
        tags["examples"] = str(evaluated.examples(evaluated.headline_attack))
        for attack, accuracy in evaluated.adversarial_accuracy.items():
            tags[f"accuracy/{attack}"] = f"{accuracy:.4f} on {evaluated.examples(attack)} test images"
    if evaluated is not None and evaluation_run:
        tags["evaluation_run"] = evaluation_run
    if problems:
        tags["forced"] = one_line("; ".join(problems), 4000)
    return tags


def _rounded(accuracy: float | None) -> str:
    """An accuracy as a tag: four decimals (a hundredth of a percent), as the per-attack tags."""
    return "None" if accuracy is None else f"{accuracy:.4f}"


def _import_run(client: MlflowClient, path: Path, meta: dict, experiment: str) -> tuple[str, str]:
    """Log a model file that no tracked run produced, so the registry can point at it; returns (run id, model id)."""
    experiment_id = ensure_experiment(client, experiment)
    tags = {
        **context_tags(),
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
            mlflow.log_params(as_params(meta["config"]))
        mlflow.log_metrics(numbers(meta.get("summary") or {}))
        model_id = log_model(path)
    return run.info.run_id, model_id


def _create_version(
    client: MlflowClient, name: str, model_id: str, run_id: str, tags: dict, description: str, alias: str | None = None
) -> TeacherVersion:
    """Create the version with its tags and card in one call, and the registered model with its first version; point
    ``alias`` at it and mark the source run as a teacher's.

    On any failure whatever was made is deleted. A process killed in between cannot delete: the registered model it
    created carries ``rrm.creating`` (its process) until its first version exists, and the next register or list
    removes it (:func:`rrm.tracking.cleanup.remove_abandoned_models`).
    """
    token = uuid.uuid4().hex
    created_model = False
    try:
        try:
            client.create_registered_model(
                name, tags={CREATING_TAG: json.dumps(process_tags())}, description=REGISTRY_DESCRIPTION
            )
            created_model = True
        except MlflowException as exc:
            if not has_error_code(exc, "RESOURCE_ALREADY_EXISTS"):
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
                client.delete_registered_model_tag(name, CREATING_TAG)
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
    with mlflow_errors(f"setting alias {alias!r} on {name!r}"):
        client = store_client()
        current = resolve_version(client, f"models:/{name}/{version}")
        if (current.tags or {}).get(TEACHER_TAG) != "true":
            raise RRMError(
                f"version {version} of {name!r} is not an rrm teacher; register one with `rrm teacher register`"
            )
        try:
            client.set_registered_model_alias(name, alias, str(version))
        except MlflowException as exc:
            if not has_error_code(exc, "INVALID_PARAMETER_VALUE"):
                raise
            raise RRMError(f"invalid alias {alias!r}: {one_line(exc.message)}; use a name such as champion") from None
        return TeacherVersion.of(client.get_model_version(name, str(version)))


def show_teacher(uri: str) -> TeacherVersion:
    """The registered version behind ``models:/name@alias`` or ``models:/name/version``."""
    with mlflow_errors(f"looking up {uri}"):
        if not uri.startswith("models:/"):
            raise RRMError(f"{uri!r} is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION")
        return TeacherVersion.of(resolve_version(store_client(), uri))


def list_teachers(name: str | None = None) -> list[TeacherVersion]:
    """Registered teachers (all, or the versions of ``name``), newest first. What a killed registration left is
    cleaned first, as in :func:`register_teacher`."""
    with mlflow_errors("listing teachers"):
        client = check_store("listing teachers")
        remove_abandoned_models(client)
        found = client.search_model_versions(f"name = '{name}'" if name else f"tags.`{TEACHER_TAG}` = 'true'")
        teachers = [TeacherVersion.of(v) for v in found if (v.tags or {}).get(TEACHER_TAG) == "true"]
        # Searches do not return aliases; the registered model holds them.
        aliases = {n: client.get_registered_model(n).aliases for n in {t.name for t in teachers}}
    for teacher in teachers:
        teacher.aliases = sorted(a for a, v in aliases[teacher.name].items() if str(v) == teacher.version)
    return sorted(teachers, key=lambda t: (t.name, -int(t.version)))
