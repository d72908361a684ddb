"""The `rrm` command line through click's runner: help everywhere, params files, one-line errors, a teacher flow."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import torch
from _helpers import tiny_train_args
from click.testing import CliRunner
from mlflow import MlflowClient
from tqdm import tqdm

from rrm import cli as rrm_cli
from rrm import progress
from rrm.data import read_dataset
from rrm.models import load_model

DIGITS = tiny_train_args()


@pytest.fixture(autouse=True)
def project(cli_project):
    return cli_project


def rrm(*args: str):
    return CliRunner().invoke(rrm_cli.cli, [str(a) for a in args])


def assert_one_line_error(result, fragment: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert fragment in lines[0], lines[0]


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name in group.list_commands(None):
        command = group.get_command(None, name)
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


@pytest.mark.parametrize("path", [(), *_commands(rrm_cli.cli)], ids=lambda p: " ".join(p) or "rrm")
def test_every_command_has_help_with_an_example(path):
    result = rrm(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.output or "Commands:" in result.output


def test_the_listing_is_each_commands_own_summary():
    """`rrm --help` lists the commands from rrm.cli.COMMANDS without loading them: the line must be the command's."""
    for name, (_, summary) in rrm_cli.COMMANDS.items():
        assert rrm_cli.cli.get_command(None, name).get_short_help_str(1000) == summary, name
    assert rrm_cli.cli.get_command(None, "nosuch") is None


# `rrm ARGS...` in a fresh interpreter that prints, last, which of torch and MLflow the command imported
LOADED_AFTER = (
    "import sys\nfrom rrm.cli import main\ntry:\n    sys.argv = ['rrm', *sys.argv[1:]]\n    main()\n"
    "finally:\n    print(*[m for m in ('torch', 'mlflow') if m in sys.modules])\n"
)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["pipeline", "list"], ["tarin"]])
def test_commands_that_need_no_model_load_no_torch(args):
    """The command line in a fresh interpreter: help, the version, the pipelines and a mistyped command never import
    torch (seconds) nor MLflow."""
    root = Path(rrm_cli.__file__).parents[2]  # where pipelines/ is
    done = subprocess.run(
        [sys.executable, "-c", LOADED_AFTER, *args], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode in (0, 2), done.stderr
    assert done.stdout.splitlines()[-1] == "", done.stdout


@pytest.mark.parametrize(
    "args", [["teacher", "register", "model.pt", "--alias", "latest"], ["teacher", "promote", "1", "v2"]]
)
def test_a_bad_alias_is_refused_before_torch_or_mlflow_loads(args, tmp_path):
    """A registry alias MLflow would refuse is one line at once: the command imports neither torch nor MLflow (seconds
    each) and touches no store."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    done = subprocess.run(
        [sys.executable, "-c", LOADED_AFTER, *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"invalid alias {args[-1]!r}" in done.stderr and "e.g. champion" in done.stderr
    assert done.stdout.splitlines()[-1] == "" and list(tmp_path.iterdir()) == [], done.stdout


def test_a_bare_train_prints_its_usage_and_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = rrm("train")
    assert result.exit_code == 2 and "Usage: " in result.output and "Example" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_with_progress_off_long_work_still_prints_a_line_a_minute(tmp_path, monkeypatch):
    """`--no-progress` (a DVC stage with `progress: false`) hides the bar, but a long training still says where it
    is, a plain line each HEARTBEAT_SECONDS (here shrunk so a one-epoch run spans several); work shorter than that
    prints nothing more."""
    monkeypatch.chdir(tmp_path)
    quiet = rrm("train", *tiny_train_args(track=False), "--out-dir", "quiet")
    assert quiet.exit_code == 0 and "natural 1/1:" not in quiet.stderr, quiet.stderr
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.02)
    result = rrm("train", *tiny_train_args(track=False, epochs=2), "--out-dir", "long")
    assert result.exit_code == 0, result.output
    lines = re.findall(r"^natural [12]/2: +\d+% \d+/\d+ \[.*\]$", result.stderr, re.M)  # epoch, steps, times
    assert len(lines) >= 2 and "\r" not in result.stderr, result.stderr


def test_a_hidden_progress_line_left_open_takes_no_screen_position():
    """A line-a-minute bar that an error left open must not push a later terminal bar to a nested position, where
    tqdm's cursor moves put the epoch lines off their line starts."""
    left_open = progress.Bar(total=10, disable=True)
    left_open.update(1)
    later = tqdm(total=3, file=io.StringIO())
    try:
        assert later.pos == 0
    finally:
        later.close()
        left_open.close()


def test_command_list():
    assert sorted(map(" ".join, _commands(rrm_cli.cli))) == [
        "data",
        "data prepare",
        "evaluate",
        "pipeline",
        "pipeline link",
        "pipeline list",
        "pipeline run",
        "pipeline unlink",
        "probe",
        "report",
        "robustify",
        "runs",
        "runs clean",
        "runs table",
        "teacher",
        "teacher list",
        "teacher promote",
        "teacher pull",
        "teacher register",
        "teacher show",
        "train",
        "tune",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--method", "bogus", "--no-track"], "unknown method 'bogus'"),
        (["train", "--dataset", "nowhere", "--no-track"], "unknown dataset 'nowhere'"),
        (["train", "--model", "bogus", "--no-track"], "unknown model 'bogus'"),
        (["train", "--lambda", "0", "--no-track"], "lambda must be > 0"),
        (["train", "--lambda", "-1e-3", "--no-track"], "lambda must be > 0"),
        (["train", "--method", "rrm", "--teacher", "missing.pt", *DIGITS, "--no-track"], "does not exist"),
        (
            ["train", "--method", "rrm", "--teacher", "models:/rrm-teacher@champion", *DIGITS, "--no-track"],
            "no registered model 'rrm-teacher'",
        ),
        (["robustify", "--teacher", "missing.pt", "--dataset", "digits", "--out", "r.safetensors"], "does not exist"),
        (["teacher", "register", "missing.pt"], "neither a model file nor an MLflow run id"),
        (["teacher", "pull", "models:/rrm-teacher@champion"], "missing --out"),
        (["train", "--params", "missing.yaml"], "does not exist"),
        (["data", "prepare", "--dataset", "digits"], "missing --out"),
        (["evaluate", "missing.pt"], "does not exist"),
        (["evaluate", "models:/rrm-teacher@champion"], "pass --out"),
        (["evaluate", "x.pt", "--attacks", "apgd,bogus"], "unknown attack 'bogus'"),
        (["evaluate", "x.pt", "--eps", "-0.1"], "eps must be >= 0"),
    ],
)
@pytest.mark.usefixtures("mlflow_store")
def test_bad_input_is_one_line_and_non_zero(args, message):
    assert_one_line_error(rrm(*args), message)


