"""`rrm tune` on digits: a tracked study with plots, pruning, bad input, two workers on a journal file, resume."""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import sqlite3
import subprocess
import sys
import time
import wsgiref.util
from pathlib import Path

import matplotlib.image
import optuna
import pytest
from _helpers import digits_file, tiny_tune_args, worker_env
from click.testing import CliRunner
from mlflow import MlflowClient

from rrm import cli as rrm_cli
from rrm.errors import RRMError
from rrm.plots import running_best
from rrm.tune import TuneConfig, parse_range, storage_label

ROOT = Path(__file__).resolve().parents[1]


def small() -> list[str]:
    """The smallest study's options; the digits come from their prepared file (see :func:`_helpers.digits_file`)."""
    return tiny_tune_args(best_trials=2, dataset=digits_file())


@pytest.fixture(autouse=True)
def project(cli_project):
    return cli_project


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A small SAT teacher on digits (2 epochs; robustness is not what these tests check)."""
    from rrm.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tune-teacher")
    cfg = TrainConfig(
        dataset="digits",
        model="cnn",
        method="sat",
        epochs=2,
        lr=0.05,
        eps=0.1,
        monitor_examples=0,
        progress=False,
        out_dir=str(out),
    )
    return str(train(cfg).model_path)


def rrm(*args: str):
    return CliRunner().invoke(rrm_cli.cli, [str(a) for a in args])


def _runs(project: Path, experiment: str = "rrm"):
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    parents = [r for r in runs if r.data.tags.get("rrm.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("rrm.kind") == "trial"]
    return client, parents, children


def _dashboard_get(storage: str, path: str) -> dict:
    """GET ``path`` from optuna-dashboard's app over ``storage``, in process (the app `optuna-dashboard STORAGE`
    serves)."""
    from optuna_dashboard import wsgi

    environ: dict = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, REQUEST_METHOD="GET")
    status = []
    body = b"".join(wsgi(storage)(environ, lambda code, headers, exc_info=None: status.append(code)))
    assert status == ["200 OK"], (status, body[:300])
    return json.loads(body)


def _png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.usefixtures("mlflow_store")
def test_small_study_records_every_trial_as_a_child_run_and_writes_the_plots(project, teacher):
    result = rrm("tune", "--method", "rrm", "--teacher", teacher, *small(), "--n-trials", "3", "--study-name", "s")
    assert result.exit_code == 0, result.output
    assert len(re.findall(r"^trial \d+ complete: lambda=", result.stderr, re.M)) == 3, result.stderr

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{project}/optuna.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert all(1e-5 <= t.params["lambda"] <= 1 for t in study.trials)

    client, parents, children = _runs(project)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == [0, 1, 2]
    by_number = {t.number: t for t in study.trials}
    for child in children:
        trial = by_number[int(child.data.tags["optuna.trial"])]
        assert child.info.status == "FINISHED" and child.data.tags["optuna.state"] == "COMPLETE"
        assert float(child.data.params["lambda"]) == pytest.approx(trial.params["lambda"])
        history = client.get_metric_history(child.info.run_id, "val_apgd_accuracy")
        assert [m.step for m in history] == [1]
        assert child.data.metrics["val_natural_accuracy"] == pytest.approx(trial.values[0])

    out = project / "runs" / "tune" / "s"
    for name in ("pareto_front.png", "lambda_vs_accuracy.png", "optimization_history.png"):
        _png(out / name)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "pareto_front.png",
        "lambda_vs_accuracy.png",
        "optimization_history.png",
        "results.json",
        "trials.csv",
    } <= logged
    results = json.loads((out / "results.json").read_text())
    assert results["trials"]["complete"] == 3 and results["finished_trials"] == 3
    assert results["best"], "the Pareto front is never empty"
    for best in results["best"].values():
        assert 0 <= best["test"]["adversarial_accuracy"] <= best["test"]["natural_accuracy"] <= 1
    assert json.loads(parent.data.tags["rrm.best_trials"]) == [int(k.split("_")[1]) for k in results["best"]]
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 4
    # Named objectives; the parent run holds the tuned lambda of the robust end of the front (not the untuned
    # default) and each objective's best over the trials.
    assert study.metric_names == ["val_natural_accuracy", "val_apgd_accuracy"]
    top = by_number[int(next(iter(results["best"])).split("_")[1])]
    assert "train.lambda" not in parent.data.params and "train.lam" not in parent.data.params
    assert float(parent.data.params["best.lambda"]) == pytest.approx(top.params["lambda"])
    assert parent.data.metrics["best_val_natural_accuracy"] == pytest.approx(max(t.values[0] for t in study.trials))
    assert parent.data.metrics["best_val_adversarial_accuracy"] == pytest.approx(max(t.values[1] for t in study.trials))
    assert parent.data.metrics["robust_end_val_natural_accuracy"] == pytest.approx(top.values[0])
    # optuna-dashboard reads the study from rrm's storage, its objectives by name
    storage = f"sqlite:///{project}/optuna.db"
    (listed,) = _dashboard_get(storage, "/api/studies")["study_summaries"]
    dashboard = _dashboard_get(storage, f"/api/studies/{listed['study_id']}")
    assert dashboard["name"] == "s" and len(dashboard["trials"]) == 3
    assert dashboard["objective_names"] == ["val_natural_accuracy", "val_apgd_accuracy"]

    # Run again with the same target: nothing to do, nothing new recorded, the parent run reused.
    again = rrm("tune", "--method", "rrm", "--teacher", teacher, *small(), "--n-trials", "3", "--study-name", "s")
    assert again.exit_code == 0, again.output
    assert "3/3 finished trials (0 run now" in again.output
    _, parents, children = _runs(project)
    assert len(parents) == 1 and len(children) == 3


@pytest.mark.usefixtures("mlflow_store")
def test_under_mlflow_run_the_projects_run_is_the_parent_and_trials_join_its_experiment(project, teacher, monkeypatch):
    """`mlflow run . -e tune` starts the project's run (in the Default experiment unless told otherwise) and passes
    MLFLOW_RUN_ID; the trials must sit in that run's experiment, or `mlflow ui` cannot nest them under it."""
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    project_run = client.create_run("0").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run)
    result = rrm("tune", "--method", "rrm", "--teacher", teacher, *small(), "--n-trials", "1", "--study-name", "m")
    assert result.exit_code == 0, result.output
    children = client.search_runs(["0"], "tags.`rrm.kind` = 'trial'")
    assert [c.data.tags["mlflow.parentRunId"] for c in children] == [project_run]
    assert client.get_run(project_run).data.tags["rrm.kind"] == "study"


