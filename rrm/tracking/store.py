"""The MLflow store and the life of a run: where runs go, one-line errors, experiments, context tags, params.

Store: ``MLFLOW_TRACKING_URI`` when set, else a SQLite file in the current directory (``sqlite:///mlflow.db``), so
``mlflow ui`` in the project shows everything without a server.

Model format: every training run keeps the rrm model file (architecture spec, weights, training meta; loaded with
``weights_only``) as its artifact ``model.pt``. A registered teacher is also logged with ``mlflow.pytorch.log_model``
in MLflow 3's safe ``pt2`` format (what MLflow serving and ``mlflow.pyfunc`` use; it keeps only ``forward``), which
carries the same rrm file as an extra file. Exporting pt2 costs seconds, so it is done once per registered teacher,
not for every student. rrm loads models from the rrm file, so ``features()`` and ``head`` work and loading a teacher
from a shared registry never unpickles code.

Experiments rrm creates are tagged as model-training experiments (``mlflow.experimentKind``), so MLflow 3's UI opens
them in its training view rather than its GenAI view.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import mlflow
import requests
import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

import rrm
from rrm.background import owner_pid
from rrm.errors import RRMError
from rrm.models import MODEL_FORMAT, Classifier, load_model
from rrm.secrets import mask_url
from rrm.tracking.uri import check_sqlite_directory as _check_sqlite_directory
from rrm.tracking.uri import tracking_label, tracking_uri
from rrm.train.basics import MODEL

DEFAULT_EXPERIMENT = "rrm"
LOGGED_MODEL_NAME = "model"
RRM_FILE_ARTIFACT = MODEL  # the rrm model file every tracked training run logs, at the root of its artifacts
# The experiment tag MLflow 3's UI reads to pick its view; without it an experiment opens in the GenAI view.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
_VERSIONED_PACKAGES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "art": "adversarial-robustness-toolbox",
    "mlflow": "mlflow",
}
# Store URIs that MLflow opens with SQLAlchemy and rrm checks first (their drivers take connect_timeout).
_DATABASE_SCHEMES = ("postgresql", "mysql")
DATABASE_CONNECT_SECONDS = 5
_reached: set[str] = set()  # database stores this process has connected to
_UNREACHABLE = (
    "Max retries exceeded",
    "Connection refused",
    "Failed to establish a new connection",
    "Read timed out",
    "ConnectTimeout",
    "Connection aborted",
    "RemoteDisconnected",
    "Connection broken",  # the server died in the middle of its answer (urllib3: IncompleteRead)
    "Connection reset",
    "No route to host",
    "Network is unreachable",
    "failed to resolve host",
    "could not translate host",
    "server closed the connection",
    "terminating connection",
    "timeout expired",
    "Can't connect to MySQL server",
    "Lost connection to MySQL server",
)


class StoreUnreachable(RRMError):
    """The tracking store (an MLflow server or the database behind a store URI) does not answer."""


def _is_database(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+", 1)[0] in _DATABASE_SCHEMES


def _client() -> MlflowClient:
    uri = tracking_uri()
    _check_sqlite_directory(uri)
    if _is_database(uri) and uri not in _reached:
        _check_database(uri)
        _reached.add(uri)
    mlflow.set_tracking_uri(uri)  # fluent calls (runs, log_model) write to the same store as the client
    return MlflowClient(tracking_uri=uri)


def _check_database(uri: str) -> None:
    """Connect once, with a timeout, before MLflow does: MLflow retries a database that is down for about two
    minutes (ten attempts with backoff, a traceback each; no setting shortens it) and then fails with a traceback."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    label = mask_url(uri)
    try:
        engine = create_engine(uri, connect_args={"connect_timeout": DATABASE_CONNECT_SECONDS}, poolclass=NullPool)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except ImportError as exc:
        driver = getattr(exc, "name", None) or str(exc)
        raise RRMError(
            f"the MLflow tracking store {label} needs the database driver {driver!r}, which is not "
            "installed; install it (PostgreSQL: pip install 'psycopg[binary]' for postgresql+psycopg://)"
        ) from None
    except Exception as exc:
        message = mask_url(_one_line(getattr(exc, "orig", None) or exc))
        if _unreachable(exc):
            raise StoreUnreachable(
                f"cannot reach the MLflow tracking database at {label} ({message}); start the "
                "database server, or fix MLFLOW_TRACKING_URI"
            ) from None
        raise RRMError(
            f"cannot connect to the MLflow tracking database at {label} ({message}); fix "
            "MLFLOW_TRACKING_URI (user, password, database name) or the database's access rules"
        ) from None


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _warn(message: str) -> None:
    """One line on stderr: something the user should know that does not stop the command."""
    print(f"Warning: {_one_line(mask_url(message), 1000)}", file=sys.stderr, flush=True)


