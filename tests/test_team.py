"""The team set-up of the README on one machine: an MLflow tracking server whose backend store is PostgreSQL (started
by the `postgres` fixture) with a local artifact folder, Optuna workers sharing one study in PostgreSQL, a DVC remote.

Without PostgreSQL the first two skip with the reason (they fail under CI=true, where it is installed).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import optuna
import pytest
from _helpers import mlflow_server, one_torch_thread, tiny_train_args, tiny_tune_args, undo_cli_settings, worker_env
from click.testing import CliRunner

from rrm import cli as rrm_cli
from rrm.io import sha256_file

SMALL = tiny_tune_args()
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


def test_two_tune_workers_share_one_study_on_postgres(postgres, digits_teacher, project):
    storage = postgres.url("optuna")
    command = [
        sys.executable,
        "-m",
        "rrm.cli",
        "tune",
        "--teacher",
        str(digits_teacher.model_path),
        *SMALL,
        "--n-trials",
        "4",
        "--storage",
        storage,
        "--study-name",
        "team",
        "--no-track",
        "--best-trials",
        "1",
    ]
    workers = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env())
        for _ in range(2)
    ]
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
