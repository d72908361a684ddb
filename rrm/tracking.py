"""Every run in MLflow and reusable teachers in its model registry; the only module that imports mlflow.

Store: ``MLFLOW_TRACKING_URI`` when set, else a SQLite file in the current directory (``sqlite:///mlflow.db``), so
``mlflow ui`` in the project shows everything without a server.

Model format: a trained model is logged with ``mlflow.pytorch.log_model`` in MLflow 3's safe ``pt2`` format (what
MLflow serving and ``mlflow.pyfunc`` use; it keeps only ``forward``) and carries the rrm model file (architecture
spec, weights, training meta; loaded with ``weights_only``) as an extra file. rrm loads teachers from that file, so
``features()`` and ``head`` work and loading a teacher from a shared registry never unpickles code.

Teachers: :func:`register_teacher` makes a model version with a model card (description) and tags, refusing an
unevaluated or non-adversarially-trained model unless forced, and never leaving a half-made version behind;
aliases (``champion``, ``candidate``) replace MLflow's deprecated stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path

import mlflow
import mlflow.pytorch
import requests
import torch
import yaml
from mlflow import MlflowClient
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import LoggedModel, LoggedModelInput, Metric, Param, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

import rrm
from rrm.data import ImageData
from rrm.errors import RRMError
from rrm.io import atomic_path, sha256_file
from rrm.models import MODEL_FORMAT, Classifier, load_model
from rrm.train import Callback, TrainConfig, TrainResult, may_teach, teacher_methods

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "rrm"
DEFAULT_TEACHER_NAME = "rrm-teacher"
# Methods that train on attacks against the model itself; only these make teachers.
LOGGED_MODEL_NAME = "model"
TEACHER_TAG = "rrm.teacher"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_VERSIONED_PACKAGES = {"torch": "torch", "torchvision": "torchvision", "art": "adversarial-robustness-toolbox",
                       "mlflow": "mlflow"}
# Per-epoch keys drawn as accuracies or times rather than as loss terms.
_NOT_LOSSES = {"epoch", "paper_epochs", "lr", "epoch_seconds", "train_accuracy", "test_accuracy",
               "monitor_robust_accuracy"}

__all__ = [
    "DEFAULT_EXPERIMENT", "DEFAULT_TEACHER_NAME", "DEFAULT_TRACKING_URI",
    "MlflowCallback", "TeacherVersion", "list_teachers", "load_registered_model", "log_evaluation", "open_study_run",
    "promote", "pull_teacher", "register_teacher", "show_teacher", "tracking_uri", "update_run",
]


# ---------------------------------------------------------------------------------------------------------- store

def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _client() -> MlflowClient:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # fluent calls (runs, log_model) write to the same store as the client
    return MlflowClient(tracking_uri=uri)


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _unreachable(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, requests.ConnectionError) or any(
        s in text for s in ("Max retries exceeded", "Connection refused", "Failed to establish a new connection",
                            "Read timed out", "ConnectTimeout"))


@contextlib.contextmanager
def _mlflow_errors(action: str) -> Iterator[None]:
    """Turn MLflow and transport errors into one-line :class:`RRMError` s that say what to do."""
    try:
        yield
    except RRMError:
        raise
    except (MlflowException, requests.RequestException, OSError) as exc:
        uri = tracking_uri()
        if _unreachable(exc):
            raise RRMError(f"{action}: cannot reach the MLflow tracking server at {uri}; start it "
                           "(`mlflow server`) or point MLFLOW_TRACKING_URI at a running one") from None
        code = getattr(exc, "error_code", "")
        if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            raise RRMError(f"{action}: the tracking server at {uri} refused ({_one_line(exc)}); check "
                           "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN") from None
        raise RRMError(f"{action} failed on {uri}: {_one_line(getattr(exc, 'message', exc))}") from None


def _is(exc: MlflowException, code: str) -> bool:
    return exc.error_code == code


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException as exc:  # another process created it first
            if not _is(exc, "RESOURCE_ALREADY_EXISTS"):
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise RRMError(f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) or "
                       "choose another --experiment")
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


def _context_tags() -> dict[str, str]:
    """Where a run came from: package versions, the project's git commit, the DVC stage that ran it."""
    tags = {f"rrm.version.{key}": value for key, value in _versions().items()}
    # The project is the working directory (where dvc.yaml and params.yaml live), not rrm's install location.
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["rrm.git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    if os.environ.get("DVC_STAGE"):
        tags["dvc.stage"] = os.environ["DVC_STAGE"]
    return tags


def _params(config: Mapping) -> dict[str, str]:
    """Training options as MLflow params; ``lam`` under its paper name ``lambda``, ``extra`` options flattened."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if key == "extra":
            out.update({f"extra.{k}": json.dumps(v) for k, v in value.items()})
            continue
        text = json.dumps(list(value)) if isinstance(value, (list, tuple)) else str(value)
        out["lambda" if key == "lam" else key] = text
    return out


def _leaves(values: Mapping, prefix: str = "") -> Iterator[tuple[str, object]]:
    """The leaves of a nested mapping, keyed by their ``/``-joined path."""
    for key, value in values.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(values: Mapping) -> dict[str, float]:
    """The numeric leaves of a nested mapping."""
    return {k: float(v) for k, v in _leaves(values) if _is_number(v)}


def _status(exc_type: type[BaseException] | None) -> str:
    if exc_type is None:
        return "FINISHED"
    return "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"


def _end_active_run(exc: BaseException | None) -> None:
    """End the active fluent run as FINISHED, FAILED (an exception) or KILLED (Ctrl-C)."""
    if exc is None:
        mlflow.end_run("FINISHED")
        return
    # Already failing: a store that fails too must not hide the original error.
    try:
        mlflow.set_tag("rrm.error", _one_line(f"{type(exc).__name__}: {exc}"))
    except Exception:  # noqa: BLE001 - best effort on the failure path
        pass
    try:
        mlflow.end_run(_status(type(exc)))  # pops the run from the active stack before writing its status
    except Exception as end_exc:  # noqa: BLE001
        warnings.warn(f"could not mark MLflow run as {_status(type(exc))}: {_one_line(end_exc)}", stacklevel=2)


def _example(model: Classifier) -> torch.Tensor:
    """Two images in [0, 1] of the model's input shape: pt2 export needs a batch >= 2 to keep the batch dynamic."""
    c, side = model.spec["in_channels"], model.spec["image_size"]
    return torch.rand(2, c, side, side, generator=torch.Generator().manual_seed(0))


def _log_model(model_path: Path) -> str:
    """Log the rrm model file under the active run as an MLflow model; returns the logged model's id."""
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
    )
    return info.model_id


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


