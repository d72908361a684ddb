"""The MLflow store and the life of a run: where runs go, one-line errors, experiments, context tags, params.

Store: ``MLFLOW_TRACKING_URI`` when set, else a SQLite file in the current directory (``sqlite:///mlflow.db``), so
``mlflow ui`` in the project shows everything without a server.

Model format: a trained model is logged with ``mlflow.pytorch.log_model`` in MLflow 3's safe ``pt2`` format (what
MLflow serving and ``mlflow.pyfunc`` use; it keeps only ``forward``) and carries the rrm model file (architecture
spec, weights, training meta; loaded with ``weights_only``) as an extra file. rrm loads teachers from that file, so
``features()`` and ``head`` work and loading a teacher from a shared registry never unpickles code.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path

import mlflow
import mlflow.pytorch
import requests
import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

import rrm
from rrm.errors import RRMError
from rrm.models import MODEL_FORMAT, Classifier, load_model

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "rrm"
LOGGED_MODEL_NAME = "model"
_VERSIONED_PACKAGES = {"torch": "torch", "torchvision": "torchvision", "art": "adversarial-robustness-toolbox",
                       "mlflow": "mlflow"}


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
    """Training options as MLflow params; ``lam`` under its paper name ``lambda``."""
    out: dict[str, str] = {}
    for key, value in config.items():
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
