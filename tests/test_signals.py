"""Runs that end badly still end right: SIGTERM like Ctrl-C, SIGKILLed runs marked FAILED, --resume continuing the
run, a tracking store lost mid-training, and stores that are down failing fast (a database; `rrm evaluate`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _helpers import cli_options, copy_store, digits_file, free_port, mlflow_server_process, tiny_train_args, worker_env
from click.testing import CliRunner
from mlflow import MlflowClient

from rrm import cli as rrm_cli
from rrm.tracking import MlflowCallback
from rrm.tracking.stale import clean_stale_runs
from rrm.train import TrainConfig, train


def long_args() -> list[str]:
    """A PGD training on the digits, read from their prepared file (:func:`_helpers.digits_file`): an epoch takes about
    a second, so a signal sent after the first one lands mid-training."""
    options = dict(dataset=digits_file(), model="cnn", method="sat", eps=0.1, monitor_examples=0, progress=False)
    return cli_options(options, {})


QUICK = tiny_train_args()
HEARTBEAT = re.compile(r"^\S+ \d+/\d+: +\d+% \d+/\d+ \[")  # a long run's line a minute, its bar hidden


@pytest.fixture(autouse=True)
def project(cli_project):
    return cli_project


def rrm(*args: object):
    return CliRunner().invoke(rrm_cli.cli, [str(a) for a in args])


def start_training(project: Path, out_dir: str, *args: str, **env: str) -> subprocess.Popen:
    """`python -m rrm.cli train` in its own process, as a scheduler starts it."""
    return subprocess.Popen(
        [sys.executable, "-m", "rrm.cli", "train", *long_args(), "--out-dir", out_dir, *args],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(**env),
    )


def wait_for_logged_epoch(proc: subprocess.Popen, database: Path, timeout: float = 300) -> None:
    """Until the first epoch's metrics are in the SQLite store ``database`` (read-only: the writer owns it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended early: {proc.communicate()}"
        if database.exists():
            try:
                with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as con:
                    if con.execute("SELECT count(*) FROM metrics WHERE key = 'epoch_seconds'").fetchone()[0]:
                        return
            except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
                pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail("no epoch was logged in time")


def only_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