def _unreachable(exc: BaseException) -> bool:
    text = str(exc)
    return (
        isinstance(exc, requests.ConnectionError)
        or getattr(exc, "error_code", None) == "TEMPORARILY_UNAVAILABLE"  # MLflow: the database went away
        or any(s in text for s in _UNREACHABLE)
    )


@contextlib.contextmanager
def _mlflow_errors(action: str) -> Iterator[None]:
    """Turn MLflow and transport errors into one-line :class:`RRMError` s that say what to do; a store that does
    not answer raises :class:`StoreUnreachable`. URIs in messages have their password masked."""
    try:
        yield
    except RRMError:
        raise
    except (MlflowException, requests.RequestException, OSError) as exc:
        uri = tracking_label()
        if _unreachable(exc):
            if _is_database(tracking_uri()):
                raise StoreUnreachable(
                    f"{action}: cannot reach the MLflow tracking database at {uri}; start the "
                    "database server, or fix MLFLOW_TRACKING_URI"
                ) from None
            raise StoreUnreachable(
                f"{action}: cannot reach the MLflow tracking server at {uri}; start it "
                "(`mlflow server`) or point MLFLOW_TRACKING_URI at a running one"
            ) from None
        code = getattr(exc, "error_code", "")
        if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            raise RRMError(
                f"{action}: the tracking server at {uri} refused ({mask_url(_one_line(exc))}); check "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
            ) from None
        raise RRMError(f"{action} failed on {uri}: {mask_url(_one_line(getattr(exc, 'message', exc)))}") from None


def _is(exc: MlflowException, code: str) -> bool:
    return exc.error_code == code


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created as a model-training experiment if it does not exist. An existing one
    without a kind (made before rrm set it) gets the kind too; one whose kind someone chose is left as it is."""
    key, kind = EXPERIMENT_KIND
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={key: kind})
        except MlflowException as exc:  # another process created it first
            if not _is(exc, "RESOURCE_ALREADY_EXISTS"):
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise RRMError(
            f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) or "
            "choose another --experiment"
        )
    if key not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, key, kind)
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
    return {**tags, **_process_tags()}


# ------------------------------------------------------------------------------------------------------ stale runs

PROCESS_TAGS = ("rrm.host", "rrm.pid", "rrm.process_start")


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux), so that a reused pid is not taken for it; None
    where ``/proc`` does not say. A zombie (killed, not yet reaped) counts as gone: "Z"."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return "Z" if fields[0] == "Z" else fields[19]


def _process_tags() -> dict[str, str]:
    """The process that owns a run: a run left RUNNING after it is gone was never ended (SIGKILL, power loss)."""
    pid = owner_pid()
    tags = {"rrm.host": socket.gethostname(), "rrm.pid": str(pid)}
    started = _process_start(pid)
    if started:
        tags["rrm.process_start"] = started
    return tags


def _process_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process named by a run's tags is alive; None when it ran on another host (cannot be checked)."""
    if tags.get("rrm.host") != socket.gethostname() or not tags.get("rrm.pid", "").isdigit():
        return None
    pid = int(tags["rrm.pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    started, recorded = _process_start(pid), tags.get("rrm.process_start")
    if started == "Z":
        return False
    return not (started and recorded and started != recorded)  # a reused pid is another process


@dataclass
class StaleRuns:
    """What a clean-up found: runs it marked FAILED (id, reason), runs it left (id, why)."""

    marked: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)


def clean_stale_runs(
    run_ids: tuple[str, ...] | list[str] = (), *, dry_run: bool = False, client: MlflowClient | None = None
) -> StaleRuns:
    """Mark FAILED, with the reason in tag ``rrm.error``, the runs left RUNNING by a process that died.

    Without ``run_ids``: every RUNNING run of an rrm process on this host that is gone (rrm tags each run with its
    host and pid); runs of other hosts cannot be checked from here and are listed in ``left``. With ``run_ids``:
    those runs wherever they ran, unless one is not RUNNING or its process on this host is alive.
    """
    with _mlflow_errors("cleaning up stale MLflow runs"):
        client = client or _client()
        if run_ids:
            runs = [client.get_run(run_id) for run_id in run_ids]
        else:
            experiments = [e.experiment_id for e in client.search_experiments()]
            runs = (
                list(client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=1000))
                if experiments
                else []
            )
        found = _stale(runs, explicit=bool(run_ids))
        if not dry_run:
            for run_id, reason in found.marked:
                client.set_tag(run_id, "rrm.error", reason)
                client.set_terminated(run_id, "FAILED")
    return found


