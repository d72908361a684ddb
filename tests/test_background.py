"""A callback run in a worker (how `rrm train` records its MLflow run): a forked process where fork exists, else a
thread. Every hook runs, in order, in the worker; what it raises stops the training at its next hook; a failing,
interrupted or killed training still reaches the callback's exit."""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from rrm.errors import RRMError
from rrm.tracking import worker as workers
from rrm.tracking.worker import BackgroundCallback, can_fork
from rrm.train import TrainConfig, train

DIGITS = dict(dataset="digits", model="cnn", method="natural", epochs=2, monitor_examples=0, progress=False)
WORKERS = [pytest.param(True, id="process"), pytest.param(False, id="thread")]


class Stop(Exception):
    pass


class _Recorder:
    """A callback context manager that records its hooks, where they ran, and how it was exited (also in ``log``,
    a file, for a worker whose training is gone)."""

    def __init__(self, fail_in: str | None = None, log=None):
        self.calls: list[str] = []
        self.where: set[str] = set()
        self.exited_with: object = "not exited"
        self.fail_in = fail_in
        self.log = log

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.exited_with = exc
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(f"exit {exc}\n")

    def _hook(self, name: str) -> None:
        self.calls.append(name)
        self.where.add(f"{os.getpid()} {threading.current_thread().name}")
        if name == self.fail_in:
            raise RRMError(f"the store refused {name}")

    def on_train_start(self, cfg, data, model) -> None:
        assert isinstance(model, str) and data.digest, "the worker is sent the data's facts and the model's device"
        self._hook("start")

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self._hook(f"epoch {epoch}")

    def on_train_end(self, result) -> None:
        self._hook("end")


@pytest.fixture(params=WORKERS)
def process(request) -> bool:
    if request.param and not can_fork():
        pytest.skip("no fork on this platform")
    return request.param


def test_every_hook_runs_in_order_in_the_worker(tmp_path, digits, process):
    recorder = _Recorder()
    with BackgroundCallback(lambda: recorder, process=process) as background:
        result = train(TrainConfig(**DIGITS, out_dir=str(tmp_path)), data=digits, callbacks=[background])
    seen = background.callback
    assert seen.calls == ["start", "epoch 1", "epoch 2", "end"]
    expected = f"{background.worker.pid} MainThread" if process else f"{os.getpid()} rrm-callback"
    assert seen.where == {expected}
    assert seen.exited_with is None and result.model_path.is_file()
    assert (seen is recorder) != process, "a thread's callback is the one made; a process's, its public attributes"


def test_an_error_of_the_callback_stops_the_training_at_its_next_hook(tmp_path, digits, process):
    recorder = _Recorder(fail_in="start")
    background = BackgroundCallback(lambda: recorder, process=process)
    with pytest.raises(RRMError, match="the store refused start"), background:
        train(TrainConfig(**{**DIGITS, "epochs": 3}, out_dir=str(tmp_path)), data=digits, callbacks=[background])
    assert background.callback.calls == ["start"], "no hook after the one that failed"
    assert isinstance(background.callback.exited_with, RRMError), "its exit saw why (an MLflow run ends FAILED)"


def test_a_failing_training_reaches_the_callbacks_exit_after_its_hooks(tmp_path, digits, process):
    recorder = _Recorder()

    def stop(epoch, metrics):
        raise Stop

    stopper = type("Stopper", (), {"on_train_start": lambda *a: None, "on_epoch_end": lambda s, e, m: stop(e, m)})()
    background = BackgroundCallback(lambda: recorder, process=process)
    with pytest.raises(Stop), background:
        train(TrainConfig(**DIGITS, out_dir=str(tmp_path)), data=digits, callbacks=[background, stopper])
    assert background.callback.calls == ["start", "epoch 1"], "the queued hooks ran before the exit"
    assert isinstance(background.callback.exited_with, Stop)


def test_the_training_can_wait_for_the_start(tmp_path, digits, process):
    recorder = _Recorder(fail_in="start")
    background = BackgroundCallback(lambda: recorder, wait_for_start=True, process=process)
    with pytest.raises(RRMError), background:
        train(TrainConfig(**DIGITS, out_dir=str(tmp_path / "run")), data=digits, callbacks=[background])
    assert not (tmp_path / "run").exists(), "refused before the run directory was made"


@pytest.mark.skipif(not can_fork(), reason="no fork on this platform")
def test_the_worker_process_leaves_ctrl_c_to_the_training(tmp_path, digits):
    recorder = _Recorder()
    with BackgroundCallback(lambda: recorder, process=True) as background:
        os.kill(background.worker.pid, signal.SIGINT)  # what a Ctrl-C sends the whole process group
        time.sleep(0.2)
        train(TrainConfig(**DIGITS, out_dir=str(tmp_path)), data=digits, callbacks=[background])
    assert background.callback.calls[-1] == "end" and background.callback.exited_with is None


@pytest.mark.skipif(not can_fork(), reason="no fork on this platform")
def test_a_ctrl_c_sent_as_the_worker_forks_never_kills_it(monkeypatch):
    """The worker ignores Ctrl-C from its first instruction on. One that arrived before the worker had set that up
    killed it (a CI run's failure); the worker's first call is slowed here to hold that moment open."""
    getppid = os.getppid
    monkeypatch.setattr(os, "getppid", lambda: time.sleep(0.3) or getppid())  # forked with the worker
    background = BackgroundCallback(_Recorder, process=True)
    time.sleep(0.1)  # past the fork's own handling, which drops a signal sent sooner
    os.kill(background.worker.pid, signal.SIGINT)
    time.sleep(0.5)
    assert background.worker.is_alive(), "killed by a Ctrl-C it should have ignored"
    background.__exit__(None, None, None)


