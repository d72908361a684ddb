"""A training callback run in a worker process, so that slow bookkeeping overlaps the training instead of adding to it.

MLflow tracking of a small training costs seconds of CPU that have nothing to do with the model: importing MLflow and
its database layer, opening the store, writing the run. In a thread of the training process that work would hold the
interpreter lock against the training's own Python (imports of torch's compiler, the optimizer's steps), so
:class:`BackgroundCallback` forks a worker process as soon as it is made, before the data load: the worker builds the
callback (MLflow imports there, on another core) while the training loads its data and model. The training only sends
each hook's arguments down a pipe; the data and the model travel as the few facts a recorder reads (name, digest,
source; device), and the worker's warnings come back up to be written on the training's stderr. Where fork is not
available (macOS, Windows), the worker is a thread, with the same protocol.

What the callback raises reaches the training at its next hook (an epoch's end, or the end of training), so a run that
cannot be recorded still stops the command with its one-line error. The callback's own exit (the run ended FAILED or
KILLED) runs when the training fails or is interrupted: the worker ignores Ctrl-C and SIGTERM and is told by the
training, and a training process that dies without a word (killed) reaches it too, as an end of the pipe.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import io
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from rrm.errors import RRMError
from rrm.tracking.environment import OWNER_PID_ENV, configure

if TYPE_CHECKING:  # this module loads before torch does (rrm.console), so the training's types are for checkers only
    from rrm.data import ImageData
    from rrm.models import Classifier
    from rrm.train import TrainConfig, TrainResult

__all__ = ["BackgroundCallback", "can_fork", "prestart"]

_END = "end"
_DIED = "the tracking worker process died; the training's files are written, its MLflow run may be RUNNING"


def can_fork() -> bool:
    """Whether the worker can be a forked process (Linux; fork is unsafe on macOS and absent on Windows)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def _pickles(value: object) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:
        return False


def _sendable(value: BaseException | None) -> BaseException | None:
    """``value`` if it pickles, else an :class:`RRMError` with its text (exceptions with custom constructors)."""
    return value if _pickles(value) else RRMError(f"{type(value).__name__}: {value}")


def _public(callback: Any) -> SimpleNamespace:
    """The callback's public attributes that pickle (what the training may read once the worker is gone)."""
    return SimpleNamespace(**{k: v for k, v in vars(callback).items() if not k.startswith("_") and _pickles(v)})


class _Relay(io.TextIOBase):
    """A worker process's stderr: its warnings go down the pipe, and the training writes them to its own stderr
    (a captured one, in tests and notebooks, as much as a terminal)."""

    def __init__(self, conn):
        self._conn = conn

    def write(self, text: str) -> int:
        self._conn.send(("say", text))
        return len(text)


def _warm() -> None:
    """What a worker forked at start-up loads before it is given its callback: rrm's training callback and MLflow
    with its database layer (imports only: nothing is written until the training has checked its input)."""
    with contextlib.suppress(BaseException):  # the callback's own making says what fails, where it is made
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (the local store's layer: a second of imports)

        import rrm.tracking.callback  # noqa: F401  (imports MLflow)


_STOPS = {signal.SIGINT, signal.SIGTERM}


def _serve(make: Callable[[], Any] | None, conn, other_end, in_process: bool, keep: Callable | None) -> None:
    """The worker: build and enter the callback, run each hook received, exit it, say how it went. A worker
    started without ``make`` (:func:`prestart`) loads what it will need, then waits to be given it; it exits
    quietly, having recorded nothing, if its training goes on without it."""
    if in_process:
        os.environ[OWNER_PID_ENV] = str(os.getppid())  # the run's process (rrm.tracking.stale reads it)
        other_end.close()  # so that the training's death reads as the end of the pipe
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the training decides
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # blocked across the fork (_start): one sent then is dropped
        sys.stderr = _Relay(conn)
    configure()  # MLflow's settings, before it loads here
    if make is None:
        _warm()
        try:
            _, make = conn.recv()  # ("make", the callback's factory)
        except (EOFError, OSError):
            return
    error: BaseException | None = None
    entered = callback = None
    try:
        entered = make()
        callback = entered.__enter__()
    except BaseException as exc:  # handed to the training
        error = exc
    reported = False
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            failure: BaseException | None = RRMError("the training process ended without ending its run (killed?)")
            break
        if message[0] == _END:
            failure = message[1]
            break
        hook, args, reply = message
        if error is None:
            try:
                getattr(callback, hook)(*args)
            except BaseException as exc:  # handed to the training
                error = exc
        if error is not None and not reported:
            conn.send(("error", _sendable(error)))
            reported = True
        if reply:
            conn.send(("ack", None))
    if entered is not None:
        stopped = error or failure
        try:
            entered.__exit__(type(stopped) if stopped else None, stopped, None)
        except BaseException as exc:
            error = error or exc
    if keep is not None:  # a thread hands its callback over
        keep(callback)
    with contextlib.suppress(OSError):  # the training is gone
        conn.send(("done", (None if reported else _sendable(error), _public(callback) if in_process else None)))


def _start(make: Callable[[], Any] | None, in_process: bool, keep: Callable | None = None) -> tuple[Any, Any]:
    """A worker (a forked process, or a thread) serving ``make``'s callback, and the training's end of its pipe."""
    conn, child = multiprocessing.Pipe()
    args = (make, child, conn, in_process, keep)
    if in_process:
        worker = multiprocessing.get_context("fork").Process(target=_serve, args=args, name="rrm-callback", daemon=True)
    else:
        worker = threading.Thread(target=_serve, args=args, name="rrm-callback", daemon=True)
    # blocked until the worker process ignores them: a Ctrl-C right after the fork must not kill it
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS if in_process else ())
    try:
        worker.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # one sent meanwhile reaches the training now
    if in_process:
        child.close()  # the worker's end lives on in the worker alone
    return worker, conn


