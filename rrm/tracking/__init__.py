"""Every run in MLflow and reusable teachers in its model registry; the only package that imports mlflow.

One module per concern:

- :mod:`rrm.tracking.store`: where runs go (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``), one-line errors,
  experiments, context tags, params, logging a model, ending runs;
- :mod:`rrm.tracking.callback`: :class:`MlflowCallback`, one run per training;
- :mod:`rrm.tracking.registry`: teachers in the model registry and their model card;
- :mod:`rrm.tracking.evaluations`: evaluations as runs linked to their training run;
- :mod:`rrm.tracking.studies`: tuning studies' parent runs, and report files.
"""

from rrm.tracking.callback import MlflowCallback
from rrm.tracking.evaluations import log_evaluation
from rrm.tracking.registry import (
    DEFAULT_TEACHER_NAME,
    TeacherVersion,
    list_teachers,
    load_registered_model,
    promote,
    pull_teacher,
    pull_teacher_version,
    register_teacher,
    show_teacher,
)
from rrm.tracking.store import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, tracking_uri
from rrm.tracking.studies import log_report, open_study_run, update_run

__all__ = [
    "DEFAULT_EXPERIMENT",
    "DEFAULT_TEACHER_NAME",
    "DEFAULT_TRACKING_URI",
    "MlflowCallback",
    "TeacherVersion",
    "list_teachers",
    "load_registered_model",
    "log_evaluation",
    "log_report",
    "open_study_run",
    "promote",
    "pull_teacher",
    "pull_teacher_version",
    "register_teacher",
    "show_teacher",
    "tracking_uri",
    "update_run",
]