# ------------------------------------------------------------------------------------------------------- training

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
            cfg = result.config
            with tempfile.TemporaryDirectory() as tmp:
                plot = Path(tmp) / "curves.png"
                _plot_history(result.history, plot, title=f"{cfg.method} {cfg.model} on {result.data.name}")
                mlflow.log_artifact(str(plot))
            if self.log_model:
                self.model_id = _log_model(result.model_path)
            self._active = False
            _end_active_run(None)


def _plot_history(history: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Per-epoch loss terms, accuracies and epoch time as one PNG (matplotlib's Agg canvas; no display needed)."""
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    losses, accuracy, seconds = fig.subplots(1, 3)
    for key in dict.fromkeys(k for h in history for k in h if k not in _NOT_LOSSES):
        losses.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=key)
    losses.set(title="loss terms", xlabel="epoch")
    for key in ("train_accuracy", "test_accuracy", "monitor_robust_accuracy"):
        if key in history[0]:
            accuracy.plot(epochs, [h[key] for h in history], marker="o", label=key)
    accuracy.set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    seconds.plot(epochs, [h["epoch_seconds"] for h in history], marker="o")
    seconds.set(title="epoch time", xlabel="epoch", ylabel="seconds")
    for ax in (losses, accuracy):
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=90)


# ----------------------------------------------------------------------------------------------------- evaluation

def _search_runs(client: MlflowClient, filter_string: str) -> list[Run]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    return list(client.search_runs(experiments, filter_string, order_by=["attributes.start_time DESC"],
                                   max_results=50))


def _model_run(client: MlflowClient, sha256: str) -> Run | None:
    """The finished run that produced (or imported) the model file with this content."""
    runs = _search_runs(client, f"tags.`rrm.model_sha256` = '{sha256}' and attributes.status = 'FINISHED'")
    return runs[0] if runs else None


