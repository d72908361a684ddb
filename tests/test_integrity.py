"""Integrity of the teacher registry, through the real command line: an evaluation is bound to the model it measured
and registration refuses one that does not back the card, `--no-sanity` never reads as passed, a replaced registry
artifact is refused on pull and load, and a registration killed half-way leaves the registry as it was."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import one_torch_thread, tiny_train_args, undo_cli_settings, worker_env
from click.testing import CliRunner
from mlflow import MlflowClient

from rrm import cli as rrm_cli
from rrm.io import sha256_file
from rrm.models import build_model, load_model, save_model
from rrm.tracking import cleanup, stale

# `rrm evaluate` at a test budget: APGD on 100 test images, the masking checks on 100 of them.
EVALUATE = [
    "--attacks",
    "apgd",
    "--n-examples",
    "100",
    "--steps",
    "10",
    "--restarts",
    "1",
    "--sanity-examples",
    "100",
    "--sanity-steps",
    "10",
    "--no-track",
]


def rrm(*args: object):
    return CliRunner().invoke(rrm_cli.cli, [str(a) for a in args])


def refused(result, *fragments: str) -> str:
    """The one-line error of a refused command, checked to name every fragment."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, digits_teacher, digits_natural):
    """The SAT teacher (Linf eps 0.1) and a natural model of the same architecture, and their `rrm evaluate` outputs:
    ``teacher.json`` (the masking checks ran), ``teacher-nosanity.json``, ``teacher-eps0.05.json`` (another threat
    model), ``teacher-50.json`` (on 50 test images) and ``natural.json`` (another model file)."""
    root = tmp_path_factory.mktemp("evaluated")
    shutil.copy(digits_teacher.model_path, root / "teacher.pt")
    shutil.copy(digits_natural.model_path, root / "natural.pt")
    outputs = {}
    with pytest.MonkeyPatch.context() as mp, one_torch_thread():
        mp.chdir(root)
        undo_cli_settings(mp)
        for name, args in {
            "teacher": ["teacher.pt", "--eps", "0.1"],
            "teacher-nosanity": ["teacher.pt", "--eps", "0.1", "--no-sanity"],
            "teacher-eps0.05": ["teacher.pt", "--eps", "0.05"],
            "teacher-50": ["teacher.pt", "--eps", "0.1", "--n-examples", "50", "--sanity-examples", "50"],
            "natural": ["natural.pt", "--eps", "0.1"],
        }.items():
            result = rrm("evaluate", *EVALUATE, *args, "--out", f"{name}.json")  # the last of an option wins
            assert result.exit_code == 0, result.output
            outputs[name] = result.output
    return root, outputs


@pytest.fixture
def project(cli_project, mlflow_store, evaluated):
    """A project with its own MLflow store (fresh), the two model files and their evaluations."""
    root, _ = evaluated
    for path in root.iterdir():
        shutil.copy(path, cli_project / path.name)
    return cli_project


def _client() -> MlflowClient:
    """The test's store (``MlflowClient()`` would follow the tracking URI the last in-process command set)."""
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _registered_models() -> list[str]:
    return [m.name for m in _client().search_registered_models()]


def test_an_evaluation_records_the_model_file_and_data_it_measured(evaluated):
    root, outputs = evaluated
    metrics = json.loads((root / "teacher.json").read_text())
    model, meta = load_model(root / "teacher.pt")
    assert metrics["model_sha256"] == sha256_file(root / "teacher.pt")
    assert metrics["model_spec"]["image_size"] == model.spec["image_size"] == 8
    assert (metrics["dataset_digest"], metrics["split"]) == (meta["dataset_digest"], "test")
    assert metrics["sanity_passed"] is True and "sanity checks passed" in outputs["teacher"]


