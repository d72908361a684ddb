"""``rrm pipeline``: optional pipelines enter DVC's view by a link, and an interrupt stops DVC's stage cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rrm.errors import RRMError
from rrm.jobs import pipelines

# A stage that says it started, then waits; Ctrl-C (SIGINT) makes it write what a training would keep, and exit.
STAGE = """\
import pathlib, signal, sys, time
def stop(signum, frame):
    pathlib.Path("kept.txt").write_text("stopped cleanly")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
pathlib.Path("started.txt").write_text("")
time.sleep(60)
pathlib.Path("out.txt").write_text("done")
"""


def _repo(tmp_path: Path) -> tuple[Path, dict]:
    """A DVC repository with one optional pipeline, `demo`, whose one stage runs :data:`STAGE`."""
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    work = tmp_path / "repo"
    (work / "pipelines" / "demo").mkdir(parents=True)
    (work / "stage.py").write_text(STAGE)
    (work / "pipelines" / "demo" / "pipeline.yaml").write_text(
        "# A demo: one slow stage.\nstages:\n  slow:\n    wdir: ../..\n    cmd: python stage.py\n"
        "    deps: [stage.py]\n    outs: [out.txt]\n"
    )
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=work, env=env, check=True)
    return work, env


def test_link_is_relative_idempotent_and_reversible(tmp_path: Path) -> None:
    work, _ = _repo(tmp_path)
    (demo,) = pipelines.pipelines(work).values()
    assert (demo.name, demo.summary, demo.linked) == ("demo", "A demo: one slow stage.", False)
    assert pipelines.link(demo) and not pipelines.link(demo)
    assert demo.linked and os.readlink(demo.dvcfile) == "pipeline.yaml"
    assert pipelines.unlink(demo) and not pipelines.unlink(demo)
    assert not demo.dvcfile.exists() and demo.definition.is_file()
    with pytest.raises(RRMError, match="unknown pipeline 'dmo': choose from demo"):
        pipelines.find("dmo", work)


def test_a_link_elsewhere_is_not_taken_for_ours(tmp_path: Path) -> None:
    work, _ = _repo(tmp_path)
    (demo,) = pipelines.pipelines(work).values()
    (demo.directory / "other.yaml").write_text("stages: {}\n")
    demo.dvcfile.symlink_to("other.yaml")
    assert not demo.linked and not pipelines.unlink(demo)
    with pytest.raises(RRMError, match=r"exists and is not a link to pipeline\.yaml: move it away"):
        pipelines.link(demo)
    assert os.readlink(demo.dvcfile) == "other.yaml"


def test_run_passes_dvcs_result(tmp_path: Path) -> None:
    work, env = _repo(tmp_path)
    (work / "stage.py").write_text("import pathlib; pathlib.Path('out.txt').write_text('done')\n")
    rrm = str(Path(sys.executable).with_name("rrm"))
    dry = subprocess.run([rrm, "pipeline", "run", "demo", "--dry"], cwd=work, env=env, capture_output=True, text=True)
    assert dry.returncode == 0 and "python stage.py" in dry.stdout and not (work / "out.txt").exists(), dry.stderr
    assert not (work / "pipelines" / "demo" / "dvc.yaml").is_symlink(), "a dry run leaves the pipeline unlinked"
    ran = subprocess.run([rrm, "pipeline", "run", "demo", "slow"], cwd=work, env=env, capture_output=True, text=True)
    assert ran.returncode == 0 and (work / "out.txt").read_text() == "done", ran.stderr
    assert "slow:" in (work / "pipelines" / "demo" / "dvc.lock").read_text()
    (work / "stage.py").write_text("raise SystemExit(3)\n")
    failed = subprocess.run([rrm, "pipeline", "run", "demo"], cwd=work, env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "failed to reproduce" in failed.stderr, failed.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_stops_the_stage_as_ctrl_c_does(tmp_path: Path, signum: int) -> None:
    """SIGTERM or Ctrl-C to `rrm pipeline run` reaches the running stage as one Ctrl-C and waits for it: the stage
    keeps what it had, DVC records no output and releases its lock (`dvc status` runs at once after)."""
    work, env = _repo(tmp_path)
    rrm = str(Path(sys.executable).with_name("rrm"))
    # Ctrl-C's default restored in the child, as a terminal does: a suite started from a background shell (nohup ...
    # &, some CI runners) would otherwise hand it SIGINT ignored, and the interrupt would never arrive.
    process = subprocess.Popen(
        [rrm, "pipeline", "run", "demo"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not (work / "started.txt").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == (143 if signum == signal.SIGTERM else 130), stderr
    assert stderr.strip().splitlines()[-1].startswith("Error: "), stderr
    assert (work / "kept.txt").read_text() == "stopped cleanly" and not (work / "out.txt").exists()
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status"], cwd=work, env=env, capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0 and "pipelines/demo/dvc.yaml:slow" in status.stdout, status.stderr
