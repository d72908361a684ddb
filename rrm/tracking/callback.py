"""The training callback: one MLflow run per :func:`rrm.train.train`: params, metrics, model file, teacher."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import LoggedModelInput, Run
from mlflow.exceptions import MlflowException

from rrm.data import ImageData
from rrm.errors import RRMError
from rrm.io import sha256_file, write_json
from rrm.models import Classifier, Teacher
from rrm.tracking.connection import StoreUnreachable, mlflow_errors, one_line, store_client, warn
from rrm.tracking.environment import owner_pid
from rrm.tracking.flatten import numbers, training_params
from rrm.tracking.logged_models import MODEL_PARAMS, log_run_model, metric_dataset
from rrm.tracking.notes import write_note
from rrm.tracking.runs import DEFAULT_EXPERIMENT, context_tags, end_active_run, ensure_experiment
from rrm.tracking.stale import check_store, process_alive
from rrm.tracking.uri import tracking_label
from rrm.tracking.versions import resolve_version, run_model, version_model_id
from rrm.train import Callback, TrainConfig, TrainResult
from rrm.train.trainer import CHECKPOINT

__all__ = ["RUN_FILE", "MlflowCallback"]

RUN_FILE = "mlflow_run.json"  # beside the checkpoint: the run a --resume continues
# counts that say how a training ran, not what it reached: tags (rrm.passes, ...), not metrics beside the accuracies
BOOKKEEPING = ("passes", "replays", "processes", "threads", "paper_epochs")


def _epoch_metrics(row: Mapping) -> dict[str, float]:
    """What an epoch logs: its numbers, less the step itself and the bookkeeping."""
    return {k: v for k, v in numbers(row).items() if k != "epoch" and k not in BOOKKEEPING}


def _epochs_in_store(client: MlflowClient, run_id: str) -> set[int]:
    """The epochs the store holds for ``run_id``: each epoch's metrics are one batch, written whole or not at all."""
    return {int(m.step) for m in client.get_metric_history(run_id, "epoch_seconds")}


