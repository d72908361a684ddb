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
from rrm.jobs.runs import clean_runs_job
from rrm.jobs.teacher import (
    list_teachers_job,
    load_model_ref,
    promote_teacher_job,
    pull_teacher_job,
    register_teacher_job,
    resolve_teacher,
    show_teacher_job,
    teacher_file,
)
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
    "clean_runs_job",
    "evaluate_job",
    "is_registry_uri",
    "list_teachers_job",
    "load_model_ref",
    "prepare_job",
    "probe_job",
    "promote_teacher_job",
    "pull_teacher_job",
    "register_teacher_job",
    "report_job",
    "require",
    "resolve_teacher",
    "robustify_job",
    "show_teacher_job",
    "teacher_file",
    "tracking",
    "train_job",
    "tune_job",
]
