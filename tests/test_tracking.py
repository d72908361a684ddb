"""MLflow tracking and the teacher registry, on a SQLite store in a temp dir and on a server started on loopback."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _helpers import copy_store, free_port, mlflow_server, one_torch_thread, tiny_train_args, undo_cli_settings
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rrm import cli as rrm_cli
from rrm import tracking
from rrm.errors import RRMError
from rrm.evaluation import EvalConfig, EvalResult, evaluate, spec_record
from rrm.io import sha256_file
from rrm.models import load_model, save_model
from rrm.tracking.evaluations import evaluation_of_run
from rrm.tracking.logged_models import has_pt2
from rrm.tracking.notes import flops, percent
from rrm.tracking.runs import ensure_experiment
from rrm.tracking.views import VIEW_ID, ui_address, view_url
from rrm.train import Callback, TrainConfig, train

VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"

DIGITS = dict(dataset="digits", model="cnn", epochs=1, monitor_examples=0, progress=False)


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory, migrated_mlflow_db):
    """A project directory (a git repo run by a DVC stage) with its own SQLite store."""
    root = tmp_path_factory.mktemp("project")
    copy_store(migrated_mlflow_db, root / "mlflow.db")
    _git(root, "init", "-q")
    _git(root, "commit", "-q", "--allow-empty", "-m", "start")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.setenv("DVC_STAGE", "train_teacher")
        yield root


@pytest.fixture(scope="module")
def teacher_run(store):
    """A tracked SAT teacher on digits (Linf eps 0.1, 2 epochs)."""
    cfg = TrainConfig(
        **{**DIGITS, "epochs": 2, "monitor_examples": 100}, method="sat", eps=0.1, out_dir=str(store / "teacher")
    )
    with tracking.MlflowCallback(experiment="tests") as tracker:
        result = train(cfg, callbacks=[tracker])
    return tracker, result


@pytest.fixture(scope="module")
def sat_file(store):
    """An untracked SAT model file: no run and no evaluation anywhere."""
    cfg = TrainConfig(**DIGITS, method="sat", eps=0.1, out_dir=str(store / "untracked"))
    return train(cfg).model_path


def _evaluate(result) -> EvalResult:
    """`rrm evaluate` at a small budget: APGD and PGD on 100 test images (sanity checks have their own tests)."""
    config = EvalConfig(
        norm="linf", eps=0.1, attacks=("apgd", "pgd"), n_examples=100, steps=10, restarts=1, pgd_steps=10, sanity=False
    )
    return evaluate(result.model.cpu().float().eval(), result.data, config, model_sha256=sha256_file(result.model_path))


@pytest.mark.usefixtures("mlflow_store")
def test_an_experiment_carries_the_robustness_view_and_keeps_a_users_edits():
    """The saved view in MLflow's own form (what its "Save as new view" writes: a browser test opens it)."""
    client = MlflowClient()
    made = ensure_experiment(client, "viewed")
    envelope = json.loads(client.get_experiment(made).tags[VIEW_TAG])
    assert envelope["name"] == "Robustness" and envelope["createdAt"] == envelope["updatedAt"] > 0
    state = json.loads(envelope["state"])
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`robust/headline`", False), "best first"
    assert state["searchFilter"] == "tags.`rrm.kind` = 'train'"
    assert {"metrics.`natural/accuracy`", "metrics.`robust/autoattack`", "params.`method`"} <= set(
        state["selectedColumns"]
    )
    assert view_url("http://127.0.0.1:5000/", made) == (
        f"http://127.0.0.1:5000/#/experiments/{made}/runs?viewStateShareKey=rrm-robustness&workflowType=machine_learning"
    )
    assert ui_address() == "http://127.0.0.1:5000", "a local store: where `mlflow ui` serves it"
    with pytest.MonkeyPatch.context() as mp:  # a team server: its own address, never its credentials
        mp.setenv("MLFLOW_TRACKING_URI", "https://ann:s3cret@mlflow.example.org:8443/team/")
        assert ui_address() == "https://mlflow.example.org:8443/team"
    older = client.create_experiment("older")  # made before rrm saved views: it gets one
    ensure_experiment(client, "older")
    assert VIEW_TAG in client.get_experiment(older).tags
    client.set_experiment_tag(older, VIEW_TAG, "a user's edit")
    ensure_experiment(client, "older")
    assert client.get_experiment(older).tags[VIEW_TAG] == "a user's edit"