def log_evaluation(
    metrics: Mapping,
    *,
    model_path: str | os.PathLike,
    train_run_id: str | None = None,
    experiment: str | None = None,
    metrics_path: str | os.PathLike | None = None,
    run_name: str | None = None,
) -> str:
    """Record an evaluation of ``model_path`` as its own run linked to the training run; returns the run id.

    The training run is ``train_run_id`` or, by default, the run that logged a model file with the same sha256.
    Numbers in ``metrics`` (nested ones as ``a/b``) become metrics, text and flags become params; the metrics JSON
    (``metrics_path``, else ``metrics`` itself) is an artifact. With no ``experiment`` the evaluation joins its
    training run's experiment and is nested under it in ``mlflow ui``.
    """
    sha256 = sha256_file(model_path)
    with _mlflow_errors("recording the evaluation in MLflow"):
        client = _client()
        train_run = client.get_run(train_run_id) if train_run_id else _model_run(client, sha256)
        if experiment is not None or train_run is None:
            experiment_id = _experiment_id(client, experiment or DEFAULT_EXPERIMENT)
        else:
            experiment_id = train_run.info.experiment_id
        tags = {**_context_tags(), "rrm.kind": "evaluate", "rrm.evaluated_sha256": sha256,
                "rrm.model_path": str(model_path)}
        if train_run is not None:
            tags["rrm.train_run_id"] = train_run.info.run_id
            if train_run.info.experiment_id == experiment_id:
                tags["mlflow.parentRunId"] = train_run.info.run_id
        run = client.create_run(experiment_id, run_name=run_name or f"evaluate {Path(model_path).name}", tags=tags)
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            params = [Param(k, _one_line(v, 6000)) for k, v in _flat_text(metrics).items()]
            numbers = [Metric(k, v, now, 0) for k, v in _numbers(metrics).items()]
            for i in range(0, max(len(params), 1), 100):
                client.log_batch(run_id, metrics=numbers if i == 0 else (), params=params[i: i + 100])
            if metrics_path is not None:
                client.log_artifact(run_id, str(metrics_path))
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "eval_metrics.json"
                    path.write_text(json.dumps(dict(metrics), indent=2, sort_keys=True, default=str) + "\n")
                    client.log_artifact(run_id, str(path))
        except BaseException as exc:
            with contextlib.suppress(Exception):
                client.set_tag(run_id, "rrm.error", _one_line(f"{type(exc).__name__}: {exc}"))
                client.set_terminated(run_id, _status(type(exc)))
            raise
        client.set_terminated(run_id, "FINISHED")
    return run_id


def _flat_text(values: Mapping) -> dict[str, str]:
    """The non-numeric leaves (text, flags, lists) of a nested mapping."""
    return {k: json.dumps(v) if isinstance(v, (list, tuple, bool)) or v is None else str(v)
            for k, v in _leaves(values) if not _is_number(v)}


