"""Jobs: what each command does, as plain functions over typed configs.

A job resolves registry URIs, loads data and models, runs the library function and records the result. The command
line, the DVC stages (through the command line) and the MLproject entry points only parse their input and call a job,
so all three behave the same. One module per job family, imported when one of its names is first used (so importing
the package loads no torch); MLflow is imported only by jobs that track or read the registry.
"""

from __future__ import annotations

import lazy_loader

# Each name loads its module when first used (SPEC 1): the command line imports this package without torch.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "common": ["FAIL_FAST_ENV", "Tracking", "check_alias", "is_registry_uri", "require", "tracking"],
        "data": ["RobustifyConfig", "prepare_job", "robustify_job"],
        "evaluate": ["EVALUATE_FORMATS", "EvaluateJob", "Evaluation", "ProbeConfig", "evaluate_job", "probe_job"],
        "report": ["ReportConfig", "report_job", "show_report"],
        "runs": ["clean_runs_job", "runs_table_job"],
        "teacher": [
            "list_teachers_job",
            "load_model_ref",
            "promote_teacher_job",
            "pull_teacher_job",
            "register_teacher_job",
            "resolve_teacher",
            "show_teacher_job",
            "teacher_file",
        ],
        "train": ["train_job"],
        "tune": ["tune_job"],
    },
)