def test_usage_errors_are_one_line_too():
    assert_one_line_error(rrm("train", "--bogus"), "No such option", code=2)
    assert_one_line_error(rrm("train", "--epochs", "many"), "'many' is not a valid integer", code=2)


def test_params_section_gives_defaults_and_flags_override(project):
    (project / "params.yaml").write_text(
        "train_teacher:\n"
        "  dataset: digits\n  model: cnn\n  method: natural\n  epochs: 3\n  lambda: 5e-3\n  milestones: [1, 2]\n"
        "  monitor_examples: 0\n  out_dir: runs/from-params\n  no_track: true\n"
        "other:\n  epochs: 1\n"
    )
    result = rrm("train", "--params", "params.yaml", "--section", "train_teacher", "--epochs", "1")
    assert result.exit_code == 0, result.output
    _, meta = load_model(project / "runs" / "from-params" / "model.pt")
    assert meta["config"]["epochs"] == 1 and meta["config"]["lam"] == 0.005
    assert list(meta["config"]["milestones"]) == [1, 2]
    assert not (project / "mlflow.db").exists(), "no_track from the file turned tracking off"

    assert_one_line_error(rrm("train", "--params", "params.yaml", "--section", "nope"), "choose one of: other")
    (project / "bad.yaml").write_text("train:\n  epoch: 3\n")
    assert_one_line_error(rrm("train", "--params", "bad.yaml"), "unknown key")


