"""Bad input and unwritable outputs through the real command line: each is one `Error:` line and a non-zero exit,
nothing is created before validation passes, and a failed run keeps only its last good checkpoint. A Hypothesis
property drives option parsing and the params loader with generated values."""

from __future__ import annotations

import errno
import json
import os
import socket
import types
from pathlib import Path

import pytest
import torch
import yaml
from _helpers import tiny_train_args
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rrm import cli as rrm_cli
from rrm import jobs
from rrm.data import load_dataset, save_dataset
from rrm.errors import RRMError
from rrm.evaluation import EvalResult
from rrm.io import OutputError, atomic_path, check_writable
from rrm.models import build_model, load_model, save_model
from rrm.train import trainer

TRAIN = ["train", *tiny_train_args(track=False)]


@pytest.fixture(autouse=True)
def project(cli_project):
    return cli_project


@pytest.fixture
def model_file(project) -> str:
    """An untrained CNN for digits saved as a model file: enough to evaluate or to robustify with."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    path = project / "model.pt"
    save_model(build_model("cnn", **data.model_kwargs()), path, {"config": {"dataset": "digits"}})
    return str(path)


def rrm(*args: object):
    return CliRunner().invoke(rrm_cli.cli, [str(a) for a in args])


def assert_one_line_error(result, fragment: str = "", code: int | None = 1) -> str:
    """Exit ``code`` (any non-zero code when None) with exactly one ``Error:`` line on stderr and no traceback."""
    assert result.exit_code != 0 if code is None else result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    assert fragment in lines[0], lines[0]
    return lines[0]


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------------------------------------- unwritable outputs


@pytest.mark.parametrize(
    "args",
    [
        ["data", "prepare", "--dataset", "digits", "--out", "afile/digits.safetensors"],
        [*TRAIN, "--out-dir", "afile/run"],
        [
            "evaluate",
            "{model}",
            "--out",
            "afile/metrics.json",
            "--n-examples",
            "10",
            "--steps",
            "1",
            "--restarts",
            "1",
            "--no-sanity",
            "--no-track",
        ],
        [
            "robustify",
            "--teacher",
            "{model}",
            "--dataset",
            "digits",
            "--out",
            "afile/robust.safetensors",
            "--steps",
            "1",
        ],
        ["tune", "--teacher", "{model}", "--dataset", "digits", "--out-dir", "afile/study", "--no-track"],
        ["report", "--out-dir", "afile/reports"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_an_output_under_a_regular_file_is_one_line_naming_the_path(project, model_file, args):
    (project / "afile").write_text("a regular file\n")
    before = files(project)
    line = assert_one_line_error(
        rrm(*(a.replace("{model}", model_file) for a in args)), "'afile' is a file, not a directory"
    )
    assert "cannot write 'afile/" in line and "choose another path" in line
    assert files(project) == before


def reachable(directory: Path) -> None:
    """Let every user pass through ``directory`` and the parents this user owns (pytest makes them private)."""
    for path in (directory, *directory.parents):
        if path.stat().st_uid == os.geteuid():
            path.chmod(path.stat().st_mode | 0o011)


def _as_an_ordinary_user(args: list[str]) -> types.SimpleNamespace:
    """``rrm ARGS`` run by an unprivileged user, for real: as root (who may write anywhere) in a forked child that
    drops to ``nobody`` first; as anyone else, in this process. Returns the exit code and stderr."""
    if os.geteuid() != 0:
        result = rrm(*args)
        return types.SimpleNamespace(exit_code=result.exit_code, stderr=result.stderr, exception=result.exception)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, run the command in-process, send back its exit code and stderr
        code = 99
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = rrm(*args)
            os.write(write, json.dumps([result.exit_code, result.stderr, repr(result.exception)]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0, "the child could not run the command as nobody"
    exit_code, stderr, exception = json.loads(answer)
    return types.SimpleNamespace(exit_code=exit_code, stderr=stderr, exception=exception)


@pytest.mark.parametrize(
    "args",
    [
        ["data", "prepare", "--dataset", "digits", "--out", "{locked}/d.safetensors"],
        ["data", "prepare", "--dataset", "digits", "--out", "{locked}/shards", "--shards"],
        [*TRAIN, "--out-dir", "{locked}/run"],
        [
            "evaluate",
            "{model}",
            "--attacks",
            "fgsm",
            "--n-examples",
            "8",
            "--no-sanity",
            "--no-track",
            "--out",
            "{locked}/eval.json",
        ],
    ],
)
def test_an_output_an_ordinary_user_may_not_write_is_one_line(tmp_path, model_file, args):
    """Root writes anywhere, so these are run as an unprivileged user: a directory it may not enter (or write) under
    the output path is the one ``Error:`` line naming the path and the fix, not a bare PermissionError."""
    readable = tmp_path / "readable"  # what the user may read: the model
    readable.mkdir()
    model = readable / "model.pt"
    model.write_bytes(Path(model_file).read_bytes())
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700 if os.geteuid() == 0 else 0o500)  # root's, or read-only to its owner
    reachable(tmp_path)
    readable.chmod(0o755)
    model.chmod(0o644)
    result = _as_an_ordinary_user([a.format(locked=locked / "sub", model=model) for a in args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, (result.stderr, result.exception)
    assert lines[0].startswith(f"Error: cannot write '{locked}/sub") and "permission denied" in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert list(locked.iterdir()) == []


def test_a_model_an_ordinary_user_may_not_read_is_one_line(tmp_path, model_file):
    reachable(tmp_path)
    model = tmp_path / "model.pt"
    model.write_bytes(Path(model_file).read_bytes())
    model.chmod(0o600 if os.geteuid() == 0 else 0o200)  # root's, or write-only to its owner
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # the output may be written: only the model is out of reach
    result = _as_an_ordinary_user(["evaluate", str(model), "--no-track", "--out", str(out / "eval.json")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, (result.stderr, result.exception)
    assert lines[0] == (
        f"Error: model file '{model}' cannot be read: permission denied; run as a user who may read it, or change "
        "its permissions"
    )


def test_a_read_only_file_system_is_one_line_and_leaves_nothing(project, monkeypatch):
    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))

    monkeypatch.setattr(os, "replace", read_only)  # a read-only bind mount is not available to tests
    assert_one_line_error(
        rrm("data", "prepare", "--dataset", "digits", "--out", "data/d.safetensors"),
        "cannot write 'data/d.safetensors': the file system is read-only",
    )
    assert files(project) == ["data"]  # the directory was made before the rename failed; no temporary file is left

    line = assert_one_line_error(rrm(*TRAIN, "--out-dir", "runs/ro"), "cannot write 'runs/ro/checkpoint.pt'")
    assert "read-only" in line and "kept nothing (no epoch finished); removed 'runs'" in line
    assert not (project / "runs").exists()


def test_check_writable_names_permission_and_read_only_file_systems(project, monkeypatch):
    (project / "out").mkdir()
    check_writable("out/x.json")
    check_writable("out/new/deeper", directory=True)
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # tests run as root, whom permission bits do not stop
    with pytest.raises(RRMError, match=r"cannot write 'out/x\.json': permission denied"):
        check_writable("out/x.json")
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(RRMError, match="cannot write 'out/run': the file system is read-only"):
        check_writable("out/run", directory=True)
    with pytest.raises(RRMError, match="cannot write 'out': it is a directory; pass a file path"):
        check_writable("out")


def test_atomic_write_clean_up_never_hides_the_first_error(project, monkeypatch):
    def refuse(self, missing_ok=False):
        raise PermissionError(errno.EACCES, "cannot remove", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(ValueError, match="the real cause"), atomic_path(project / "x.json"):
        raise ValueError("the real cause")
    monkeypatch.undo()
    with pytest.raises(OutputError, match="it is a directory") as info, atomic_path(project):
        pass
    assert isinstance(info.value, OSError) and info.value.errno == errno.EISDIR  # still an OSError for callers


# ----------------------------------------------------------------------------------------------- damaged datasets


def _rewrite_header(path: Path, change) -> None:
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata=change(meta))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda meta: None, "is not an rrm dataset file (its metadata header has no format"),
        (lambda meta: {k: v for k, v in meta.items() if k != "name"}, "is damaged (its metadata header lacks name)"),
        (
            lambda meta: {**meta, "classes": "[0, 1, not json"},
            "is damaged (JSONDecodeError reading its metadata header",
        ),
        (lambda meta: {**meta, "mean": "3"}, "is damaged (TypeError reading its metadata header"),
    ],
    ids=["no header", "missing key", "not JSON", "wrong shape"],
)
def test_a_dataset_file_with_a_damaged_header_is_one_line(project, change, message):
    path = project / "d.safetensors"
    save_dataset(load_dataset("digits").subset(64, 32), path)
    _rewrite_header(path, change)
    line = assert_one_line_error(rrm(*TRAIN, "--dataset", path.name, "--out-dir", "run"), message)
    assert "re-create it with `rrm data prepare`" in line or "write one with `rrm data prepare`" in line
    assert not (project / "run").exists()


def test_a_loader_that_cannot_use_an_option_is_one_line(project):
    assert_one_line_error(
        rrm("data", "prepare", "--dataset", "digits", "--out", "d.safetensors", "-o", "test_size=100000"),
        "dataset 'digits' cannot use the options {'test_size': 100000}",
    )
    assert not (project / "d.safetensors").exists()


# -------------------------------------------------------------------------------------------------- nan and inf


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*TRAIN, "--width", "inf"], "width must be a finite number, got inf"),
        ([*TRAIN, "--width", "nan"], "width must be a finite number, got nan"),
        ([*TRAIN, "--method", "sat", "--step-size", "inf"], "step_size must be a finite number, got inf"),
        ([*TRAIN, "--method", "rrm", "--teacher", "t.pt", "--lambda", "inf"], "lambda must be a finite number"),
        (
            [*TRAIN, "--method", "kd", "--teacher", "t.pt", "--temperature", "inf"],
            "temperature must be a finite number",
        ),
        ([*TRAIN, "--weight-decay", "inf"], "weight_decay must be a finite number"),
        ([*TRAIN, "--method", "sat", "--norm", "l2", "--eps", "inf"], "eps must be a finite number"),
        ([*TRAIN, "--lr", "nan"], "lr must be a positive number, got nan"),
        (["evaluate", "m.pt", "--pgd-step-size", "inf"], "pgd_step_size must be a finite number"),
        (["evaluate", "m.pt", "--norm", "l2", "--eps", "inf"], "eps must be a finite number"),
        (
            ["tune", "--teacher", "t.pt", "--dataset", "digits", "--prune-below", "nan"],
            "prune_below must be a finite number",  # unused without the threshold pruner, and still refused
        ),
        (
            ["tune", "--teacher", "t.pt", "--dataset", "digits", "-o", "weight_decay=inf"],
            "weight_decay must be a finite number",
        ),
        (["tune", "--teacher", "t.pt", "--dataset", "digits", "--range", "lambda=1e-3,inf"], "is not finite"),
    ],
)
def test_nan_and_inf_are_refused_before_anything_is_written(project, args, message):
    assert_one_line_error(
        rrm(
            *args,
            "--out-dir" if args[0] in ("train", "tune") else "--out",
            "out" if args[0] != "evaluate" else "out.json",
        ),
        message,
    )
    assert files(project) == []


def test_robustify_refuses_an_infinite_step(project, model_file):
    assert_one_line_error(
        rrm(
            "robustify", "--teacher", model_file, "--dataset", "digits", "--out", "r.safetensors", "--step-size", "inf"
        ),
        "robustify needs step_size to be a finite number > 0, got inf",
    )
    assert files(project) == ["model.pt"]


def test_build_model_refuses_a_width_that_is_not_finite():
    for width in (float("inf"), float("nan"), 0.0):
        with pytest.raises(RRMError, match="width must be a finite number > 0"):
            build_model("cnn", num_classes=10, in_channels=1, image_size=8, width=width)


# -------------------------------------------------------------------------------------------------- params files


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"epochs": "many"}, "epochs in section 'train' of 'p.yaml' must be an integer, got 'many'"),
        ({"epochs": 1.5}, "epochs in section 'train' of 'p.yaml' must be an integer, got 1.5"),
        ({"epochs": True}, "must be an integer, got True"),
        ({"epochs": None}, "epochs in section 'train' of 'p.yaml' has no value"),
        ({"lr": "fast"}, "lr in section 'train' of 'p.yaml' must be a number, got 'fast'"),
        ({"lr": float("nan")}, "lr must be a positive number, got nan"),
        ({"weight_decay": float("inf")}, "weight_decay must be a finite number, got inf"),
        ({"no_track": 1}, "no_track in section 'train' of 'p.yaml' must be true or false, got 1"),
        ({"milestones": [1.5, 2]}, "milestones in section 'train' of 'p.yaml' must be a list of integers"),
        ({"dataset": ["digits"]}, "dataset in section 'train' of 'p.yaml' must be text, got ['digits']"),
        ({"method": "natural", "lambda": "lots"}, "lambda in section 'train' of 'p.yaml' must be a number"),
        ({"epoch": 3}, "unknown key in section 'train' of 'p.yaml': 'epoch'"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else None,
)
def test_a_train_params_file_is_type_checked(project, section, message):
    (project / "p.yaml").write_text(
        yaml.safe_dump({"train": {"dataset": "digits", "out_dir": "run", "no_track": True, **section}})
    )
    assert_one_line_error(rrm("train", "--params", "p.yaml"), message)
    assert files(project) == ["p.yaml"]


@pytest.mark.parametrize(
    ("section", "args", "message"),
    [
        ({"epochs": "many"}, [], "epochs in section 'tune' of 'p.yaml' must be an integer, got 'many'"),
        ({"n_trials": 2.5}, [], "n_trials in section 'tune' of 'p.yaml' must be an integer"),
        ({"bogus": 1}, [], "unknown key in section 'tune' of 'p.yaml': 'bogus'"),
        ({"options": {"bogus": 1}}, [], "unknown training option(s) ['bogus']"),
        ({"options": {"weight_decay": "fast"}}, [], "weight_decay must be a number, got 'fast'"),
        ({"options": {"epochs": 2}}, [], "-o epochs=... of rrm tune: pass --epochs instead"),
        ({"options": {"alpha": 0.5}}, [], "alpha is an option of method 'kd' or 'kdiga', not 'rrm'"),
        ({"options": "weight_decay=0"}, [], "options in section 'tune' of 'p.yaml' must be a mapping of KEY: VALUE"),
        ({}, ["-o", "bogus=1"], "unknown training option(s) ['bogus']"),
        ({}, ["-o", "weight_decay=many"], "weight_decay must be a number, got 'many'"),
        ({}, ["-o", "gamma=5", "-o", "alpha=0.5"], "gamma, alpha are options of method 'kd' or 'kdiga', not 'rrm'"),
        ({}, ["-o", "lambda=0.1"], "lambda is tuned in [1e-05, 1.0], so its fixed value 0.1 would be ignored"),
        ({}, ["--range", "lr=0.01,0.1", "--lr", "0.05"], "lr is tuned in [0.01, 0.1], so its fixed value 0.05"),
        ({}, ["-o", "out_dir=elsewhere"], "the study sets out_dir for every trial, so the value would be ignored"),
        ({}, ["-o", "method=kd"], "the study sets method for every trial"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, (dict, list)) else None,
)
def test_tune_options_are_type_checked_and_an_ignored_one_is_refused(project, section, args, message):
    (project / "p.yaml").write_text(yaml.safe_dump({"tune": {"teacher": "t.pt", "dataset": "digits", **section}}))
    assert_one_line_error(rrm("tune", "--params", "p.yaml", "--no-track", *args), message)
    assert files(project) == ["p.yaml"]


def test_a_flag_of_another_method_is_refused(project):
    assert_one_line_error(
        rrm(*TRAIN, "--method", "natural", "--lambda", "0.5"),
        "lambda is an option of method 'rrm', not 'natural'; use --method rrm",
    )
    assert_one_line_error(
        rrm(*TRAIN, "--method", "kd", "--teacher", "t.pt", "--attack-steps", "3"),
        "attack_steps is an option of method 'sat' or 'pgd-fast' or 'rrm', not 'kd'",
    )
    assert files(project) == []


# ------------------------------------------------------------------------------------------------------- resume


def test_resume_with_nothing_to_resume_is_an_error_and_resume_or_start_starts_afresh(project):
    line = assert_one_line_error(
        rrm(*TRAIN, "--out-dir", "runs/typo", "--resume"), "--resume: there is no checkpoint in 'runs/typo' to resume"
    )
    assert "--resume-or-start" in line and not (project / "runs").exists()

    first = rrm(*TRAIN, "--out-dir", "runs/a", "--resume-or-start")
    assert first.exit_code == 0, first.output
    again = rrm(*TRAIN, "--out-dir", "runs/a", "--resume-or-start", "--epochs", "2")
    assert again.exit_code == 0, again.output
    _, meta = load_model(project / "runs" / "a" / "model.pt")
    assert meta["summary"]["epochs"] == 2
    state = torch.load(project / "runs" / "a" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2  # the second call resumed after epoch 1


# --------------------------------------------------------------------------------------------- files after errors


def test_a_run_that_diverges_in_its_first_epoch_leaves_nothing(project):
    line = assert_one_line_error(
        rrm(*TRAIN, "--lr", "1e12", "--momentum", "0", "--out-dir", "runs/nan/deep"), "the training loss became"
    )
    assert "lower --lr" in line and "kept nothing (no epoch finished); removed 'runs'" in line
    assert not (project / "runs").exists()

    (project / "mine").mkdir()
    (project / "mine" / "notes.txt").write_text("the user's\n")
    line = assert_one_line_error(
        rrm(*TRAIN, "--lr", "1e12", "--momentum", "0", "--out-dir", "mine"), "kept nothing (no epoch finished)"
    )
    assert "removed" not in line and files(project / "mine") == ["notes.txt"]


@pytest.mark.usefixtures("mlflow_store")
def test_a_tracked_run_that_diverges_in_its_first_epoch_leaves_nothing_either(project):
    tracked = [a for a in TRAIN if a != "--no-track"]  # MLflow writes its run file into the directory first
    for out_dir in ("runs/tracked", "mine"):
        if out_dir == "mine":
            (project / "mine").mkdir()
            (project / "mine" / "notes.txt").write_text("the user's\n")
        assert_one_line_error(
            rrm(*tracked, "--lr", "1e12", "--momentum", "0", "--out-dir", out_dir), "kept nothing (no epoch finished)"
        )
    assert not (project / "runs").exists() and files(project / "mine") == ["notes.txt"]


def test_a_run_that_diverges_later_keeps_its_last_good_checkpoint_and_says_so(project, monkeypatch):
    factor = trainer.lr_factor

    def explode_after_epoch_one(schedule, progress, epoch_progress, milestones, gamma):
        # from the second step of epoch 2: the checkpoint of epoch 1 holds the rate of the first
        return 1e12 if epoch_progress > 1 else factor(schedule, progress, epoch_progress, milestones, gamma)

    monkeypatch.setattr(trainer, "lr_factor", explode_after_epoch_one)
    args = [*TRAIN, "--epochs", "2", "--schedule", "constant", "--out-dir", "runs/late"]
    line = assert_one_line_error(rrm(*args), "the training loss became")
    assert "in epoch 2" in line
    assert "kept checkpoint.pt in 'runs/late' (epoch 1, the last good one; --resume continues from it)" in line
    assert files(project) == ["runs", "runs/late", "runs/late/checkpoint.pt"]

    monkeypatch.setattr(trainer, "lr_factor", factor)
    resumed = rrm(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (project / "runs" / "late" / "model.pt").is_file()


def test_an_unreachable_tracking_server_leaves_no_output_directory(project, monkeypatch):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    tracked = [a for a in TRAIN if a != "--no-track"]
    assert_one_line_error(rrm(*tracked, "--out-dir", "runs/tracked"), "cannot reach the MLflow tracking server")
    assert not (project / "runs").exists()


def test_a_corrupt_robustify_resume_file_says_to_delete_it(project, model_file):
    args = [
        "robustify",
        "--teacher",
        model_file,
        "--dataset",
        "digits",
        "--out",
        "r.safetensors",
        "--steps",
        "1",
        "--batch-size",
        "2000",
        "--no-progress",
    ]
    partial = project / "r.safetensors.partial.pt"
    partial.write_bytes(b"not a torch file")
    assert_one_line_error(rrm(*args), "the robustify resume file 'r.safetensors.partial.pt' is corrupt")
    torch.save([1, 2, 3], partial)
    line = assert_one_line_error(rrm(*args), "'r.safetensors.partial.pt' is not a robustify resume file")
    assert "delete 'r.safetensors.partial.pt' to start over" in line
    partial.unlink()
    done = rrm(*args)
    assert done.exit_code == 0, done.output
    assert (project / "r.safetensors").is_file() and not partial.exists()


# -------------------------------------------------------------------------------- the property: parsing never crashes
#
# These properties test parsing, so the jobs are replaced by stubs that only validate what they were given (the
# checks the real jobs run before any work): no training, evaluation or study runs, and each example costs
# milliseconds. Everything else (the commands, option types, params loader, config validation) is the real code.


def _stub_jobs(monkeypatch) -> None:
    from rrm.config import resolve_device

    def train_job(cfg, track=None, teacher_pin=None):
        cfg.validate()
        resolve_device(cfg.device)
        check_writable(cfg.out_dir, directory=True)
        summary = {
            "dataset": cfg.dataset,
            "test_accuracy": 0.5,
            "epochs": cfg.epochs,
            "epoch_seconds_mean": 1.0,
            "epoch_seconds_ci95": 0.0,
        }
        return types.SimpleNamespace(summary=summary, model_path=Path(cfg.out_dir) / "model.pt"), None

    def tune_job(cfg, track=None, log=print):
        cfg.validate()
        return types.SimpleNamespace(
            study_name=cfg.name,
            storage=cfg.storage,
            finished=0,
            ran=[],
            seconds=0.0,
            best=[],
            files={},
            parent_run_id=None,
        )

    def evaluate_job(job, track=None):
        job.attack.validate()
        result = EvalResult(natural_accuracy=0.5, adversarial_accuracy={}, n_examples=job.attack.n_examples or 0)
        return types.SimpleNamespace(result=result, out=Path(job.out or "eval_metrics.json"), run_id=None)

    monkeypatch.setattr(jobs, "train_job", train_job)
    monkeypatch.setattr(jobs, "tune_job", tune_job)
    monkeypatch.setattr(jobs, "evaluate_job", evaluate_job)


def assert_clean_exit(result) -> None:
    """The invariant: exit 0, or a non-zero exit with exactly one `Error:` line and no traceback."""
    event(f"exit code {result.exit_code}")
    if result.exit_code == 0:
        assert result.exception is None and "Traceback" not in result.output, result.output
    else:
        assert_one_line_error(result, code=None)


# Values as a shell would pass them: numbers of every kind (nan, inf, huge, negative), words, lists, empty text.
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
_ARG = st.one_of(
    st.integers(-3, 10**4).map(str),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "nan",
            "inf",
            "-inf",
            "1e309",
            "-0",
            "0",
            "1",
            "true",
            "many",
            "",
            " ",
            "1,2",
            "[1, 2]",
            "stem,penultimate",
            "cuda:x",
            "--epochs",
            "a=1",
        ]
    ),
    _TEXT,
)
_TRAIN_FLAGS = [
    "--epochs",
    "--batch-size",
    "--lr",
    "--momentum",
    "--weight-decay",
    "--lr-gamma",
    "--milestones",
    "--eps",
    "--norm",
    "--step-size",
    "--attack-steps",
    "--replays",
    "--lambda",
    "--temperature",
    "--alpha",
    "--gamma",
    "--width",
    "--feature-dim",
    "--noise-magnitude",
    "--grad-align-weight",
    "--kd-weight",
    "--iga-weight",
    "--monitor-examples",
    "--monitor-steps",
    "--seed",
    "--method",
    "--schedule",
    "--match-layers",
    "--match-inputs",
    "--precision",
    "--device",
    "--out-dir",
    "--model",
]
_SWITCHES = [
    "--resume",
    "--resume-or-start",
    "--random-start",
    "--no-random-start",
    "--early-stop-on-co",
    "--project-to-eps",
    "--deterministic",
]
_EVALUATE_FLAGS = [
    "--eps",
    "--norm",
    "--attacks",
    "--n-examples",
    "--batch-size",
    "--steps",
    "--restarts",
    "--pgd-steps",
    "--pgd-step-size",
    "--sanity-examples",
    "--sanity-steps",
    "--sanity-tolerance",
    "--sanity-zero-accuracy",
    "--seed",
    "--transfer-attack",
    "--out",
]
_TUNE_FLAGS = [
    "--n-trials",
    "--knobs",
    "--min-natural-accuracy",
    "--prune-below",
    "--validation-size",
    "--attack-examples",
    "--attack-steps",
    "--best-trials",
    "--test-examples",
    "--epochs",
    "--lr",
    "--eps",
    "--width",
    "--mode",
    "--pruner",
    "--study-name",
    "--range",
    "-o",
]
# KEY=VALUE arguments of -o and --range, with real keys most of the time.
_KEY_VALUE = st.tuples(
    st.sampled_from(
        [
            "epochs",
            "lr",
            "lambda",
            "lam",
            "weight_decay",
            "momentum",
            "temperature",
            "alpha",
            "gamma",
            "milestones",
            "step_size",
            "out_dir",
            "method",
            "bogus",
        ]
    ),
    st.one_of(_ARG, st.tuples(_ARG, _ARG).map(",".join)),
).map("=".join)
_PROPERTY = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _flags(names: list[str], often: tuple[str, ...] = ()):
    value = {"-o": _KEY_VALUE, "--range": _KEY_VALUE}
    name = st.one_of(st.sampled_from(names), *map(st.just, often))  # each of `often` as likely as all the others
    pair = name.flatmap(lambda flag: st.tuples(st.just(flag), value.get(flag, _ARG)))
    return st.lists(pair, max_size=4).map(lambda pairs: [item for pair in pairs for item in pair])


@_PROPERTY
@given(flags=_flags(_TRAIN_FLAGS), switches=st.lists(st.sampled_from(_SWITCHES), max_size=2))
def test_property_train_options_exit_cleanly(monkeypatch, flags, switches):
    _stub_jobs(monkeypatch)
    assert_clean_exit(rrm("train", "--no-track", "--dataset", "digits", *flags, *switches))


@_PROPERTY
@given(flags=_flags(_EVALUATE_FLAGS))
def test_property_evaluate_options_exit_cleanly(monkeypatch, flags):
    _stub_jobs(monkeypatch)
    assert_clean_exit(rrm("evaluate", "m.pt", "--no-track", *flags))


@_PROPERTY
@given(flags=_flags(_TUNE_FLAGS, often=("-o", "--range")))
def test_property_tune_options_exit_cleanly(monkeypatch, flags):
    _stub_jobs(monkeypatch)
    assert_clean_exit(rrm("tune", "--no-track", "--teacher", "t.pt", "--dataset", "digits", *flags))


# Params-file values: whatever YAML can hold, under the commands' real keys (and some unknown ones).
_YAML_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    _TEXT,
    st.sampled_from(["5e-3", "nan", ".inf", "1,2", "stem", "cosine", "l2", "rrm"]),
)
_YAML_VALUE = st.one_of(
    _YAML_SCALAR,
    st.lists(_YAML_SCALAR, max_size=3),
    st.dictionaries(st.sampled_from(["lambda", "lr", "epochs", "bogus", "weight_decay"]), _YAML_SCALAR, max_size=2),
)
_KEYS = {
    "train": [
        "epochs",
        "batch_size",
        "lr",
        "momentum",
        "weight_decay",
        "milestones",
        "eps",
        "norm",
        "step_size",
        "attack_steps",
        "lambda",
        "temperature",
        "alpha",
        "width",
        "method",
        "schedule",
        "match_layers",
        "device",
        "resume",
        "resume_or_start",
        "no_track",
        "monitor_examples",
        "teacher",
        "bogus",
        "epochs-x",
    ],
    "tune": [
        "n_trials",
        "knobs",
        "ranges",
        "options",
        "mode",
        "pruner",
        "prune_below",
        "validation_size",
        "epochs",
        "lr",
        "eps",
        "width",
        "study_name",
        "seed",
        "bogus",
    ],
    "evaluate": [
        "eps",
        "norm",
        "attacks",
        "n_examples",
        "steps",
        "restarts",
        "pgd_step_size",
        "sanity",
        "sanity_tolerance",
        "out",
        "model",
        "dataset",
        "bogus",
    ],
}
_FIXED = {
    "train": {"dataset": "digits", "no_track": True},
    "tune": {"teacher": "t.pt", "dataset": "digits", "no_track": True},
    "evaluate": {"model": "m.pt", "no_track": True},
}


@_PROPERTY
@given(command=st.sampled_from(sorted(_KEYS)), data=st.data())
def test_property_params_files_exit_cleanly(project, monkeypatch, command, data):
    _stub_jobs(monkeypatch)
    section = data.draw(st.dictionaries(st.sampled_from(_KEYS[command]), _YAML_VALUE, max_size=4), label="section")
    (project / "p.yaml").write_text(yaml.safe_dump({"stage": {**_FIXED[command], **section}}))
    assert_clean_exit(rrm(command, "--params", "p.yaml", "--section", "stage"))