def test_no_sanity_never_reads_as_passed(evaluated):
    root, outputs = evaluated
    metrics = json.loads((root / "teacher-nosanity.json").read_text())
    assert "sanity_passed" in metrics and metrics["sanity_passed"] is None, "written as null: not run"
    assert metrics["sanity"]["enabled"] is False
    assert "sanity checks not run" in outputs["teacher-nosanity"] and "passed" not in outputs["teacher-nosanity"]


def test_register_accepts_an_evaluation_of_the_model_itself(project):
    result = rrm("teacher", "register", "teacher.pt", "--evaluation", "teacher.json")
    assert result.exit_code == 0, result.output
    assert "registered models:/rrm-teacher/1" in result.output and "forced" not in result.output
    shown = rrm("teacher", "show", "models:/rrm-teacher/1")
    assert "sanity checks passed" in shown.output and "--force" not in shown.output
    assert "forced:" not in shown.output and "evaluation_run:" in shown.output
    # the headline with its attack and image count, and every accuracy beside its own
    accuracy = json.loads((project / "teacher.json").read_text())["adversarial_accuracy"]["apgd"]
    assert "attack: apgd" in shown.output and "examples: 100" in shown.output
    assert f"accuracy/apgd: {accuracy:.4f} on 100 test images" in shown.output
    assert "by apgd on 100 test images" in result.output


def test_register_refuses_a_headline_on_fewer_images_unless_told(project):
    refused(
        rrm("teacher", "register", "teacher.pt", "--evaluation", "teacher-50.json"),
        "its headline accuracy (apgd) is on 50 test images, fewer than 100",
        "--min-examples 50",
    )
    assert _registered_models() == []
    result = rrm("teacher", "register", "teacher.pt", "--evaluation", "teacher-50.json", "--min-examples", "50")
    assert result.exit_code == 0 and "forced" not in result.output, result.output
    assert "on 50 test images" in rrm("teacher", "show", "models:/rrm-teacher/1").output
    refused(rrm("teacher", "register", "teacher.pt", "--min-examples", "0"), "--min-examples must be >= 1")


def test_register_refuses_an_evaluation_of_another_model(project):
    natural, teacher = sha256_file(project / "natural.pt")[:12], sha256_file(project / "teacher.pt")[:12]
    line = refused(
        rrm("teacher", "register", "teacher.pt", "--evaluation", "natural.json"),
        "refusing to register 'teacher.pt'",
        f"its evaluation measured another model file (sha256 {natural}, this one is {teacher})",
        "--force",
    )
    assert "architecture" not in line and "threat model" not in line, "only what is wrong is named"
    assert _registered_models() == []

    result = rrm("teacher", "register", "teacher.pt", "--evaluation", "natural.json", "--force")
    assert result.exit_code == 0, result.output
    assert "forced, overriding: its evaluation measured another model file" in result.output
    shown = rrm("teacher", "show", "models:/rrm-teacher/1").output
    assert "**Registered with --force**, overriding: its evaluation measured another model file" in shown
    assert "forced: its evaluation measured another model file" in shown  # the tag
    assert "evaluation_run:" not in shown, "an evaluation of another file is no evidence about this one"


def test_register_refuses_a_28x28_model_with_an_8x8_teachers_evaluation(project):
    big = build_model("cnn", num_classes=10, in_channels=1, image_size=28)
    save_model(
        big,
        project / "big.pt",
        meta={
            "method": "sat",
            "model": "cnn",
            "norm": "linf",
            "eps": 0.1,
            "dataset": "mnist5k",
            "dataset_digest": "0" * 64,
        },
    )
    refused(
        rrm("teacher", "register", "big.pt", "--evaluation", "teacher.json"),
        "its evaluation measured another model file",
        "another architecture (cnn on 1x8x8 images, 10 classes; this model: cnn on 1x28x28 images, 10 classes)",
        "its evaluation ran on dataset 'digits'",
        "not on the training data (digest 000000000000)",
    )
    assert _registered_models() == []


