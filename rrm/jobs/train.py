"""The training job: the teacher resolved once, the run recorded in MLflow by a worker process."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import tempfile
from pathlib import Path

from rrm.errors import RRMError, unknown
from rrm.jobs.common import Tracking, tracking
from rrm.jobs.teacher import resolve_teacher
from rrm.models import Teacher
from rrm.tracking.uri import check_sqlite_directory, is_local_store, tracking_uri

__all__ = ["train_job"]


def train_job(cfg, track: Tracking = Tracking(), teacher_pin: str | os.PathLike | None = None):
    """Train ``cfg`` (a :class:`rrm.train.TrainConfig`), teacher resolved from the registry where it is a URI and
    checked against ``teacher_pin`` where given (:func:`teacher_file`).

    Returns the :class:`rrm.train.TrainResult` and the MLflow run id (None when not tracked, on ranks other than
    the first under torchrun: only rank 0 records the run, and when the tracking store stopped answering during
    training: the run was left unfinished, which a warning on stderr has said).
    """
    from rrm.data import load_dataset
    from rrm.models import ARCHITECTURES
    from rrm.train import get_method, train
    from rrm.train.basics import progress_shown, start_line
    from rrm.train.distributed import is_main

    cfg.validate()
    method = get_method(cfg.method)
    if cfg.model not in ARCHITECTURES:
        raise unknown("model", cfg.model, ARCHITECTURES)
    if is_main() and progress_shown(cfg.progress):  # before the store, the data and the teacher: seconds
        print(start_line(cfg), file=sys.stderr, flush=True)
    takes_teacher = method.needs_teacher or bool(cfg.transplant)
    if teacher_pin is not None and not takes_teacher:
        raise RRMError(
            f"--teacher-pin checks a teacher, and method {cfg.method!r} takes none (rrm, kd, kdiga or --transplant "
            "do); drop it"
        )
    # A store that does not answer fails now, before data and model load. A local store (SQLite) cannot go away:
    # MLflow is imported and the run started by a worker process while the data loads and the training runs.
    local = is_local_store(tracking_uri())
    if track.enabled and is_main():
        if local:
            check_sqlite_directory(tracking_uri())
        else:
            tracking().check_store("starting the MLflow run")
    with tempfile.TemporaryDirectory() as tmp:
        # resolved once (pulled, pinned, loaded); the trainer builds its frozen copy after seeding
        teacher = resolve_teacher(cfg.teacher, tmp, "cpu", teacher_pin) if takes_teacher and cfg.teacher else None
        if not track.enabled or not is_main():
            # a fresh training is not the one a tracked run recorded: never resume that run
            if is_main() and not (cfg.resume or cfg.resume_or_start):
                (Path(cfg.out_dir) / "mlflow_run.json").unlink(missing_ok=True)  # rrm.tracking.callback.RUN_FILE
            return train(cfg, data=load_dataset(cfg.dataset), teacher=teacher), None
        from rrm.tracking.worker import BackgroundCallback

        # a resumed training must know which run it continues before it goes on, a server that it answers
        wait = cfg.resume or cfg.resume_or_start or not local
        # The worker starts here (or was forked at start-up: rrm.console), before the data: MLflow loads beside the
        # data, the model and torch's compiler.
        # the teacher as the run records it, without its weights: the factory travels pickled to the worker
        record = dataclasses.replace(teacher, model=None) if teacher is not None else None
        tracker = functools.partial(_mlflow_callback, track.experiment, track.run_name, record, track.recipe)
        with BackgroundCallback(tracker, wait_for_start=wait) as background:
            result = train(cfg, data=load_dataset(cfg.dataset), teacher=teacher, callbacks=[background])
    recorded = background.callback
    return result, None if recorded.unfinished else recorded.run_id


def _mlflow_callback(experiment: str, run_name: str | None, teacher: Teacher | None, recipe: str | None = None):
    """A training's MLflow callback, made in its worker (:mod:`rrm.tracking.worker`; a module function, so it
    pickles)."""
    return tracking().MlflowCallback(experiment=experiment, run_name=run_name, teacher=teacher, recipe=recipe)
