"""The tuning job: an Optuna study over a method's knobs, its teacher resolved once for every trial."""

from __future__ import annotations

import tempfile

from rrm.config import resolve_device
from rrm.jobs.common import Tracking
from rrm.jobs.teacher import resolve_teacher

__all__ = ["tune_job"]


def tune_job(cfg, track: Tracking = Tracking(), log=print):
    """Run the Optuna study ``cfg`` (a :class:`rrm.tune.TuneConfig`); returns its :class:`rrm.tune.TuneResult`."""
    from rrm.tune import tune

    cfg.validate()  # every input error before the teacher is pulled
    with tempfile.TemporaryDirectory() as tmp:
        teacher = resolve_teacher(cfg.train.teacher, tmp, resolve_device(cfg.train.device))
        return tune(cfg, track=track.enabled, experiment=track.experiment, log=log, teacher=teacher)