_prestarted: tuple[Any, Any] | None = None  # (process, connection): a worker forked at start-up, not yet adopted


def prestart() -> None:
    """Fork a worker now, at a command's start, before torch loads: it imports MLflow on another core while the
    command loads torch, its data and its model, and this process's next :class:`BackgroundCallback` adopts it (its
    factory then travels pickled). A worker never adopted is stopped when this process exits."""
    global _prestarted
    if _prestarted is not None or not can_fork():
        return
    _prestarted = _start(None, in_process=True)
    atexit.register(_discard)


def _discard() -> None:
    """Stop a prestarted worker that no training adopted (it has recorded nothing)."""
    global _prestarted
    if _prestarted is not None:
        worker, conn = _prestarted
        _prestarted = None
        conn.close()
        worker.kill()
        worker.join()


class BackgroundCallback:
    """Run the hooks of the callback ``make()`` returns (a context manager, entered in the worker) in a worker.

    Use it as a context manager around :func:`rrm.train.train`; the worker starts when this object is made, so make
    it before loading data. ``wait_for_start``: the training waits until the callback's ``on_train_start`` has run
    (e.g. when it must decide which run a resumed training continues). ``process``: fork a worker process (default:
    where fork is available) or use a thread. After the ``with`` block, :attr:`callback` is the callback (a thread's)
    or its public attributes (a process's), every hook run.
    """

    def __init__(self, make: Callable[[], Any], *, wait_for_start: bool = False, process: bool | None = None):
        self.callback: Any = None
        self.in_process = can_fork() if process is None else process
        self._wait_for_start = wait_for_start
        self._error: BaseException | None = None
        self._data: SimpleNamespace | None = None  # the data's facts, from the start of training
        global _prestarted
        if self.in_process and _prestarted is not None and _pickles(make):  # the worker forked at start-up
            (self.worker, self._conn), _prestarted = _prestarted, None
            self._conn.send(("make", make))
            return
        _discard()  # a thread was asked for, or a factory that does not pickle: a fresh worker instead
        self.worker, self._conn = _start(make, self.in_process, None if self.in_process else self._keep)

    def _keep(self, callback: Any) -> None:
        self.callback = callback

    def __enter__(self) -> BackgroundCallback:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._conn.send((_END, _sendable(exc)))
            error, state = self._receive(until="done")
            self._error = self._error or error
            if self.in_process:
                self.callback = state
        except (EOFError, OSError):
            self._error = self._error or RRMError(_DIED)
        self.worker.join()
        if exc is None:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _receive(self, until: str | None = None) -> Any:
        """Read the worker's messages: those waiting, or (``until``) up to the first of that kind, whose value it
        returns. Its warnings go to stderr; its first error is kept for the next hook."""
        while until or self._conn.poll():
            kind, value = self._conn.recv()
            if kind == "say":
                sys.stderr.write(value)
            elif kind == "error":
                self._error = self._error or value
            if kind == until:
                return value
        return None

    def _call(self, hook: str, *args: object, wait: bool = False) -> None:
        try:
            self._receive()
            self._raise()
            self._conn.send((hook, args, wait))
            if wait:
                self._receive(until="ack")
        except (EOFError, OSError):
            self._error = self._error or RRMError(_DIED)
        self._raise()

    def on_train_start(self, cfg: TrainConfig, data: ImageData, model: Classifier) -> None:
        # what a recorder reads of the data (its digest hashes every image: once), kept for the end of training
        self._data = SimpleNamespace(name=data.name, digest=data.digest, source=dict(data.source))
        device = str(next(model.parameters()).device)
        self._call("on_train_start", cfg, self._data, device, wait=self._wait_for_start)

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self._call("on_epoch_end", epoch, dict(metrics))

    def on_train_end(self, result: TrainResult) -> None:
        self._call("on_train_end", dataclasses.replace(result, model=None, data=self._data), wait=True)