def _stale(runs: list[Run], explicit: bool) -> StaleRuns:
    """Which of ``runs`` to mark FAILED and why; ``explicit``: asked for by id, so marked unless known alive."""
    found = StaleRuns()
    for run in runs:
        tags, run_id = run.data.tags, run.info.run_id
        alive = _process_alive(tags) if "rrm.pid" in tags else None
        where = f"pid {tags['rrm.pid']} on host {tags['rrm.host']}" if "rrm.pid" in tags else "an unknown process"
        if run.info.status != "RUNNING":
            found.left.append((run_id, f"it is {run.info.status}, not RUNNING"))
        elif alive:
            found.left.append((run_id, f"its process ({where}) is still running"))
        elif alive is None and not explicit:
            if "rrm.pid" in tags:
                found.left.append(
                    (
                        run_id,
                        f"its process ({where}) cannot be checked from this host: run `rrm runs "
                        "clean` there, or pass the run id",
                    )
                )
        elif alive is False:
            found.marked.append(
                (
                    run_id,
                    f"left RUNNING by {where}, which is gone (killed by SIGKILL or out of "
                    "memory, a power loss, or a tracking store that did not answer at its end)",
                )
            )
        else:
            found.marked.append((run_id, f"left RUNNING by {where}; marked FAILED by `rrm runs clean`"))
    return found


_cleaned: set[str] = set()  # stores whose stale runs this process has marked


def check_store(action: str) -> MlflowClient:
    """The store's client once it answered (one line, in seconds, when it does not); on the first call per store,
    runs left RUNNING by dead rrm processes of this host are marked FAILED, each with a warning."""
    with _mlflow_errors(action):
        client = _client()
        uri = tracking_uri()
        if uri in _cleaned:
            return client
        stale = clean_stale_runs(client=client)
        _cleaned.add(uri)
    for run_id, reason in stale.marked:
        _warn(f"marked MLflow run {run_id} FAILED: {reason}")
    return client


def _params(config: Mapping) -> dict[str, str]:
    """Training options as MLflow params; ``lam`` under its paper name ``lambda``."""
    out: dict[str, str] = {}
    for key, value in config.items():
        text = json.dumps(list(value)) if isinstance(value, (list, tuple)) else str(value)
        out["lambda" if key == "lam" else key] = text
    return out


def _training_params(config: Mapping, device: str | None = None) -> dict[str, str]:
    """The params of a training run: the options every method reads, and of the method's own options only its
    (:attr:`rrm.train.Method.options`), so a natural run shows no lambda or alpha. ``schedule`` and (given the
    ``device``) ``precision`` are the ones that ran, as the run's tags say, not None for "the method's default";
    ``teacher`` and ``transplant`` only where there is one."""
    from rrm.train import METHODS, resolved_precision, resolved_schedule

    method = METHODS.get(str(config.get("method")))
    owned = {name for cls in METHODS.values() for name in cls.options}
    kept = {
        key: value
        for key, value in config.items()
        if (key not in owned or (method is not None and key in method.options))
        and not (key in ("teacher", "transplant") and value is None)
    }
    if method is not None:
        kept["schedule"] = resolved_schedule(config.get("schedule"), method)
        if device is not None:
            kept["precision"] = resolved_precision(config.get("precision"), method, device)
    return _params(kept)


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
    with contextlib.suppress(Exception):
        mlflow.set_tag("rrm.error", _one_line(f"{type(exc).__name__}: {exc}"))
    try:
        mlflow.end_run(_status(type(exc)))  # pops the run from the active stack before writing its status
    except Exception as end_exc:
        warnings.warn(f"could not mark MLflow run as {_status(type(exc))}: {_one_line(end_exc)}", stacklevel=2)


def _example(model: Classifier) -> torch.Tensor:
    """Two images in [0, 1] of the model's input shape: pt2 export needs a batch >= 2 to keep the batch dynamic."""
    c, side = model.spec["in_channels"], model.spec["image_size"]
    return torch.rand(2, c, side, side, generator=torch.Generator().manual_seed(0))


def _log_model(model_path: Path, run_id: str | None = None) -> str:
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


def _search_runs(client: MlflowClient, filter_string: str) -> list[Run]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    return list(client.search_runs(experiments, filter_string, order_by=["attributes.start_time DESC"], max_results=50))


def _model_run(client: MlflowClient, sha256: str) -> Run | None:
    """The finished run that produced (or imported) the model file with this content."""
    runs = _search_runs(client, f"tags.`rrm.model_sha256` = '{sha256}' and attributes.status = 'FINISHED'")
    return runs[0] if runs else None
