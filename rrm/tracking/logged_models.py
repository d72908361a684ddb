"""Models in MLflow: a run's rrm model file logged as an MLflow model, and the run that produced a model file.

Model format: every training run keeps the rrm model file (architecture spec, weights, training meta; loaded with
``weights_only``) as its artifact ``model.pt``. A registered teacher is also logged with ``mlflow.pytorch.log_model``
in MLflow 3's safe ``pt2`` format (what MLflow serving and ``mlflow.pyfunc`` use; it keeps only ``forward``), which
carries the same rrm file as an extra file. Exporting pt2 costs seconds, so it is done once per registered teacher,
not for every student. rrm loads models from the rrm file, so ``features()`` and ``head`` work and loading a teacher
from a shared registry never unpickles code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from mlflow import MlflowClient
from mlflow.entities import Run

from rrm.models import MODEL_FORMAT, Classifier, load_model
from rrm.train.basics import MODEL

__all__ = ["LOGGED_MODEL_NAME", "RRM_FILE_ARTIFACT", "log_model", "model_run", "search_runs"]

LOGGED_MODEL_NAME = "model"
RRM_FILE_ARTIFACT = MODEL  # the rrm model file every tracked training run logs, at the root of its artifacts


def _example(model: Classifier) -> torch.Tensor:
    """Two images in [0, 1] of the model's input shape: pt2 export needs a batch >= 2 to keep the batch dynamic."""
    c, side = model.spec["in_channels"], model.spec["image_size"]
    return torch.rand(2, c, side, side, generator=torch.Generator().manual_seed(0))


def log_model(model_path: Path, run_id: str | None = None) -> str:
    """Log the rrm model file as an MLflow model (pt2) of run ``run_id`` (default: the active run, which may also be
    a finished one); returns the logged model's id."""
    import mlflow.pytorch  # seconds to import and to export: only for registered teachers

    model, _ = load_model(model_path)
    info = mlflow.pytorch.log_model(
        model,
        name=LOGGED_MODEL_NAME,
        serialization_format="pt2",
        input_example=_example(model).numpy(),
        # Explicit requirements skip MLflow's dependency inference, which reloads the model (seconds).
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        extra_files=[str(model_path)],
        metadata={"rrm_format": MODEL_FORMAT, "rrm_file": f"extra_files/{model_path.name}"},
        **({"run_id": run_id} if run_id else {}),
    )
    return info.model_id


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
