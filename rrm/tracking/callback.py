"""The training callback: one MLflow run per :func:`rrm.train.train`, with its params, metrics, model and teacher."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import LoggedModelInput

from rrm.data import ImageData
from rrm.errors import RRMError
from rrm.io import sha256_file
from rrm.models import Classifier
from rrm.tracking.registry import _resolve_version, _run_model, _version_model_id
from rrm.tracking.store import (
    DEFAULT_EXPERIMENT, _client, _context_tags, _end_active_run, _experiment_id, _log_model, _mlflow_errors, _numbers,
    _one_line, _params,
)
from rrm.train import Callback, TrainConfig, TrainResult


def _dataset_input(data: ImageData, ref: str) -> MetaDataset:
    """Name, source and digest only: cheap for any dataset size."""
    path = Path(ref)
    if path.is_file():
        with warnings.catch_warnings():  # MLflow warns that a local path "can be interpreted in multiple ways"
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(path.resolve()))
    else:
        source = CodeDatasetSource({"rrm.dataset": ref, **{k: str(v) for k, v in data.source.items()}})
    # MLflow stores at most 36 characters of a digest; the full sha256 goes into the input's tags.
    return MetaDataset(source, name=data.name, digest=data.digest[:36])


class MlflowCallback(Callback):
    """Record one training run in MLflow: params, per-epoch metrics, tags, dataset, teacher, artifacts and model.

    Use it as a context manager around :func:`rrm.train.train`, so that a run that raises ends FAILED (KILLED on
    Ctrl-C) instead of staying RUNNING::

        with MlflowCallback(experiment="rrm") as tracker:
            result = train(cfg, callbacks=[tracker])
        print(tracker.run_id)

    The run starts when training starts (after data, model and teacher loaded) and ends FINISHED when it ends.
    An active run of the caller becomes the parent; so does the run named by a ``mlflow.parentRunId`` tag.
    ``log_model=False`` (tuning trials) skips the checkpoint and the MLflow model, the costly artifacts, and tags
    only the model file's path. :meth:`stop` ends a run that was stopped on purpose (a pruned trial).
    """

    def __init__(self, experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, log_model: bool = True):
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.log_model = log_model
        self.run_id: str | None = None
        self.model_id: str | None = None
        self._entered = False
        self._active = False
        self._logged_epochs: set[int] = set()

    def __enter__(self) -> "MlflowCallback":
        self._entered = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._entered = False
        if self._active:
            self._active = False
            _end_active_run(exc)

    def stop(self, reason: str) -> None:
        """End the run now as KILLED with tag ``rrm.stopped`` = ``reason``: stopped on purpose, not failed."""
        if self._active:
            self._active = False
            with _mlflow_errors("ending the MLflow run"):
                mlflow.set_tag("rrm.stopped", _one_line(reason))
                mlflow.end_run("KILLED")

    def on_train_start(self, cfg: TrainConfig, data: ImageData, model: Classifier) -> None:
        if not self._entered:  # outside a `with`, a failing run would be marked FINISHED at interpreter exit
            raise RRMError("use MlflowCallback as a context manager: `with MlflowCallback() as tracker: "
                           "train(cfg, callbacks=[tracker])`")
        with _mlflow_errors("starting the MLflow run"):
            client = _client()
            experiment_id = _experiment_id(client, self.experiment)
            tags = {**_context_tags(), "rrm.kind": "train", "rrm.dataset": data.name,
                    "rrm.dataset_digest": data.digest, **self.tags}
            run = mlflow.start_run(experiment_id=experiment_id, nested=mlflow.active_run() is not None,
                                   run_name=self.run_name or f"{cfg.method}-{cfg.model}-{data.name}", tags=tags)
            self.run_id, self._active = run.info.run_id, True
            mlflow.log_params(_params(cfg.to_dict()))
            mlflow.log_input(_dataset_input(data, cfg.dataset), context="train", tags={"rrm.digest": data.digest})
            if cfg.teacher:
                self._log_teacher(client, cfg.teacher)

    def _log_teacher(self, client: MlflowClient, ref: str) -> None:
        tags = {"rrm.teacher_uri": ref}
        model_id = None
        if ref.startswith("models:/"):
            version = _resolve_version(client, ref)
            tags.update({"rrm.teacher_name": version.name, "rrm.teacher_version": str(version.version)})
            if version.run_id:
                tags["rrm.teacher_run_id"] = version.run_id
            model_id = _version_model_id(version)
        elif ref.startswith("runs:/"):
            logged = _run_model(client, ref)
            tags["rrm.teacher_run_id"] = logged.source_run_id
            model_id = logged.model_id
        else:
            tags["rrm.teacher_sha256"] = sha256_file(ref)
        mlflow.set_tags(tags)
        if model_id:  # lineage: the teacher's logged model is an input of the student's run
            mlflow.log_input(model=LoggedModelInput(model_id))

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        with _mlflow_errors("logging epoch metrics to MLflow"):
            mlflow.log_metrics({k: v for k, v in _numbers(metrics).items() if k != "epoch"}, step=epoch)
        self._logged_epochs.add(epoch)

    def on_train_end(self, result: TrainResult) -> None:
        with _mlflow_errors("logging the trained model to MLflow"):
            for row in result.history:  # epochs a resumed run took from its checkpoint
                if row["epoch"] not in self._logged_epochs:
                    self.on_epoch_end(row["epoch"], row)
            epoch_keys = set(result.history[-1])
            mlflow.log_metrics({k: v for k, v in _numbers(result.summary).items() if k not in epoch_keys})
            mlflow.set_tags({"rrm.precision": result.summary["precision"], "rrm.schedule": result.summary["schedule"],
                             "rrm.device": result.summary["device"], "rrm.model_path": str(result.model_path)})
            if self.log_model:  # the sha256 tag says "this run logged that model file" (the registry looks it up)
                mlflow.set_tag("rrm.model_sha256", sha256_file(result.model_path))
                mlflow.log_artifact(str(result.checkpoint_path))
            mlflow.log_artifact(str(result.metrics_path))
            from rrm.plots import plot_training_curves  # matplotlib only once a run ends

            cfg = result.config
            with tempfile.TemporaryDirectory() as tmp:
                plot = Path(tmp) / "curves.png"
                plot_training_curves(result.history, plot, title=f"{cfg.method} {cfg.model} on {result.data.name}")
                mlflow.log_artifact(str(plot))
            if self.log_model:
                self.model_id = _log_model(result.model_path)
            self._active = False
            _end_active_run(None)
