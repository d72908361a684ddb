"""What every job shares: whether and where it is tracked, how MLflow is loaded, and the one-line input errors."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from types import ModuleType

from rrm.errors import RRMError
from rrm.models.teacher import REGISTRY_SCHEMES

__all__ = ["FAIL_FAST_ENV", "Tracking", "is_registry_uri", "require", "tracking"]

# MLflow retries an unreachable server 7 times with exponential backoff (minutes) and waits up to 120 s for each
# answer; jobs give up in seconds instead (under a minute for a server that accepts but never answers). Values the
# user exported win.
FAIL_FAST_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


@dataclass
class Tracking:
    """Whether and where a job records its run in MLflow."""

    enabled: bool = True
    experiment: str | None = "rrm"  # None: the job's default (an evaluation joins its training run's experiment)
    run_name: str | None = None  # None: the job's default name


def tracking() -> ModuleType:
    """:mod:`rrm.tracking` (and with it MLflow, seconds to import), loaded only by jobs that need it."""
    for key, value in FAIL_FAST_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", str(sys.stderr.isatty()).lower())
    # libpq (PostgreSQL stores): a database host that drops packets fails in seconds, not after the TCP timeout.
    os.environ.setdefault("PGCONNECT_TIMEOUT", "10")
    # MLflow prints a run's URL, password included, whenever a run on a server ends; rrm prints it masked.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from rrm import tracking as module

    if "MLFLOW_LOGGING_LEVEL" not in os.environ:  # MLflow's INFO lines (store creation) would bury our output
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        # A database store that is down: MLflow logs a traceback per failed call; rrm says it in one line.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    return module


def is_registry_uri(ref: str | os.PathLike | None) -> bool:
    """Whether a model reference is a registry URI (loading it talks to MLflow) rather than a file."""
    return isinstance(ref, str) and ref.startswith(REGISTRY_SCHEMES)


def require(value: object, what: str) -> None:
    """A missing input: one line naming the flag."""
    if value is None or value == () or value == "":
        raise RRMError(f"missing {what}; pass it, or set it in the --params section")
