"""The process settings MLflow reads, set before it is used and without importing it (seconds): fail fast, print no
password, log only what matters. Values the user exported win."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["FAIL_FAST_ENV", "OWNER_PID_ENV", "configure", "owner_pid"]

# MLflow retries an unreachable server 7 times with exponential backoff (minutes) and waits up to 120 s for each
# answer; rrm gives up in seconds instead (under a minute for a server that accepts but never answers).
FAIL_FAST_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}

OWNER_PID_ENV = "RRM_OWNER_PID"  # set in a worker process: the training whose run it records


def owner_pid() -> int:
    """The process whose run this process records: itself, or the training whose worker it is."""
    return int(os.environ.get(OWNER_PID_ENV, os.getpid()))


def configure() -> None:
    """Set MLflow's environment defaults and quiet its loggers; idempotent and cheap, so it runs before each use.

    MLflow reads the variables when it sends a request, so setting them before the first store call is in time.
    Importing MLflow sets its logger to INFO, so the levels are set again after that: :func:`rrm.tracking.connection.
    store_client` calls this before every store call.
    """
    for key, value in FAIL_FAST_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", str(sys.stderr.isatty()).lower())
    # libpq (PostgreSQL stores): a database host that drops packets fails in seconds, not after the TCP timeout.
    os.environ.setdefault("PGCONNECT_TIMEOUT", "10")
    # MLflow prints a run's URL, password included, whenever a run on a server ends; rrm prints it masked.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:  # MLflow's INFO lines (store creation) would bury our output
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        # A database store that is down: MLflow logs a traceback per failed call; rrm says it in one line.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # A PostgreSQL store that dies under an open connection: psycopg logs "error ignored terminating <Pipeline ...>"
    # while it discards that connection; rrm has already said in one line that the store stopped answering.
    logging.getLogger("psycopg").setLevel(logging.ERROR)
