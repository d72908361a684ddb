"""The team set-up of the README on one machine: an MLflow tracking server whose backend store is PostgreSQL (started
by the `postgres` fixture) with a local artifact folder, Optuna workers sharing one study in PostgreSQL, a DVC remote.

Without PostgreSQL the first two skip with the reason (they fail under CI=true, where it is installed).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from _helpers import (
    digits_file,
    mlflow_server,
    one_torch_thread,
    tiny_train_args,
    tiny_tune_args,
    undo_cli_settings,
    worker_env,
)
from click.testing import CliRunner
from mlflow import MlflowClient

from rrm import cli as rrm_cli
from rrm.io import sha256_file


def small() -> list[str]:
    """The smallest study's options; the digits come from their prepared file (see :func:`_helpers.digits_file`)."""
    return tiny_tune_args(dataset=digits_file())


TINY_TRAIN = tiny_train_args(lr=0.05, experiment="team")


@pytest.fixture(autouse=True)
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    undo_cli_settings(monkeypatch)
    with one_torch_thread():
        yield tmp_path


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    """`mlflow server` on loopback: backend store in PostgreSQL, artifacts proxied to a local folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(postgres.url("mlflow"), root) as url:
        yield url, root / "artifacts"


def rrm(*args: str):
    result = CliRunner().invoke(rrm_cli.cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_runs_and_teachers_live_in_the_team_server_on_postgres(team_server, postgres, project, monkeypatch):
    url, artifacts = team_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    trained = rrm("train", "--method", "sat", "--eps", "0.1", *TINY_TRAIN, "--out-dir", "teacher")
    teacher_run = re.search(r"MLflow run ([0-9a-f]{32})", trained.output).group(1)
    evaluation = project / "eval_metrics.json"
    evaluation.write_text(
        json.dumps(
            {
                "natural_accuracy": 0.8,
                "adversarial_accuracy": {"apgd": 0.5},
                "eps": 0.1,
                "norm": "linf",
                "sanity_passed": True,
            }
        )
    )
    # A hand-written evaluation names no model file: registering it takes --force.
    rrm("teacher", "register", "teacher/model.pt", "--evaluation", evaluation, "--name", "team-teacher", "--force")
    rrm("teacher", "promote", "1", "champion", "--name", "team-teacher")
    rrm("teacher", "pull", "models:/team-teacher@champion", "--out", "pulled.pt")
    assert sha256_file(project / "pulled.pt") == sha256_file(project / "teacher" / "model.pt")
    student = rrm(
        "train",
        "--method",
        "rrm",
        "--lambda",
        "0.5",
        "--teacher",
        "models:/team-teacher@champion",
        *TINY_TRAIN,
        "--out-dir",
        "student",
    )
    student_run = re.search(r"MLflow run ([0-9a-f]{32})", student.output).group(1)

    from mlflow import MlflowClient

    client = MlflowClient(url)
    tags = client.get_run(student_run).data.tags
    assert (tags["rrm.teacher_version"], tags["rrm.teacher_run_id"]) == ("1", teacher_run)
    assert list(artifacts.rglob("MLmodel")), "artifacts go through the server to its artifact folder"
    # The records are in PostgreSQL itself, not in a file beside the server.
    import psycopg

    with psycopg.connect(host=postgres.host, port=postgres.port, user=postgres.user, dbname="mlflow") as con:
        finished = {r[0] for r in con.execute("SELECT run_uuid FROM runs WHERE status = 'FINISHED'").fetchall()}
        models = {r[0] for r in con.execute("SELECT name FROM registered_models").fetchall()}
    assert {teacher_run, student_run} <= finished and "team-teacher" in models


def _tune_worker(teacher: Path, storage: str, study: str, n_trials: int) -> subprocess.Popen:
    """One `rrm tune` worker process on ``study`` in ``storage`` (untracked)."""
    command = [sys.executable, "-m", "rrm.cli", "tune", "--teacher", str(teacher), *small(), "--no-track"]
    command += ["--n-trials", str(n_trials), "--storage", storage, "--study-name", study, "--best-trials", "1"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env())


def test_two_tune_workers_share_one_study_on_postgres(postgres, digits_teacher, project):
    storage = postgres.url("optuna")
    workers = [_tune_worker(digits_teacher.model_path, storage, "team", 4) for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err
    ran = [int(re.search(r"\((\d+) run now", out).group(1)) for out, _ in outputs]
    trials = optuna.load_study(study_name="team", storage=storage).trials
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))), "no trial lost or duplicated"
    assert sum(ran) == len(trials) and min(ran) >= 1, (ran, len(trials))
    assert 4 <= len(trials) <= 5 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({json.dumps(t.params) for t in trials}) == len(trials), "the workers sampled different points"


def test_a_tune_worker_killed_mid_trial_leaves_its_trial_failed_and_the_others_complete(
    postgres, digits_teacher, project
):
    """Two workers on one PostgreSQL study; one is SIGKILLed while its trial runs. The other marks that trial FAIL
    (not RUNNING for ever) and completes the study: every other trial COMPLETE, none lost or run twice."""
    storage = postgres.url("optuna")
    victim, other = (_tune_worker(digits_teacher.model_path, storage, "killed", 5) for _ in range(2))
    deadline = time.monotonic() + 240
    killed = None
    while killed is None and time.monotonic() < deadline and victim.poll() is None:
        with contextlib.suppress(KeyError):  # the study is made by whichever worker comes first
            for trial in optuna.load_study(study_name="killed", storage=storage).trials:
                owner = trial.user_attrs.get("rrm.worker") or {}
                if trial.state == optuna.trial.TrialState.RUNNING and owner.get("pid") == victim.pid:
                    victim.kill()
                    killed = trial.number
                    break
        time.sleep(0.05)
    victim.communicate(timeout=60)
    assert killed is not None, "the victim never ran a trial"
    _, err = other.communicate(timeout=300)
    assert other.returncode == 0, err
    assert f"trial {killed} was left running by a worker that died; marked FAIL" in err, err
    trials = {t.number: t.state for t in optuna.load_study(study_name="killed", storage=storage).trials}
    assert sorted(trials) == list(range(len(trials))), "no trial lost or duplicated"
    assert trials.pop(killed) == optuna.trial.TrialState.FAIL
    assert set(trials.values()) == {optuna.trial.TrialState.COMPLETE} and len(trials) >= 4, trials


@pytest.mark.slow  # about 35 s: a server restarted under a real training or study
def test_a_study_whose_database_goes_away_continues_where_it_stopped(postgres, digits_teacher, project):
    """The study's PostgreSQL stops at once while a trial runs: the worker ends with one line that says so and how
    to go on. Once the database is back, the same command finishes the study: the interrupted trial FAIL, every
    other trial COMPLETE, as many complete as asked for, none lost or counted twice."""
    storage = postgres.create_database(f"away_{os.getpid()}")
    worker = _tune_worker(digits_teacher.model_path, storage, "away", 4)
    deadline, interrupted = time.monotonic() + 240, None
    while interrupted is None:
        assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()
        with contextlib.suppress(KeyError):  # not created yet
            trials = optuna.load_study(study_name="away", storage=storage).trials
            running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
            if running and any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
                interrupted = running[0]
        time.sleep(0.05)
    postgres.stop()
    try:
        _, err = worker.communicate(timeout=240)
    finally:
        postgres.start()
    lines = err.strip().splitlines()
    assert worker.returncode == 1 and lines[-1].startswith("Error: the Optuna storage "), err
    assert "Traceback" not in err and "stopped answering" in lines[-1] and "rerun the same command" in lines[-1], err
    again = _tune_worker(digits_teacher.model_path, storage, "away", 4)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    trials = {t.number: t.state for t in optuna.load_study(study_name="away", storage=storage).trials}
    assert sorted(trials) == list(range(len(trials))), "no trial lost or duplicated"
    assert trials.pop(interrupted) == optuna.trial.TrialState.FAIL
    assert list(trials.values()) == [optuna.trial.TrialState.COMPLETE] * 4, trials


@pytest.mark.slow
def test_sixteen_trainings_and_four_tune_workers_at_once_on_one_server(team_server, postgres, digits_teacher, project):
    """Load: 16 tracked trainings and then 4 tracked tuning workers (one PostgreSQL study) at once against one MLflow
    server on PostgreSQL. Every training run ends FINISHED with its metrics, files and logged model; the study's
    trials are each one child run in their state, under one FINISHED parent (`benchmarks/bench_load.py` measures
    the rates)."""
    url, _ = team_server
    env = worker_env(MLFLOW_TRACKING_URI=url)
    train = [sys.executable, "-m", "rrm.cli", "train", *tiny_train_args(experiment="load")]
    trainings = [
        subprocess.Popen(
            [*train, "--seed", str(i), "--out-dir", f"load/{i}"], env=env, stderr=subprocess.PIPE, text=True
        )
        for i in range(16)
    ]
    assert [p.wait(timeout=600) for p in trainings] == [0] * 16, [p.stderr.read()[-500:] for p in trainings]
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("load").experiment_id])
    assert len(runs) == 16 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        assert {"test_accuracy", "total_flops", "loss"} <= set(run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"model.pt", "checkpoint.pt", "train_metrics.json"} <= artifacts
        assert len(run.outputs.model_outputs) == 1

    tune = [sys.executable, "-m", "rrm.cli", "tune", "--teacher", str(digits_teacher.model_path), *small()]
    tune += ["--n-trials", "8", "--storage", postgres.url("optuna"), "--study-name", "load"]
    tune += ["--experiment", "load-tune", "--best-trials", "1"]
    workers = [subprocess.Popen(tune, env=env, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    assert [w.wait(timeout=600) for w in workers] == [0] * 4, [w.stderr.read()[-500:] for w in workers]
    runs = client.search_runs([client.get_experiment_by_name("load-tune").experiment_id])
    parents = [r for r in runs if r.data.tags.get("rrm.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("rrm.kind") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    study = optuna.load_study(study_name="load", storage=postgres.url("optuna"))
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trials) == [t.number for t in study.trials]
    ended = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    assert all(r.info.status == ended[r.data.tags["optuna.state"]] for r in trials)


def test_dvc_remote_push_then_pull_restores_the_data(tmp_path):
    def run(*args: str) -> None:
        done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=worker_env(), timeout=120)
        assert done.returncode == 0, (args, done.stdout, done.stderr)

    dvc = (sys.executable, "-m", "dvc")
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    rrm("data", "prepare", "--dataset", "digits", "--out", "data/digits.safetensors")
    digest = sha256_file(tmp_path / "data" / "digits.safetensors")
    run(*dvc, "add", "-q", "data/digits.safetensors")
    run(*dvc, "remote", "add", "-d", "team", str(tmp_path.parent / f"{tmp_path.name}-remote"))
    run(*dvc, "push", "-q")
    (tmp_path / "data" / "digits.safetensors").unlink()
    shutil.rmtree(tmp_path / ".dvc" / "cache")  # so the file can only come back from the remote
    run(*dvc, "pull", "-q")
    assert sha256_file(tmp_path / "data" / "digits.safetensors") == digest
