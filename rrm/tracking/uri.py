"""Where runs go, answered without importing MLflow (seconds): the tracking URI and the checks that need no store."""

from __future__ import annotations

import os
from pathlib import Path

from rrm.errors import RRMError
from rrm.secrets import mask_url

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def tracking_label() -> str:
    """The tracking URI with its password masked: what messages, tags and files show."""
    return mask_url(tracking_uri())


def is_local_store(uri: str) -> bool:
    """A store in a file on this machine (SQLite, or MLflow's file store): no server or network to fail."""
    scheme = uri.split(":", 1)[0] if "://" in uri else "file"
    return scheme in ("sqlite", "file")


def check_sqlite_directory(uri: str) -> None:
    """A SQLite store in a directory that does not exist is a typo, not a new store: MLflow would create the
    directories and an empty store, and every listing would come back empty."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    if path.name and not path.parent.is_dir():
        raise RRMError(
            f"the MLflow store {mask_url(uri)} is in a directory that does not exist ({str(path.parent)!r}); "
            "create it, or fix MLFLOW_TRACKING_URI"
        )