@pytest.mark.usefixtures("mlflow_store")
def test_sigterm_mid_training_ends_the_run_killed_and_resume_continues_it(project):
    proc = start_training(project, "out", "--epochs", "40")
    wait_for_logged_epoch(proc, project / "mlflow.db")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: terminated by SIGTERM"), stderr
    client, run = only_run(f"sqlite:///{project}/mlflow.db")
    assert run.info.status == "KILLED" and run.data.tags["rrm.error"].startswith("Terminated")
    state = torch.load(project / "out" / "checkpoint.pt", weights_only=True)  # whole: written atomically
    done = state["epoch"]
    assert lines[0] == (
        f"Error: terminated by SIGTERM; kept checkpoint.pt in 'out' (epoch {done}, the last good one; --resume "
        "continues from it)"
    ), "what was kept, and how to go on"
    assert 1 <= done < 40 and not (project / "out" / "model.pt").exists()

    # --resume continues that run: same id, the epochs after the checkpoint appended, each epoch once.
    resumed = rrm("train", *long_args(), "--out-dir", "out", "--epochs", done + 1, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"MLflow run {run.info.run_id}" in resumed.output
    _, again = only_run(f"sqlite:///{project}/mlflow.db")
    assert again.info.status == "FINISHED" and "rrm.error" not in again.data.tags
    assert again.data.tags["rrm.resumed_with"] == f"epochs={done + 1}, resume=True"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch_seconds")]
    assert sorted(steps) == list(range(1, done + 2))


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


@pytest.mark.usefixtures("mlflow_store")
def test_a_sigkilled_training_is_marked_failed_by_its_tracking_worker(project):
    proc = start_training(project, "killed", "--epochs", "40")
    wait_for_logged_epoch(proc, project / "mlflow.db")
    proc.kill()  # the training alone: its tracking worker process sees the pipe close
    proc.wait()
    client, run = only_run(f"sqlite:///{project}/mlflow.db")
    for _ in range(300):
        if client.get_run(run.info.run_id).info.status != "RUNNING":
            break
        time.sleep(0.2)
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "FAILED" and ended.data.tags["rrm.pid"] == str(proc.pid), "the training's pid"
    assert "the training process ended without ending its run" in ended.data.tags["rrm.error"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the tracking worker is a process on Linux")
@pytest.mark.usefixtures("mlflow_store")
def test_a_sigkilled_run_is_marked_failed_by_the_next_command(project):
    proc = start_training(project, "killed", "--epochs", "40")
    wait_for_logged_epoch(proc, project / "mlflow.db")
    for worker in _children(proc.pid):  # as `kill -9` of the whole process group would: the worker first
        os.kill(worker, signal.SIGKILL)
    proc.kill()
    proc.wait()
    client, run = only_run(f"sqlite:///{project}/mlflow.db")
    assert run.info.status == "RUNNING" and run.data.tags["rrm.pid"] == str(proc.pid)

    listed = rrm("runs", "clean", "--dry-run")
    assert listed.exit_code == 0 and f"would mark run {run.info.run_id} FAILED" in listed.output
    assert client.get_run(run.info.run_id).info.status == "RUNNING"

    nxt = rrm("train", *QUICK, "--out-dir", "next")  # its worker process marks it; the training says so
    assert nxt.exit_code == 0, nxt.output
    assert f"marked MLflow run {run.info.run_id} FAILED" in nxt.stderr
    marked = client.get_run(run.info.run_id)
    assert marked.info.status == "FAILED"
    assert f"pid {proc.pid}" in marked.data.tags["rrm.error"] and "gone" in marked.data.tags["rrm.error"]


@pytest.mark.usefixtures("mlflow_store")
def test_runs_clean_leaves_live_and_foreign_runs_and_marks_runs_named_by_id(project):
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.create_experiment("clean")
    mine = client.create_run(experiment, tags={"rrm.host": socket.gethostname(), "rrm.pid": str(os.getpid())})
    foreign = client.create_run(experiment, tags={"rrm.host": "elsewhere.example", "rrm.pid": "12345"})
    untagged = client.create_run(experiment)  # not an rrm process's run (a study's parent, `mlflow run`)

    result = rrm("runs", "clean")
    assert result.exit_code == 0, result.output
    assert "marked 0 run(s) FAILED" in result.output
    assert (
        f"left run {foreign.info.run_id}: its process (pid 12345 on host elsewhere.example) cannot be checked"
        in result.output
    )
    assert f"left run {mine.info.run_id}: its process" in result.output and "still running" in result.output
    for run in (mine, foreign, untagged):
        assert client.get_run(run.info.run_id).info.status == "RUNNING"

    result = rrm("runs", "clean", foreign.info.run_id, mine.info.run_id)
    assert f"marked run {foreign.info.run_id} FAILED" in result.output
    assert client.get_run(foreign.info.run_id).info.status == "FAILED"
    assert client.get_run(mine.info.run_id).info.status == "RUNNING", "a live process's run is never marked"


@pytest.mark.usefixtures("mlflow_store")
def test_resume_starts_a_new_run_after_a_finished_training_or_a_fresh_untracked_one(project):
    cfg = TrainConfig(
        dataset="digits",
        model="cnn",
        method="natural",
        epochs=1,
        monitor_examples=0,
        progress=False,
        out_dir=str(project / "done"),
    )
    with MlflowCallback(log_model=False) as first:
        train(cfg, callbacks=[first])
    assert json.loads((project / "done" / "mlflow_run.json").read_text())["run_id"] == first.run_id
    with MlflowCallback(log_model=False) as extended:
        train(cfg.replace(epochs=2, resume=True), callbacks=[extended])
    assert extended.run_id != first.run_id and not extended.resumed, "a FINISHED run is not reopened"

    result = rrm("train", *QUICK, "--out-dir", "done", "--no-track")  # a fresh training, not the recorded one
    assert result.exit_code == 0, result.output
    assert not (project / "done" / "mlflow_run.json").exists()


def test_a_tracking_server_lost_mid_training_does_not_stop_it(project, tmp_path_factory, migrated_mlflow_db):
    root = tmp_path_factory.mktemp("server")
    copy_store(migrated_mlflow_db, root / "server.db")
    with mlflow_server_process(f"sqlite:///{root}/server.db", root) as (url, server):
        secret_url = url.replace("http://", "http://user:p%2Fss@")
        proc = start_training(project, "out", "--epochs", "6", MLFLOW_TRACKING_URI=secret_url)
        wait_for_logged_epoch(proc, root / "server.db")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    out = project / "out"
    assert {"model.pt", "checkpoint.pt", "train_metrics.json"} <= {p.name for p in out.iterdir()}
    assert "wrote out/model.pt" in stdout and "MLflow run" not in stdout
    warnings = [line for line in stderr.strip().splitlines() if not HEARTBEAT.match(line)]
    assert len(warnings) == 2 and all(w.startswith("Warning: ") for w in warnings), stderr
    assert "stopped answering" in warnings[0] and "training goes on" in warnings[0]
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert f"MLflow run {run_id}" in warnings[1] and "left unfinished" in warnings[1] and "--resume" in warnings[1]
    assert "p%2Fss" not in stderr + stdout

    # The run stays RUNNING in the store; the next clean-up there marks it, its process being gone.
    server_store = MlflowClient(f"sqlite:///{root}/server.db")
    assert server_store.get_run(run_id).info.status == "RUNNING"
    assert [r for r, _ in clean_stale_runs(client=server_store).marked] == [run_id]
    assert server_store.get_run(run_id).info.status == "FAILED"


def test_a_tracking_server_back_before_the_end_gets_the_whole_run(project, tmp_path_factory, migrated_mlflow_db):
    """The server dies after the first epoch and is started again at once, on the same address, while the training
    goes on: one warning, and at the end the run is FINISHED in the store with every epoch's metrics, those of the
    epochs trained while it was away included."""
    root = tmp_path_factory.mktemp("server")
    copy_store(migrated_mlflow_db, root / "server.db")
    with mlflow_server_process(f"sqlite:///{root}/server.db", root) as (url, server):
        proc = start_training(project, "out", "--epochs", "25", MLFLOW_TRACKING_URI=url)
        wait_for_logged_epoch(proc, root / "server.db")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    wait_until_gone(proc, lines)
    with mlflow_server_process(f"sqlite:///{root}/server.db", root, port=int(url.rsplit(":", 1)[1])):
        assert proc.wait(timeout=600) == 0, lines
        reader.join(timeout=10)
    assert_whole_run(project / "out", proc, lines, f"sqlite:///{root}/server.db", epochs=25)


def wait_until_gone(proc: subprocess.Popen, lines: list[str]) -> None:
    """Until the training, its stderr read into ``lines``, has warned that the store stopped answering."""
    deadline = time.monotonic() + 120
    while not any("stopped answering" in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, lines
        time.sleep(0.05)


def assert_whole_run(out: Path, proc: subprocess.Popen, lines: list[str], uri: str, epochs: int) -> None:
    """A training that lost its store and got it back: one warning (not "left unfinished"), and its run FINISHED
    in the store at ``uri`` with its logged model and every epoch's loss."""
    stdout = proc.stdout.read()
    warnings = [line for line in lines if not HEARTBEAT.match(line)]
    assert len(warnings) == 1 and "stopped answering" in warnings[0], lines
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert f"MLflow run {run_id}" in stdout
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.outputs.model_outputs
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, epochs + 1))


@pytest.mark.slow  # about 35 s: a server restarted under a real training or study
def test_a_postgres_store_that_restarts_mid_training_gets_the_whole_run(project, postgres):
    """PostgreSQL as the store itself, no server between: stopped at once (as a crash would) after the first logged
    epoch and started again while the training goes on. One warning, and at the end the run is FINISHED in the
    database with every epoch's metrics, those of the epochs trained while it was away included."""
    import psycopg

    uri = postgres.create_database(f"direct_{os.getpid()}")
    proc = start_training(project, "out", "--epochs", "25", MLFLOW_TRACKING_URI=uri)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    query = "SELECT count(*) FROM metrics WHERE key = 'epoch_seconds'"
    deadline = time.monotonic() + 300
    while True:  # the first epoch logged
        assert proc.poll() is None and time.monotonic() < deadline, lines
        with contextlib.suppress(psycopg.Error), psycopg.connect(uri.replace("+psycopg", ""), connect_timeout=5) as con:
            if con.execute(query).fetchone()[0]:
                break
        time.sleep(0.2)
    postgres.stop()
    try:
        wait_until_gone(proc, lines)
    finally:
        postgres.start()  # the session's other tests use this server
    assert proc.wait(timeout=600) == 0, lines
    reader.join(timeout=10)
    assert_whole_run(project / "out", proc, lines, uri, epochs=25)


@pytest.mark.parametrize(
    "uri",
    [
        "postgresql+psycopg://rrm:p/ss@127.0.0.1:{port}/mlflow",
        "postgresql+psycopg://rrm@127.0.0.1:{port}/mlflow?password=s3cr",
    ],
)
def test_a_database_store_that_is_down_fails_fast_with_one_line(monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(port=free_port()))
    started = time.monotonic()
    result = rrm("train", *QUICK, "--out-dir", "out")
    assert time.monotonic() - started < 10, "MLflow alone retries for about two minutes"
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot reach the MLflow tracking database"), lines
    assert "p/ss" not in lines[0] and "s3cr" not in lines[0]


def test_evaluate_checks_the_store_before_attacking(project, monkeypatch, digits_natural):
    model = project / "model.pt"
    shutil.copy(digits_natural.model_path, model)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    result = rrm("evaluate", model, "--n-examples", "20", "--steps", "2", "--restarts", "1", "--no-sanity")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the MLflow tracking server" in lines[0], result.stderr
    assert not (project / "eval_metrics.json").exists(), "nothing attacked, nothing written"