@pytest.mark.usefixtures("mlflow_store")
def test_pruned_trials_are_recorded_as_pruned(project, teacher):
    # Threshold 1.0: any APGD accuracy below 100% after an epoch stops the trial, so every trial is pruned.
    result = rrm(
        "tune",
        "--method",
        "kd",
        "--teacher",
        teacher,
        *small(),
        "--epochs",
        "3",
        "--n-trials",
        "2",
        "--mode",
        "constrained",
        "--pruner",
        "threshold",
        "--prune-below",
        "1.0",
        "--study-name",
        "p",
    )
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="p", storage=f"sqlite:///{project}/optuna.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(t.last_step == 1 and set(t.params) == {"temperature", "alpha"} for t in study.trials)
    client, _parents, children = _runs(project)
    assert len(children) == 2
    for child in children:
        assert child.info.status == "KILLED" and child.data.tags["optuna.state"] == "PRUNED"
        assert "pruned" in child.data.tags["rrm.stopped"]
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_apgd_accuracy")] == [1]
    results = json.loads((project / "runs" / "tune" / "p" / "results.json").read_text())
    assert results["trials"]["pruned"] == 2 and results["best"] == {}
    assert "trial 0 pruned" in result.stderr
    _png(project / "runs" / "tune" / "p" / "temperature_vs_accuracy.png")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "bogus"], "unknown tuning method 'bogus'"),
        (["--mode", "both"], "unknown tuning mode 'both'"),
        (["--range", "lambda=1,1e-5"], "range of lambda [1, 1e-05] is inverted"),
        (["--range", "lambda=0.1,0.1"], "range of lambda [0.1, 0.1] is empty"),
        (["--range", "lambda=0,1"], "log scale and must be > 0"),
        (["--range", "lambda=1e-3"], "a range is LOW,HIGH"),
        (["--range", "temperature=1,50"], "unknown parameter to tune for 'rrm' 'temperature'"),
        (["--method", "kd", "--range", "alpha=0,2"], "alpha must be in [0, 1]"),
        (["--knobs", "momentum"], "unknown parameter to tune"),
        (["--pruner", "median"], "needs --mode constrained"),
        (["--mode", "constrained", "--pruner", "sometimes"], "unknown pruner 'sometimes'"),
        (["--n-trials", "0"], "n_trials must be >= 1"),
        (["--storage", "somewhere"], "is not a URL"),
        (["--storage", "notadb://x"], "unknown database kind 'notadb'"),
    ],
)
def test_bad_input_fails_before_any_trial(project, teacher, args, message):
    result = rrm("tune", "--teacher", teacher, *small(), "--n-trials", "2", *args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert not (project / "optuna.db").exists() and not (project / "runs").exists()
    assert not (project / "mlflow.db").exists()


def test_missing_teacher_and_unreachable_postgres_fail_fast(project, teacher):
    result = rrm("tune", *small())
    assert result.exit_code == 1 and "needs a teacher" in result.stderr
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    result = rrm("tune", "--teacher", teacher, *small(), "--storage", f"postgresql://u:secret@127.0.0.1:{port}/db")
    assert time.monotonic() - started < 30
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    # Without a PostgreSQL driver installed the fix is to install one; with one, the server is down.
    assert "pip install psycopg" in line or "cannot open the Optuna storage" in line, line
    assert "secret" not in line and line.count("\n") == 0
    assert not (project / "mlflow.db").exists() and not (project / "runs").exists()


def test_a_study_made_with_other_settings_is_refused(project, teacher):
    common = ["tune", "--teacher", teacher, *small(), "--n-trials", "1", "--no-track", "--study-name", "x"]
    assert rrm(*common).exit_code == 0
    result = rrm(*common, "--range", "lambda=1e-3,1e-1")
    assert result.exit_code == 1 and "made with other settings (ranges)" in result.stderr, result.output
    study = optuna.load_study(study_name="x", storage=f"sqlite:///{project}/optuna.db")
    assert len(study.trials) == 1


def test_two_workers_share_one_journal_study(project, teacher):
    journal = project / "study.log"
    command = [
        sys.executable,
        "-m",
        "rrm.cli",
        "tune",
        "--teacher",
        teacher,
        *small(),
        "--n-trials",
        "6",
        "--storage",
        f"journal:{journal}",
        "--study-name",
        "shared",
        "--no-track",
        "--best-trials",
        "1",
    ]
    workers = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env())
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (_out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err
    ran = [int(re.search(r"\((\d+) run now", out).group(1)) for out, _ in outputs]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))), "no trial lost or duplicated"
    assert sum(ran) == len(trials), (ran, len(trials))
    # Both may start their last trial at the same instant: at most one trial past the target.
    assert 6 <= len(trials) <= 7 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    logged = [line for _, err in outputs for line in err.splitlines() if line.startswith("trial ")]
    assert sorted(int(line.split()[1]) for line in logged) == numbers
    assert len({json.dumps(t.params) for t in trials}) == len(trials), "the workers sampled different points"


