"""Shared fixtures: small models trained through the real trainer, once per test session."""

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from _helpers import one_torch_thread, undo_cli_settings

from rrm.data import load_dataset
from rrm.train import TrainConfig, train


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
