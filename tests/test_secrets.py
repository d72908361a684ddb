"""Passwords never leave in clear: the masking function on every URL form, and each place that prints, tags or
writes a URL (tune's storage label, results.json and tag; the train summary; errors naming a tracking URI)."""

from __future__ import annotations

import json
import re
import time

import pytest
from _helpers import copy_store, free_port, mlflow_server, tiny_train_args
from click.testing import CliRunner

from rrm import cli as rrm_cli
from rrm.errors import RRMError
from rrm.secrets import mask_url

# Passwords that hold what broke the old masking: "/", "@", ":" and "?", percent-encoded or not.
SECRETS = ["p/ss", "p%2Fss", "p@ss", "p%40ss", "s3:cr/et@x", "a?b", "pl41n"]


@pytest.fixture(autouse=True)
def project(cli_project):
    return cli_project


def rrm(*args: str):
    return CliRunner().invoke(rrm_cli.cli, [str(a) for a in args])


def assert_hidden(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} leaked: {text}"


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize(
    ("form", "kept"),
    [
        ("postgresql+psycopg://rrm:{}@db.example:5432/optuna", "rrm:***@db.example:5432/optuna"),
        ("postgresql://:{}@db/o", "@db/o"),
        ("mysql+pymysql://rrm:{}@db/mlflow?charset=utf8mb4", "@db/mlflow?charset=utf8mb4"),
        ("http://user:{}@127.0.0.1:5000", "user:***@127.0.0.1:5000"),
        ("https://user:{}@mlflow.example/prefix/", "@mlflow.example/prefix/"),
        ("postgresql+psycopg://rrm@db:5432/optuna?password={}", "rrm@db:5432/optuna?password=***"),
        (
            "postgresql+psycopg://rrm@db:5432/optuna?sslmode=require&password={}&application_name=rrm",
            "?sslmode=require&password=***&application_name=rrm",
        ),
        ("postgresql+psycopg://rrm@db:5432/optuna?PASSWORD={}", "optuna?PASSWORD=***"),
        ("cannot open the Optuna storage 'postgresql://rrm:{}@db/o': connection refused", "@db/o': connection refused"),
        ("host=db user=rrm password={} dbname=optuna", "host=db user=rrm password=*** dbname=optuna"),
    ],
)
def test_every_url_form_loses_its_password_and_keeps_the_rest(form, kept, secret):
    masked = mask_url(form.format(secret))
    assert_hidden(masked.replace("***", ""), secret)
    assert kept in masked, "user, host, port, database and the other options still say which store it is"
    assert mask_url(masked) == masked, "masking twice changes nothing"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql+psycopg://rrm:p/ss@db:5432/optuna", "postgresql+psycopg://rrm:***@db:5432/optuna"),
        ("postgresql://rrm:p@ss@db/o?sslmode=require", "postgresql://rrm:***@db/o?sslmode=require"),
        ("postgresql://rrm@db/o?password=x&sslmode=require", "postgresql://rrm@db/o?password=***&sslmode=require"),
        ("http://user:p%2Fss@127.0.0.1:5000", "http://user:***@127.0.0.1:5000"),
    ],
)
def test_masked_urls_read_as_expected(url, masked):
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///mlflow.db",
        "sqlite:////abs/path/o.db",
        "journal:runs/tune/study.log",
        "http://127.0.0.1:5000",
        "postgresql+psycopg://rrm@db:5432/optuna",
        "file:///tmp/mlruns",
        "runs/tune/study.log",
    ],
)
def test_urls_without_passwords_are_unchanged(url):
    assert mask_url(url) == url


def test_the_tune_storage_label_and_its_errors_are_masked():
    from rrm.tune import storage_label
    from rrm.tune.storage import open_storage

    for secret in SECRETS:
        assert_hidden(storage_label(f"postgresql+psycopg://rrm:{secret}@db/optuna").replace("***", ""), secret)
    assert storage_label("postgresql://me:pw@db:5432/optuna") == "postgresql://me:***@db:5432/optuna"
    port = free_port()
    for url in (
        f"postgresql+psycopg://rrm:p/ss@127.0.0.1:{port}/optuna",
        f"postgresql+psycopg://rrm@127.0.0.1:{port}/optuna?password=s3cr%2Ft",
    ):
        with pytest.raises(RRMError) as caught:
            open_storage(url)
        assert_hidden(str(caught.value), "p/ss", "s3cr")
    with pytest.raises(RRMError) as caught:  # SQLAlchemy quotes a URL it cannot parse
        open_storage("postgresql+psycopg://rrm:p/ss@db:notaport/optuna")
    assert_hidden(str(caught.value), "p/ss")