def _trial_states(db: Path) -> list[tuple[str, int]]:
    """(state, number of parameters) per trial, read-only: optuna.load_study would create the tables the worker is
    creating at that moment, and the two may collide."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
        return con.execute(
            "SELECT t.state, COUNT(p.param_id) FROM trials t "
            "LEFT JOIN trial_params p ON p.trial_id = t.trial_id GROUP BY t.trial_id"
        ).fetchall()


def test_an_interrupted_study_resumes_instead_of_starting_over(project, teacher):
    url = f"sqlite:///{project}/optuna.db"
    command = [
        sys.executable,
        "-m",
        "rrm.cli",
        "tune",
        "--teacher",
        teacher,
        *small(),
        "--epochs",
        "2",
        "--n-trials",
        "50",
        "--study-name",
        "r",
        "--no-track",
    ]
    log = project / "worker.log"
    with log.open("w") as err:
        worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=worker_env())
    deadline = time.monotonic() + 240
    states: list[tuple[str, int]] = []
    try:  # kill it while it trains its third (or later) trial
        while time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.5)
            try:
                states = _trial_states(project / "optuna.db")
            except sqlite3.Error:  # not created yet, its tables are being made, or it is writing
                continue
            if sum(s == "COMPLETE" for s, _ in states) >= 2 and any(s == "RUNNING" and n for s, n in states):
                break
    finally:
        worker.kill()
        worker.wait()
    reached = sum(s == "COMPLETE" for s, _ in states) >= 2 and any(s == "RUNNING" for s, _ in states)
    assert reached, f"the worker never got to its third trial: {states}\n" + log.read_text()[-3000:]
    before = {t.number: t for t in optuna.load_study(study_name="r", storage=url).trials}
    kept = {n: t.params for n, t in before.items() if t.state == optuna.trial.TrialState.COMPLETE}
    zombies = [n for n, t in before.items() if t.state == optuna.trial.TrialState.RUNNING]
    assert zombies

    target = len(kept) + 2
    result = rrm(
        "tune",
        "--teacher",
        teacher,
        *small(),
        "--epochs",
        "2",
        "--n-trials",
        str(target),
        "--study-name",
        "r",
        "--no-track",
    )
    assert result.exit_code == 0, result.output
    assert f"{target}/{target} finished trials (2 run now" in result.output
    after = optuna.load_study(study_name="r", storage=url).trials
    for number, params in kept.items():  # the earlier trials are kept as they were
        assert after[number].state == optuna.trial.TrialState.COMPLETE and after[number].params == params
    for number in zombies:  # the trial the kill interrupted is failed, not counted and not resumed
        assert after[number].state == optuna.trial.TrialState.FAIL
        assert f"trial {number} was left running by a worker that died" in result.stderr
    assert len(after) == len(before) + 2
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in after) == target


def test_ranges_labels_and_settings():
    assert parse_range("1e-5,1") == (1e-5, 1.0) and parse_range([1, 50]) == (1.0, 50.0)
    with pytest.raises(RRMError, match="LOW,HIGH"):
        parse_range("1,2,3")
    assert storage_label("postgresql://me:pw@db:5432/optuna") == "postgresql://me:***@db:5432/optuna"
    cfg = TuneConfig(method="kdiga", ranges={"lr": (0.01, 0.1)})
    assert cfg.tuned == ("gamma", "temperature", "lr")
    assert cfg.name == "kdiga-cnn-mnist5k" and cfg.pruner_name == "none"
    assert TuneConfig(mode="constrained").pruner_name == "median"


def test_only_rrm_tune_imports_optuna_and_the_training_core_imports_neither():
    importers = sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "rrm").rglob("*.py")
        if re.search(r"^\s*(import|from) optuna", p.read_text(), re.M)
    )
    assert importers and all(p.startswith("rrm/tune/") for p in importers), importers
    script = "import sys, rrm.train, rrm.cli; assert not {'optuna', 'mlflow'} & set(sys.modules), sys.modules.keys()"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=worker_env(), timeout=120)
    assert done.returncode == 0, done.stderr


def test_trials_of_dead_or_missing_workers_are_failed(monkeypatch):
    from rrm.tune import storage

    study = optuna.create_study()
    mine, dead, orphan = study.ask(), study.ask(), study.ask()
    mine.set_user_attr("rrm.worker", storage.this_worker())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead.set_user_attr("rrm.worker", {"host": socket.gethostname(), "pid": int(gone.stdout)})
    assert [t.number for t in storage.abandon_dead_trials(study)] == [dead.number]  # the orphan is still young
    monkeypatch.setattr(storage, "ORPHAN_SECONDS", 0)
    assert [t.number for t in storage.abandon_dead_trials(study)] == [orphan.number]
    assert [t.state.name for t in study.trials] == ["RUNNING", "FAIL", "FAIL"]
    assert storage.trial_counts(study) == (0, 1)


def test_workers_that_race_to_create_the_schema_open_the_storage_again(monkeypatch, tmp_path):
    """Two workers starting on an empty PostgreSQL both create Optuna's tables; the loser retries, others fail."""
    from rrm.tune import storage

    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise RuntimeError('type "studydirection" already exists')
        return real(url, **kwargs)

    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    assert isinstance(storage.open_storage(f"sqlite:///{tmp_path}/o.db"), real) and len(calls) == 2

    def broken(url, **kwargs):
        calls.append(url)
        raise RuntimeError("password authentication failed")

    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    with pytest.raises(RRMError, match="password authentication failed"):
        storage.open_storage(f"sqlite:///{tmp_path}/o.db")
    assert len(calls) == 1


def test_the_history_plot_rings_every_improvement_the_last_trials_included():
    """The best-so-far line steps after each trial, so an improvement on the last trial would not show: each
    improvement is also ringed. Infeasible trials do not count."""
    values = [(0.2, True), (0.5, False), (0.4, True), (0.4, True), (0.7, True)]
    trials = [{"number": i, "acc": v, "feasible": ok} for i, (v, ok) in enumerate(values)]
    best, better = running_best(trials, "acc")
    assert best == [0.2, 0.2, 0.4, 0.4, 0.7]
    assert better == [(0, 0.2), (2, 0.4), (4, 0.7)]
    best, better = running_best([{"number": 0, "acc": 0.9, "feasible": False}], "acc")
    assert math.isnan(best[0]) and better == []
