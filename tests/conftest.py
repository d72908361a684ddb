"""Shared fixtures: small models trained through the real trainer, once per test session."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from _helpers import copy_store, migrated_store, one_torch_thread, undo_cli_settings

from rrm.data import load_dataset
from rrm.train import TrainConfig, train


def pytest_configure(config: pytest.Config) -> None:
    """Bytecode caches on, even where PYTHONDONTWRITEBYTECODE is set (some sandboxes set it): pytest's rewritten test
    modules are then not compiled again each run (two workers start 6 s sooner), nor rrm's modules in each of the
    suite's 120 interpreters. Before pytest-xdist starts its workers, which inherit the environment."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_for_the_session():
    """Every test in the session on one torch thread (see :func:`_helpers.one_torch_thread`): a two-epoch SAT
    training took 8-12 s on one thread and 70-90 s on two with the two cores shared with other work."""
    with one_torch_thread():
        yield


@pytest.fixture(autouse=True)
def no_tracking_uri_left_behind():
    """Each test starts from the environment's store: rrm sets MLflow's process-wide tracking URI (so fluent calls
    write where its client does), and a test after one that used a server, now stopped, would otherwise reach for
    that server (MLflow reads its global before MLFLOW_TRACKING_URI)."""
    yield
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None:
        utils._tracking_uri = None


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_natural(tmp_path_factory, digits):
    """A natural CNN on digits (about 97% clean accuracy after 8 epochs, ~1 s)."""
    cfg = TrainConfig(
        dataset="digits",
        model="cnn",
        method="natural",
        epochs=8,
        lr=0.05,
        monitor_examples=0,
        progress=False,
        out_dir=str(tmp_path_factory.mktemp("natural")),
    )
    return train(cfg, data=digits)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory, digits):
    """A SAT (PGD-7, Linf eps 0.1) CNN teacher on digits."""
    cfg = TrainConfig(
        dataset="digits",
        model="cnn",
        method="sat",
        epochs=8,
        lr=0.05,
        eps=0.1,
        monitor_examples=0,
        progress=False,
        out_dir=str(tmp_path_factory.mktemp("teacher")),
    )
    return train(cfg, data=digits)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on loopback with databases `mlflow` and `optuna` (see tests/_postgres.py).

    Skips when PostgreSQL cannot be started here, with the reason; under CI=true that is a failure instead, since
    CI installs the package and a skip there would hide a broken team set-up.
    """
    import _postgres

    try:
        with _postgres.running(("mlflow", "optuna")) as server:
            yield server
            return
    except _postgres.Unavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required under CI=true but cannot be started: {exc}")
        pytest.skip(f"PostgreSQL cannot be started here: {exc}")


@pytest.fixture(scope="session")
def migrated_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its schema migrated, made once per session: tests copy it (milliseconds) instead
    of paying MLflow's migrations (seconds) for each store they open (see :func:`_helpers.migrated_store`)."""
    return migrated_store(tmp_path_factory.mktemp("migrated-store") / "mlflow.db")


@pytest.fixture
def cli_project(tmp_path, monkeypatch):
    """A project directory as cwd with its own SQLite MLflow store, on one torch thread; the CLI's process-wide
    settings are undone after the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    undo_cli_settings(monkeypatch)
    with one_torch_thread():
        yield tmp_path


@pytest.fixture
def mlflow_store(cli_project, migrated_mlflow_db) -> Path:
    """The :func:`cli_project`'s store file, there before the test starts: a copy of a freshly migrated store. For
    tests that track; a test that checks that nothing made a store leaves it out."""
    return copy_store(migrated_mlflow_db, cli_project / "mlflow.db")
