"""Faults around the program, produced for real: a disk that fills up under a writer.

The disk is a 4 MiB tmpfs mounted for the test, with most of it taken by a filler file; mounting needs root (or
CAP_SYS_ADMIN), and where it is refused the tests skip and say so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _helpers import tiny_train_args
from click.testing import CliRunner
from mlflow import MlflowClient
from test_shards import _tree as image_tree

from rrm import cli as rrm_cli
from rrm.models import load_model

DISK_BYTES = 4 << 20


@pytest.fixture
def small_disk(cli_project: Path):
    """A real, nearly full file system: ``fill(free_bytes)`` leaves that much space, ``free()`` removes the filler."""
    mount = cli_project / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {done.stderr.strip()}")
    filler = mount / "filler"

    class Disk:
        path = mount

        @staticmethod
        def fill(free_bytes: int) -> None:
            """Leave ``free_bytes`` free, whatever the disk holds already."""
            st = os.statvfs(mount)
            filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - free_bytes))

        @staticmethod
        def free() -> None:
            filler.unlink()

    try:
        yield Disk
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def rrm(*args: object):
    return CliRunner().invoke(rrm_cli.cli, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (result.stderr, result)
    return lines[0]


def test_a_full_disk_while_preparing_data_is_one_line_and_leaves_no_file(small_disk):
    small_disk.fill(100 << 10)  # the prepared digits take about 460 KiB
    out = small_disk.path / "digits.safetensors"
    line = one_error_line(rrm("data", "prepare", "--dataset", "digits", "--out", out))
    assert line == f"Error: cannot write '{out}': no space left on the device; free some space, or choose another path"
    assert sorted(p.name for p in small_disk.path.iterdir()) == ["filler"]  # no partial file under any name
    small_disk.free()
    assert rrm("data", "prepare", "--dataset", "digits", "--out", out).exit_code == 0


def test_a_full_disk_mid_training_keeps_the_last_checkpoint_and_resume_finishes_the_same_run(small_disk, tmp_path):
    """A checkpoint (about 440 KiB) fits once in 700 KiB, not twice: epoch 1 is saved, epoch 2's fails; the run
    keeps epoch 1, says so in one line, and once space is free `--resume` ends with the weights of a run that never
    stopped."""
    train = ["train", *tiny_train_args(epochs=2, track=False)]
    whole = rrm(*train, "--out-dir", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output

    run = small_disk.path / "run"
    small_disk.fill(700 << 10)
    line = one_error_line(rrm(*train, "--out-dir", run))
    assert f"cannot write '{run}/checkpoint.pt': no space left on the device" in line
    assert f"kept checkpoint.pt in '{run}' (epoch 1, the last good one; --resume continues from it)" in line
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]  # no temporary file left beside it

    small_disk.free()
    resumed = rrm(*train, "--out-dir", run, "--resume")
    assert resumed.exit_code == 0, resumed.output
    expected, got = load_model(tmp_path / "whole" / "model.pt")[0], load_model(run / "model.pt")[0]
    for (name, a), b in zip(expected.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), name


def _write(kind: str, work: Path, out: Path) -> list[object]:
    """The command that writes ``out``: an evaluation or a robustified dataset (of ``work/teacher.pt``), or prepared
    shards (of the image folder ``work/tree``)."""
    teacher = work / "teacher.pt"
    if kind == "evaluate":
        attack = ("--attacks", "apgd", "--n-examples", "20", "--steps", "2", "--restarts", "1", "--no-sanity")
        return ["evaluate", teacher, "--eps", "0.1", *attack, "--no-track", "--no-progress", "--out", out]
    if kind.startswith("robustify"):
        robustify = ["robustify", "--dataset", "digits", "--teacher", teacher, "--steps", "2", "--no-progress"]
        shards = ["--shards", "--batch-size", "300"] if kind == "robustify-shards" else []  # about 77 KB a shard
        return [*robustify, *shards, "--out", out]
    folder = ("--dataset", "imagefolder", "-o", f"root={work / 'tree'}", "-o", "image_size=48")  # about 830 KB
    return ["data", "prepare", *folder, "--shards", "--shard-images", "20", "--workers", "1", "--out", out]


@pytest.mark.parametrize(
    ("kind", "free_bytes"),
    [("evaluate", 0), ("robustify", 100 << 10), ("robustify-shards", 200 << 10), ("shards", 300 << 10)],
)
def test_a_full_disk_under_every_writer_is_one_line_and_a_rerun_finishes(
    small_disk, digits_teacher, tmp_path, kind, free_bytes
):
    """Each output on a full disk: one line that says so and where; nothing left that a later command would take for
    a whole output (complete shards stay, but no manifest names them until all are written); once space is free the
    same command finishes."""
    out = small_disk.path / {"evaluate": "eval.json", "robustify": "robust.safetensors"}.get(kind, kind)
    shutil.copy(digits_teacher.model_path, tmp_path / "teacher.pt")
    image_tree(tmp_path / "tree", per_class=40)
    small_disk.fill(free_bytes)
    line = one_error_line(rrm(*_write(kind, tmp_path, out)))
    assert "no space left on the device" in line and str(small_disk.path) in line, line
    assert not out.is_file(), "no partial output under its own name"
    if kind.endswith("shards"):
        assert any(out.glob("train-*.safetensors")), "the finished shards stay"
        assert not (out / "dataset.json").exists(), "no manifest names shards that were not all written"
    small_disk.free()
    again = rrm(*_write(kind, tmp_path, out))
    assert again.exit_code == 0, again.output
    assert out.exists()


@pytest.mark.usefixtures("mlflow_store")
def test_a_full_disk_under_the_artifact_store_while_registering_leaves_the_registry_as_it_was(small_disk):
    """The experiment's artifacts live on the small disk. A teacher trained and evaluated with space free, then
    registered with the disk full: one line naming the file and the full disk, no registered model nor version left,
    and once space is free the same command registers it."""
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # the project's store, whatever an earlier test set
    client.create_experiment("rrm", artifact_location=str(small_disk.path / "artifacts"))
    trained = rrm("train", *tiny_train_args(method="sat", eps=0.1), "--out-dir", "teacher")
    assert trained.exit_code == 0, trained.output
    evaluated = rrm(
        "evaluate", "teacher/model.pt", "--dataset", "digits", "--eps", "0.1", "--attacks", "apgd", "--n-examples", 20,
        "--no-sanity", "--no-track", "--out", "teacher.json",
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    register = ["teacher", "register", "teacher/model.pt", "--evaluation", "teacher.json", "--force"]
    register += ["--min-examples", 20]
    small_disk.fill(100 << 10)  # the pt2 export registering adds is about as large as the model file (430 KiB)
    line = one_error_line(rrm(*register))
    assert "no space left on the device" in line and str(small_disk.path) in line, line
    assert client.search_registered_models() == []
    small_disk.free()
    done = rrm(*register)
    assert done.exit_code == 0, done.output
    assert [int(v.version) for v in client.search_model_versions("name = 'rrm-teacher'")] == [1]
