"""What several test modules share: a free loopback port, an `mlflow server` started on it, a migrated MLflow store
to copy, the digits as a prepared file for subprocesses, a worker process's environment, one torch thread, a project
directory where the CLI's process-wide settings are undone, and the command-line options of the smallest real
training and tuning."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from rrm import cli as rrm_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def migrated_store(path: Path) -> Path:
    """Create at ``path`` an MLflow SQLite store whose schema MLflow has migrated, less the Default experiment (the
    one row MLflow writes on opening a store: with the store's artifact root, which depends on who opens it and from
    where). A copy is what a fresh store is once migrated; whoever opens it adds its Default experiment as MLflow does
    on first use. Checked to hold nothing else: no experiment, run or model."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{path}"
    SqlAlchemyStore(uri, str(path.parent / "mlruns")).engine.dispose()
    with contextlib.closing(sqlite3.connect(path)) as con, con:
        con.execute("DELETE FROM experiments WHERE experiment_id = 0")
        tables = [name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        filled = {name for name in tables if con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]}
    # alembic's schema version, and the default workspace a migration inserts
    assert filled == {"alembic_version", "workspaces"}, f"a fresh store holds more than its schema: {sorted(filled)}"
    return path


def copy_store(migrated: Path, to: Path) -> Path:
    """A copy of the :func:`migrated_store` ``migrated`` at ``to`` (which must not exist): a fresh store there."""
    if to.exists():
        raise FileExistsError(f"{to} exists; a store copied over it would hide what the test made")
    shutil.copyfile(migrated, to)
    return to


@functools.cache
def digits_file() -> str:
    """The digits prepared once per test process as a dataset file (`rrm data prepare`), for ``--dataset`` in the
    tests' subprocesses: the same pixels, labels and name as ``--dataset digits``, without the 1.4 s of CPU that
    importing scikit-learn and splitting costs each process that loads the digits by name."""
    from rrm.data import prepare_dataset

    root = tempfile.mkdtemp(prefix="rrm-digits-")
    atexit.register(shutil.rmtree, root, True)
    path = Path(root) / "digits.safetensors"
    prepare_dataset("digits", path)
    return str(path)


def worker_env(**extra: str) -> dict:
    """The environment of a subprocess that must import this checkout's rrm, on one thread."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "OMP_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        **extra,
    }


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared CPU: a second intra-op thread made epochs up to 50x slower under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def undo_cli_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI sets a few process-wide environment variables; record them so they are removed after the test."""
    for key in (
        *rrm_cli._FAIL_FAST_ENV,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
        "PGCONNECT_TIMEOUT",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
    ):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, root: Path, timeout: float = 180) -> Iterator[str]:
    """`mlflow server` on loopback with ``backend_store_uri`` and artifacts proxied to ``root/artifacts``; yields its
    URL once /health answers, and always stops it (its whole process group)."""
    with mlflow_server_process(backend_store_uri, root, timeout) as (url, _):
        yield url


@contextlib.contextmanager
def mlflow_server_process(
    backend_store_uri: str, root: Path, timeout: float = 180, port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """:func:`mlflow_server`, yielding its process too (a test may kill it early: ``os.killpg(proc.pid, ...)``);
    on ``port`` (a server started again where it was), else a free one."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                backend_store_uri,
                "--artifacts-destination",
                str(root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # MLflow 3 starts a job consumer (Huey, seconds of CPU) for GenAI jobs that rrm never submits
            env=worker_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                        if reply.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"mlflow server on {backend_store_uri.split(':')[0]} did not start: "
                        f"{(root / 'server.log').read_text()[-2000:]}"
                    )
                time.sleep(0.5)
            yield url, proc
        finally:
            with contextlib.suppress(ProcessLookupError):  # stopped by the test already
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def override(params: dict, overrides: dict[str, object]) -> dict:
    """Set ``overrides`` in ``params`` (a parsed YAML mapping, changed in place and returned): each key is a dotted
    path of keys that must already exist (``"evaluate.steps"``), or has ``*`` for every key of one mapping
    (``"students.*.epochs"``: every student, each of which must have ``epochs``). Applied in order, so a later key
    can undo part of an earlier wildcard. A path that names a missing key raises KeyError naming that path, before
    anything of that key is set: a shrink that silently missed its key (a renamed option, a typo) would leave the
    test running full size."""
    for dotted, value in overrides.items():
        targets: list[tuple[str, dict, object]] = [("", {None: params}, None)]  # (path, mapping, key in it)
        for part in dotted.split("."):
            found = []
            for where, parent, name in targets:
                node = parent[name]
                if not isinstance(node, dict):
                    raise KeyError(f"override {dotted!r}: {where!r} is a {type(node).__name__}, not a mapping")
                if part == "*" and not node:
                    raise KeyError(f"override {dotted!r}: {where or 'the top level'} is empty, '*' matches nothing")
                for key in list(node) if part == "*" else [part]:
                    path = f"{where}.{key}" if where else str(key)
                    if key not in node:
                        known = ", ".join(map(str, node)) or "nothing"
                        raise KeyError(f"override {dotted!r}: no key {path!r} (it has {known})")
                    found.append((path, node, key))
            targets = found
        for _, parent, key in targets:  # all of them exist: set them
            parent[key] = value
    return params


def override_yaml(path: Path, overrides: dict[str, object]) -> None:
    """Rewrite the YAML file ``path`` with ``overrides`` applied (see :func:`override`); merge keys (``<<:``) come
    out expanded, comments are dropped."""
    params = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(override(params, overrides), sort_keys=False))


def cli_options(defaults: dict[str, object], overrides: dict[str, object]) -> list[str]:
    """Command-line options from ``defaults`` updated by ``overrides`` (a new key goes last): ``key=value`` gives
    ``--key value`` (underscores become dashes), True a bare ``--key``, False ``--no-key``, None leaves the key out."""
    args: list[str] = []
    for key, value in {**defaults, **overrides}.items():
        flag = key.replace("_", "-")
        if value is True:
            args.append(f"--{flag}")
        elif value is False:
            args.append(f"--no-{flag}")
        elif value is not None:
            args += [f"--{flag}", str(value)]
    return args


def tiny_train_args(**overrides: object) -> list[str]:
    """`rrm train` options of the smallest real training: one epoch of a CNN on digits, no monitor, no progress bar
    (about a second); ``overrides`` as in :func:`cli_options` (``lr=0.05``, ``track=False``)."""
    return cli_options(
        {"dataset": "digits", "model": "cnn", "epochs": 1, "monitor_examples": 0, "progress": False}, overrides
    )


def tiny_tune_args(**overrides: object) -> list[str]:
    """`rrm tune` options of the smallest real trial: one epoch of a BatchNorm CNN student on digits, scored by APGD
    (5 steps) on 64 validation images and tested on 64 (about a second a trial); ``overrides`` as in
    :func:`cli_options`."""
    defaults = {
        "dataset": "digits",
        "model": "cnn-bn",
        "eps": 0.1,
        "epochs": 1,
        "lr": 0.05,
        "attack_examples": 64,
        "attack_steps": 5,
        "test_examples": 64,
        "test_steps": 5,
    }
    return cli_options(defaults, overrides)