def _summarize_evaluation(values: Mapping) -> dict | None:
    """Natural accuracy and the worst adversarial accuracy over the attacks of an evaluation, or None if absent.

    Takes ``rrm evaluate``'s metrics (``adversarial_accuracy`` per attack), the same logged as run metrics
    (``adversarial_accuracy/apgd``) or a single number.
    """
    natural, adversarial = values.get("natural_accuracy"), values.get("adversarial_accuracy")
    if isinstance(adversarial, Mapping):
        per_attack = dict(adversarial)
    elif adversarial is not None:
        per_attack = {str(values.get("attack", "attack")): adversarial}
    else:
        per_attack = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("adversarial_accuracy/")}
    per_attack = {k: float(v) for k, v in per_attack.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not isinstance(natural, (int, float)) or not per_attack:
        return None
    attack = min(per_attack, key=per_attack.get)
    sanity = values.get("sanity_passed")  # a bool in the JSON, "true"/"false" once logged as a run param
    checks = values.get("sanity")
    enabled = checks.get("enabled") if isinstance(checks, Mapping) else values.get("sanity/enabled")
    if str(enabled).lower() == "false":  # `rrm evaluate --no-sanity` reports passed for checks it never ran
        sanity = None
    examples = values.get("n_examples")  # logged runs give every number back as a float
    return {
        "natural_accuracy": float(natural), "adversarial_accuracy": per_attack[attack], "attack": attack,
        "norm": values.get("norm"), "eps": values.get("eps"),
        "n_examples": int(examples) if isinstance(examples, (int, float)) else None,
        "sanity_passed": None if sanity is None else str(sanity).lower() == "true",
    }


def _evaluation_of_run(client: MlflowClient, run_id: str) -> dict | None:
    """The newest finished evaluation linked to training run ``run_id`` that measured both accuracies."""
    runs = _search_runs(client, f"tags.`rrm.train_run_id` = '{run_id}' and attributes.status = 'FINISHED'")
    for run in runs:
        found = _summarize_evaluation({**run.data.params, **run.data.metrics})
        if found is not None:
            return {**found, "evaluation_run": run.info.run_id}
    return None


def _read_evaluation(evaluation: str | os.PathLike | Mapping) -> dict:
    """The metrics of an evaluation given as a dict or as the JSON file ``rrm evaluate`` writes."""
    if isinstance(evaluation, Mapping):
        return dict(evaluation)
    path = Path(evaluation)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RRMError(f"evaluation file {str(path)!r} does not exist; write it with `rrm evaluate`") from None
    except (OSError, ValueError) as exc:
        raise RRMError(f"evaluation file {str(path)!r} is not JSON ({_one_line(exc)}); pass the metrics file "
                       "`rrm evaluate` writes") from None


# -------------------------------------------------------------------------------------------------------- registry

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


def log_report(files: list[Path], experiment: str = DEFAULT_EXPERIMENT) -> None:
    """Log report files as artifacts; under `mlflow run` into the project's run, otherwise into a new "report" run."""
    inside_project_run = bool(os.environ.get("MLFLOW_RUN_ID"))
    with _mlflow_errors("log the report"):
        if not inside_project_run:
            mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=None if inside_project_run else "report"):
            for path in files:
                mlflow.log_artifact(str(path))


# --------------------------------------------------------------------------------------------------------- tuning

def open_study_run(study: str, storage: str, *, params: Mapping[str, object],
                   experiment: str = DEFAULT_EXPERIMENT) -> tuple[str, str]:
    """The parent run of tuning study ``study`` in ``storage`` (a label without secrets), set RUNNING: its id and
    the name of its experiment, where the trial runs belong (``mlflow ui`` nests runs within one experiment).

    A study keeps one parent run across restarts and workers: found by a tag, created when missing. Workers that
    start together may each create one; each then keeps the oldest and deletes its own if that is not it, so all
    trials end up under one parent. ``params`` are logged when the run is created. Under ``mlflow run`` the
    project's run is the parent, and ``MLFLOW_RUN_ID`` is removed so that trial runs do not resume it.
    """
    key = hashlib.sha256(f"{storage}\n{study}".encode()).hexdigest()[:32]
    tags = {**_context_tags(), "rrm.kind": "study", "rrm.study": study, "rrm.study_storage": storage,
            "rrm.study_key": key}
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)
    with _mlflow_errors("opening the study's MLflow run"):
        client = _client()
        if project_run:
            client.log_batch(project_run, params=[Param(k, _one_line(v, 6000)) for k, v in params.items()])
            for name, value in tags.items():
                client.set_tag(project_run, name, value)
            return project_run, client.get_experiment(client.get_run(project_run).info.experiment_id).name
        experiment_id = _experiment_id(client, experiment)

        def existing() -> list[Run]:
            runs = client.search_runs([experiment_id], f"tags.`rrm.study_key` = '{key}'", max_results=100)
            return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

        runs = existing()
        if not runs:
            mine = client.create_run(experiment_id, run_name=f"study {study}", tags=tags).info.run_id
            client.log_batch(mine, params=[Param(k, _one_line(v, 6000)) for k, v in params.items()])
            runs = existing()
            if runs[0].info.run_id != mine:
                client.delete_run(mine)
        run_id = runs[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    return run_id, experiment


def update_run(run_id: str, *, tags: Mapping[str, object] | None = None, metrics: Mapping[str, float] | None = None,
               artifacts: tuple[Path, ...] | list[Path] = (), status: str | None = None) -> None:
    """Add tags, metrics and artifact files to a finished or running run; ``status`` (FINISHED, FAILED, KILLED)
    ends it. Used for a study's parent run and for the final state of its trial runs."""
    with _mlflow_errors("updating an MLflow run"):
        client = _client()
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()])
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, _one_line(value, 5000))
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        if status is not None:
            client.set_terminated(run_id, status)