def _device(model: Classifier | str) -> str:
    """The model's device; a worker process (:mod:`rrm.tracking.worker`) is sent the device alone."""
    return model if isinstance(model, str) else str(next(model.parameters()).device)


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
    """Record one training run in MLflow: params, per-epoch metrics, tags, dataset, teacher, artifacts and model file.

    Use it as a context manager around :func:`rrm.train.train`, so that a run that raises ends FAILED (KILLED on
    Ctrl-C or SIGTERM) instead of staying RUNNING::

        with MlflowCallback(experiment="rrm") as tracker:
            result = train(cfg, callbacks=[tracker])
        print(tracker.run_id)

    The run starts when training starts (after data, model and teacher loaded) and ends FINISHED when it ends.
    An active run of the caller becomes the parent; so does the run named by a ``mlflow.parentRunId`` tag.
    The run keeps rrm's model file (artifact ``model.pt``) and the checkpoint, and logs the file as its MLflow logged
    model, with its final metrics linked to it and to the dataset (the pt2 export, seconds, waits until the model is
    registered as a teacher). ``log_model=False`` (tuning trials) skips the checkpoint, the model file and the logged
    model and tags only the model file's path. ``teacher``: the teacher the job resolved
    (:func:`rrm.jobs.resolve_teacher`; its weights are dropped here), whose URI, registry version and sha256 the run
    records as they were when it was resolved; without it, the run records ``cfg.teacher``, looked up once when the
    run starts (the registry version an alias points at then, or the file's sha256). :meth:`stop` ends a run
    that was stopped on purpose (a pruned trial). The run is named ``run_name``, else RECIPE-MODEL-DATASET: ``recipe``
    (the params section it came from, e.g. ``transplant-fast``), else the method.

    The run's id is kept in ``mlflow_run.json`` beside the first checkpoint: a ``resume`` of an unfinished training
    continues that run (same id, metrics appended by epoch) where it still exists in this store and experiment.
    Starting a run first marks FAILED the runs that dead processes of this host left RUNNING. A store that stops
    answering during training does not stop it: one warning, the training goes on and writes its files, and at
    the end :attr:`unfinished` (also on stderr) says which run was left unfinished and how to finish it.
    """

    def __init__(
        self,
        experiment: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        log_model: bool = True,
        teacher: Teacher | None = None,
        recipe: str | None = None,
    ):
        self.experiment = experiment
        self.run_name = run_name
        self.recipe = recipe
        self.tags = dict(tags or {})
        self.log_model = log_model
        # what the run records of the teacher, not its weights (this object may be pickled to a worker process)
        self.teacher = dataclasses.replace(teacher, model=None) if teacher is not None else None
        self.run_id: str | None = None
        self.resumed = False
        self.unfinished: str | None = None  # why the run was left RUNNING when the store stopped answering
        self._entered = False
        self._active = False
        self._logged_epochs: set[int] = set()
        self._lost: str | None = None  # the store stopped answering: what failed, when
        self._out_dir: Path | None = None
        self._run_record: dict | None = None  # mlflow_run.json of a new run, until the first epoch ends
        self._dataset: tuple[str, str] | None = None
        self._model_params: dict[str, str] = {}

    def __enter__(self) -> MlflowCallback:
        self._entered = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._entered = False
        if self._active:
            self._active = False
            if self._lost is None:
                end_active_run(exc)
            else:  # the store is gone: asking it again would only add a timeout
                self._leave_unfinished()

    def stop(self, reason: str) -> None:
        """End the run now as KILLED with tag ``rrm.stopped`` = ``reason``: stopped on purpose, not failed."""
        if self._active:
            self._active = False
            with mlflow_errors("ending the MLflow run"):
                mlflow.set_tag("rrm.stopped", one_line(reason))
                mlflow.end_run("KILLED")

    def on_train_start(self, cfg: TrainConfig, data: ImageData, model: Classifier) -> None:
        if not self._entered:  # outside a `with`, a failing run would be marked FINISHED at interpreter exit
            raise RRMError(
                "use MlflowCallback as a context manager: `with MlflowCallback() as tracker: "
                "train(cfg, callbacks=[tracker])`"
            )
        self._out_dir = Path(cfg.out_dir)
        self._dataset = (data.name, data.digest)  # the input _dataset_input logs, to link metrics to
        self._model_params = {k: str(getattr(cfg, k)) for k in MODEL_PARAMS if getattr(cfg, k, None) is not None}
        with mlflow_errors("starting the MLflow run"):
            client = check_store("starting the MLflow run")
            experiment_id = ensure_experiment(client, self.experiment)
            tags = {
                **context_tags(),
                "rrm.kind": "train",
                "rrm.dataset": data.name,
                "rrm.dataset_digest": data.digest,
                "rrm.out_dir": str(self._out_dir.resolve()),
                **self.tags,
            }
            nested = mlflow.active_run() is not None
            earlier = self._interrupted_run(client, cfg, experiment_id)
            if earlier is not None:
                self._resume(client, earlier, cfg, tags, nested, _device(model))
                return
            run = mlflow.start_run(
                experiment_id=experiment_id,
                nested=nested,
                run_name=self.run_name or f"{self.recipe or cfg.method}-{cfg.model}-{data.name}",
                tags=tags,
            )
            self.run_id, self._active = run.info.run_id, True
            # written beside the first checkpoint (a run with no good epoch leaves nothing to resume, nor this file)
            self._run_record = {"run_id": self.run_id, "experiment_id": experiment_id, "tracking_uri": tracking_label()}
            mlflow.log_params(training_params(cfg.to_dict(), _device(model)))
            mlflow.log_input(_dataset_input(data, cfg.dataset), context="train", tags={"rrm.digest": data.digest})
            if self.teacher is not None or cfg.teacher:
                self._log_teacher(client, self.teacher.ref if self.teacher is not None else cfg.teacher)

    def _interrupted_run(self, client: MlflowClient, cfg: TrainConfig, experiment_id: str) -> Run | None:
        """The run of the training that ``cfg.resume`` continues: named in ``mlflow_run.json`` beside a checkpoint,
        in this store and experiment, not deleted and not FINISHED (a finished training extended is a new run)."""
        path = self._out_dir / RUN_FILE
        if not (cfg.resume and (self._out_dir / CHECKPOINT).is_file() and path.is_file()):
            return None
        try:
            run_id = json.loads(path.read_text())["run_id"]
            run = client.get_run(run_id)
        except (ValueError, KeyError, TypeError, OSError):
            return None
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # another store's run
                return None
            raise
        if (
            run.info.experiment_id != experiment_id
            or run.info.lifecycle_stage == "deleted"
            or run.info.status == "FINISHED"
        ):
            return None
        if (
            run.info.status == "RUNNING"
            and process_alive(run.data.tags)
            and run.data.tags.get("rrm.pid") != str(owner_pid())
        ):
            raise RRMError(
                f"MLflow run {run_id} of {str(self._out_dir)!r} is RUNNING in process "
                f"{run.data.tags['rrm.pid']} on this host; wait for it or stop it before resuming"
            )
        return run

    def _resume(self, client: MlflowClient, run: Run, cfg: TrainConfig, tags: dict, nested: bool, device: str) -> None:
        """Continue ``run``: RUNNING again with this process's tags, params it lacks logged, changed ones (more
        epochs, say) in tag ``rrm.resumed_with``, and its logged epochs remembered so none is logged twice."""
        run_id = run.info.run_id
        logged = run.data.params
        params = training_params(cfg.to_dict(), device)
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
        if changed:
            tags["rrm.resumed_with"] = one_line(", ".join(f"{k}={v}" for k, v in sorted(changed.items())), 5000)
        mlflow.start_run(run_id=run_id, nested=nested, tags=tags)
        self.run_id, self._active, self.resumed = run_id, True, True
        for key in ("rrm.error", "rrm.stopped"):  # what ended it before no longer holds
            if key in run.data.tags:
                client.delete_tag(run_id, key)
        new = {k: v for k, v in params.items() if k not in logged}
        if new:
            mlflow.log_params(new)
        self._logged_epochs = _epochs_in_store(client, run_id)

    def _log_teacher(self, client: MlflowClient, ref: str) -> None:
        """Tag the run with its teacher and link the teacher's logged model as an input, from :attr:`teacher` as
        resolved; only a teacher given as ``cfg.teacher`` alone is looked up (its registry version, its file's hash)."""
        teacher = self.teacher
        tags = {"rrm.teacher_uri": ref}
        model_id = None
        if ref.startswith("models:/"):
            version = (teacher.registry if teacher is not None else None) or resolve_version(client, ref)
            tags.update({"rrm.teacher_name": version.name, "rrm.teacher_version": str(version.version)})
            if version.run_id:
                tags["rrm.teacher_run_id"] = version.run_id
            sha256 = teacher.sha256 if teacher is not None else (version.tags or {}).get("model_sha256")
            if sha256:
                tags["rrm.teacher_sha256"] = sha256
            model_id = version_model_id(version)
        elif ref.startswith("runs:/"):  # which logged model the run holds: the lineage link (no version, no hash)
            logged = run_model(client, ref, required=False)
            tags["rrm.teacher_run_id"] = logged.source_run_id if logged else ref[len("runs:/") :].split("/")[0]
            model_id = logged.model_id if logged else None
        else:
            tags["rrm.teacher_sha256"] = teacher.sha256 if teacher is not None else sha256_file(ref)
        mlflow.set_tags(tags)
        if model_id:  # lineage: the teacher's logged model is an input of the student's run
            mlflow.log_input(model=LoggedModelInput(model_id))

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        if self._run_record is not None:
            write_json(self._out_dir / RUN_FILE, self._run_record)
            self._run_record = None
        if self._lost is not None:
            return
        try:
            self._log_epoch(epoch, metrics)
        except StoreUnreachable as exc:
            self._store_lost(f"in epoch {epoch}", exc)

    def _log_epoch(self, epoch: int, metrics: dict) -> None:
        with mlflow_errors("logging epoch metrics to MLflow"):
            mlflow.log_metrics(_epoch_metrics(metrics), step=epoch)
        self._logged_epochs.add(epoch)

    def _store_lost(self, when: str, exc: StoreUnreachable) -> None:
        """Go on without the store; say so once."""
        self._lost = when
        warn(
            f"the MLflow tracking store at {tracking_label()} stopped answering {when} ({one_line(exc, 120)}); "
            f"training goes on without it and writes its checkpoint and model to {self._out_dir}"
        )

    def on_train_end(self, result: TrainResult) -> None:
        try:
            if self._lost is not None:  # it may be back: then the run is finished as if it had never left
                with mlflow_errors("reaching the MLflow tracking store again"):
                    # the store may have written the epoch whose reply was lost: that one is not sent twice
                    self._logged_epochs |= _epochs_in_store(store_client(), self.run_id)
                self._lost = None
            self._finish(result)
        except StoreUnreachable as exc:
            if self._lost is None:
                self._store_lost("at the end of training", exc)
            self._active = False
            self._leave_unfinished()

    def _finish(self, result: TrainResult) -> None:
        for row in result.history:  # epochs a resumed run took from its checkpoint, or trained while the store was away
            if row["epoch"] not in self._logged_epochs:
                self._log_epoch(row["epoch"], row)
        with mlflow_errors("logging the trained model to MLflow"):
            model_id = None
            if self.log_model:  # before the final metrics, which are then linked to it and to the dataset
                run = mlflow.active_run()
                model_id = log_run_model(
                    store_client(),
                    run.info.run_id,
                    run.info.experiment_id,
                    Path(result.model_path),
                    result.history[-1]["epoch"],
                    list(_epoch_metrics(result.history[-1])),
                    self._model_params,
                )
            epoch_keys = set(result.history[-1])
            summary = numbers(result.summary)
            mlflow.log_metrics(
                {k: v for k, v in summary.items() if k not in epoch_keys and k not in BOOKKEEPING},
                run_id=self.run_id,  # read afresh: the active run's cached record lacks the new output
                model_id=model_id,
                dataset=metric_dataset(*self._dataset) if model_id and self._dataset else None,
            )
            mlflow.set_tags(
                {
                    "rrm.precision": result.summary["precision"],
                    "rrm.schedule": result.summary["schedule"],
                    "rrm.device": result.summary["device"],
                    "rrm.model_path": str(result.model_path),
                    **{f"rrm.{k}": f"{summary[k]:g}" for k in BOOKKEEPING if k in summary},
                }
            )
            if self.log_model:  # the sha256 tag says "this run logged that model file" (the registry looks it up)
                mlflow.set_tag("rrm.model_sha256", sha256_file(result.model_path))
                mlflow.log_artifact(str(result.checkpoint_path))
                mlflow.log_artifact(str(result.model_path))  # RRM_FILE_ARTIFACT: the registry reads it there
            mlflow.log_artifact(str(result.metrics_path))
            write_note(store_client(), self.run_id)
            self._active = False
            end_active_run(None)

    def _leave_unfinished(self) -> None:
        """The store stopped answering: forget the run in this process and say how to finish it."""
        self.unfinished = (
            f"MLflow run {self.run_id} in {tracking_label()} was left unfinished (RUNNING): the "
            f"tracking store stopped answering {self._lost}. The training's files are in "
            f"{self._out_dir}. Once the store answers, rerun the same command with --resume to record "
            "the rest in that run; until then the next rrm command on this host that records a run, "
            "or `rrm runs clean`, marks it FAILED"
        )
        # end_run pops the run from MLflow's stack of active runs, then tells the store, which fails (or, back by
        # now, keeps the run RUNNING as the message says).
        with contextlib.suppress(Exception):
            mlflow.end_run("RUNNING")
        warn(self.unfinished)