@pytest.mark.usefixtures("mlflow_store")
def test_the_study_tag_and_results_json_are_masked_even_given_a_raw_url(project):
    """The tag and the results file mask what they are given: a caller that forgot the label leaks nothing."""
    import optuna
    from mlflow import MlflowClient

    from rrm import jobs
    from rrm.train import TrainConfig
    from rrm.tune import TuneConfig
    from rrm.tune.summary import summarise

    raw = "postgresql+psycopg://rrm:s3:cr/et@x@db:5432/optuna?password=an0ther"
    jobs.tracking()
    from rrm.tracking import open_study_run

    run_id, _ = open_study_run("s", raw, params={"method": "rrm"})
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags["rrm.study_storage"] == "postgresql+psycopg://rrm:***@db:5432/optuna?password=***"
    assert "rrm.pid" not in tags, "a study's parent run is shared by workers: no process of its own"

    cfg = TuneConfig(
        study_name="s",
        n_trials=1,
        out_dir=str(project / "tune"),
        train=TrainConfig(dataset="digits", method="rrm", teacher="t.pt"),
    )
    study = optuna.create_study(directions=["maximize", "maximize"])
    result = summarise(study, cfg, [], raw, [], time.perf_counter())
    written = (project / "tune" / "results.json").read_text()
    assert json.loads(written)["storage"] == tags["rrm.study_storage"] == result.storage
    assert_hidden(written, "s3:cr", "an0ther")


@pytest.mark.usefixtures("mlflow_store")
def test_tune_on_postgres_with_passwords_prints_tags_and_writes_none(postgres, digits_teacher, project):
    """A real study in PostgreSQL, its URL with a password holding "/" and "@", then one passed as ?password=:
    stdout, stderr, the MLflow runs and the study's files never hold either (trust authentication ignores them)."""
    from mlflow import MlflowClient

    small = [
        "--dataset",
        "digits",
        "--model",
        "cnn",
        "--eps",
        "0.1",
        "--epochs",
        "1",
        "--lr",
        "0.05",
        "--attack-examples",
        "32",
        "--attack-steps",
        "2",
        "--test-examples",
        "32",
        "--test-steps",
        "2",
        "--best-trials",
        "1",
        "--n-trials",
        "1",
        "--teacher",
        digits_teacher.model_path,
    ]
    base = f"postgresql+psycopg://{postgres.user}"
    where = f"{postgres.host}:{postgres.port}/optuna"
    for name, storage, secret in [
        ("slash", f"{base}:p/ss%40w0rd@{where}", "w0rd"),  # SQLAlchemy needs @ encoded
        ("query", f"{base}@{where}?password=qu3ry%2Fpw", "qu3ry"),
    ]:
        result = rrm("tune", "--storage", storage, "--study-name", name, "--out-dir", f"tune-{name}", *small)
        assert result.exit_code == 0, result.output
        assert_hidden(result.output + result.stderr, secret)
        assert "***@" in result.output or "password=***" in result.output
        for path in (project / f"tune-{name}").rglob("*"):
            if path.suffix in (".json", ".csv"):
                assert_hidden(path.read_text(), secret)
        client = MlflowClient()
        for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
            assert_hidden(json.dumps([run.data.tags, run.data.params]), secret)


def test_the_train_summary_and_run_record_mask_a_tracking_uri_password(
    project, monkeypatch, tmp_path_factory, migrated_mlflow_db
):
    """`rrm train` against an `mlflow server` whose URI carries user:password (the server ignores them)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("server")
    copy_store(migrated_mlflow_db, root / "server.db")
    with mlflow_server(f"sqlite:///{root}/server.db", root) as url:
        secret_url = url.replace("http://", "http://user:p%2Fss@")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", secret_url)
        result = rrm("train", *tiny_train_args(), "--out-dir", "out")
        assert result.exit_code == 0, result.output
        assert_hidden(result.output + result.stderr, "p%2Fss", "p/ss")
        assert f"({url.replace('http://', 'http://user:***@')})" in result.output
        run_id = re.search(r"MLflow run ([0-9a-f]{32})", result.output).group(1)
        run = MlflowClient(url).get_run(run_id)
        assert_hidden(json.dumps([run.data.tags, run.data.params]), "p%2Fss", "p/ss")
        for path in (project / "out").glob("*.json"):
            assert_hidden(path.read_text(), "p%2Fss", "p/ss")


@pytest.mark.parametrize(
    "uri",
    [
        "http://user:p%2Fss@127.0.0.1:{port}",
        "postgresql+psycopg://rrm:p/ss@127.0.0.1:{port}/mlflow",
        "postgresql+psycopg://rrm@127.0.0.1:{port}/mlflow?password=p/ss",
    ],
)
def test_cannot_reach_errors_mask_the_tracking_uri(monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(port=free_port()))
    result = rrm("teacher", "list")
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.startswith("Error: ") and "cannot reach the MLflow tracking" in line and "\n" not in line, line
    assert_hidden(line, "p%2Fss", "p/ss")


def test_a_sqlite_store_in_a_missing_directory_is_an_error_not_a_new_store(cli_project, monkeypatch):
    from click.testing import CliRunner

    from rrm import cli as rrm_cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{cli_project}/nowhere/mlflow.db")
    result = CliRunner().invoke(rrm_cli.cli, ["teacher", "list"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is in a directory that does not exist" in lines[0], result.stderr
    assert not (cli_project / "nowhere").exists()