def test_training_run_reads_back(teacher_run, store):
    tracker, result = teacher_run
    client = MlflowClient()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert (params["method"], params["eps"], params["attack_steps"], params["epochs"]) == ("sat", "0.1", "7", "2")
    # Only SAT's own knobs among the methods' options: no lambda, alpha or temperature; the schedule that ran.
    assert not {"lambda", "alpha", "temperature", "replays", "feature_loss", "teacher"} & set(params)
    assert params["schedule"] == run.data.tags["rrm.schedule"] == "step", "SAT's default, not None"
    assert params["precision"] == run.data.tags["rrm.precision"] == "fp32"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development", "the UI's training view"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [1, 2]
    for key in ("loss", "train_accuracy", "monitor_robust_accuracy", "epoch_seconds", "lr"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    metrics = run.data.metrics
    assert metrics["monitor_robust_accuracy"] == pytest.approx(result.summary["monitor_robust_accuracy"])
    assert {"epoch_seconds_mean", "epoch_seconds_ci95", "total_seconds"} <= set(metrics)
    # bookkeeping is tagged, not listed among the accuracies
    assert not {"passes", "replays", "processes", "threads", "paper_epochs"} & set(metrics)
    assert [run.data.tags[f"rrm.{k}"] for k in ("passes", "replays", "processes", "threads")] == ["2", "1", "1", "1"]

    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == _git(store, "rev-parse", "HEAD")
    assert tags["dvc.stage"] == "train_teacher"
    assert {"rrm.version.torch", "rrm.version.art", "rrm.version.mlflow", "rrm.version.rrm"} <= set(tags)
    assert tags["rrm.model_sha256"] == sha256_file(result.model_path)
    assert tags["rrm.dataset_digest"] == result.data.digest

    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "digits"
    assert result.data.digest.startswith(dataset_input.dataset.digest)
    assert {t.key: t.value for t in dataset_input.tags}["rrm.digest"] == result.data.digest

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint.pt", "train_metrics.json", "model.pt"} <= artifacts
    # The run's logged model: rrm's model file and an MLmodel naming it, its final metrics linked to it and to the
    # dataset; the pt2 export (seconds) waits until the model is registered as a teacher.
    (output,) = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert (logged.name, logged.source_run_id, str(logged.status)) == ("model", run.info.run_id, "READY")
    assert logged.params["method"] == "sat" and logged.params["eps"] == "0.1"
    linked = {m.key: m for m in logged.metrics}
    assert linked["test_accuracy"].value == pytest.approx(result.summary["test_accuracy"])
    assert linked["total_flops"].dataset_name == "digits"
    assert result.data.digest.startswith(linked["total_flops"].dataset_digest)
    # (the module's registration test, if it ran first on this worker, added the pt2 export to this model)
    assert {"MLmodel", "model.pt"} <= {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    assert has_pt2(client, logged) == ("rrm.registered_as" in run.data.tags)
    # its note says what was trained and found, the numbers rounded to what they mean
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("Trained sat `cnn` on digits at Linf eps 0.1: 2 epochs, seed 0;"), note
    assert f"test accuracy {100 * result.summary['test_accuracy']:.1f}% (natural)" in note
    assert "FLOPs to train" in note
    assert ("Not evaluated yet" in note) != ("rrm.evaluation_run" in run.data.tags)  # the evaluation test may run first
    x = torch.rand(3, 1, 8, 8)
    same = tracking.load_registered_model(f"runs:/{tracker.run_id}/model")
    assert torch.allclose(same.features(x), result.model.features(x), atol=1e-6)


def test_register_promote_pull_then_train_student(teacher_run, store, monkeypatch):
    tracker, result = teacher_run
    client = MlflowClient()
    with pytest.raises(RRMError, match="no evaluation"):
        tracking.register_teacher(tracker.run_id)
    metrics = _evaluate(result)
    evaluation_run = tracking.log_evaluation(metrics, model_path=result.model_path)
    evaluated = client.get_run(evaluation_run)
    linked = evaluated.data.tags
    assert linked["rrm.train_run_id"] == linked["mlflow.parentRunId"] == tracker.run_id
    assert evaluation_of_run(client, tracker.run_id) == (metrics, evaluation_run), "the run gives the result back"
    assert evaluated.info.run_name == f"apgd+pgd linf eps=0.1 · {client.get_run(tracker.run_id).info.run_name}"
    # its duration in the runs table is what the evaluation measured, not the milliseconds that logging it took
    measured = 1000 * sum(metrics.seconds.values())
    assert measured > 0 and measured <= evaluated.info.end_time - evaluated.info.start_time <= measured + 5000
    # The training run carries its evaluation's headline numbers, so runs sort by robustness in the UI; the checks
    # did not run, so there is no checks/passed to read as passed. Their names sort together by what they are.
    trained = client.get_run(tracker.run_id).data
    assert trained.metrics["robust/apgd"] == metrics.adversarial_accuracy["apgd"]
    assert trained.metrics["natural/accuracy"] == metrics.natural_accuracy
    assert trained.metrics["natural/images"] == metrics.n_test
    assert trained.metrics["robust/headline"] == metrics.headline_accuracy
    assert trained.metrics["robust/apgd_images"] == metrics.n_examples and trained.metrics["robust/eps"] == 0.1
    headline = {k for k in trained.metrics if k.startswith(("natural/", "robust/", "checks/"))}
    assert headline == {"natural/accuracy", "natural/images", "robust/headline", "robust/eps"} | {
        f"robust/{a}{images}" for a in ("apgd", "pgd") for images in ("", "_images")
    }
    assert "checks/passed" not in trained.metrics and trained.tags["rrm.sanity_checks"] == "not run"
    note = trained.tags["mlflow.note.content"]  # rewritten with the evaluation's numbers, each with its image count
    apgd = f"apgd {100 * metrics.adversarial_accuracy['apgd']:.1f}% on {metrics.examples('apgd')}"
    assert apgd in note and f"natural {100 * metrics.natural_accuracy:.1f}% on {metrics.n_test}" in note, note
    assert "Gradient-masking checks: not run." in note and "Not evaluated yet" not in note
    assert tracking.log_evaluation(metrics, model_path=result.model_path) == evaluation_run, "logged once"

    # Its masking checks did not run: registering it is refused, and forcing it says so on the card.
    with pytest.raises(RRMError, match="sanity checks did not run"):
        tracking.register_teacher(tracker.run_id)
    version = tracking.register_teacher(tracker.run_id, force=True)
    assert "sanity checks did not run" in version.tags["forced"]
    assert "**Registered with --force**, overriding: its gradient-masking sanity checks did not run" in (
        version.description
    )
    assert version.uri == "models:/rrm-teacher/1"
    # The version's source is the training run's logged model, which registering gave its pt2 export; the
    # evaluation's headline numbers are linked to it. The run is marked a teacher's; the evaluation was not logged
    # again.
    source = client.get_run(tracker.run_id)
    (output,) = source.outputs.model_outputs
    assert client.get_model_version("rrm-teacher", "1").source == f"models:/{output.model_id}"
    logged = client.get_logged_model(output.model_id)
    assert has_pt2(client, logged)
    on_model = {m.key: m.value for m in logged.metrics}
    assert on_model["robust/apgd"] == pytest.approx(metrics.adversarial_accuracy["apgd"])
    assert on_model["natural/accuracy"] == pytest.approx(metrics.natural_accuracy)
    assert source.data.tags["rrm.role"] == "teacher" and source.info.run_name.startswith("teacher · sat-cnn")
    assert source.data.tags["rrm.registered_as"] == "models:/rrm-teacher/1"
    import mlflow.pytorch

    served = mlflow.pytorch.load_model(f"models:/{output.model_id}")
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(served(x), result.model.cpu()(x), atol=1e-5)
    tags = version.tags
    assert (tags["architecture"], tags["feature_dim"], tags["method"], tags["norm"], tags["eps"]) == (
        "cnn",
        "128",
        "sat",
        "linf",
        "0.1",
    )
    assert (tags["dataset"], tags["dataset_digest"]) == ("digits", result.data.digest)
    worst = min(metrics.adversarial_accuracy, key=metrics.adversarial_accuracy.get)
    assert tags["adversarial_accuracy"] == f"{metrics.adversarial_accuracy[worst]:.4f}"  # rounded to what it means
    assert tags["attack"] == worst, "on the same images, the worst attack is the one that counts"
    assert tags["natural_accuracy"] == f"{metrics.natural_accuracy:.4f}"
    assert tags["source_run"] == tracker.run_id and tags["evaluation_run"] == evaluation_run
    assert f"({worst} on 100 test images; linf eps 0.1; sanity checks not run; also " in version.description
    assert tags["examples"] == "100" and all(
        tags[f"accuracy/{a}"].endswith(" on 100 test images") for a in ["apgd", "pgd"]
    )
    assert tracker.run_id in version.description

    assert tracking.promote("rrm-teacher", 1, "champion").aliases == ["champion"]
    assert tracking.show_teacher("models:/rrm-teacher@champion").version == "1"
    # other tests of this module may have registered other models in this store
    assert [t.uri for t in tracking.list_teachers() if t.uri.startswith("models:/rrm-teacher/")] == [
        "models:/rrm-teacher/1"
    ]

    path, meta = tracking.pull_teacher("models:/rrm-teacher@champion", store / "pulled" / "teacher.pt")
    pulled, pulled_meta = load_model(path)
    assert pulled_meta["method"] == meta["method"] == "sat"
    assert sha256_file(path) == sha256_file(result.model_path)
    registered = tracking.load_registered_model("models:/rrm-teacher@champion")
    assert not registered.training
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(registered.features(x), pulled.features(x))
    assert torch.allclose(registered.head(registered.features(x)), registered(x))

    # The trainer takes the loaded teacher; the URI in the config is what the run records.
    student_cfg = TrainConfig(
        **DIGITS, method="rrm", lam=0.5, teacher="models:/rrm-teacher@champion", out_dir=str(store / "student")
    )
    with tracking.MlflowCallback(experiment="tests") as student:
        trained = train(student_cfg, teacher=tracking.load_registered_model(student_cfg.teacher), callbacks=[student])
    run = client.get_run(student.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["rrm.teacher_uri"] == "models:/rrm-teacher@champion"
    assert (run.data.tags["rrm.teacher_version"], run.data.tags["rrm.teacher_run_id"]) == ("1", tracker.run_id)
    assert run.data.tags["rrm.teacher_sha256"] == sha256_file(result.model_path)
    assert [m.model_id for m in run.inputs.model_inputs] == [output.model_id]
    assert {"ce", "representation"} <= set(run.data.metrics)
    assert trained.model.feature_dim == registered.feature_dim

    # The command line resolves the URI before training, tracked or not.
    undo_cli_settings(monkeypatch)
    result = CliRunner().invoke(
        rrm_cli.cli,
        [
            "train",
            "--method",
            "rrm",
            "--lambda",
            "0.5",
            "--teacher",
            "models:/rrm-teacher@champion",
            *tiny_train_args(track=False),
            "--out-dir",
            str(store / "cli-student"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert load_model(store / "cli-student" / "model.pt")[1]["teacher"] == "models:/rrm-teacher@champion"
    # So does tuning: one trial of one epoch, scored by APGD on 32 images.
    result = CliRunner().invoke(
        rrm_cli.cli,
        [
            "tune",
            "--method",
            "rrm",
            "--teacher",
            "models:/rrm-teacher@champion",
            "--dataset",
            "digits",
            "--model",
            "cnn-bn",
            "--eps",
            "0.1",
            "--epochs",
            "1",
            "--n-trials",
            "1",
            "--attack-examples",
            "32",
            "--attack-steps",
            "2",
            "--best-trials",
            "1",
            "--test-examples",
            "32",
            "--test-steps",
            "2",
            "--storage",
            f"sqlite:///{store}/optuna.db",
            "--out-dir",
            str(store / "tune"),
            "--no-track",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "1/1 finished trials" in result.output


def test_register_refuses_unevaluated_or_natural_models_and_writes_nothing(sat_file, store):
    client = MlflowClient()
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    with pytest.raises(RRMError, match="no evaluation"):
        tracking.register_teacher(sat_file, "refused")
    natural = train(TrainConfig(**DIGITS, method="natural", out_dir=str(store / "natural"))).model_path
    with pytest.raises(RRMError, match="adversarially trained"):
        tracking.register_teacher(natural, "refused", evaluation={"natural_accuracy": 0.9, "adversarial_accuracy": 0})
    masked = {"natural_accuracy": 0.9, "adversarial_accuracy": {"apgd": 0.8}, "sanity_passed": False}
    with pytest.raises(RRMError, match="sanity checks"):
        tracking.register_teacher(sat_file, "refused", evaluation=masked)
    with pytest.raises(RRMError, match="has no natural_accuracy"):
        tracking.register_teacher(sat_file, "refused", evaluation={"accuracy": 0.9})
    assert client.search_registered_models("name = 'refused'") == []
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before


def _own_copy(sat_file: Path, path: Path) -> Path:
    """The SAT model under another sha256: registering it imports a run without making ``sat_file`` one that a run
    produced (the module's tests share one store, in whatever order a worker runs them)."""
    model, meta = load_model(sat_file)
    save_model(model, path, meta={**meta, "copy": path.name})
    return path


def test_forced_registration_of_an_untracked_file_imports_it(sat_file, tmp_path):
    version = tracking.register_teacher(_own_copy(sat_file, tmp_path / "forced.pt"), "forced", force=True)
    assert (version.tags["evaluated"], version.tags["adversarial_accuracy"]) == ("false", "not evaluated")
    run = MlflowClient().get_run(version.run_id)
    assert run.data.tags["rrm.kind"] == "import" and run.info.status == "FINISHED"
    assert tracking.load_registered_model("models:/forced/1").features(torch.rand(2, 1, 8, 8)).shape == (2, 128)


def test_failed_registration_leaves_no_version(sat_file, monkeypatch, tmp_path):
    create = MlflowClient.create_model_version

    def create_then_fail(self, *args, **kwargs):
        create(self, *args, **kwargs)
        raise MlflowException("the store went away")

    monkeypatch.setattr(MlflowClient, "create_model_version", create_then_fail)
    with pytest.raises(RRMError, match="the store went away"):  # forced: the evaluation names no model file
        tracking.register_teacher(
            _own_copy(sat_file, tmp_path / "half.pt"),
            "half",
            evaluation={"natural_accuracy": 0.9, "adversarial_accuracy": 0.5},
            force=True,
        )
    client = MlflowClient()
    assert client.search_model_versions("name = 'half'") == []
    assert client.search_registered_models("name = 'half'") == []


def test_bad_references_are_one_line_errors(teacher_run):
    tracker, _ = teacher_run
    tracking.register_teacher(tracker.run_id, "refs", force=True)
    cases = {
        "models:/refs@nope": "has no alias 'nope'",
        "models:/refs/9": "has no version 9",
        "models:/nobody@champion": "no registered model 'nobody'",
        "models:/refs": "names no version",
        "runs:/0123456789abcdef0123456789abcdef/model": "no MLflow run",
    }
    for uri, message in cases.items():
        with pytest.raises(RRMError, match=message) as caught:
            tracking.load_registered_model(uri)
        assert "\n" not in str(caught.value)
    with pytest.raises(RRMError, match="invalid alias"):
        tracking.promote("refs", 1, "v3")
    with pytest.raises(RRMError, match="must be a number"):
        tracking.promote("refs", "latest", "champion")
    # A version registered by plain MLflow is no rrm teacher: loading and promoting it are refused.
    client = MlflowClient()
    client.create_registered_model("plain")
    (output,) = client.get_run(tracker.run_id).outputs.model_outputs  # the run's logged model
    client.create_model_version(
        "plain", source=f"models:/{output.model_id}", run_id=tracker.run_id, model_id=output.model_id
    )
    with pytest.raises(RRMError, match="not an rrm teacher"):
        tracking.load_registered_model("models:/plain/1")
    with pytest.raises(RRMError, match="not an rrm teacher"):
        tracking.promote("plain", 1, "champion")


class _Raise(Callback):
    def __init__(self, error: BaseException):
        self.error = error

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        raise self.error


@pytest.mark.parametrize(("error", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_run_that_raises_is_not_left_running(store, error, status):
    import mlflow

    cfg = TrainConfig(**DIGITS, method="natural", out_dir=str(store / f"raises-{status}"))
    with pytest.raises(type(error)), tracking.MlflowCallback(experiment="tests") as tracker:
        train(cfg, callbacks=[tracker, _Raise(error)])
    run = MlflowClient().get_run(tracker.run_id)
    assert run.info.status == status
    assert run.data.tags["rrm.error"].startswith(type(error).__name__)
    assert mlflow.active_run() is None


def test_the_callback_must_wrap_training(store):
    cfg = TrainConfig(**DIGITS, method="natural", out_dir=str(store / "unwrapped"))
    with pytest.raises(RRMError, match="context manager"):
        train(cfg, callbacks=[tracking.MlflowCallback(experiment="tests")])


def test_resumed_run_logs_every_epoch(store):
    cfg = TrainConfig(**DIGITS, method="natural", out_dir=str(store / "resumed"))
    train(cfg)
    with tracking.MlflowCallback(experiment="tests") as tracker:
        train(cfg.replace(epochs=2, resume=True), callbacks=[tracker])
    history = MlflowClient().get_metric_history(tracker.run_id, "test_accuracy")
    assert sorted(m.step for m in history) == [1, 2]


def test_an_epoch_the_store_wrote_before_it_stopped_answering_is_logged_once(store, monkeypatch):
    """The store wrote epoch 1's metrics and went away before its reply came (a server killed mid-request): the
    training goes on, and when the store answers again at the end, epoch 1 is in the run once, not sent again."""
    import mlflow
    import requests

    log_metrics, lost = mlflow.log_metrics, []

    def written_then_lost(metrics, step=None, **kwargs):
        log_metrics(metrics, step=step, **kwargs)
        if step == 1 and not lost:
            lost.append(step)
            raise requests.ConnectionError("connection reset by peer before the reply")

    monkeypatch.setattr(mlflow, "log_metrics", written_then_lost)
    cfg = TrainConfig(**{**DIGITS, "epochs": 3}, method="natural", out_dir=str(store / "reply-lost"))
    with tracking.MlflowCallback(experiment="tests") as tracker:
        train(cfg, callbacks=[tracker])
    run = MlflowClient().get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    for key in ("loss", "epoch_seconds"):
        assert sorted(m.step for m in MlflowClient().get_metric_history(tracker.run_id, key)) == [1, 2, 3], key


def test_training_on_a_prepared_file_records_the_file_as_input(store):
    from rrm.data import prepare_dataset

    path = store / "digits.safetensors"
    _data, digest = prepare_dataset("digits", path)
    cfg = TrainConfig(**{**DIGITS, "dataset": str(path)}, method="natural", out_dir=str(store / "from-file"))
    # An experiment of its own: MLflow keeps one dataset record per (name, digest) and experiment.
    with tracking.MlflowCallback(experiment="tests-file") as tracker:
        train(cfg, callbacks=[tracker])
    inputs = MlflowClient().get_run(tracker.run_id).inputs.dataset_inputs
    assert [i.dataset.digest for i in inputs] == [digest[:36]]
    assert str(path.resolve()) in inputs[0].dataset.source


@pytest.fixture
def server(tmp_path, monkeypatch, migrated_mlflow_db):
    """`mlflow server` on loopback with a SQLite backend and proxied artifacts, all in tmp; always stopped."""
    copy_store(migrated_mlflow_db, tmp_path / "server.db")
    with mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        yield url


def test_register_and_pull_through_a_server(server, sat_file, tmp_path):
    model, meta = load_model(sat_file)
    evaluation = tmp_path / "eval_metrics.json"
    evaluation.write_text(
        json.dumps(
            {
                "natural_accuracy": 0.8,
                "adversarial_accuracy": {"apgd": 0.5},
                "eps": 0.1,
                "norm": "linf",
                "sanity_passed": True,
                "model_sha256": sha256_file(sat_file),
                "model_spec": spec_record(model.spec),
                "dataset_digest": meta["dataset_digest"],
                "split": "test",
            }
        )
    )
    version = tracking.register_teacher(sat_file, evaluation=evaluation)
    assert version.uri == "models:/rrm-teacher/1" and version.tags["adversarial_accuracy"] == "0.5000"
    assert "sanity checks passed" in version.description
    tracking.promote("rrm-teacher", 1, "champion")
    path, meta = tracking.pull_teacher("models:/rrm-teacher@champion", tmp_path / "pulled.pt")
    assert sha256_file(path) == sha256_file(sat_file) and meta["method"] == "sat"
    teacher = tracking.load_registered_model("models:/rrm-teacher@champion")
    assert teacher.features(torch.rand(2, 1, 8, 8)).shape == (2, 128)
    client = MlflowClient()
    evaluations = client.search_runs(
        [client.get_run(version.run_id).info.experiment_id], "tags.`rrm.kind` = 'evaluate'"
    )
    assert [r.data.tags["rrm.train_run_id"] for r in evaluations] == [version.run_id]
    assert list((tmp_path / "artifacts").rglob("MLmodel")), "artifacts go through the server to its destination"


def test_server_down_is_a_quick_one_line_error(sat_file, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    started = time.monotonic()
    with pytest.raises(RRMError, match="cannot reach the MLflow tracking server") as caught:
        tracking.register_teacher(sat_file, force=True)
    assert time.monotonic() - started < 30
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "message",
    [
        "Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch",
        # the server killed in the middle of its answer (seen when a server is SIGKILLed during a request)
        "('Connection broken: IncompleteRead(0 bytes read, 2 more expected)', IncompleteRead(0 bytes read))",
    ],
)
def test_a_server_gone_mid_request_is_unreachable_not_an_error(message):
    from rrm.tracking.connection import StoreUnreachable, mlflow_errors

    action = "logging epoch metrics to MLflow"
    with pytest.raises(StoreUnreachable, match="cannot reach the MLflow tracking"), mlflow_errors(action):
        raise MlflowException(f"API request to http://127.0.0.1:1/api failed with exception {message}")
    # anything else stays an error that stops the command
    with pytest.raises(RRMError) as other, mlflow_errors(action):
        raise MlflowException("INVALID_PARAMETER_VALUE: bad metric")
    assert not isinstance(other.value, StoreUnreachable)


@pytest.mark.parametrize(
    ("value", "text"), [(0.69999998807907, "70.0%"), (0.8555, "85.5%"), (1.0, "100.0%"), (0.0004, "0.0%")]
)
def test_accuracies_in_notes_are_rounded_to_a_tenth_of_a_percent(value, text):
    assert percent(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(64465346560000.0, "64.5 TFLOPs"), (5.75e12, "5.75 TFLOPs"), (1.2e15, "1.2 PFLOPs"), (3.3e9, "3.3 GFLOPs")],
)
def test_costs_in_notes_have_three_figures(value, text):
    assert flops(value) == text
