"""Models in MLflow: each training run's model as an MLflow 3 logged model, and the run that produced a model file.

Model format: every training run keeps the rrm model file (architecture spec, weights, training meta; loaded with
``weights_only``) as its artifact ``model.pt``, and logs it as the run's logged model ``model``
(:func:`log_run_model`): the same file and an ``MLmodel`` that names it, no export, so it costs milliseconds. The
run's final metrics and its evaluations' headline numbers are linked to that model and to the dataset, so MLflow's
Models tab compares students by robust accuracy. Registering a model as a teacher adds MLflow 3's safe ``pt2`` export
to the same logged model (:func:`add_pt2`; what MLflow serving and ``mlflow.pyfunc`` use; it keeps only
``forward``): seconds, so once per teacher, not for every student. A file no tracked run produced is logged whole
with ``mlflow.pytorch.log_model`` (:func:`log_model`). rrm loads models from the rrm file, so ``features()`` and
``head`` work and loading a teacher from a shared registry never unpickles code.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from mlflow import MlflowClient
from mlflow.entities import Dataset, LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric, Run
from mlflow.models import Model

from rrm.models import MODEL_FORMAT, Classifier, load_model
from rrm.train.basics import MODEL

__all__ = [
    "LOGGED_MODEL_NAME",
    "MODEL_PARAMS",
    "RRM_FILE_ARTIFACT",
    "add_pt2",
    "has_pt2",
    "log_model",
    "log_run_model",
    "metric_dataset",
    "model_run",
    "search_runs",
]

LOGGED_MODEL_NAME = "model"
RRM_FILE_ARTIFACT = MODEL  # the rrm model file every tracked training run logs, at the root of its artifacts
# what a logged model says of itself in the Models tab (the run keeps every training param)
MODEL_PARAMS = ("method", "model", "norm", "eps", "epochs", "seed", "transplant", "teacher")


def metric_dataset(name: str, digest: str) -> Dataset:
    """The dataset a metric is on, as the run's input names it (MLflow keeps 36 characters of a digest)."""
    return Dataset(name=name, digest=digest[:36], source_type="rrm", source="{}")


def _example(model: Classifier) -> torch.Tensor:
    """Two images in [0, 1] of the model's input shape: pt2 export needs a batch >= 2 to keep the batch dynamic."""
    c, side = model.spec["in_channels"], model.spec["image_size"]
    return torch.rand(2, c, side, side, generator=torch.Generator().manual_seed(0))


def _pt2_arguments(model_path: Path) -> tuple[Classifier, dict]:
    model, _ = load_model(model_path)
    return model, {
        "serialization_format": "pt2",
        "input_example": _example(model).numpy(),
        # Explicit requirements skip MLflow's dependency inference, which reloads the model (seconds).
        "pip_requirements": [f"torch=={torch.__version__.split('+')[0]}"],
        "extra_files": [str(model_path)],
        "metadata": {"rrm_format": MODEL_FORMAT, "rrm_file": f"extra_files/{model_path.name}"},
    }


def log_model(model_path: Path, run_id: str | None = None) -> str:
    """Log the rrm model file as an MLflow model (pt2) of run ``run_id`` (default: the active run, which may also be
    a finished one); returns the logged model's id."""
    import mlflow.pytorch  # seconds to import and to export: only for registered teachers

    model, arguments = _pt2_arguments(model_path)
    info = mlflow.pytorch.log_model(
        model, name=LOGGED_MODEL_NAME, **arguments, **({"run_id": run_id} if run_id else {})
    )
    return info.model_id


def log_run_model(
    client: MlflowClient,
    run_id: str,
    experiment_id: str,
    model_path: Path,
    step: int,
    keys: list[str],
    params: Mapping[str, str],
) -> str:
    """Log a training run's rrm model file as its MLflow logged model ``model`` (READY, an output of the run at
    ``step``, with the run's metrics ``keys`` at that step linked to it); returns the model id. Nothing is exported:
    the ``MLmodel`` only names the rrm file, which :func:`rrm.tracking.pull` reads."""
    logged = client.create_logged_model(
        experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id, params=dict(params), model_type="rrm"
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            card = Model(run_id=run_id, model_id=logged.model_id, artifact_path=LOGGED_MODEL_NAME)
            card.metadata = {"rrm_format": MODEL_FORMAT, "rrm_file": model_path.name}
            card.save(Path(tmp) / "MLmodel")
            client.log_model_artifact(logged.model_id, str(Path(tmp) / "MLmodel"))
        client.log_model_artifact(logged.model_id, str(model_path))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])
        _link_step(client, run_id, logged.model_id, step, keys)
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return logged.model_id


def _link_step(client: MlflowClient, run_id: str, model_id: str, step: int, keys: list[str]) -> None:
    """Link the run's metrics ``keys`` at ``step`` (its last epoch) to the model, as ``mlflow.<flavour>.log_model``
    does for every metric of the run: each point again, with the model's id."""
    points = [
        Metric(
            m.key,
            m.value,
            m.timestamp,
            m.step,
            model_id=model_id,
            dataset_name=m.dataset_name,
            dataset_digest=m.dataset_digest,
            run_id=run_id,
        )
        for key in keys
        for m in client.get_metric_history(run_id, key)
        if m.step == step and m.model_id is None
    ]
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i : i + 1000])


def has_pt2(client: MlflowClient, logged: LoggedModel) -> bool:
    """Whether a logged model carries the pt2 export (MLflow's ``pytorch`` flavour), not only the rrm file."""
    import mlflow.artifacts
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{logged.artifact_location}/MLmodel", dst_path=tmp, tracking_uri=client.tracking_uri
        )
        return "pytorch" in ((yaml.safe_load(Path(path).read_text()) or {}).get("flavors") or {})


def add_pt2(client: MlflowClient, logged: LoggedModel, model_path: Path) -> None:
    """Add the pt2 export to a training run's logged model (its ``MLmodel`` then names the pytorch flavour and the
    rrm file among its extra files), so ``mlflow.pytorch.load_model("models:/ID")`` serves it: done on registering."""
    import mlflow.pytorch

    model, arguments = _pt2_arguments(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / LOGGED_MODEL_NAME
        mlflow.pytorch.save_model(model, str(local), **arguments)
        card = Model.load(str(local / "MLmodel"))
        card.run_id, card.model_id, card.artifact_path = logged.source_run_id, logged.model_id, LOGGED_MODEL_NAME
        card.save(str(local / "MLmodel"))
        client.log_model_artifacts(logged.model_id, str(local))


def search_runs(client: MlflowClient, filter_string: str) -> list[Run]:
    """The newest 50 runs of any experiment that match ``filter_string``, newest first."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    return list(client.search_runs(experiments, filter_string, order_by=["attributes.start_time DESC"], max_results=50))


def model_run(client: MlflowClient, sha256: str) -> Run | None:
    """The finished run that produced (or imported) the model file with this content."""
    runs = search_runs(client, f"tags.`rrm.model_sha256` = '{sha256}' and attributes.status = 'FINISHED'")
    return runs[0] if runs else None
