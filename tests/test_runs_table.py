"""`rrm runs table`: an experiment's finished trainings as a leaderboard, read from MLflow alone."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
from _helpers import tiny_train_args
from click.testing import CliRunner
from mlflow import MlflowClient

from rrm.cli import cli
from rrm.stats import mean_ci
from rrm.tracking.runs import DEFAULT_EXPERIMENT, ensure_experiment


def rrm(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _run(client: MlflowClient, experiment: str, name: str, params: dict, metrics: dict, tags: dict | None = None):
    """A finished training run as training and `rrm evaluate` leave it: params, natural/ and robust/ metrics, tags."""
    run = client.create_run(
        experiment, run_name=name, tags={"rrm.kind": "train", "rrm.dataset": "mnist5k", **(tags or {})}
    )
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


# natural, robust (APGD on 500), AutoAttack (on 200) accuracy per recipe and seed
RESULTS = {
    "sat": [(0.97, 0.83, 0.80), (0.96, 0.85, 0.81)],
    "fast": [(0.98, 0.70, 0.66), (0.97, 0.74, 0.70)],
    "natural": [(0.99, 0.00, 0.00), (0.99, 0.01, 0.00)],
}


@pytest.fixture
def store(mlflow_store):
    """Three recipes x two seeds, evaluated with APGD on 500 images and AutoAttack on 200; a running run and an
    evaluation run that the table must leave out."""
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = ensure_experiment(client, DEFAULT_EXPERIMENT)
    for method, seeds in RESULTS.items():
        for seed, (natural, apgd, aa) in enumerate(seeds):
            metrics = {
                "natural/accuracy": natural,
                "robust/apgd": apgd,
                "robust/apgd_images": 500,
                "robust/autoattack": aa,
                "robust/autoattack_images": 200,
                "robust/eps": 0.3,
                "total_flops": 2e12 if method != "sat" else 6e12,
            }
            tags = {"rrm.sanity_checks": "passed"}
            if method == "fast":  # a student of a registered teacher
                tags |= {"rrm.teacher_name": "rrm-teacher", "rrm.teacher_version": "3"}
            params = {"method": method, "model": "cnn-bn", "eps": "0.3", "seed": str(seed)}
            _run(client, experiment, f"{method}-cnn-bn-mnist5k", params, metrics, tags)
    running = client.create_run(experiment, run_name="still running", tags={"rrm.kind": "train"})
    evaluation = client.create_run(experiment, run_name="apgd linf eps=0.3", tags={"rrm.kind": "evaluate"})
    client.set_terminated(evaluation.info.run_id, "FINISHED")
    return client, experiment, running


def test_one_row_per_recipe_with_the_mean_and_ci_over_its_seeds(store):
    result = rrm("runs", "table", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["method"] for r in rows] == ["sat", "fast", "natural"]  # best robust accuracy first
    sat = rows[0]
    assert sat["seeds"] == [0, 1] and len(sat["run_ids"]) == 2
    for got, index in ((sat["natural"], 0), (sat["robust"], 1), (sat["autoattack"], 2)):
        want = mean_ci([100 * seeds[index] for seeds in RESULTS["sat"]])
        assert got == pytest.approx(want)
    # APGD on 500 images is the headline; AutoAttack on 200 is beside it, never a minimum over both
    assert sat["attack"] == "apgd/500" and sat["autoattack_images"] == 200
    assert sat["tflops"] == pytest.approx(6.0) and sat["checks"] == "passed" and sat["eps"] == 0.3
    assert rows[1]["teacher"] == "rrm-teacher v3" and sat["teacher"] is None


def test_per_run_rows_filtered_and_sorted(store):
    result = rrm(
        "runs", "table", "--runs", "--filter", "params.method = 'fast'", "--sort", "natural", "--format", "json"
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["seeds"], r["natural"][0]) for r in rows] == [([0], pytest.approx(98.0)), ([1], pytest.approx(97.0))]


def test_text_md_and_csv_are_narrow_tables_of_the_same_numbers(store):
    text = rrm("runs", "table")
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "method", "model"] and len(lines) == 2 + 3
    experiment = store[1]
    view = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?viewStateShareKey=rrm-robustness"
    assert text.stderr == f"in mlflow ui: {view}&workflowType=machine_learning\n", "the same runs in a browser"
    assert max(map(len, lines)) <= 160
    sat = next(line for line in lines if line.startswith("sat-"))
    mean, ci = mean_ci([83.0, 85.0])
    assert f"{mean:.1f} ± {ci:.1f}" in sat and "apgd/500" in sat and "(200)" in sat
    md = rrm("runs", "table", "--format", "md", "--columns", "run,seeds,robust")
    assert md.stdout.splitlines()[0].replace(" ", "") == "|run|seeds|robust|"
    rows = list(csv.DictReader(io.StringIO(rrm("runs", "table", "--format", "csv").stdout)))
    assert float(rows[0]["robust"]) == pytest.approx(mean) and float(rows[0]["robust_ci"]) == pytest.approx(ci, 1e-3)


def test_a_filter_on_a_headline_metric_and_runs_recorded_under_the_old_names(store):
    client, experiment, _ = store
    old = {"eval_natural_accuracy": 0.95, "eval_apgd_accuracy": 0.9, "eval_apgd_examples": 500, "eval_eps": 0.3}
    old |= {"eval_autoattack_accuracy": 0.88, "eval_autoattack_examples": 200, "sanity_passed": 1.0}
    _run(client, experiment, "rrm-cnn-bn-mnist5k", {"method": "rrm", "seed": "0"}, old, {"rrm.sanity_checks": "passed"})
    result = rrm("runs", "table", "--runs", "--filter", "metrics.`robust/apgd` > 0.84", "--format", "json")
    assert result.exit_code == 0, result.output
    assert [r["method"] for r in json.loads(result.stdout)] == ["sat"], "an old run has no robust/apgd to filter on"
    rows = json.loads(rrm("runs", "table", "--runs", "--format", "json").stdout)
    (recorded,) = [r for r in rows if r["method"] == "rrm"]
    assert recorded["robust"] == [pytest.approx(90.0), 0.0] and recorded["attack"] == "apgd/500"
    assert recorded["natural"][0] == pytest.approx(95.0) and recorded["eps"] == 0.3
    assert recorded["autoattack"][0] == pytest.approx(88.0) and recorded["autoattack_images"] == 200


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--filter", "params.method == fast"], "bad --filter 'params.method == fast'"),
        (["--columns", "run,accuracy"], "unknown column 'accuracy'; choose one of:"),
        (["--sort", "speed"], "unknown sort column 'speed'; choose one of:"),
        (["--format", "html"], "unknown format 'html'"),
        (["--experiment", "nope"], "no experiment 'nope' in sqlite:///"),
    ],
)
def test_bad_input_is_one_line(store, args, fragment):
    result = rrm("runs", "table", *args)
    assert result.exit_code in (1, 2), result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and fragment in line, line


def test_an_empty_selection_says_so(store):
    result = rrm("runs", "table", "--filter", "params.method = 'free'")
    assert result.exit_code == 0 and result.stdout == ""
    assert "no finished training runs that match --filter in experiment 'rrm'" in result.stderr
    assert json.loads(rrm("runs", "table", "--filter", "params.method = 'free'", "--format", "json").stdout) == []


def test_a_tracked_training_and_its_evaluation_make_a_row(mlflow_store):
    """Through the real commands: the evaluation's headline and image count reach the training run and the table."""
    trained = rrm("train", *tiny_train_args(method="fast", eps=0.1, out_dir="fast"))
    assert trained.exit_code == 0, trained.output
    evaluated = rrm(
        *("evaluate", "fast/model.pt", "--eps", "0.1", "--attacks", "apgd,autoattack", "--n-examples", "40"),
        *("--autoattack-examples", "20", "--steps", "5", "--restarts", "1", "--no-sanity", "--no-progress"),
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert "apgd " in evaluated.stdout and "(40 images)" in evaluated.stdout and "(20 images)" in evaluated.stdout
    (row,) = json.loads(rrm("runs", "table", "--format", "json").stdout)
    metrics = json.loads((mlflow_store.parent / "fast" / "model.pt").with_name("eval_metrics.json").read_text())
    assert row["method"] == "fast" and row["attack"] == "apgd/40" and row["autoattack_images"] == 20
    assert row["robust"][0] == pytest.approx(100 * metrics["adversarial_accuracy"]["apgd"])
    assert row["natural"][0] == pytest.approx(100 * metrics["natural_accuracy"])
    assert row["tflops"] > 0 and row["checks"] == "not run"