def test_register_refuses_an_evaluation_whose_masking_checks_did_not_run(project):
    refused(
        rrm("teacher", "register", "teacher.pt", "--evaluation", "teacher-nosanity.json"),
        "its gradient-masking sanity checks did not run",
    )
    assert _registered_models() == []
    result = rrm("teacher", "register", "teacher.pt", "--evaluation", "teacher-nosanity.json", "--force")
    assert result.exit_code == 0, result.output
    shown = rrm("teacher", "show", "models:/rrm-teacher/1").output
    assert "sanity checks not run" in shown and "sanity checks passed" not in shown
    assert "**Registered with --force**, overriding: its gradient-masking sanity checks did not run" in shown


def test_register_refuses_an_evaluation_of_another_threat_model(project):
    refused(
        rrm("teacher", "register", "teacher.pt", "--evaluation", "teacher-eps0.05.json"),
        "its evaluation is for linf eps 0.05, not the threat model the model was trained for and the card states "
        "(linf eps 0.1)",
    )
    assert _registered_models() == []


def _swap_artifact(project: Path, other: Path) -> None:
    """Replace the rrm model file inside the registry's artifact store by another valid model file."""
    (artifact,) = [p for p in project.rglob("extra_files/teacher.pt")]
    artifact.write_bytes(other.read_bytes())


def test_a_swapped_registry_artifact_is_refused_on_pull_and_load(project):
    assert rrm("teacher", "register", "teacher.pt", "--evaluation", "teacher.json").exit_code == 0
    assert rrm("teacher", "pull", "models:/rrm-teacher/1", "--out", "pulled.pt").exit_code == 0
    assert sha256_file(project / "pulled.pt") == sha256_file(project / "teacher.pt")

    _swap_artifact(project, project / "natural.pt")
    natural, teacher = sha256_file(project / "natural.pt")[:12], sha256_file(project / "teacher.pt")[:12]
    fragments = (
        "models:/rrm-teacher/1 (version 1 of 'rrm-teacher')",
        f"has sha256 {natural}",
        f"not the {teacher} recorded at registration",
        "register the teacher again",
    )
    refused(rrm("teacher", "pull", "models:/rrm-teacher/1", "--out", "swapped.pt"), *fragments)
    assert not (project / "swapped.pt").exists()
    refused(rrm("evaluate", "models:/rrm-teacher/1", "--out", "swapped.json", *EVALUATE), *fragments)
    refused(
        rrm("train", "--method", "rrm", "--teacher", "models:/rrm-teacher/1", *tiny_train_args(track=False)), *fragments
    )


def _killed(project: Path, patch: str, *args: str) -> None:
    """Run `rrm ARGS` in a process that SIGKILLs itself where ``patch`` (test code, run first) makes it: what a
    `kill -9` at that point leaves behind."""
    script = (
        "import os, signal, sys\n"
        "def die(*args, **kwargs):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"{patch}\n"
        "from rrm.cli import main\nsys.argv = ['rrm', *sys.argv[1:]]\nmain()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        env=worker_env(),
    )
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_a_register_killed_before_its_first_version_leaves_the_registry_as_it_was(project):
    _killed(
        project,
        "from mlflow import MlflowClient\nMlflowClient.create_model_version = die",
        "teacher",
        "register",
        "teacher.pt",
        "--evaluation",
        "teacher.json",
    )
    client = _client()
    (left,) = client.search_registered_models()
    assert left.name == "rrm-teacher" and client.search_model_versions("name = 'rrm-teacher'") == []

    listed = rrm("teacher", "list")  # the next command
    assert listed.exit_code == 0 and "no teachers registered" in listed.output
    assert _registered_models() == [], "the empty registered model a killed register left is gone"
    result = rrm("teacher", "register", "teacher.pt", "--evaluation", "teacher.json")
    assert result.exit_code == 0 and "registered models:/rrm-teacher/1" in result.output


