"""A callback run in a worker thread (how `rrm train` records its MLflow run): every hook runs, in order, in one
other thread; what it raises stops the training at its next hook; a failing training still reaches its exit."""

from __future__ import annotations

import threading

import pytest

from rrm.background import BackgroundCallback
from rrm.errors import RRMError
from rrm.train import TrainConfig, train

DIGITS = dict(dataset="digits", model="cnn", method="natural", epochs=2, monitor_examples=0, progress=False)


class _Recorder:
    """A callback context manager that records its hooks, their thread, and how it was exited."""

    def __init__(self, fail_in: str | None = None):
        self.calls: list[str] = []
        self.threads: set[str] = set()
        self.exited_with: object = "not exited"
        self.fail_in = fail_in

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.exited_with = exc

    def _hook(self, name: str) -> None:
        self.calls.append(name)
        self.threads.add(threading.current_thread().name)
        if name == self.fail_in:
            raise RRMError(f"the store refused {name}")

    def on_train_start(self, cfg, data, model) -> None:
        self._hook("start")

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self._hook(f"epoch {epoch}")

    def on_train_end(self, result) -> None:
        self._hook("end")


def test_every_hook_runs_in_order_in_the_worker(tmp_path, digits):
    recorder = _Recorder()
    with BackgroundCallback(lambda: recorder) as background:
        result = train(TrainConfig(**DIGITS, out_dir=str(tmp_path)), data=digits, callbacks=[background])
    assert recorder.calls == ["start", "epoch 1", "epoch 2", "end"]
    assert recorder.threads == {"rrm-callback"} and background.callback is recorder
    assert recorder.exited_with is None and result.model_path.is_file()


def test_an_error_of_the_callback_stops_the_training_at_its_next_hook(tmp_path, digits):
    recorder = _Recorder(fail_in="start")
    with pytest.raises(RRMError, match="the store refused start"), BackgroundCallback(lambda: recorder) as background:
        train(TrainConfig(**{**DIGITS, "epochs": 3}, out_dir=str(tmp_path)), data=digits, callbacks=[background])
    assert recorder.calls == ["start"], "no hook after the one that failed"
    assert isinstance(recorder.exited_with, RRMError), "its exit saw why (an MLflow run ends FAILED)"


def test_a_failing_training_reaches_the_callbacks_exit_after_its_hooks(tmp_path, digits):
    recorder = _Recorder()

    class Stop(Exception):
        pass

    def stop(epoch, metrics):
        raise Stop

    stopper = type("Stopper", (), {"on_train_start": lambda *a: None, "on_epoch_end": lambda s, e, m: stop(e, m)})()
    with pytest.raises(Stop), BackgroundCallback(lambda: recorder) as background:
        train(TrainConfig(**DIGITS, out_dir=str(tmp_path)), data=digits, callbacks=[background, stopper])
    assert recorder.calls == ["start", "epoch 1"], "the queued hooks ran before the exit"
    assert isinstance(recorder.exited_with, Stop)


def test_the_training_can_wait_for_the_start(tmp_path, digits):
    recorder = _Recorder(fail_in="start")
    with pytest.raises(RRMError), BackgroundCallback(lambda: recorder, wait_for_start=True) as background:
        train(TrainConfig(**DIGITS, out_dir=str(tmp_path / "run")), data=digits, callbacks=[background])
    assert not (tmp_path / "run").exists(), "refused before the run directory was made"
