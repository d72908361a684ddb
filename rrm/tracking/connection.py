"""The MLflow store's client and its failures as one-line errors: a store that does not answer says so in seconds.

Store: ``MLFLOW_TRACKING_URI`` when set, else a SQLite file in the current directory (``sqlite:///mlflow.db``), so
``mlflow ui`` in the project shows everything without a server.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rrm.errors import RRMError, missing_driver
from rrm.io import DISK_FULL, output_error
from rrm.secrets import mask_url
from rrm.tracking.environment import configure
from rrm.tracking.uri import check_sqlite_directory, tracking_label, tracking_uri

__all__ = [
    "DATABASE_CONNECT_SECONDS",
    "StoreUnreachable",
    "has_error_code",
    "mlflow_errors",
    "one_line",
    "store_client",
    "warn",
]

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


def store_client() -> MlflowClient:
    """A client of the tracking store, MLflow's settings in place (:func:`rrm.tracking.environment.configure`); a
    database store is connected to once first, with a timeout."""
    configure()
    uri = tracking_uri()
    check_sqlite_directory(uri)
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
        raise missing_driver(f"the MLflow tracking store {label}", exc) from None
    except Exception as exc:
        message = mask_url(one_line(getattr(exc, "orig", None) or exc))
        if _unreachable(exc):
            raise StoreUnreachable(
                f"cannot reach the MLflow tracking database at {label} ({message}); start the "
                "database server, or fix MLFLOW_TRACKING_URI"
            ) from None
        raise RRMError(
            f"cannot connect to the MLflow tracking database at {label} ({message}); fix "
            "MLFLOW_TRACKING_URI (user, password, database name) or the database's access rules"
        ) from None


def one_line(text: object, limit: int = 300) -> str:
    """``text`` on one line, cut to ``limit`` characters: what a tag or a message holds."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def warn(message: str) -> None:
    """One line on stderr: something the user should know that does not stop the command."""
    print(f"Warning: {one_line(mask_url(message), 1000)}", file=sys.stderr, flush=True)


def _unreachable(exc: BaseException) -> bool:
    text = str(exc)
    return (
        isinstance(exc, requests.ConnectionError)
        or getattr(exc, "error_code", None) == "TEMPORARILY_UNAVAILABLE"  # MLflow: the database went away
        or any(s in text for s in _UNREACHABLE)
    )


@contextlib.contextmanager
def mlflow_errors(action: str) -> Iterator[None]:
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
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            # a local artifact store on a full disk: the line every rrm output gives
            raise RRMError(f"{action}: {output_error(exc.filename2 or exc.filename, exc)}") from None
        code = getattr(exc, "error_code", "")
        if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            raise RRMError(
                f"{action}: the tracking server at {uri} refused ({mask_url(one_line(exc))}); check "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
            ) from None
        raise RRMError(f"{action} failed on {uri}: {mask_url(one_line(getattr(exc, 'message', exc)))}") from None


def has_error_code(exc: MlflowException, code: str) -> bool:
    """Whether MLflow answered with error ``code`` (``RESOURCE_DOES_NOT_EXIST``, ``RESOURCE_ALREADY_EXISTS``...)."""
    return exc.error_code == code
