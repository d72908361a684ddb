"""Jobs: what each command does, as plain functions over typed configs.

A job resolves registry URIs, loads data and models, runs the library function and records the result. The command
line, the DVC stages (through the command line) and the MLproject entry points only parse their input and call a job,
so all three behave the same. One module per job family; MLflow is imported only by jobs that track or read the
registry.
"""

from __future__ import annotations

from rrm.jobs.common import FAIL_FAST_ENV, Tracking, is_registry_uri, require, tracking
from rrm.jobs.data import RobustifyConfig, prepare_job, robustify_job
from rrm.jobs.evaluate import EVALUATE_FORMATS, EvaluateJob, Evaluation, ProbeConfig, evaluate_job, probe_job
from rrm.jobs.report import ReportConfig, report_job
from rrm.jobs.teacher import load_model_ref, resolve_teacher, teacher_file
from rrm.jobs.train import train_job
from rrm.jobs.tune import tune_job

__all__ = [
    "EVALUATE_FORMATS",
    "FAIL_FAST_ENV",
    "EvaluateJob",
    "Evaluation",
    "ProbeConfig",
    "ReportConfig",
    "RobustifyConfig",
    "Tracking",
    "evaluate_job",
    "is_registry_uri",
    "load_model_ref",
    "prepare_job",
    "probe_job",
    "report_job",
    "require",
    "resolve_teacher",
    "robustify_job",
    "teacher_file",
    "tracking",
    "train_job",
    "tune_job",
]
