"""Every run in MLflow and reusable teachers in its model registry; the only package that imports mlflow.

One module per concern:

- :mod:`rrm.tracking.uri`: where runs go (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``), without MLflow;
- :mod:`rrm.tracking.store`: one-line errors, experiments, context tags, params, logging a model, ending runs;
- :mod:`rrm.tracking.callback`: :class:`MlflowCallback`, one run per training;
- :mod:`rrm.tracking.registry`: teachers in the model registry and their model card;
- :mod:`rrm.tracking.evaluations`: evaluations as runs linked to their training run;
- :mod:`rrm.tracking.studies`: tuning studies' parent runs, and report files.

The names below are imported from their module when first used, so that importing :mod:`rrm.tracking.uri` (to check
a store before training) does not import MLflow, which takes seconds.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "MlflowCallback": "callback",
    "log_evaluation": "evaluations",
    "DEFAULT_TEACHER_NAME": "registry",
    "TeacherVersion": "registry",
    "list_teachers": "registry",
    "load_registered_model": "registry",
    "promote": "registry",
    "pull_teacher": "registry",
    "pull_teacher_version": "registry",
    "register_teacher": "registry",
    "show_teacher": "registry",
    "DEFAULT_EXPERIMENT": "store",
    "DEFAULT_TRACKING_URI": "uri",
    "tracking_uri": "uri",
    "log_report": "studies",
    "open_study_run": "studies",
    "update_run": "studies",
}
_MODULES = ("callback", "evaluations", "registry", "store", "studies", "uri", "cleanup", "card")

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"rrm.tracking.{_WHERE[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"rrm.tracking.{name}")
    raise AttributeError(f"module 'rrm.tracking' has no attribute {name!r}")