def test_a_register_killed_inside_its_import_run_leaves_no_running_run(project):
    _killed(
        project,
        "import mlflow.pytorch\nmlflow.pytorch.log_model = die",
        "teacher",
        "register",
        "teacher.pt",
        "--evaluation",
        "teacher.json",
    )
    client = _client()
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert [r.info.status for r in client.search_runs(experiments)] == ["RUNNING"]  # what kill -9 left

    listed = rrm("teacher", "list")  # the next command
    assert listed.exit_code == 0 and "FAILED" in listed.stderr, listed.stderr  # one warning line says so
    (run,) = client.search_runs(experiments)
    assert run.info.status == "FAILED" and "which is gone" in run.data.tags["rrm.error"]
    assert _registered_models() == []


def test_only_abandoned_empty_registered_models_are_removed(project, monkeypatch):
    client = _client()
    client.create_registered_model("plain")  # not rrm's: left alone
    # a killed register of rrm < tags
    client.create_registered_model("older-rrm", description=cleanup.REGISTRY_DESCRIPTION)
    creator = json.dumps(stale.process_tags())  # a live process: this one
    client.create_registered_model("in-progress", tags={cleanup.CREATING_TAG: creator})
    assert rrm("teacher", "list").exit_code == 0
    assert sorted(_registered_models()) == ["in-progress", "older-rrm", "plain"], "too young to be abandoned"

    monkeypatch.setattr(cleanup, "ABANDONED_AFTER_S", -1)  # an hour later
    assert rrm("teacher", "list").exit_code == 0
    assert sorted(_registered_models()) == ["plain"]


def _in_processes(project: Path, *scripts: str) -> list[subprocess.CompletedProcess]:
    """Run each Python script in its own process, all at once, in the project against its store."""
    env = worker_env(MLFLOW_TRACKING_URI=os.environ["MLFLOW_TRACKING_URI"])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script in scripts
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def test_two_registrations_at_once_make_two_versions_and_one_alias(project):
    """Two `rrm teacher register ... --alias champion` racing on one store: both succeed, two versions, the alias on
    one of them, no run left RUNNING."""
    register = ["teacher", "register", "teacher.pt", "--evaluation", "teacher.json", "--alias", "champion"]
    script = f"import sys\nfrom rrm.cli import main\nsys.argv = ['rrm', *{register!r}]\nmain()\n"
    done = _in_processes(project, script, script)
    assert [d.returncode for d in done] == [0, 0], [d.stderr for d in done]
    versions = _client().search_model_versions("name = 'rrm-teacher'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert int(_client().get_registered_model("rrm-teacher").aliases["champion"]) in (1, 2)
    runs = _client().search_runs([e.experiment_id for e in _client().search_experiments()])
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []


def test_a_pull_racing_promotions_gets_the_file_of_the_version_it_names(project):
    """While one process moves `champion` between two versions twenty times, another pulls it twenty times: each pull
    writes the file of the version it resolved, byte for byte."""
    assert rrm("teacher", "register", "teacher.pt", "--evaluation", "teacher.json").exit_code == 0
    forced = rrm("teacher", "register", "natural.pt", "--evaluation", "natural.json", "--force")
    assert forced.exit_code == 0, forced.output
    assert rrm("teacher", "promote", "1", "champion").exit_code == 0
    promote = (
        "from rrm.tracking import promote\nfor i in range(20):\n    promote('rrm-teacher', 2 - i % 2, 'champion')\n"
    )
    pull = (
        "from rrm.io import sha256_file\nfrom rrm.tracking import pull_teacher_version\n"
        "for i in range(20):\n"
        "    path, _, version = pull_teacher_version('models:/rrm-teacher@champion', f'pulled{i}.pt')\n"
        "    print(version.version, sha256_file(path))\n"
    )
    done = _in_processes(project, promote, pull)
    assert [d.returncode for d in done] == [0, 0], [d.stderr for d in done]
    expected = {"1": sha256_file(project / "teacher.pt"), "2": sha256_file(project / "natural.pt")}
    pulled = [line.split() for line in done[1].stdout.splitlines()]
    assert len(pulled) == 20 and all(expected[version] == sha for version, sha in pulled), pulled
