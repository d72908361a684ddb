"""Where a study lives, and the workers that share it: storage URLs, the schema race, dead-worker clean-up.

- Storage: ``sqlite:///FILE`` (one process at a time), ``journal:FILE`` or ``FILE.log`` (several processes on one
  host), or any SQLAlchemy URL such as PostgreSQL (many hosts); opened before any trial, so a bad one fails first.
- Crashes: a trial left RUNNING by a dead worker on this host (its pid is gone), or never claimed by a worker for
  ``ORPHAN_SECONDS``, is marked FAIL before each trial; on database storages a heartbeat fails it after a grace
  period wherever its worker ran. Such trials do not count as finished, so the restart runs a replacement.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from rrm.errors import RRMError, missing_driver
from rrm.io import ensure_dir
from rrm.secrets import mask_url

HEARTBEAT_SECONDS, GRACE_SECONDS = 60, 180
SCHEMA_RACE_RETRIES = 5
# A live worker names itself on a trial milliseconds after creating it; an unnamed trial this old was orphaned.
ORPHAN_SECONDS = 30
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def storage_label(url: str) -> str:
    """The storage URL without its password (in any URL form, see :func:`rrm.secrets.mask_url`), fit for logs,
    tags and files."""
    return mask_url(url)


def _journal_path(url: str) -> Path | None:
    if url.startswith("journal:"):
        return Path(url[len("journal:") :].removeprefix("//"))
    return Path(url) if "://" not in url and url.endswith(".log") else None


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage behind ``url``, opened now so that a bad or unreachable one fails before any trial.

    ``sqlite:///FILE`` (one process at a time), ``journal:FILE`` or ``FILE.log`` (several processes on one host),
    any SQLAlchemy URL such as ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB`` (many hosts; psycopg is a
    dependency of rrm).
    """
    label = storage_label(url)
    journal = _journal_path(url)
    if journal is not None:
        try:
            journal.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        except OSError as exc:
            raise RRMError(
                f"cannot open the journal file {str(journal)!r}: {exc.strerror or exc}; check the path"
            ) from None
    if "://" not in url:
        if url.endswith((".db", ".sqlite", ".sqlite3")):
            url = f"sqlite:///{url}"
        else:
            raise RRMError(
                f"storage {label!r} is not a URL; use sqlite:///FILE.db, journal:FILE.log or "
                "postgresql://USER:PASSWORD@HOST:PORT/DB"
            )
    engine_kwargs: dict = {}
    if url.startswith("sqlite:///"):
        ensure_dir(Path(url[len("sqlite:///") :]).parent)  # one line, not a traceback, when it cannot be made
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable host fails in seconds
    try:
        for attempt in range(SCHEMA_RACE_RETRIES + 1):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the heartbeat options are marked experimental
                    return optuna.storages.RDBStorage(
                        url,
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=HEARTBEAT_SECONDS,
                        grace_period=GRACE_SECONDS,
                    )
            except Exception as exc:
                # Workers started together on an empty database race to create Optuna's tables; the losers see
                # "already exists" or a duplicate key. The winner's schema is there a moment later: open again.
                text = _database_message(exc)
                if attempt == SCHEMA_RACE_RETRIES or not any(m in text for m in ("already exists", "duplicate key")):
                    raise
                time.sleep(0.5 + random.random())
    except ImportError as exc:
        raise missing_driver(f"storage {label}", exc) from None
    except Exception as exc:
        text = " ".join(mask_url(_database_message(exc)).split())[:300]  # SQLAlchemy quotes a URL it cannot parse
        if "Can't load plugin" in text:
            raise RRMError(
                f"storage {label}: unknown database kind {url.split(':')[0]!r}; use sqlite:///FILE.db, "
                "journal:FILE.log or postgresql://USER:PASSWORD@HOST:PORT/DB"
            ) from None
        raise RRMError(
            f"cannot open the Optuna storage {label}: {text}; check the URL and that the database server is running"
        ) from None


def storage_lost(exc: BaseException, label: str) -> RRMError | None:
    """The one-line error for a database storage that stopped answering in the middle of a study, or None when
    ``exc`` is something else. The study keeps what it stored; a rerun continues it (:func:`abandon_dead_trials`
    fails the trial that was running, and the worker runs a replacement)."""
    from sqlalchemy.exc import DBAPIError

    seen = exc  # in the chain: Optuna 5 may raise an UnboundLocalError of its own while handling the lost database
    while seen is not None and not isinstance(seen, DBAPIError):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    text = " ".join(mask_url(_database_message(seen)).split())[:160]
    return RRMError(
        f"the Optuna storage {label} stopped answering ({text}); the study keeps every trial it finished: once the "
        "database answers again, rerun the same command to continue where it stopped"
    )


def _database_message(exc: BaseException) -> str:
    """The database driver's own message where SQLAlchemy wrapped it (``exc.orig``), else the exception's."""
    return str(getattr(exc, "orig", None) or exc)


# -------------------------------------------------------------------------------------------------------- workers


def this_worker() -> dict:
    """This process, as trials name the worker that runs them (``rrm.worker``)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(owner: dict | None) -> bool:
    """Whether the worker running a trial is alive; only this host's processes can be checked."""
    if not owner:
        return False  # asked for but never started: its worker died at once
    if owner.get("host") != socket.gethostname():
        return True  # the database heartbeat fails it if its worker died
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_finished(trial: FrozenTrial) -> bool:
    """Complete, pruned, or failed by its own error (a diverged loss, say); not abandoned by a dead worker."""
    return trial.state in _FINISHED or (trial.state == TrialState.FAIL and "rrm.error" in trial.user_attrs)


def abandon_dead_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Mark FAIL the trials left RUNNING by workers of this host that died, and trials that never got an owner
    (their worker died between creating and starting them); returns them."""
    dead = []
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("rrm.worker")
        orphan = owner is None and (now - trial.datetime_start).total_seconds() > ORPHAN_SECONDS
        if orphan or (owner is not None and not _alive(owner)):
            with contextlib.suppress(RuntimeError, ValueError):  # another worker got there first
                study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                dead.append(trial)
    return dead


def trial_counts(study: optuna.Study) -> tuple[int, int]:
    """(finished trials, trials running in live workers)."""
    trials = study.get_trials(deepcopy=False)
    running = sum(t.state == TrialState.RUNNING and _alive(t.user_attrs.get("rrm.worker")) for t in trials)
    return sum(map(is_finished, trials)), running
