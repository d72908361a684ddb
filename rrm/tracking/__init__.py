"""Every run in MLflow and reusable teachers in its model registry; the only package that imports mlflow.

One module per concern:

- :mod:`rrm.tracking.uri`: where runs go (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``), without MLflow;
- :mod:`rrm.tracking.environment`: MLflow's settings (fail fast, no password printed, quiet loggers), without MLflow;
- :mod:`rrm.tracking.connection`: the store's client and its failures as one-line errors;
- :mod:`rrm.tracking.runs`: experiments, the tags that say where a run came from, how a run ends;
- :mod:`rrm.tracking.stale`: the process that owns a run, and runs whose process died;
- :mod:`rrm.tracking.flatten`: options and results as params and metrics;
- :mod:`rrm.tracking.logged_models`: each training run's model as an MLflow logged model, and the run that made a
  model file;
- :mod:`rrm.tracking.notes`: what a training run found, in one paragraph (its note in ``mlflow ui``);
- :mod:`rrm.tracking.worker`: a training callback run in a worker process, beside the training (without MLflow);
- :mod:`rrm.tracking.callback`: :class:`MlflowCallback`, one run per training;
- :mod:`rrm.tracking.aliases`: the registry's rule for aliases, without MLflow;
- :mod:`rrm.tracking.versions`, :mod:`rrm.tracking.pull`, :mod:`rrm.tracking.registry`, :mod:`rrm.tracking.card`,
  :mod:`rrm.tracking.cleanup`: teachers in the model registry: their records, pulling them, registering them, their
  model card, what killed registrations left;
- :mod:`rrm.tracking.evaluations`: evaluations as runs linked to their training run;
- :mod:`rrm.tracking.leaderboard`: an experiment's training runs as a table, per run or over seeds;
- :mod:`rrm.tracking.studies`: tuning studies' parent runs, and report files.

The names below are imported from their module when first used (``lazy_loader``, as in :mod:`rrm.jobs`), so that
importing :mod:`rrm.tracking.uri` (to check a store before training) or the worker does not import MLflow, which
takes seconds. MLflow's settings are made before it is first imported through here, and again before each store
call.
"""

from __future__ import annotations

import lazy_loader

from rrm.tracking.environment import configure

_getattr, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=[
        "aliases",
        "callback",
        "card",
        "cleanup",
        "connection",
        "environment",
        "evaluations",
        "flatten",
        "leaderboard",
        "logged_models",
        "notes",
        "pull",
        "registry",
        "runs",
        "stale",
        "studies",
        "uri",
        "versions",
        "worker",
    ],
    submod_attrs={
        "callback": ["MlflowCallback"],
        "evaluations": ["log_evaluation"],
        "versions": ["DEFAULT_TEACHER_NAME", "TeacherVersion"],
        "registry": ["list_teachers", "promote", "register_teacher", "show_teacher"],
        "pull": ["load_registered_model", "pull_teacher", "pull_teacher_version"],
        "runs": ["DEFAULT_EXPERIMENT"],
        "stale": ["StaleRuns", "check_store", "clean_stale_runs"],
        "uri": ["DEFAULT_TRACKING_URI", "tracking_uri"],
        "studies": ["log_report", "open_study_run", "update_run"],
    },
)


def __getattr__(name: str):
    configure()  # MLflow's settings, before a module that imports it loads
    return _getattr(name)