def test_a_tracked_run_is_named_after_its_params_section(project, mlflow_store):
    """students.transplant-fast trains with method fast: its run says which recipe it is, not just `fast`."""
    (project / "params.yaml").write_text(
        "students:\n  transplant-fast:\n    dataset: digits\n    model: cnn\n    method: fast\n    epochs: 1\n"
        "    monitor_examples: 0\n    progress: false\n"
    )
    args = ("train", "--params", "params.yaml", "--section", "students.transplant-fast")
    assert rrm(*args, "--out-dir", "a").exit_code == 0
    assert rrm(*args, "--out-dir", "b", "--run-name", "mine").exit_code == 0
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    names = {r.info.run_name for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert names == {"transplant-fast-cnn-digits", "mine"}


def test_data_prepare_writes_a_dataset(project):
    result = rrm("data", "prepare", "--dataset", "digits", "--out", "data/digits.safetensors", "-o", "test_size=300")
    assert result.exit_code == 0, result.output
    assert len(read_dataset(project / "data" / "digits.safetensors").test_y) == 300


@pytest.mark.usefixtures("mlflow_store")
def test_teacher_flow_through_the_command_line(project):
    result = rrm(
        "train",
        "--method",
        "sat",
        "--eps",
        "0.1",
        *DIGITS[:-3],
        "--epochs",
        "2",
        "--monitor-examples",
        "0",
        "--out-dir",
        "runs/teacher",
        "--experiment",
        "cli",
    )
    assert result.exit_code == 0, result.output
    train_run = re.search(r"MLflow run ([0-9a-f]{32})", result.output).group(1)
    assert_one_line_error(rrm("teacher", "register", train_run), "has no evaluation")

    result = rrm(
        "evaluate",
        "runs/teacher/model.pt",
        "--eps",
        "0.1",
        "--attacks",
        "apgd,fgsm",
        "--n-examples",
        "100",
        "--steps",
        "10",
        "--restarts",
        "1",
        "--no-sanity",
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((project / "runs" / "teacher" / "eval_metrics.json").read_text())
    assert set(metrics["adversarial_accuracy"]) == {"apgd", "fgsm"}

    # It finds the evaluation run linked to the training run; its masking checks did not run (--no-sanity), so
    # registration needs --force.
    assert_one_line_error(rrm("teacher", "register", train_run), "sanity checks did not run")
    result = rrm("teacher", "register", train_run, "--force")
    assert result.exit_code == 0, result.output
    assert "registered models:/rrm-teacher/1" in result.output
    assert rrm("teacher", "promote", "1", "champion").exit_code == 0
    listed = rrm("teacher", "list")
    assert "models:/rrm-teacher/1" in listed.output and "champion" in listed.output
    shown = rrm("teacher", "show", "models:/rrm-teacher@champion")
    assert f"| adversarial accuracy | {100 * min(metrics['adversarial_accuracy'].values()):.2f}%" in shown.output
    assert rrm("teacher", "pull", "models:/rrm-teacher@champion", "--out", "t.pt").exit_code == 0
    teacher, meta = load_model(project / "t.pt")
    assert meta["method"] == "sat" and teacher.features(torch.rand(2, 1, 8, 8)).shape == (2, 128)
    assert_one_line_error(rrm("teacher", "show", "models:/rrm-teacher@nope"), "has no alias 'nope'")
    assert_one_line_error(rrm("teacher", "promote", "7", "champion"), "has no version 7")

    result = rrm(
        "evaluate",
        "models:/rrm-teacher@champion",
        "--eps",
        "0.1",
        "--n-examples",
        "50",
        "--steps",
        "5",
        "--restarts",
        "1",
        "--no-sanity",
        "--out",
        "champion.json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((project / "champion.json").read_text())["n_examples"] == 50


def test_server_down_fails_in_seconds_with_one_line(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    assert_one_line_error(rrm("teacher", "list"), "cannot reach the MLflow tracking server")
    assert time.monotonic() - started < 30


def test_untracked_training_runs_as_a_process_without_importing_mlflow(project):
    script = (
        "import sys\nfrom rrm.cli import main\nsys.argv = ['rrm', *sys.argv[1:]]\ntry:\n    main()\n"
        "finally:\n    assert 'mlflow' not in sys.modules, 'mlflow was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "train", "--no-track", *DIGITS, "--out-dir", "out"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "wrote out/model.pt" in done.stdout and not (project / "mlflow.db").exists()


def test_training_says_what_it_does_before_loading_and_leaves_a_line_per_epoch(project):
    args = ["--dataset", "digits", "--model", "cnn", "--epochs", "2", "--monitor-examples", "0", "--progress"]
    done = subprocess.run(
        [sys.executable, "-m", "rrm.cli", "train", "--no-track", *args, "--out-dir", "out"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    # the bar redraws itself with carriage returns; what is left on the screen is the text after the last one
    shown = [part for line in done.stderr.splitlines() if (part := line.rsplit("\r", 1)[-1].strip())]
    assert shown[0] == "training natural cnn on digits for 2 epochs: loading", done.stderr
    epochs = [line for line in shown if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"], done.stderr
    assert all(" train acc " in line and " test acc " in line for line in epochs)
