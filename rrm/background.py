"""A training callback run in a worker thread, so that slow bookkeeping overlaps the training instead of adding to it.

MLflow tracking of a small training costs seconds that have nothing to do with the model: importing MLflow and its
database layer, opening the store, writing the run. :class:`BackgroundCallback` builds the callback and runs every
hook in one worker thread, in order; the training thread only queues them (torch releases the interpreter lock in its
kernels, so the worker gets on meanwhile). At the end of training it waits until the worker has run every hook.

What the callback raises reaches the training thread at its next hook (an epoch's end, or the end of training), so a
run that cannot be recorded still stops the command with its one-line error, and the callback's own exit (the run
ended FAILED or KILLED) still runs when the training fails or is interrupted.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from rrm.data import ImageData
from rrm.models import Classifier
from rrm.train import Callback, TrainConfig, TrainResult

_END = object()


class BackgroundCallback(Callback):
    """Run the hooks of the callback ``make()`` returns (a context manager, entered in the worker) in a worker thread.

    Use it as a context manager around :func:`rrm.train.train`. ``wait_for_start``: the training waits until the
    callback's ``on_train_start`` has run (e.g. when it must decide which run a resumed training continues). After
    the ``with`` block, :attr:`callback` is the callback, every hook run.
    """

    def __init__(self, make: Callable[[], Any], *, wait_for_start: bool = False):
        self.callback: Any = None
        self._wait_for_start = wait_for_start
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._failure: BaseException | None = None  # what stopped the training thread, for the callback's exit
        self._thread = threading.Thread(target=self._work, args=(make,), name="rrm-callback", daemon=True)

    def __enter__(self) -> BackgroundCallback:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._failure = exc
        self._queue.put(_END)
        self._thread.join()
        if exc is None:
            self._raise()

    def _work(self, make: Callable[[], Any]) -> None:
        entered = None
        try:
            entered = make()
            self.callback = entered.__enter__()
        except BaseException as error:  # handed to the training thread
            self._error = error
        while True:
            item = self._queue.get()
            try:
                if item is _END:
                    break
                if self._error is None:
                    hook, args = item
                    getattr(self.callback, hook)(*args)
            except BaseException as error:  # handed to the training thread
                self._error = error
            finally:
                self._queue.task_done()
        if entered is not None:
            stopped = self._error or self._failure
            try:
                entered.__exit__(type(stopped) if stopped else None, stopped, None)
            except BaseException as error:  # handed to the training thread
                self._error = self._error or error

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _call(self, hook: str, *args: object, wait: bool = False) -> None:
        self._raise()
        self._queue.put((hook, args))
        if wait:
            self._queue.join()
            self._raise()

    def on_train_start(self, cfg: TrainConfig, data: ImageData, model: Classifier) -> None:
        self._call("on_train_start", cfg, data, model, wait=self._wait_for_start)

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self._call("on_epoch_end", epoch, dict(metrics))

    def on_train_end(self, result: TrainResult) -> None:
        self._call("on_train_end", result, wait=True)