def _killed_training(log: str) -> None:
    background = BackgroundCallback(lambda: _Recorder(log=log), process=True)
    background.on_epoch_end(1, {"loss": 1.0})
    os._exit(9)  # as if killed: no exit, no word to the worker


@pytest.mark.skipif(not can_fork(), reason="no fork on this platform")
def test_a_killed_training_still_reaches_the_callbacks_exit(tmp_path):
    log = tmp_path / "log"
    training = multiprocessing.get_context("fork").Process(target=_killed_training, args=(str(log),))
    training.start()
    training.join(30)
    for _ in range(100):
        if log.is_file():
            break
        time.sleep(0.1)
    assert "exit the training process ended without ending its run" in log.read_text()


def _recorder(log: str | None = None) -> _Recorder:
    """A module function, so that a worker forked at start-up can be sent it pickled."""
    return _Recorder(log=log)


@pytest.mark.skipif(not can_fork(), reason="no fork on this platform")
def test_a_worker_forked_at_start_up_is_adopted_by_the_training(tmp_path, digits):
    workers.prestart()
    worker = workers._prestarted[0]
    with BackgroundCallback(functools.partial(_recorder)) as adopted:
        train(TrainConfig(**DIGITS, out_dir=str(tmp_path)), data=digits, callbacks=[adopted])
    assert adopted.worker is worker and workers._prestarted is None
    assert adopted.callback.calls == ["start", "epoch 1", "epoch 2", "end"]
    assert adopted.callback.where == {f"{worker.pid} MainThread"} and not worker.is_alive()


@pytest.mark.skipif(not can_fork(), reason="no fork on this platform")
def test_a_worker_forked_at_start_up_and_never_adopted_is_stopped_having_recorded_nothing(tmp_path):
    workers.prestart()
    worker, _ = workers._prestarted
    workers._discard()  # what this process's exit does
    assert not worker.is_alive() and workers._prestarted is None


def test_only_a_tracked_training_forks_its_worker_at_start_up(monkeypatch):
    from rrm.console import _tracked_training

    assert _tracked_training(["train", "--epochs", "1"])
    assert not _tracked_training(["train", "--no-track"]) and not _tracked_training(["train", "--help"])
    assert not _tracked_training(["evaluate", "model.pt"]) and not _tracked_training([])
    assert not _tracked_training(["train"]), "a bare `rrm train` prints its help"
    monkeypatch.setenv("RANK", "1")
    assert not _tracked_training(["train", "--epochs", "1"]), "torchrun's other ranks record nothing"


@pytest.mark.skipif(not can_fork(), reason="no pseudo-terminals or fork on this platform")
def test_rrm_train_on_a_terminal_says_it_is_starting_and_its_early_worker_records_the_run(tmp_path, migrated_mlflow_db):
    import pty
    import shutil
    import subprocess
    import sys

    from _helpers import copy_store, worker_env
    from mlflow import MlflowClient

    rrm = shutil.which("rrm") or str(Path(sys.executable).with_name("rrm"))
    command = [rrm, "train", "--dataset", "digits", "--model", "cnn", "--epochs", "1", "--monitor-examples", "0"]
    main, terminal = pty.openpty()
    uri = f"sqlite:///{copy_store(migrated_mlflow_db, tmp_path / 'mlflow.db')}"
    proc = subprocess.Popen(
        [*command, "--out-dir", "out"],
        cwd=tmp_path,
        stdout=terminal,
        stderr=terminal,
        env=worker_env(MLFLOW_TRACKING_URI=uri),
    )
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=300) == 0, seen
    os.close(main)
    assert seen.startswith(b"rrm train: starting\r\x1b[K"), seen[:80]  # shown, then cleared for the command's own
    assert b"training natural cnn on digits for 1 epochs: loading" in seen and b"MLflow run" in seen
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.tags["rrm.pid"] == str(proc.pid), (
        "the training's, not the worker's"
    )


@pytest.mark.skipif(not can_fork(), reason="no fork on this platform")
def test_a_worker_that_dies_stops_the_training_with_one_line(tmp_path, digits):
    recorder = _Recorder()
    background = BackgroundCallback(lambda: recorder, process=True)
    os.kill(background.worker.pid, signal.SIGKILL)
    background.worker.join()
    with pytest.raises(RRMError, match="the tracking worker process died"), background:
        train(TrainConfig(**DIGITS, out_dir=str(tmp_path)), data=digits, callbacks=[background])


@pytest.mark.skipif(not can_fork(), reason="no fork on this platform")
def test_a_factory_that_does_not_pickle_gets_a_fresh_worker(tmp_path, digits):
    workers.prestart()
    early = workers._prestarted[0]
    recorder = _Recorder()
    with BackgroundCallback(lambda: recorder) as background:
        train(TrainConfig(**DIGITS, out_dir=str(tmp_path)), data=digits, callbacks=[background])
    assert background.worker is not early and not early.is_alive() and workers._prestarted is None
    assert background.callback.calls == ["start", "epoch 1", "epoch 2", "end"]
